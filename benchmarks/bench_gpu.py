from torchquant.bench.gpu import main

main()
