from torchquant.bench.models import main

main()
