"""`python -m torchquant`: the torchquant command line."""
import os
import sys

from torchquant.cli import main

if __name__ == "__main__":
    # `python -m` puts the working directory first on the import path, where a file such as matplotlib.py would
    # shadow the installed package when the command imports it; MODEL specs find modules there without it
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    sys.exit(main())
