"""`python -m openelm_mlx.train`: the PyTorch reference trainer (`openelm_mlx.reference.train`, the torch wing)."""

import sys

from .reference.train import main

if __name__ == "__main__":
    sys.exit(main())
