"""Multilevel Monte Carlo for diffusion posteriors (Haji-Ali, Pereyra, Shaw, Zygalakis 2025), with Giles'
adaptive algorithm (Giles 2008, 2015).

Level l runs the sampler with M^l fine steps; level l > Lmin returns the coupled difference
P_l - P_{l-1}, whose coarse path uses every M-th fine time, shares x_T and y with the fine path, and
builds its noise from the M fine noises (``coarse_noise_weights``). The split follows pymlmc: a level
function ``level_fn(l, N, batch) -> LevelSums`` and the driver ``mlmc(level_fn, eps, ...)``.

Vector payoffs (n pixels): mean_l is the RMS over pixels of the per-pixel mean of Y_l, V_l the mean over
pixels of the per-pixel variance; the MSE target is the pixel-averaged MSE <= eps^2.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import numpy as np
import torch

from lightning_mlmc.diffusion import COUPLINGS, coarse_noise_weights, drift_increment, step_coefficients
from lightning_mlmc.errors import InputError, NumericalError, WeakConvergenceFailure
from lightning_mlmc.sampling import Model, NoiseSource, StartDistribution, batch_obs, gaussian_start
from lightning_mlmc.schedule import TimeGrid, VPSchedule

Tensor = torch.Tensor
Coupling = Literal["naive", "weighted", "jacobian"]


# ----------------------------------------------------------------------------------------------
# Payoffs.


def make_payoff(name: str | Callable = "second_moment", clip: float | None = None) -> Callable[[Tensor], Tensor]:
    """Payoff f: (N, n) -> (N, k). ``second_moment`` (x^2, the default), ``mean`` (x), ``moments``
    ([x, x^2], k = 2n: posterior mean and variance from one run) or a callable; ``clip`` clamps x to
    [-clip, clip] first."""
    if callable(name):
        base = name
    elif name == "second_moment":
        base = lambda x: x * x  # noqa: E731
    elif name == "mean":
        base = lambda x: x  # noqa: E731
    elif name == "moments":
        base = lambda x: torch.cat([x, x * x], dim=1)  # noqa: E731
    else:
        raise InputError(f"payoff: unknown payoff {name!r}; expected second_moment, mean, moments or a callable")
    if clip is not None:
        if not clip > 0:
            raise InputError(f"clip: expected a positive number, got {clip}")
        return lambda x: base(x.clamp(-clip, clip))
    return base


def _apply_payoff(payoff, x: Tensor) -> Tensor:
    flat = x.reshape(x.shape[0], -1)
    out = payoff(flat)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != flat.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"payoff: returned {got}, expected a tensor of shape ({flat.shape[0]}, k) "
                         "(samples x payoff components)")
    return out.to(torch.float64)


# ----------------------------------------------------------------------------------------------
# Level sums.

SUM_NAMES = ("y1", "y2", "y3", "y4", "f1", "f2", "c1", "c2")


@dataclass
class LevelSums:
    """Per-pixel sums over samples of Y = P_f - P_c (powers 1-4), of P_f and P_c (powers 1-2), with costs."""

    n: int
    sums: dict  # name -> float64 tensor (pixels,)
    calls: int  # network evaluations actually made (sample rows passed to the model)

    @classmethod
    def zeros(cls, pixels: int) -> "LevelSums":
        return cls(0, {k: torch.zeros(pixels, dtype=torch.float64) for k in SUM_NAMES}, 0)

    def add(self, other: "LevelSums") -> None:
        self.n += other.n
        self.calls += other.calls
        for k in SUM_NAMES:
            self.sums[k] = self.sums[k] + other.sums[k]

    @classmethod
    def from_payoffs(cls, pf: Tensor, pc: Tensor | None, calls: int) -> "LevelSums":
        y = pf if pc is None else pf - pc
        pc = torch.zeros_like(pf) if pc is None else pc
        s = {"y1": y.sum(0), "y2": (y**2).sum(0), "y3": (y**3).sum(0), "y4": (y**4).sum(0),
             "f1": pf.sum(0), "f2": (pf**2).sum(0), "c1": pc.sum(0), "c2": (pc**2).sum(0)}
        return cls(pf.shape[0], s, calls)


@dataclass
class LevelStats:
    """Statistics of one level (JSON keys ``level, n_samples, mean, var, cost`` and diagnostics)."""

    level: int
    n_samples: int
    mean: float  # RMS over pixels of the per-pixel mean of Y_l
    var: float  # mean over pixels of the per-pixel variance of Y_l
    cost: float  # NFEs per sample from the formula
    mean_fine: float  # RMS over pixels of E[P_l]
    var_fine: float  # mean over pixels of V[P_l]
    kurtosis: float
    calls: int  # network evaluations counted


def level_stats(level: int, s: LevelSums, cost: float) -> LevelStats:
    n = max(s.n, 1)
    m1, m2 = s.sums["y1"] / n, s.sums["y2"] / n
    m3, m4 = s.sums["y3"] / n, s.sums["y4"] / n
    var = (m2 - m1**2).clamp_min(0.0)
    f1, f2 = s.sums["f1"] / n, s.sums["f2"] / n
    central4 = m4 - 4 * m3 * m1 + 6 * m2 * m1**2 - 3 * m1**4
    ok = var > 1e-300
    kurt = float((central4[ok] / var[ok] ** 2).mean()) if ok.any() else 0.0
    return LevelStats(level, s.n, float(m1.pow(2).mean().sqrt()), float(var.mean()), cost,
                      float(f1.pow(2).mean().sqrt()), float((f2 - f1**2).clamp_min(0).mean()), kurt, s.calls)


# ----------------------------------------------------------------------------------------------
# The coupled level sampler.


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
    """

    def __init__(self, model: Model, y: Tensor | None, shape, *, M: int = 2, lmin: int = 0,
                 sampler: str = "ddpm", coupling: Coupling = "naive", data_std: float = 0.5, payoff="second_moment",
                 start: StartDistribution | None = None, grid: TimeGrid | None = None,
                 schedule: VPSchedule | None = None, seed: int = 0, dtype=torch.float64, device="cpu"):
        if int(M) != M or M < 2:
            raise InputError(f"M: expected an integer >= 2, got {M}")
        if sampler not in ("ddpm", "ddim"):
            raise InputError(f"sampler: expected ddpm or ddim for MLMC, got {sampler!r}")
        if coupling not in COUPLINGS:
            raise InputError(f"coupling: expected one of {', '.join(COUPLINGS)}, got {coupling!r}")
        if not (math.isfinite(data_std) and data_std >= 0):
            raise InputError(f"data_std: expected a finite number >= 0, got {data_std}")
        self.model, self.y, self.shape = model, y, tuple(shape)
        self.M, self.lmin, self.sampler, self.coupling = int(M), int(lmin), sampler, coupling
        self.data_std = float(data_std)
        self.payoff = make_payoff(payoff) if not callable(payoff) or isinstance(payoff, str) else payoff
        self.start = start or gaussian_start()
        self.grid, self.schedule = grid or TimeGrid(), schedule or VPSchedule()
        self.seed, self.dtype, self.device = int(seed), dtype, device
        # Payoff components (n for per-pixel payoffs, 2n for moments), found by applying it once.
        self.pixels = int(_apply_payoff(self.payoff, torch.zeros(1, int(np.prod(self.shape)))).shape[1])
        self._coef: dict[int, object] = {}
        self._weights: dict[int, list[list[float]]] = {}

    def cost(self, level: int) -> float:
        """NFEs per sample: M^l + M^(l-1), or M^l at Lmin."""
        return float(self.M**level + (self.M ** (level - 1) if level > self.lmin else 0))

    def _coefficients(self, steps: int):
        if steps not in self._coef:
            times = self.grid.times(steps, self.start.t, self.schedule)
            self._coef[steps] = step_coefficients(times, self.sampler == "ddpm", self.schedule)
        return self._coef[steps]

    def _coarse_weights(self, steps: int) -> list[list[float]]:
        """The coarse-noise weights of every coarse step of a fine grid with ``steps`` steps (cached)."""
        if steps not in self._weights:
            cf = self._coefficients(steps)
            self._weights[steps] = [coarse_noise_weights(cf, j, self.M, self.coupling, self.data_std).tolist()
                                    for j in range(steps // self.M)]
        return self._weights[steps]

    @torch.no_grad()
    def paths(self, level: int, noise: NoiseSource) -> tuple[Tensor, Tensor | None, int]:
        """Coupled fine and coarse samples of one batch: (x_fine, x_coarse or None, network evaluations)."""
        M, n_f = self.M, self.M**level
        cf = self._coefficients(n_f)
        coupled = level > self.lmin
        cc = self._coefficients(n_f // M) if coupled else None
        weights = self._coarse_weights(n_f) if coupled else None
        x_f = self.start.sample(noise.start())
        x_c = x_f.clone() if coupled else None
        batch = x_f.shape[0]
        y1, y2 = batch_obs(self.y, batch), batch_obs(self.y, 2 * batch) if coupled else None
        calls = 0
        for j in range(n_f // M if coupled else n_f):
            xi_c = None
            w_c = weights[j] if coupled else None
            for i in range(M if coupled else 1):
                k = j * M + i if coupled else j
                t = float(cf.t[k])
                where = f"level {level}, step {k} (t = {t:.6g})"
                if coupled and i == 0:
                    # Fine and coarse evaluate at the same time: one batched call.
                    both = torch.cat([x_f, x_c])
                    eps = self.model(both, y2, torch.full((2 * batch,), t, dtype=torch.float64, device=both.device))
                    eps_f, eps_c = eps[:batch], eps[batch:]
                    calls += 2 * batch
                else:
                    eps_f = self.model(x_f, y1, torch.full((batch,), t, dtype=torch.float64, device=x_f.device))
                    calls += batch
                inc = drift_increment(x_f, eps_f, cf.a_minus_1[k], cf.eps[k])
                if cf.noise[k] > 0:
                    xi = noise.step(k)
                    inc = inc + cf.noise[k].to(x_f.dtype) * xi
                    if coupled:
                        xi_c = w_c[i] * xi if xi_c is None else xi_c + w_c[i] * xi
                x_f = x_f + inc
                if coupled and i == 0:
                    inc_c = drift_increment(x_c, eps_c, cc.a_minus_1[j], cc.eps[j])
                if not torch.isfinite(x_f).all():
                    raise NumericalError(f"non-finite values (NaN or Inf) in the fine path at {where}")
            if coupled:
                if cc.noise[j] > 0 and xi_c is not None:
                    inc_c = inc_c + cc.noise[j].to(x_c.dtype) * xi_c
                x_c = x_c + inc_c
                if not torch.isfinite(x_c).all():
                    raise NumericalError(f"non-finite values (NaN or Inf) in the coarse path at level {level}, "
                                         f"coarse step {j} (t = {float(cc.t[j]):.6g})")
        return x_f, x_c, calls

    def __call__(self, level: int, n: int, batch_index: int = 0, rank: int = 0) -> LevelSums:
        """Sums over ``n`` coupled samples of level ``level`` from stream (seed, level, batch_index, rank)."""
        noise = NoiseSource(self.seed, (n, *self.shape), stream=(level, batch_index, rank),
                            dtype=self.dtype, device=self.device)
        x_f, x_c, calls = self.paths(level, noise)
        pf = _apply_payoff(self.payoff, x_f).cpu()
        pc = None if x_c is None else _apply_payoff(self.payoff, x_c).cpu()
        return LevelSums.from_payoffs(pf, pc, calls)


# ----------------------------------------------------------------------------------------------
# Distributed helpers.


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _share(n: int) -> tuple[int, int]:
    """(this rank's share of n samples, rank)."""
    dist = _dist()
    if dist is None:
        return n, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    return n // world + (1 if rank < n % world else 0), rank


def _all_reduce(s: LevelSums) -> LevelSums:
    dist = _dist()
    if dist is None:
        return s
    keys = list(SUM_NAMES)
    flat = torch.cat([s.sums[k] for k in keys] + [torch.tensor([s.n, s.calls], dtype=torch.float64)])
    dist.all_reduce(flat)
    p = s.sums["y1"].numel()
    sums = {k: flat[i * p : (i + 1) * p].clone() for i, k in enumerate(keys)}
    return LevelSums(int(flat[-2].item()), sums, int(flat[-1].item()))


# ----------------------------------------------------------------------------------------------
# The adaptive driver.


@dataclass
class MLMCResult:
    """Result of the adaptive MLMC driver (the RESULT.json of DESIGN.md section 6 plus diagnostics)."""

    estimate: list
    levels: list
    alpha: float
    beta: float
    gamma: float
    nfe: float
    nfe_counted: int
    nfe_mc: float
    savings: float
    eps: float
    rmse_bound: float
    bias_estimate: float
    wall_seconds: float
    M: int
    lmin: int
    theta: float
    converged: bool = True
    pilot_nfe: float = 0.0  # NFEs of the automatic-Lmin pilot not reused by the estimate (inside nfe)

    def to_json(self) -> dict:
        return asdict(self)


def _fit_rate(levels: list[int], values: list[float], M: int) -> float:
    """-slope of log_M(values) against level, floored at 0.5 as in Giles' code."""
    v = np.maximum(np.asarray(values, dtype=float), 1e-300)
    if len(levels) < 2:
        return 0.5
    slope = np.polyfit(np.asarray(levels, dtype=float), np.log(v) / np.log(M), 1)[0]
    return float(max(0.5, -slope))


def _fit_growth(levels: list[int], costs: list[float], M: int) -> float:
    """Slope of log_M(cost) against level (gamma), floored at 0.5 as in Giles' code."""
    if len(levels) < 2:
        return 1.0
    return float(max(0.5, np.polyfit(np.asarray(levels, float), np.log(costs) / np.log(M), 1)[0]))


class _State:
    """Per-level sums, sample counts and batch counters; saved after every batch when a path is given."""

    def __init__(self, path: str | None, fingerprint: str, pixels: int):
        self.path, self.fingerprint, self.pixels = path, fingerprint, pixels
        self.L: int | None = None
        self.lmin: int | None = None
        self.pilot_nfe, self.pilot_calls = 0.0, 0  # automatic-Lmin pilot work not reused by the estimate
        self.sums: dict[int, LevelSums] = {}
        self.batches: dict[int, int] = {}
        self.pending: dict[int, int] = {}

    def ensure(self, level: int):
        if level not in self.sums:
            self.sums[level] = LevelSums.zeros(self.pixels)
            self.batches.setdefault(level, 0)
            self.pending.setdefault(level, 0)

    def save(self):
        if self.path is None:
            return
        data = {"fingerprint": self.fingerprint, "L": self.L, "lmin": self.lmin, "pilot_nfe": self.pilot_nfe,
                "pilot_calls": self.pilot_calls, "pending": self.pending, "batches": self.batches,
                "levels": {l: {"n": s.n, "calls": s.calls, "sums": {k: v.tolist() for k, v in s.sums.items()}}
                           for l, s in self.sums.items()}}
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)

    def load(self) -> bool:
        if self.path is None or not os.path.exists(self.path):
            return False
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, OSError) as e:
            raise InputError(f"state: cannot read {self.path} ({e}); delete it to start afresh") from None
        if data.get("fingerprint") != self.fingerprint:
            raise InputError(f"state: {self.path} was written with different arguments; "
                             "use the same arguments to resume or another --state file")
        self.L, self.lmin = data["L"], data.get("lmin")
        self.pilot_nfe, self.pilot_calls = float(data.get("pilot_nfe", 0.0)), int(data.get("pilot_calls", 0))
        self.pending = {int(k): int(v) for k, v in data["pending"].items()}
        self.batches = {int(k): int(v) for k, v in data["batches"].items()}
        self.sums = {int(l): LevelSums(d["n"], {k: torch.tensor(v, dtype=torch.float64) for k, v in d["sums"].items()},
                                       d["calls"]) for l, d in data["levels"].items()}
        return True


def fingerprint(**args) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sample_level(level_fn, level: int, n: int, batch_size: int, first_batch: int, pixels: int) -> tuple[LevelSums, int]:
    """``n`` samples of a level in batches (shared across ranks); returns the sums and the batches used."""
    total, b = LevelSums.zeros(pixels), first_batch
    while n > 0:
        nb = min(batch_size, n)
        share, rank = _share(nb)
        total.add(_all_reduce(level_fn(level, share, b, rank) if share > 0 else LevelSums.zeros(pixels)))
        n, b = n - nb, b + 1
    return total, b - first_batch


@dataclass
class LminChoice:
    """The automatic Lmin and the pilot it came from (coupled levels 1..top, ``n`` samples each)."""

    lmin: int
    top: int
    predicted: dict  # candidate Lmin -> predicted sum_l sqrt(V_l C_l) over the pilot levels
    pilot: dict  # level -> LevelSums of the coupled pilot (reused for levels > lmin)
    batches: dict  # level -> pilot batches used (the estimate's streams continue after them)


def choose_lmin(sampler, n: int, lmax: int, *, batch_size: int = 1000, ratio: float = 0.25) -> LminChoice:
    """Automatic Lmin from a pilot run of ``n`` coupled samples on levels 1, 2, ...

    The pilot stops at the first level whose coupled variance V_l is below ``ratio`` V[P_l] (the coupling
    has started to pay) or at ``lmax``. Every candidate c below it whose next level already has
    V_(c+1) < V[P_(c+1)] (the seed authors' rule: start where the corrections are cheaper than the
    samples) is scored by the MLMC cost it predicts, sqrt(V[P_c] C_c) + sum_(l > c) sqrt(V_l C_l) with
    C_c = M^c and C_l = M^l + M^(l-1) (the optimal N_l make the total cost proportional to its square);
    the cheapest wins. ``sampler`` needs a settable ``lmin`` (CoupledLevelSampler); it is left at the choice.
    """
    if n < 2:
        raise InputError(f"n0: expected at least 2 pilot samples, got {n}")
    M, pixels = sampler.M, sampler.pixels
    sampler.lmin = 0
    pilot, batches, var_fine, var_diff = {}, {}, {}, {}
    level = 0
    while level < lmax:
        level += 1
        sums, used = _sample_level(sampler, level, n, batch_size, 0, pixels)
        pilot[level], batches[level] = sums, used
        st = level_stats(level, sums, sampler.cost(level))
        c1, c2 = sums.sums["c1"] / sums.n, sums.sums["c2"] / sums.n
        var_diff[level], var_fine[level] = st.var, st.var_fine
        var_fine.setdefault(level - 1, float((c2 - c1**2).clamp_min(0).mean()))
        if st.var < ratio * st.var_fine:
            break
    top = level
    predicted = {}
    for c in range(0, top):
        if not var_diff[c + 1] < var_fine[c + 1]:
            continue
        cost = math.sqrt(var_fine[c] * M**c)
        cost += sum(math.sqrt(var_diff[l] * (M**l + M ** (l - 1))) for l in range(c + 1, top + 1))
        predicted[c] = cost
    lmin = min(predicted, key=predicted.get) if predicted else top - 1
    sampler.lmin = lmin
    return LminChoice(lmin, top, predicted, pilot, batches)


def mlmc(
    level_fn: Callable[..., LevelSums],
    eps: float,
    *,
    M: int = 2,
    lmin: int | Literal["auto"] = 0,
    lmax: int = 10,
    n0: int = 100,
    theta: float = 0.25,
    cost_fn: Callable[[int], float] | None = None,
    alpha0: float | None = None,
    beta0: float | None = None,
    gamma0: float | None = None,
    batch_size: int = 1000,
    state_path: str | None = None,
    state_key: str = "",
    pixels: int | None = None,
) -> MLMCResult:
    """Giles' adaptive MLMC driver (Giles 2015, Algorithm 1) for a vector payoff.

    Args:
        level_fn: ``level_fn(l, N, batch_index, rank) -> LevelSums``.
        eps: target RMSE (pixel-averaged).
        M: refinement factor; lmin, lmax: coarsest and finest allowed levels; n0: pilot samples per level.
            ``lmin="auto"`` picks Lmin from a coupled pilot run (``choose_lmin``; needs a level function
            with a settable ``lmin``, i.e. a CoupledLevelSampler); pilot levels above it are reused and
            the rest of the pilot is counted in ``nfe`` (``pilot_nfe``).
        theta: the share of eps^2 given to the bias (the variance gets 1 - theta).
        cost_fn: NFEs per sample of a level (default M^l + M^(l-1), M^lmin at lmin).
        alpha0, beta0, gamma0: fixed rates (fitted when None, floored at 0.5 as Giles).
        batch_size: samples per level-function call; the sums are saved after every batch.
        state_path: JSON file of the per-level sums; an existing one (same ``state_key``) is resumed.
        pixels: payoff dimension (needed for the state; inferred from the first batch otherwise).

    Raises:
        WeakConvergenceFailure: Lmax reached and the bias test still fails (``.result`` has the estimate).
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise InputError(f"eps: expected a positive number, got {eps}")
    if int(M) != M or M < 2:
        raise InputError(f"M: expected an integer >= 2, got {M}")
    auto = lmin == "auto"
    if auto:
        if not hasattr(level_fn, "lmin") or not hasattr(level_fn, "M") or level_fn.M != M:
            raise InputError("lmin: 'auto' needs a CoupledLevelSampler (with a settable lmin) of the same M")
        if lmax < 1:
            raise InputError(f"lmax: expected at least 1 with lmin auto, got {lmax}")
    elif not isinstance(lmin, int) or lmin < 0 or lmax < lmin + 1:
        raise InputError(f"lmin/lmax: expected 0 <= lmin < lmax (or lmin 'auto'), got lmin={lmin}, lmax={lmax}")
    if n0 < 2:
        raise InputError(f"n0: expected at least 2 pilot samples, got {n0}")
    if not 0 < theta < 1:
        raise InputError(f"theta: expected 0 < theta < 1, got {theta}")
    cost_fn = cost_fn or (lambda l: float(M**l + (M ** (l - 1) if l > lmin else 0)))
    if not auto and getattr(level_fn, "lmin", lmin) != lmin:
        raise InputError(f"lmin: the level sampler was built with lmin={level_fn.lmin}, the driver got lmin={lmin}")
    tic = time.perf_counter()
    pixels = pixels or getattr(level_fn, "pixels", None)
    if pixels is None:  # probe the payoff dimension on a stream the estimate never uses
        pixels = level_fn(lmin, 2, 2**31, 0).sums["y1"].numel()
    st = _State(state_path, fingerprint(key=state_key, eps=eps, M=M, lmin=lmin, lmax=lmax, n0=n0, theta=theta,
                                        alpha0=alpha0, beta0=beta0, gamma0=gamma0, batch_size=batch_size), pixels)
    if st.load():
        lmin = st.lmin if st.lmin is not None else lmin
        if auto:
            level_fn.lmin = lmin
    else:
        if auto:
            choice = choose_lmin(level_fn, n0, lmax, batch_size=batch_size)
            lmin = choice.lmin
            for l, sums in choice.pilot.items():
                if l > lmin:  # coupled levels are the same whatever Lmin is: keep their samples
                    st.sums[l], st.batches[l] = sums, choice.batches[l]
                else:
                    st.pilot_nfe += sums.n * (M**l + M ** (l - 1))
                    st.pilot_calls += sums.calls
            st.batches[lmin] = choice.batches.get(lmin, 0)  # fresh streams for the now plain level
        st.lmin = lmin
        st.L = min(max([lmin + 2, *st.sums]), lmax)
        for l in range(lmin, st.L + 1):
            st.ensure(l)
            st.pending[l] = max(0, n0 - st.sums[l].n)
        st.save()

    def run_pending():
        for l in sorted(st.pending):
            while st.pending[l] > 0:
                nb = min(batch_size, st.pending[l])
                share, rank = _share(nb)
                part = level_fn(l, share, st.batches[l], rank) if share > 0 else LevelSums.zeros(pixels)
                part = _all_reduce(part)
                st.sums[l].add(part)
                st.batches[l] += 1
                st.pending[l] -= nb
                st.save()

    def stats():
        return [level_stats(l, st.sums[l], cost_fn(l)) for l in range(lmin, st.L + 1)]

    def rates(ls):
        coupled = [s for s in ls if s.level > lmin]
        lv = [s.level for s in coupled]
        ml, vl = [s.mean for s in coupled], [s.var for s in coupled]
        # Giles' fix for possible zero values at fine levels.
        a_tmp, b_tmp = (alpha0 or 1.0), (beta0 or 1.0)
        for i in range(1, len(coupled)):
            ml[i] = max(ml[i], 0.5 * ml[i - 1] / M**a_tmp)
            vl[i] = max(vl[i], 0.5 * vl[i - 1] / M**b_tmp)
        # alpha from the levels past the largest |mean_l|: the coarse levels before it are pre-asymptotic
        # (mean_l grows there on the uniform grid) and would flatten the fitted weak rate.
        peak = int(np.argmax(ml)) if ml else 0
        alpha = alpha0 if alpha0 is not None else _fit_rate(lv[peak:], ml[peak:], M)
        beta = beta0 if beta0 is not None else _fit_rate(lv, vl, M)
        gamma = gamma0 if gamma0 is not None else _fit_growth(lv, [s.cost for s in coupled], M)
        return ml, vl, alpha, beta, gamma

    def bias_estimate(ml, alpha, ls):
        # Giles' estimate max_r mean_(L-r) / M^(r alpha) / (M^alpha - 1), with each |E[Y_l]| replaced by
        # its upper confidence bound mean_l + 2 SE: a noisy small mean at a level with few samples must
        # not end the refinement early (it did on the bimodal problem, where Y_l is heavy-tailed).
        # The extrapolation also caps alpha at 1, the samplers' weak order: a steeper slope fitted from a
        # few noisy levels would promise a bias that the scheme cannot deliver.
        coupled = [s for s in ls if s.level > lmin]
        up = [m + 2.0 * math.sqrt(s.var / max(s.n_samples, 1)) for m, s in zip(ml, coupled)]
        a = min(alpha, 1.0)
        return max(up[-1 - r] / M ** (r * a) for r in range(min(3, len(up)))) / (M**a - 1)

    def top_up(ml, alpha, ls):
        """Samples that make a statistically inconclusive bias test conclusive, or None when it fails.

        Each of the finest levels in the test must have mean_l + 2 SE within its share of the bias
        budget, room_l = sqrt(theta) eps (M^a - 1) M^(r a). A level with mean_l - 2 SE > room_l fails the
        test outright (a finer level is needed: None); one with mean_l - 2 SE <= room_l < mean_l + 2 SE
        is undecided, and more samples decide it: N >= 4 V_l / (room_l - mean_l)^2 where mean_l < room_l,
        at least twice and at most four times its current count per round."""
        a = min(alpha, 1.0)
        coupled = [s for s in ls if s.level > lmin]
        need = {}
        for r in range(min(3, len(coupled))):
            s, m = coupled[-1 - r], ml[-1 - r]
            room = math.sqrt(theta) * eps * (M**a - 1) * M ** (r * a)
            se = math.sqrt(s.var / s.n_samples)
            if m - 2.0 * se > room:
                return None
            if m + 2.0 * se > room:
                wanted = 4 * s.var / (room - m) ** 2 if m < room else math.inf
                need[s.level] = int(min(max(wanted, 2 * s.n_samples), 4 * s.n_samples)) - s.n_samples
        return need

    converged = True
    while True:
        run_pending()
        ls = stats()
        ml, vl, alpha, beta, gamma = rates(ls)
        var = [ls[0].var] + vl
        cost = [s.cost for s in ls]
        total = sum(math.sqrt(v * c) for v, c in zip(var, cost))
        ns = [math.ceil(math.sqrt(v / c) * total / ((1 - theta) * eps**2)) for v, c in zip(var, cost)]
        dn = {s.level: max(0, n - s.n_samples) for s, n in zip(ls, ns)}
        if all(dn[l] <= 0.01 * st.sums[l].n for l in dn):
            rem = bias_estimate(ml, alpha, ls)
            if rem > math.sqrt(theta) * eps:
                # An inconclusive test is settled with samples at the finest levels when that costs less
                # than a new level (10 samples); at Lmax, while a round costs less than n0 samples of the
                # level that cannot be added (Giles 2008's price of a level; the rounds at least double
                # the counts, so they end). A failing test needs a new level.
                more = top_up(ml, alpha, ls)
                budget = (min(n0, 10) if st.L < lmax else n0) * cost_fn(st.L + 1)
                if more and sum(n * cost_fn(l) for l, n in more.items()) <= budget:
                    dn.update(more)
                elif st.L == lmax:
                    converged = False
                    break
                else:
                    st.L += 1
                    st.ensure(st.L)
                    var.append(var[-1] / M**beta)
                    cost.append(cost_fn(st.L))
                    total = sum(math.sqrt(v * c) for v, c in zip(var, cost))
                    ns = [math.ceil(math.sqrt(v / c) * total / ((1 - theta) * eps**2)) for v, c in zip(var, cost)]
                    # Giles (2015) gives the new level only its extrapolated optimal N_L, which can be 1 or
                    # 2 samples: its V_L and mean then come from nothing and the bias test and rmse_bound go
                    # wrong. A floor of 10 samples keeps them estimated (Giles 2008 gave every new level
                    # N0, which at the finest levels costs more than the whole optimal estimate).
                    ns[-1] = max(ns[-1], min(n0, 10))
                    dn = {l: max(0, n - st.sums[l].n) for l, n in zip(range(lmin, st.L + 1), ns)}
            else:
                break
        if sum(dn.values()) == 0:
            break
        st.pending.update(dn)
        st.save()

    ls = stats()
    ml, vl, alpha, beta, gamma = rates(ls)
    estimate = sum(st.sums[l].sums["y1"] / st.sums[l].n for l in range(lmin, st.L + 1))
    # rmse_bound is an upper confidence bound, not a point estimate of the RMSE: each V_l is raised by two
    # standard errors of a sample variance, V_l sqrt((kurtosis - 1) / N_l), and the bias term is already
    # the upper (mean + 2 SE) estimate of the bias test.
    var_est = sum(s.var / s.n_samples * (1 + 2 * math.sqrt(max(s.kurtosis - 1, 0.0) / s.n_samples)) for s in ls)
    bias = bias_estimate(ml, alpha, ls)
    nfe = sum(s.n_samples * s.cost for s in ls) + st.pilot_nfe
    # V[P_L] barely depends on L; take it from the finest level with enough samples to estimate it.
    var_pl = next((s.var_fine for s in reversed(ls) if s.n_samples >= min(100, n0)), ls[0].var_fine)
    nfe_mc = var_pl * M**st.L / ((1 - theta) * eps**2)
    result = MLMCResult(
        estimate=estimate.tolist(), levels=[asdict(s) for s in ls], alpha=alpha, beta=beta, gamma=gamma,
        nfe=float(nfe), nfe_counted=int(sum(s.calls for s in ls) + st.pilot_calls), nfe_mc=float(nfe_mc),
        savings=float(nfe_mc / nfe), eps=float(eps), rmse_bound=float(math.sqrt(var_est + bias**2)),
        bias_estimate=float(bias), wall_seconds=time.perf_counter() - tic, M=M, lmin=lmin, theta=theta,
        converged=converged, pilot_nfe=float(st.pilot_nfe),
    )
    if not converged:
        raise WeakConvergenceFailure(
            f"weak convergence failed: the bias estimate {bias:.3g} still exceeds sqrt(theta) eps = "
            f"{math.sqrt(theta) * eps:.3g} at Lmax = {lmax}; raise --lmax or eps", result)
    return result


# ----------------------------------------------------------------------------------------------
# mlmc_test: Giles' convergence and complexity tables.


@dataclass
class ConvergenceRow:
    level: int
    mean: float  # ave(Pf - Pc) (RMS over pixels)
    mean_fine: float  # ave(Pf)
    var: float  # var(Pf - Pc)
    var_fine: float  # var(Pf)
    kurtosis: float
    check: float
    cost: float
    calls: int


@dataclass
class MLMCTestResult:
    rows: list
    alpha: float
    beta: float
    gamma: float
    complexity: list = field(default_factory=list)
    wall_seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    def tables(self) -> str:
        out = ["l  ave(Pf-Pc)  ave(Pf)  var(Pf-Pc)  var(Pf)  kurtosis  check  cost"]
        for r in self.rows:
            out.append(f"{r.level:<2d} {r.mean:11.4e} {r.mean_fine:9.4e} {r.var:11.4e} {r.var_fine:9.4e} "
                       f"{r.kurtosis:9.2f} {r.check:6.3f} {r.cost:6.0f}")
        out.append(f"alpha = {self.alpha:.3f}  beta = {self.beta:.3f}  gamma = {self.gamma:.3f}")
        if self.complexity:
            out.append("eps  value  mlmc_cost  std_cost  savings  N_l")
            for c in self.complexity:
                out.append(f"{c['eps']:.4g} {c['value']:.5g} {c['mlmc_cost']:.4g} {c['std_cost']:.4g} "
                           f"{c['savings']:.2f} {' '.join(str(n) for n in c['N_l'])}")
        return "\n".join(out)


def mlmc_test(sampler: CoupledLevelSampler, levels: int, samples: int, eps_list=(), *, n0: int = 100,
              theta: float = 0.25, lmax: int = 10, batch_size: int = 1000) -> MLMCTestResult:
    """Giles' mlmc_test: ``samples`` coupled samples on every level lmin..levels, the convergence table
    with kurtosis and the consistency check, fitted rates, then one adaptive run per eps."""
    if levels <= sampler.lmin:
        raise InputError(f"levels: expected more than lmin = {sampler.lmin}, got {levels}")
    tic = time.perf_counter()
    rows, prev = [], None
    for l in range(sampler.lmin, levels + 1):
        s, _ = _sample_level(sampler, l, samples, batch_size, 0, sampler.pixels)
        st = level_stats(l, s, sampler.cost(l))
        n = s.n
        y1, f1, c1 = s.sums["y1"] / n, s.sums["f1"] / n, s.sums["c1"] / n
        var_y = (s.sums["y2"] / n - y1**2).clamp_min(0)
        var_f = (s.sums["f2"] / n - f1**2).clamp_min(0)
        if prev is None:
            check = 0.0
        else:
            pf1, pvar_f = prev
            num = (y1 + pf1 - f1).abs()
            den = 3.0 * (var_y.sqrt() + pvar_f.sqrt() + var_f.sqrt()) / math.sqrt(n)
            ok = den > 0
            check = float((num[ok] / den[ok]).pow(2).mean().sqrt()) if ok.any() else 0.0
        prev = (f1, var_f)
        rows.append(ConvergenceRow(l, st.mean, st.mean_fine, st.var, st.var_fine, st.kurtosis, check, st.cost, s.calls))
    coupled = [r for r in rows if r.level > sampler.lmin]
    lv = [r.level for r in coupled]
    alpha = _fit_rate(lv, [r.mean for r in coupled], sampler.M)
    beta = _fit_rate(lv, [r.var for r in coupled], sampler.M)
    gamma = _fit_growth(lv, [r.cost for r in coupled], sampler.M)
    res = MLMCTestResult(rows, alpha, beta, gamma)
    for e in eps_list:
        try:
            r = mlmc(sampler, e, M=sampler.M, lmin=sampler.lmin, lmax=lmax, n0=n0, theta=theta,
                     cost_fn=sampler.cost, batch_size=batch_size, pixels=sampler.pixels)
            converged = True
        except WeakConvergenceFailure as fail:
            r, converged = fail.result, False
        res.complexity.append({"eps": e, "value": float(np.sqrt(np.mean(np.square(r.estimate)))),
                               "mlmc_cost": r.nfe, "std_cost": r.nfe_mc, "savings": r.savings,
                               "N_l": [lv_["n_samples"] for lv_ in r.levels], "converged": converged})
    res.wall_seconds = time.perf_counter() - tic
    return res
