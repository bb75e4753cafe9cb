"""Shared datamodule machinery: clean images in, (x, y) batches out through an inverse-problem operator."""

from __future__ import annotations

import abc
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_mlmc.errors import InputError
from lightning_mlmc.operators import Operator, operator_from_config


class ObserveBatch:
    """collate_fn drawing y = A(x) + noise for a batch of clean images (fresh noise every epoch).

    The noise comes from torch's global generator of the loading process, which
    ``seed_everything(workers=True)`` seeds, so training runs are reproducible.
    """

    def __init__(self, operator: Operator):
        self.operator = operator

    def __call__(self, items) -> tuple[Tensor, Tensor]:
        x = torch.stack([item[0] for item in items])
        return x, self.operator.observe(x)


class InverseProblemDataModule(pl.LightningDataModule, abc.ABC):
    """Base class: subclasses set ``image_shape`` and implement ``load_splits() -> (train, val, test)``.

    Args:
        operator: the operator as a dict, ``{"name": "superres" | "denoise" | "inpaint" | "matrix", ...}``
            with its parameters (see ``lightning_mlmc.operators``); ``shape`` is filled in from the data
            (if given, it must match).
        batch_size: training and evaluation batch size.
        num_workers: DataLoader workers.
        seed: fixes the split and the validation/test observations.
        num_val_observations: how many fixed validation observations the UQ callbacks get.
    """

    image_shape: tuple[int, ...] = ()

    def __init__(self, operator: dict, batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 num_val_observations: int = 16):
        super().__init__()
        if batch_size < 1:
            raise InputError(f"data.batch_size: expected >= 1, got {batch_size}")
        if num_workers < 0:
            raise InputError(f"data.num_workers: expected >= 0, got {num_workers}")
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.num_val_observations = int(num_val_observations)
        if not isinstance(operator, dict):
            raise InputError(f"data.operator: expected a mapping with a name, got {operator!r}")
        config = dict(operator)
        given = config.pop("shape", None)
        if given is not None and tuple(int(s) for s in given) != tuple(self.image_shape):
            raise InputError(f"data.operator.shape: {list(given)} does not match the data's image shape "
                             f"{list(self.image_shape)}")
        self.operator = operator_from_config({**config, "shape": list(self.image_shape)})
        self._splits: dict[str, Tensor] | None = None
        self._observed: dict[str, Tensor] = {}

    def operator_config(self) -> dict:
        """The operator config that LightningCLI links into ``model.operator``."""
        return self.operator.config()

    @abc.abstractmethod
    def load_splits(self) -> tuple[Tensor, Tensor, Tensor]:
        """The clean (train, val, test) images, each (N, *image_shape) in [-1, 1]."""

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        train, val, test = self.load_splits()
        for name, x in (("train", train), ("val", val), ("test", test)):
            self.operator.check_input(x)
        self._splits = {"train": train, "val": val, "test": test}
        # Fixed observations for evaluation, one generator per split.
        for i, name in enumerate(("val", "test")):
            g = torch.Generator().manual_seed(self.seed * 1000 + 17 + i)
            self._observed[name] = self.operator.observe(self._splits[name], g)

    def split(self, name: str) -> Tensor:
        self.setup()
        return self._splits[name]

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.split("train")), batch_size=self.batch_size, shuffle=True,
                          drop_last=len(self.split("train")) >= self.batch_size, num_workers=self.num_workers,
                          collate_fn=ObserveBatch(self.operator), persistent_workers=self.num_workers > 0)

    def _fixed_loader(self, name: str) -> DataLoader:
        return DataLoader(TensorDataset(self.split(name), self._observed[name]), batch_size=self.batch_size,
                          num_workers=self.num_workers)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def validation_observations(self, n: int | None = None) -> tuple[Tensor, Tensor]:
        """The first ``n`` (default ``num_val_observations``) validation images and their fixed observations."""
        self.setup()
        n = self.num_val_observations if n is None else int(n)
        return self._splits["val"][:n], self._observed["val"][:n]


def split_indices(n: int, n_val: int, n_test: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """A fixed random split of range(n) into train/val/test by ``seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]
