"""Per-level sample sums, the statistics Giles' algorithm reads from them, and their reduction across ranks.

Vector payoffs (n pixels): ``mean`` is the RMS over pixels of the per-pixel mean of Y_l, ``var`` the mean
over pixels of the per-pixel variance (DESIGN.md section 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
SUM_NAMES = ("y1", "y2", "y3", "y4", "f1", "f2", "c1", "c2", "nz", "s0", "s1", "s2")


@dataclass
class LevelSums:
    """Per-pixel sums over samples of Y = P_f - P_c (powers 1-4), of P_f and P_c (powers 1-2), the count of
    samples whose Y is not zero (``nz``: a discontinuous payoff's level differences are mostly exactly zero, and
    a variance resting on one or two of them cannot be trusted), with costs. With antithetic pairs a sample is
    a pair mean; ``s0``, ``s1``, ``s2`` count and sum the single fine paths (both members of every pair), so
    plain MC without pairs can be priced too.

    Attributes:
        n: samples summed.
        sums: name (``SUM_NAMES``) -> float64 tensor of shape (pixels,).
        calls: network evaluations actually made (sample rows passed to the model).
    """

    n: int
    sums: dict
    calls: int

    @classmethod
    def zeros(cls, pixels: int) -> "LevelSums":
        return cls(0, {k: torch.zeros(pixels, dtype=torch.float64) for k in SUM_NAMES}, 0)

    def add(self, other: "LevelSums") -> None:
        self.n += other.n
        self.calls += other.calls
        for k in SUM_NAMES:
            self.sums[k] = self.sums[k] + other.sums[k]

    @classmethod
    def from_payoffs(cls, pf: Tensor, pc: Tensor | None, calls: int, single: Tensor | None = None) -> "LevelSums":
        """Sums of N samples: fine payoffs ``pf`` (N, k) and coarse ``pc`` (None at the coarsest level);
        ``single``: the payoffs of the single fine paths when a sample is an antithetic pair mean (2N, k)."""
        y = pf if pc is None else pf - pc
        pc = torch.zeros_like(pf) if pc is None else pc
        single = pf if single is None else single
        s = {"y1": y.sum(0), "y2": (y**2).sum(0), "y3": (y**3).sum(0), "y4": (y**4).sum(0),
             "f1": pf.sum(0), "f2": (pf**2).sum(0), "c1": pc.sum(0), "c2": (pc**2).sum(0),
             "nz": (y != 0).sum(0).to(y.dtype), "s0": torch.full_like(pf[0], float(single.shape[0])),
             "s1": single.sum(0), "s2": (single**2).sum(0)}
        return cls(pf.shape[0], s, calls)

    @property
    def pixels(self) -> int:
        return int(self.sums["y1"].numel())


@dataclass
class LevelStats:
    """Statistics of one level; ``to_json`` of a result keeps the DESIGN.md keys ``level, n_samples, mean,
    var, cost`` and the diagnostics."""

    level: int
    n_samples: int
    mean: float  # RMS over pixels of the per-pixel mean of Y_l
    var: float  # mean over pixels of the per-pixel variance of Y_l
    cost: float  # NFEs per sample from the formula
    mean_fine: float  # RMS over pixels of E[P_l]
    var_fine: float  # mean over pixels of V[P_l]
    kurtosis: float
    calls: int  # network evaluations counted
    mean_debiased: float = math.nan  # sqrt(mean over pixels of E[Y_l]^2) without the noise floor V_l / N_l
    var_plain: float = math.nan  # V[P_l] pooled over every path with P_l's law (fine of l, coarse of l + 1)
    nonzero: float = math.nan  # samples whose Y_l is not exactly zero (pixel mean)
    check: float = 0.0  # Giles' consistency check against the level below (RMS over pixels)
    floored: bool = False  # no variation seen: the driver used Giles' floors for its mean and variance


def varies(central2: Tensor, second: Tensor) -> Tensor:
    """The pixels whose kurtosis the power sums can give: a variance above 1e-6 of the mean square. The fourth
    central moment is m4 - 4 m3 m1 + 6 m2 m1^2 - 3 m1^4, whose rounding error is about 1e-16 m1^4; below this
    threshold it swamps central2^2 (a pixel nearly constant next to its mean, as an antithetic pair mean of an
    affine chain is, read a kurtosis of 1e15)."""
    return central2 > 1e-6 * second.abs() + 1e-300


def level_stats(level: int, s: LevelSums, cost: float) -> LevelStats:
    n = max(s.n, 1)
    m1, m2 = s.sums["y1"] / n, s.sums["y2"] / n
    m3, m4 = s.sums["y3"] / n, s.sums["y4"] / n
    var = (m2 - m1**2).clamp_min(0.0)
    f1, f2 = s.sums["f1"] / n, s.sums["f2"] / n
    central4 = m4 - 4 * m3 * m1 + 6 * m2 * m1**2 - 3 * m1**4
    ok = varies(var, m2)
    kurt = float((central4[ok] / var[ok] ** 2).mean()) if ok.any() else 0.0
    return LevelStats(level, s.n, float(m1.pow(2).mean().sqrt()), float(var.mean()), cost,
                      float(f1.pow(2).mean().sqrt()), float((f2 - f1**2).clamp_min(0).mean()), kurt, s.calls,
                      nonzero=float(s.sums["nz"].mean()))


# ----------------------------------------------------------------------------------------------
# Across ranks (torch.distributed, e.g. Lightning DDP): each rank draws its share with its own stream.


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def world_size() -> int:
    dist = _dist()
    return 1 if dist is None else dist.get_world_size()


def is_rank_zero() -> bool:
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def rank_share(n: int) -> tuple[int, int]:
    """(this rank's share of n samples, rank); (n, 0) outside torch.distributed."""
    dist = _dist()
    if dist is None:
        return n, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    return n // world + (1 if rank < n % world else 0), rank


def reduction_device() -> torch.device:
    """Where the process group reduces: the current CUDA device under NCCL (it has no CPU backend), else the
    CPU."""
    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(s: LevelSums) -> LevelSums:
    """The sums over every rank (the identity outside torch.distributed), reduced on the process group's
    device and returned on the CPU."""
    dist = _dist()
    if dist is None:
        return s
    keys = list(SUM_NAMES)
    flat = torch.cat([s.sums[k] for k in keys] + [torch.tensor([s.n, s.calls], dtype=torch.float64)])
    flat = flat.to(reduction_device())
    dist.all_reduce(flat)
    flat = flat.cpu()
    p = s.sums["y1"].numel()
    sums = {k: flat[i * p : (i + 1) * p].clone() for i, k in enumerate(keys)}
    return LevelSums(int(flat[-2].item()), sums, int(flat[-1].item()))
