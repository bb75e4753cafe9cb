"""Lightning callbacks that run the MLMC and Picard samplers at validation time and log UQ dashboards."""

from callbacks.ema import FusedEMA
from callbacks.mlmc_callback import MLMCCallback
from callbacks.picard_callback import PicardCallback

__all__ = ["FusedEMA", "MLMCCallback", "PicardCallback"]
