"""`python -m openelm_mlx.prepare_data`: pre-training data preparation (in the torch wing:
`openelm_mlx.reference.prepare_data`)."""

from . import cli
from .reference.prepare_data import main

if __name__ == "__main__":
    cli.exit_process(main())
