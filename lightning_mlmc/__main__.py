"""``python -m lightning_mlmc <command>``: the same command line as ``lightning-mlmc`` (so
``torchrun -m lightning_mlmc mlmc ...`` runs MLMC over ranks)."""

import sys

from lightning_mlmc.cli import main

if __name__ == "__main__":
    sys.exit(main())
