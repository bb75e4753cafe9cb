"""Lightning callbacks that run the MLMC and Picard samplers at validation time and log UQ dashboards."""

from callbacks.mlmc_callback import MLMCCallback
from callbacks.picard_callback import PicardCallback

__all__ = ["MLMCCallback", "PicardCallback"]
