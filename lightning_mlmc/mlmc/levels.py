"""MLMC levels: the level-function protocol of the driver and the coupled diffusion level sampler.

Level l runs the sampler with M^l fine steps; level l > Lmin returns the coupled difference
P_l - P_(l-1), whose coarse path uses every M-th fine time, shares x_T and y with the fine path, and
builds its noise from the M fine noises (``coarse_noise_weights``). As in pymlmc, a level function
``levels(l, N, batch_index, rank) -> LevelSums`` is all the driver needs, plus what it knows about itself
(``M``, ``lmin``, ``pixels``, ``cost``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch

from lightning_mlmc.diffusion import StepCoefficients, advance, step_coefficients
from lightning_mlmc.errors import InputError, NumericalError
import lightning_mlmc.mlmc.engine as engine
from lightning_mlmc.mlmc.coupling import Coupling, check_coupling, check_data_std, coarse_noise_weights
from lightning_mlmc.mlmc.payoffs import apply_payoff, make_payoff
from lightning_mlmc.mlmc.sums import LevelSums
from lightning_mlmc.sampling import (Model, NoiseSource, StartDistribution, Streams, check_sampler, gaussian_start,
                                     pair_means)
from lightning_mlmc.schedule import TimeGrid, VPSchedule

Tensor = torch.Tensor


def check_M(M) -> int:
    if int(M) != M or M < 2:
        raise InputError(f"M: expected an integer >= 2, got {M}")
    return int(M)


def level_cost(M: int, level: int, lmin: int) -> float:
    """NFEs per sample of a level: M^l fine plus M^(l-1) coarse steps, M^lmin at the plain level Lmin."""
    return float(M**level + (M ** (level - 1) if level > lmin else 0))


@runtime_checkable
class LevelFunction(Protocol):
    """What the MLMC driver calls: ``levels(l, n, batch_index, rank) -> LevelSums`` of n samples of level l
    from the noise stream (batch_index, rank), and what it knows about itself."""

    M: int  # refinement factor
    lmin: int  # the coarsest level (a plain, uncoupled estimator)
    pixels: int  # payoff components

    def cost(self, level: int) -> float:
        """Cost per sample of a level (NFEs for the diffusion levels)."""

    def __call__(self, level: int, n: int, batch_index: int = 0, rank: int = 0) -> LevelSums: ...


@dataclass(frozen=True)
class UserLevels:
    """A plain level function (pymlmc style) with what the driver needs to know about it.

    Args:
        fn: ``fn(level, n, batch_index, rank) -> LevelSums`` (``LevelSums.from_payoffs(pf, pc, cost)``
            builds the sums from n fine and coarse payoffs; ``pc`` is None at Lmin). Use ``batch_index``
            and ``rank`` to pick independent random streams.
        M: refinement factor; lmin: coarsest level.
        cost: cost per sample of a level (default M^l + M^(l-1), M^lmin at Lmin).
        pixels: payoff components (probed with 2 samples on a stream no estimate uses when omitted).
    """

    fn: Callable[..., LevelSums]
    M: int = 2
    lmin: int = 0
    cost_fn: Callable[[int], float] | None = None
    pixels: int = 0

    def __post_init__(self):
        check_M(self.M)
        if self.pixels <= 0:
            object.__setattr__(self, "pixels", self.fn(self.lmin, 2, Streams.PROBE_BATCH, 0).pixels)

    def cost(self, level: int) -> float:
        return self.cost_fn(level) if self.cost_fn is not None else level_cost(self.M, level, self.lmin)

    def __call__(self, level: int, n: int, batch_index: int = 0, rank: int = 0) -> LevelSums:
        return self.fn(level, n, batch_index, rank)


class CoupledLevelSampler:
    """Draws coupled (fine, coarse) sampler paths for a level; the level function of the MLMC driver.

    Args:
        model: eps-predictor ``model(x_t, y, t)``; y: observation (leading batch dim 1).
        shape: event shape of one sample.
        M: refinement factor; lmin: the coarsest level (plain, uncoupled).
        sampler: ``"ddpm"`` or ``"ddim"`` (the deterministic sampler couples through x_T alone).
        coupling: ``"naive"`` (sum / sqrt(M), the default: 25-35% smaller V_l at fine levels, exactly on the
            Gaussian oracle for every grid and measured on the trained digits model, benchmarks/mlmc_grids.py)
            or ``"weighted"`` (the seed's variance-coefficient weights), or ``"jacobian"`` (weights carried by
            the full step Jacobian for Gaussian data of per-pixel std ``data_std``; see
            ``coarse_noise_weights``).
        data_std: the ``jacobian`` coupling's data scale (0.5: images in [-1, 1]).
        payoff: per-pixel payoff (see ``make_payoff``).
        seed: base seed; each (level, batch, rank) has its own stream.
        antithetic: a sample is the mean of an antithetic pair of paths (noise z and -z: the start and every
            step's draw, fine and coarse); N_l counts pairs and the cost counts both paths.
    """

    def __init__(self, model: Model, y: Tensor | None, shape, *, M: int = 2, lmin: int = 0,
                 sampler: str = "ddpm", coupling: Coupling = "naive", data_std: float = 0.5, payoff="second_moment",
                 start: StartDistribution | None = None, grid: TimeGrid | None = None,
                 schedule: VPSchedule | None = None, seed: int = 0, dtype=torch.float64, device="cpu",
                 antithetic: bool = False):
        self.model, self.y, self.shape = model, y, tuple(shape)
        self.antithetic = bool(antithetic)
        self.M, self.lmin = check_M(M), int(lmin)
        self.sampler, self.coupling = check_sampler(sampler), check_coupling(coupling)
        self.data_std = check_data_std(data_std)
        self.payoff = make_payoff(payoff) if not callable(payoff) or isinstance(payoff, str) else payoff
        self.start = start or gaussian_start()
        self.grid, self.schedule = grid or TimeGrid(), schedule or VPSchedule()
        self.seed, self.dtype, self.device = int(seed), dtype, device
        # Payoff components (n for per-pixel payoffs, 2n for moments), found by applying it once.
        self.pixels = int(apply_payoff(self.payoff, torch.zeros(1, int(np.prod(self.shape)))).shape[1])
        self._coef: dict[int, StepCoefficients] = {}
        self._weights: dict[int, list[list[float]]] = {}

    def with_payoff(self, payoff) -> "CoupledLevelSampler":
        """The same levels with another payoff (a callable (N, n) -> (N, k); sharing this sampler's caches)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.payoff = payoff
        copy.pixels = int(apply_payoff(payoff, torch.zeros(1, int(np.prod(self.shape)))).shape[1])
        return copy

    def with_lmin(self, lmin: int) -> "CoupledLevelSampler":
        """The same levels with another coarsest level (sharing this sampler's caches)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.lmin = int(lmin)
        return copy

    @property
    def paths(self) -> int:
        """Paths per sample: 2 with antithetic pairs (a sample is the pair mean), else 1."""
        return 2 if self.antithetic else 1

    def cost(self, level: int) -> float:
        """NFEs per sample: M^l + M^(l-1), or M^l at Lmin (twice that with antithetic pairs)."""
        return self.paths * level_cost(self.M, level, self.lmin)

    def plain_cost(self, level: int) -> float:
        """NFEs of one plain sample of P_l (the sequential sampler with M^l steps; a pair of them with
        antithetic pairs)."""
        return float(self.paths * self.M**level)

    @property
    def scheme(self) -> dict:
        """The scheme these levels run (recorded in MLMC results)."""
        return {"grid": self.grid.kind, "rho": self.grid.rho, "coupling": self.coupling, "sampler": self.sampler,
                "antithetic": self.antithetic, **({"data_std": self.data_std} if self.coupling == "jacobian" else {})}

    def level_sums(self, x_f: Tensor, x_c: Tensor | None, calls: int) -> LevelSums:
        """The sums of one batch's finished paths (payoffs on the CPU, float64); with antithetic pairs a sample
        is the pair mean of rows (i, i + n) of both paths (the single fine paths are summed too)."""
        pf = apply_payoff(self.payoff, x_f).cpu()
        pc = None if x_c is None else apply_payoff(self.payoff, x_c).cpu()
        if not self.antithetic:
            return LevelSums.from_payoffs(pf, pc, calls)
        return LevelSums.from_payoffs(pair_means(pf), None if pc is None else pair_means(pc), calls, single=pf)

    def coefficients(self, steps: int) -> StepCoefficients:
        """The step coefficients of the grid with ``steps`` steps (cached)."""
        if steps not in self._coef:
            times = self.grid.times(steps, self.start.t, self.schedule)
            self._coef[steps] = step_coefficients(times, self.sampler == "ddpm", self.schedule)
        return self._coef[steps]

    def coarse_weights(self, steps: int) -> list[list[float]]:
        """The coarse-noise weights of every coarse step of a fine grid with ``steps`` steps (cached)."""
        if steps not in self._weights:
            cf = self.coefficients(steps)
            self._weights[steps] = [coarse_noise_weights(cf, j, self.M, self.coupling, self.data_std).tolist()
                                    for j in range(steps // self.M)]
        return self._weights[steps]

    def steppers(self, level: int, n: int, batch_index: int = 0, rank: int = 0, plain: bool = False) -> "CoupledPaths":
        """One batch of level ``level`` as an engine stepper (``engine.run`` advances many together)."""
        return CoupledPaths(self, level, n, batch_index, rank, plain)

    def __call__(self, level: int, n: int, batch_index: int = 0, rank: int = 0) -> LevelSums:
        """Sums over ``n`` coupled samples of level ``level`` from stream (seed, level, batch_index, rank)."""
        paths = self.steppers(level, n, batch_index, rank)
        engine.run([paths], self.model, self.y)
        return paths.sums()


class CoupledPaths:
    """The fine and coarse paths of one batch of a level (plain paths at Lmin, or when ``plain``), one reverse
    step per network evaluation: fine and coarse rows are evaluated together at a coarse step's start (they
    share its time), the coarse step's noise is built from the fine noises of its sub-steps.

    All randomness comes from the batch's own stream (seed, level, batch_index, rank), so the paths do not
    depend on what else the engine evaluates with them."""

    def __init__(self, sampler: CoupledLevelSampler, level: int, n: int, batch_index: int, rank: int, plain: bool):
        self.sampler, self.level, self.n = sampler, level, n * sampler.paths  # n samples: n pairs of paths, or n
        self.noise = NoiseSource(sampler.seed, (self.n, *sampler.shape), stream=(level, batch_index, rank),
                                 dtype=sampler.dtype, device=sampler.device, antithetic=sampler.antithetic)
        self.M, self.steps = sampler.M, sampler.M**level
        self.coupled = level > sampler.lmin and not plain
        self.cf = sampler.coefficients(self.steps)
        self.cc = sampler.coefficients(self.steps // self.M) if self.coupled else None
        self.weights = sampler.coarse_weights(self.steps) if self.coupled else None
        self.x_f = sampler.start.sample(self.noise.start())
        self.x_c = self.x_f.clone() if self.coupled else None
        self.k, self.calls, self.xi_c, self.eps_c = 0, 0, None, None

    @property
    def remaining(self) -> int:
        return self.steps - self.k

    def _both(self) -> bool:
        return self.coupled and self.k % self.M == 0

    def rows(self) -> int:
        return 2 * self.n if self._both() else self.n

    def inputs(self) -> tuple[Tensor, Tensor]:
        x = torch.cat([self.x_f, self.x_c]) if self._both() else self.x_f
        return x, torch.full((x.shape[0],), float(self.cf.t[self.k]), dtype=torch.float64, device=x.device)

    def consume(self, eps: Tensor) -> None:
        k, cf = self.k, self.cf
        j, i = divmod(k, self.M) if self.coupled else (k, 0)
        self.calls += eps.shape[0]
        if self._both():
            eps, self.eps_c = eps[: self.n], eps[self.n :]
        xi = self.noise.step(k) if cf.noise[k] > 0 else None
        if self.coupled and xi is not None:
            w = self.weights[j][i]
            self.xi_c = w * xi if self.xi_c is None else self.xi_c + w * xi
        self.x_f = advance(self.x_f, eps, cf, k, xi)
        if not torch.isfinite(self.x_f).all():
            raise NumericalError(f"non-finite values (NaN or Inf) in the fine path at level {self.level}, "
                                 f"step {k} (t = {float(cf.t[k]):.6g})")
        if self.coupled and i == self.M - 1:
            self.x_c = advance(self.x_c, self.eps_c, self.cc, j, self.xi_c)
            if not torch.isfinite(self.x_c).all():
                raise NumericalError(f"non-finite values (NaN or Inf) in the coarse path at level {self.level}, "
                                     f"coarse step {j} (t = {float(self.cc.t[j]):.6g})")
            self.xi_c = self.eps_c = None
        self.k += 1

    def sums(self) -> LevelSums:
        """The level sums of the finished paths (``CoupledLevelSampler.level_sums``)."""
        return self.sampler.level_sums(self.x_f, self.x_c, self.calls)
