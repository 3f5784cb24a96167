from torchquant.bench.gemm_cpu import main

main()
