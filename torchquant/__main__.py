"""`python -m torchquant`: the torchquant command line."""
import sys

from torchquant.cli import main

if __name__ == "__main__":
    sys.exit(main())
