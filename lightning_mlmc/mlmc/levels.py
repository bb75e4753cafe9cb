"""MLMC levels of a diffusion sampler: the coupled level sampler (a ``protocol.LevelFunction``).

Level l runs the sampler with M^l fine steps; level l > Lmin returns the coupled difference
P_l - P_(l-1), whose coarse path uses every M-th fine time, shares x_T and y with the fine path, and
builds its noise from the M fine noises (``coarse_noise_weights``).

Levels over networks as well as steps: with a cheaper ``coarse_model`` (a distilled student) and a switch
level s, the levels below s are the student's (M^l steps), level s is the teacher minus the student on one
grid of M^(s-1) steps with the same noise (it does not refine the grid: ``refines(s)`` is False), and the
levels above are the teacher's on M^(l-1) steps. The sum telescopes to E[P_teacher] on the finest grid:

    E[P^S_lmin] + sum_(lmin < l < s) E[P^S_l - P^S_(l-1)] + E[P^T_(s-1) - P^S_(s-1)] + sum_(l > s) E[P^T_(l-1) - P^T_(l-2)]

(subscripts: log_M of the steps). Each batch's rows name their network, and the engine evaluates each
network's rows in one call. Costs are in teacher NFEs, a student row counting its FLOPs relative to a teacher
row's (``network_cost.flops_per_row``).
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_mlmc.diffusion import StepCoefficients
from lightning_mlmc.errors import InputError, NumericalError
import lightning_mlmc.mlmc.engine as engine
from lightning_mlmc.mlmc.coupling import Coupling, check_coupling, check_data_std, coarse_noise_weights
from lightning_mlmc.mlmc.payoffs import apply_payoff, make_payoff
from lightning_mlmc.mlmc.protocol import NFE, LevelFunction, UserLevels, check_M, level_cost  # noqa: F401 (re-exported)
from lightning_mlmc.mlmc.sums import LevelSums
from lightning_mlmc.samplers import DEFAULT_SAMPLER, GridSteps, SamplerName, get_sampler
from lightning_mlmc.sampling import Model, NoiseSource, StartDistribution, gaussian_start, pair_means
from lightning_mlmc.schedule import TimeGrid, VPSchedule

Tensor = torch.Tensor


class CoupledLevelSampler(LevelFunction):
    """Draws coupled (fine, coarse) sampler paths for a level; the level function of the MLMC driver.

    Args:
        model: eps-predictor ``model(x_t, y, t)``; y: observation (leading batch dim 1).
        shape: event shape of one sample.
        M: refinement factor; lmin: the coarsest level (plain, uncoupled).
        sampler: a sampler of the registry (``lightning_mlmc.samplers``): ``"ddpm"`` (the default), ``"ddim"`` or
            ``"dpm2m"`` (a deterministic sampler couples through x_T alone).
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
        coarse_model: a cheaper eps-predictor for the levels below ``switch`` (a distilled student; None: one
            network); switch: the level between the two networks (>= 1); coarse_cost: a coarse-model row's
            cost in teacher rows (default: the ratio of their FLOPs per row, measured on first use).
    """

    batched = True
    can_change_lmin = True

    def __init__(self, model: Model, y: Tensor | None, shape, *, M: int = 2, lmin: int = 0,
                 sampler: SamplerName = DEFAULT_SAMPLER, coupling: Coupling = "naive", data_std: float = 0.5,
                 payoff="second_moment",
                 start: StartDistribution | None = None, grid: TimeGrid | None = None,
                 schedule: VPSchedule | None = None, seed: int = 0, dtype=torch.float64, device="cpu",
                 antithetic: bool = False, coarse_model: Model | None = None, switch: int | None = None,
                 coarse_cost: float | None = None):
        self.model, self._y, self.shape = model, y, tuple(shape)
        self.coarse_model, self.switch, self._coarse_cost = check_networks(coarse_model, switch, coarse_cost)
        self.antithetic = bool(antithetic)
        self.M, self.lmin = check_M(M), int(lmin)
        self.spec, self.coupling = get_sampler(sampler), check_coupling(coupling)
        self.sampler = self.spec.name
        self.data_std = check_data_std(data_std)
        self.payoff = make_payoff(payoff) if not callable(payoff) or isinstance(payoff, str) else payoff
        self.start = start or gaussian_start()
        self.grid, self.schedule = grid or TimeGrid(), schedule or VPSchedule()
        self.seed, self.dtype, self.device = int(seed), dtype, device
        # Payoff components (n for per-pixel payoffs, 2n for moments), found by applying it once.
        self.pixels = int(apply_payoff(self.payoff, torch.zeros(1, int(np.prod(self.shape)))).shape[1])
        self._steps: dict[int, GridSteps] = {}
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

    def with_switch(self, switch: int) -> "CoupledLevelSampler":
        """The same two networks with another switch level."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.switch = check_networks(self.coarse_model, switch, self._coarse_cost)[1]
        return copy

    def teacher_levels(self) -> "CoupledLevelSampler":
        """The teacher's own one-network levels (the coarse network dropped)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.coarse_model, copy.switch = None, None
        return copy

    def coarse_levels(self) -> "CoupledLevelSampler":
        """The coarse network's own one-network levels (automatic Lmin's pilot of a two-network run; costs in
        coarse-network NFEs)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.model, copy.coarse_model, copy.switch = self.coarse_model, None, None
        return copy

    @property
    def y(self) -> Tensor | None:
        return self._y

    @property
    def networks(self) -> dict:
        """The networks rows name: ``model`` (the teacher) and, with levels over networks, ``coarse``."""
        return {"model": self.model, **({"coarse": self.coarse_model} if self.coarse_model is not None else {})}

    @property
    def cost_unit(self) -> str:
        return NFE if self.coarse_model is None else TEACHER_NFE

    def fine_network(self, level: int) -> str:
        return "coarse" if self.switch is not None and level < self.switch else "model"

    def coarse_network(self, level: int) -> str:
        return "coarse" if self.switch is not None and level <= self.switch else "model"

    def steps(self, level: int) -> int:
        """Fine steps of a level: M^l, or M^(l-1) from the switch level up."""
        return self.M ** (level - 1 if self.switch is not None and level >= self.switch else level)

    def refines(self, level: int) -> bool:
        return self.switch is None or level != self.switch

    def coarse_steps(self, level: int) -> int:
        return self.steps(level) // self.M if self.refines(level) else self.steps(level)

    def row_cost(self, network: str) -> float:
        """A row's cost in teacher rows (1 for the teacher; the FLOPs ratio for the coarse model)."""
        if network == "model":
            return 1.0
        if self._coarse_cost is None:
            self._coarse_cost = relative_flops(self.coarse_model, self.model, self.shape, self._y, self.dtype, self.device)
        return self._coarse_cost

    def cost(self, level: int) -> float:
        """Cost per sample: M^l + M^(l-1) NFEs, or M^l at Lmin (twice that with antithetic pairs); with levels
        over networks each path's steps weighted by its network's ``row_cost``."""
        if self.switch is None:
            return self.paths * level_cost(self.M, level, self.lmin)
        fine = self.steps(level) * self.row_cost(self.fine_network(level))
        coarse = self.coarse_steps(level) * self.row_cost(self.coarse_network(level)) if level > self.lmin else 0.0
        return self.paths * (fine + coarse)

    def plain_cost(self, level: int) -> float:
        """Cost of one plain sample of P_l (the sequential sampler with the level's fine steps on its fine
        network; a pair of them with antithetic pairs)."""
        return float(self.paths * self.steps(level) * self.row_cost(self.fine_network(level)))

    def network_costs(self) -> dict:
        """Per network: its cost per row in ``cost_unit`` (and what it rests on)."""
        if self.coarse_model is None:
            return {}
        return {"model": {"row_cost": 1.0}, "coarse": {"row_cost": self.row_cost("coarse"), "switch": self.switch}}

    @property
    def scheme(self) -> dict:
        """The scheme these levels run (recorded in MLMC results)."""
        out = {"grid": self.grid.kind, "rho": self.grid.rho, "coupling": self.coupling, "sampler": self.sampler,
               "antithetic": self.antithetic, **({"data_std": self.data_std} if self.coupling == "jacobian" else {})}
        if self.switch is not None:
            out.update(switch=self.switch, coarse_cost=self.row_cost("coarse"))
        return out

    def level_sums(self, x_f: Tensor, x_c: Tensor | None, calls: int) -> LevelSums:
        """The sums of one batch's finished paths (payoffs on the CPU, float64); with antithetic pairs a sample
        is the pair mean of rows (i, i + n) of both paths (the single fine paths are summed too)."""
        pf = apply_payoff(self.payoff, x_f).cpu()
        pc = None if x_c is None else apply_payoff(self.payoff, x_c).cpu()
        if not self.antithetic:
            return LevelSums.from_payoffs(pf, pc, calls)
        return LevelSums.from_payoffs(pair_means(pf), None if pc is None else pair_means(pc), calls, single=pf)

    def grid_steps(self, steps: int) -> GridSteps:
        """The sampler's steps on the grid with ``steps`` steps (cached)."""
        if steps not in self._steps:
            self._steps[steps] = self.spec.steps(self.grid.times(steps, self.start.t, self.schedule), self.schedule)
        return self._steps[steps]

    def coefficients(self, steps: int) -> StepCoefficients:
        """The step coefficients of the grid with ``steps`` steps (cached): times, noise, coupling weights."""
        return self.grid_steps(steps).coef

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
        engine.run([paths], self.networks, self.y)
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
        self.steps = sampler.steps(level)
        self.coupled = level > sampler.lmin and not plain
        # coarse steps per fine step: M on a refining level, 1 between two networks on one grid (same noise)
        self.M = sampler.M if sampler.refines(level) else 1
        self.nets = (sampler.fine_network(level), sampler.coarse_network(level))
        self.fine = sampler.grid_steps(self.steps)
        self.coarse = sampler.grid_steps(self.steps // self.M) if self.coupled else None
        self.cf = self.fine.coef
        if self.coupled:
            self.weights = sampler.coarse_weights(self.steps) if self.M > 1 else [[1.0]] * self.steps
        self.x_f = sampler.start.sample(self.noise.start())
        self.x_c = self.x_f.clone() if self.coupled else None
        self.x0_f = self.x0_c = None  # a multistep sampler's x0_hat at each path's previous point
        self.k, self.calls, self.xi_c, self.eps_c = 0, 0, None, None

    @property
    def remaining(self) -> int:
        return self.steps - self.k

    def _both(self) -> bool:
        return self.coupled and self.k % self.M == 0

    def rows(self) -> int:
        return 2 * self.n if self._both() else self.n

    def networks(self) -> list[tuple[str, int]]:
        """The network of each block of the next evaluation's rows: (name, rows), in row order."""
        return [(self.nets[0], self.n), (self.nets[1], self.n)] if self._both() else [(self.nets[0], self.n)]

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
        self.x_f, self.x0_f = self.fine.advance(self.x_f, eps, k, xi, self.x0_f)
        if not torch.isfinite(self.x_f).all():
            raise NumericalError(f"non-finite values (NaN or Inf) in the fine path at level {self.level}, "
                                 f"step {k} (t = {float(cf.t[k]):.6g})")
        if self.coupled and i == self.M - 1:
            self.x_c, self.x0_c = self.coarse.advance(self.x_c, self.eps_c, j, self.xi_c, self.x0_c)
            if not torch.isfinite(self.x_c).all():
                raise NumericalError(f"non-finite values (NaN or Inf) in the coarse path at level {self.level}, "
                                     f"coarse step {j} (t = {float(self.coarse.coef.t[j]):.6g})")
            self.xi_c = self.eps_c = None
        self.k += 1

    def sums(self) -> LevelSums:
        """The level sums of the finished paths (``CoupledLevelSampler.level_sums``)."""
        return self.sampler.level_sums(self.x_f, self.x_c, self.calls)


TEACHER_NFE = "teacher NFE (a coarse-model row counts its FLOPs relative to a teacher row)"


def check_networks(coarse_model, switch, coarse_cost) -> tuple:
    """(coarse_model, switch, coarse_cost) checked: a switch level with a coarse model and only then."""
    if coarse_model is None:
        if switch is not None or coarse_cost is not None:
            raise InputError("switch/coarse_cost: given without a coarse model (--coarse-checkpoint)")
        return None, None, None
    if isinstance(switch, bool) or not isinstance(switch, int) or switch < 1:
        raise InputError(f"switch: expected an integer >= 1 (the level between the two networks), got {switch!r}")
    if coarse_cost is not None and not (isinstance(coarse_cost, (int, float)) and 0 < coarse_cost):
        raise InputError(f"coarse_cost: expected a positive number (a coarse row's cost in teacher rows), got {coarse_cost!r}")
    return coarse_model, int(switch), None if coarse_cost is None else float(coarse_cost)


def relative_flops(coarse, model, shape, y, dtype, device) -> float:
    """FLOPs of one coarse-model row over one teacher row (``network_cost.flops_per_row``)."""
    from lightning_mlmc.mlmc.network_cost import flops_per_row

    teacher = flops_per_row(model, shape, y, dtype, device)
    student = flops_per_row(coarse, shape, y, dtype, device)
    if teacher <= 0 or student <= 0:
        raise InputError("coarse_cost: the networks' FLOPs cannot be counted (torch.utils.flop_counter sees no "
                         "matrix products in them); give coarse_cost, a coarse row's cost in teacher rows")
    return student / teacher
