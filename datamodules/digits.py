"""scikit-learn's ``load_digits``: 1797 real 8x8 handwritten digits, bundled (no download)."""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.base import InverseProblemDataModule, split_indices


class DigitsDataModule(InverseProblemDataModule):
    """8x8 digits scaled from [0, 16] to [-1, 1]; fixed split by ``seed`` (``val_size``/``test_size`` images).

    See ``InverseProblemDataModule`` for the shared arguments.
    """

    image_shape = (1, 8, 8)

    def __init__(self, operator: dict, batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 num_val_observations: int = 16, val_size: int = 180, test_size: int = 180):
        super().__init__(operator, batch_size, num_workers, seed, num_val_observations)
        self.val_size, self.test_size = int(val_size), int(test_size)

    def load_splits(self) -> tuple[Tensor, Tensor, Tensor]:
        from sklearn.datasets import load_digits

        images = torch.as_tensor(load_digits().images, dtype=torch.float32)  # (1797, 8, 8) in [0, 16]
        x = (images / 8.0 - 1.0)[:, None]
        train, val, test = split_indices(len(x), self.val_size, self.test_size, self.seed)
        return x[train], x[val], x[test]
