"""MNIST, FashionMNIST and CIFAR-10 through torchvision (files under ``root``; ``download`` needs a network)."""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from datamodules.base import InverseProblemDataModule, split_indices
from lightning_mlmc.errors import InputError

DATASETS = {
    "mnist": ("MNIST", (1, 28, 28)),
    "fashion_mnist": ("FashionMNIST", (1, 28, 28)),
    "cifar10": ("CIFAR10", (3, 32, 32)),
}


class TorchvisionDataModule(InverseProblemDataModule):
    """A torchvision dataset scaled to [-1, 1]: train/val split of the official training set, official test set.

    Args:
        dataset: ``mnist``, ``fashion_mnist`` or ``cifar10``.
        root: folder holding (or receiving) the torchvision files.
        download: fetch missing files (needs a network); off by default.
        val_size: images held out of the training set for validation.
        limit: use only the first ``limit`` training images (quick experiments); 0 = all.
        (others: see ``InverseProblemDataModule``)
    """

    def __init__(self, operator: dict, dataset: Literal["mnist", "fashion_mnist", "cifar10"] = "mnist",
                 root: str = "data", download: bool = False, val_size: int = 5000, limit: int = 0,
                 batch_size: int = 128, num_workers: int = 0, seed: int = 0, num_val_observations: int = 16):
        if dataset not in DATASETS:
            raise InputError(f"data.dataset: unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
        self.dataset, self.root, self.download = dataset, str(root), bool(download)
        self.val_size, self.limit = int(val_size), int(limit)
        self.image_shape = DATASETS[dataset][1]
        super().__init__(operator, batch_size, num_workers, seed, num_val_observations)

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._open(train)

    def _open(self, train: bool):
        import torchvision

        cls = getattr(torchvision.datasets, DATASETS[self.dataset][0])
        try:
            return cls(self.root, train=train, download=self.download)
        except RuntimeError as e:
            if self.download:
                raise InputError(f"data.download: could not download {self.dataset} into {self.root!r}: {e}") from None
            raise InputError(
                f"data.root: {self.dataset} files not found under {os.path.abspath(self.root)!r} and download is "
                f"false; set data.init_args.download=true on a machine with a network, or use the bundled "
                f"digits (configs/digits_superres.yaml, DigitsDataModule)"
            ) from None

    def _images(self, train: bool) -> Tensor:
        data = self._open(train).data
        x = torch.as_tensor(data)
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W) uint8
        return x.float() / 127.5 - 1.0

    def load_splits(self) -> tuple[Tensor, Tensor, Tensor]:
        full = self._images(True)
        if self.val_size >= len(full):
            raise InputError(f"data.val_size: {self.val_size} leaves no training images out of {len(full)}")
        train, val, _ = split_indices(len(full), self.val_size, 0, self.seed)
        train = train[: self.limit] if self.limit > 0 else train
        return full[train].contiguous(), full[val].contiguous(), self._images(False)
