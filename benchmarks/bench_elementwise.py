from torchquant.bench.elementwise import main

main()
