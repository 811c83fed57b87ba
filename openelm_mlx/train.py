"""`python -m openelm_mlx.train`: the PyTorch reference trainer (`openelm_mlx.reference.train`, the torch wing)."""

from . import cli
from .reference.train import main

if __name__ == "__main__":
    cli.exit_process(main())
