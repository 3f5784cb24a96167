from torchquant.bench.layers import main

main()
