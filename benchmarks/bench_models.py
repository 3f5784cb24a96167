"""Real models (MiniLM, digits CNN, ResNet-style stages) vs float and torch.ao: see torchquant/bench/models.py."""
from torchquant.bench.models import main

main()
