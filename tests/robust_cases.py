"""Level functions with known means that a driver tuned on smooth problems can get wrong: rare large
outliers on the coarse levels (heavy tails that a small pilot does not see)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lightning_mlmc.mlmc import LevelFunction, LevelSums
from lightning_mlmc.sampling import derive_seed


@dataclass(frozen=True)
class RareOutliers(LevelFunction):
    """Levels whose coarse approximations are occasionally far off, as a sampler with too few steps is.

    P_l = mu + b 2^-l + G + c sum_(k<=l) 2^-k Z_k + A 4^-l S 1{U < q} 1{l < clean}, with G, Z_k, a random sign
    S and U shared by the fine and coarse path of a level (so Y_l = P_l - P_(l-1) is small, but carries the
    outliers' change below ``clean``). E[P_l] = mu + b 2^-l exactly, so E[P] = mu; the outlier term is symmetric
    (a sample that saw none has no shift either), with variance A^2 16^-l q and kurtosis 1 / q: a pilot of a
    few dozen samples rarely sees one, a run of thousands does.
    Cost as the diffusion levels: 2^l plain, 2^l + 2^(l-1) coupled (M = 2).
    """

    mu: float = 1.0
    b: float = 1.0
    c: float = 1.0
    A: float = 400.0
    q: float = 1e-3
    clean: int = 4
    M: int = 2
    lmin: int = 0
    seed: int = 0
    pixels: int = 1

    exact = property(lambda self: self.mu)

    def cost(self, level: int) -> float:
        return float(2**level + (2 ** (level - 1) if level > self.lmin else 0))

    def plain_cost(self, level: int) -> float:
        return float(2**level)

    can_change_lmin = True

    def with_lmin(self, lmin: int) -> "RareOutliers":
        return replace(self, lmin=int(lmin))

    def path(self, level: int, g: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """P_level of the draws (``u`` in (-1, 1): its sign is S, |u| < q an outlier)."""
        weights = torch.tensor([2.0 ** -(k + 1) for k in range(level)], dtype=torch.float64)
        out = self.mu + self.b * 2.0**-level + g + self.c * (z[:, :level] * weights).sum(1)
        if level < self.clean:
            out = out + self.A * 4.0**-level * torch.sign(u) * (u.abs() < self.q).to(torch.float64)
        return out

    def __call__(self, level: int, n: int, batch_index: int = 0, rank: int = 0) -> LevelSums:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, level, batch_index, rank))
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        z = torch.randn(n, max(level, 1), generator=gen, dtype=torch.float64)
        u = 2.0 * torch.rand(n, generator=gen, dtype=torch.float64) - 1.0
        fine = self.path(level, g, z, u)
        coarse = self.path(level - 1, g, z, u) if level > self.lmin else None
        return LevelSums.from_payoffs(fine[:, None], None if coarse is None else coarse[:, None], n * 2**level)
