"""LightningDataModules for lightning-mlmc (they import ``lightning_mlmc``; never the reverse)."""

from datamodules.analytic import AnalyticDataModule
from datamodules.base import InverseProblemDataModule
from datamodules.digits import DigitsDataModule
from datamodules.torchvision_data import TorchvisionDataModule

__all__ = ["AnalyticDataModule", "DigitsDataModule", "InverseProblemDataModule", "TorchvisionDataModule"]
