"""Training data drawn from an analytic problem's Gaussian-mixture prior (exact scores to compare with)."""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.base import InverseProblemDataModule
from lightning_mlmc.errors import InputError
from lightning_mlmc.problems import AnalyticSpec, prior_mixture


def sample_prior(spec: AnalyticSpec, n: int, generator: torch.Generator) -> Tensor:
    """n draws from the spec's prior mixture, shape (n, *spec.shape), float32."""
    return prior_mixture(spec).sample(n, generator).float().reshape(n, *spec.shape)


class AnalyticDataModule(InverseProblemDataModule):
    """x ~ the spec's prior, y = A x + noise_std eta with the spec's matrix and noise_std.

    A network trained here can be compared with the exact diffused-posterior score
    (``ExactPosteriorEps``) of the same problem. The operator is the spec's dense matrix.

    Args:
        spec: path of the analytic spec JSON (DESIGN.md section 3).
        num_train, num_val, num_test: sizes of the drawn splits.
    """

    def __init__(self, spec: str, num_train: int = 20000, num_val: int = 1000, num_test: int = 1000,
                 batch_size: int = 256, num_workers: int = 0, seed: int = 0, num_val_observations: int = 16):
        self.spec_path = str(spec)
        self.spec = AnalyticSpec.load(self.spec_path)
        self.image_shape = tuple(self.spec.shape)
        if min(num_train, num_val, num_test) < 1:
            raise InputError("data.num_train/num_val/num_test: expected >= 1")
        self.sizes = (int(num_train), int(num_val), int(num_test))
        operator = {"name": "matrix", "matrix": self.spec.matrix.tolist(), "noise_std": self.spec.noise_std}
        super().__init__(operator, batch_size, num_workers, seed, num_val_observations)

    def load_splits(self) -> tuple[Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        x = sample_prior(self.spec, sum(self.sizes), g)
        a, b = self.sizes[0], self.sizes[0] + self.sizes[1]
        return x[:a], x[a:b], x[b:]
