"""Predicted complexity: what MLMC and plain Monte Carlo would cost at other eps, from one run's levels
(Giles' mlmc_test complexity table and his cost-versus-eps figure, predicted instead of run).

The prediction runs the adaptive driver itself (``driver.mlmc``: the pilot sized by cost, the plan, the bias
test with its confidence bounds, the floors, the plain-MC finish and the honest ``nfe_mc`` of
``estimates.plain_mc_alternative``) on ``synthetic.SyntheticLevels`` fitted to the run, so the prediction and a
real run follow the same rules; the automatic-Lmin pilot is added as ``choose_lmin`` sizes it. Each eps is the
median of a few synthetic runs (their own noise).

The uncertainty is a parametric bootstrap over each level's samples: a replicate redraws as many samples of
every sampled level as the run drew, from the Gaussian laws fitted to it, refits the laws to them and runs the
driver again at ``predict_eps``; the spread of the replicates' savings is ``savings_sd``. It covers the
sampling noise of the run's level statistics (means, variances, hence the fitted rates), not a model error
of the Gaussian, pixel-independent synthetic levels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from lightning_mlmc.errors import InputError, WeakConvergenceFailure
from lightning_mlmc.mlmc.config import MLMCConfig
from lightning_mlmc.mlmc.driver import first_pilot, mlmc
from lightning_mlmc.mlmc.estimates import COUPLING_PAYS, LevelMoments, level_moments
from lightning_mlmc.mlmc.levels import level_cost
from lightning_mlmc.mlmc.lmin import LminChoice
from lightning_mlmc.mlmc.result import MLMCResult
from lightning_mlmc.mlmc.sums import LevelSums
from lightning_mlmc.mlmc.synthetic import LevelLaw, SyntheticLevels, synthetic_laws

DEFAULT_EPS = (0.05, 0.02, 0.01, 0.005)
SIM_BATCH = 1 << 40  # the synthetic driver's batch size: one batch per level and round


@dataclass
class PredictedRun:
    """The predicted cost of an MLMC run at ``eps`` and of the cheapest plain MC that meets it."""

    eps: float
    nfe: float  # MLMC (what the driver would spend, the automatic-Lmin pilot included)
    nfe_mc: float  # the honest plain-MC alternative (``mc_steps`` x ``mc_samples``)
    savings: float  # nfe_mc / nfe
    sequential_calls: float
    mc_sequential_calls: float
    L: int
    N_l: list
    mc_steps: int
    mc_samples: int
    method: str  # mlmc, or mc when the driver would finish as plain MC
    converged: bool


@dataclass
class ComplexityPrediction:
    """Predicted costs over an eps list (``rows``) and the bootstrap at ``predict_eps``."""

    rows: list[PredictedRun]
    predict_eps: float
    savings: float  # at predict_eps
    savings_sd: float  # bootstrap standard deviation (nan without replicates)
    nfe_sd: float
    savings_interval: tuple = (math.nan, math.nan)  # bootstrap 16th and 84th percentiles
    replicates: list = field(default_factory=list)  # (nfe, nfe_mc) of each bootstrap replicate
    alpha: float = math.nan
    beta: float = math.nan

    COLUMNS = ("eps", "mlmc_nfe", "mc_nfe", "savings", "mlmc_sequential_calls", "mc_sequential_calls", "L",
               "mc_steps", "mc_samples", "method", "converged")

    def row(self, eps: float) -> PredictedRun:
        return min(self.rows, key=lambda r: abs(math.log(r.eps / eps)))

    def table(self) -> list[list]:
        return [[r.eps, r.nfe, r.nfe_mc, r.savings, r.sequential_calls, r.mc_sequential_calls, r.L, r.mc_steps,
                 r.mc_samples, r.method, r.converged] for r in self.rows]

    def text(self) -> str:
        out = ["eps     MLMC NFE    plain-MC NFE  savings  MLMC seq. calls  MC seq. calls  L   plain MC"]
        for r in self.rows:
            note = "" if r.method == "mlmc" else "  (the driver would finish as plain MC)"
            note += "" if r.converged else "  (the bias test would still fail at lmax)"
            out.append(f"{r.eps:<7g} {r.nfe:<11,.0f} {r.nfe_mc:<13,.0f} {r.savings:<8.2f} {r.sequential_calls:<16,.0f} "
                       f"{r.mc_sequential_calls:<14,.0f} {r.L:<3d} {r.mc_samples} x {r.mc_steps} steps{note}")
        if math.isfinite(self.savings_sd):
            lo, hi = self.savings_interval
            out.append(f"predicted savings at eps {self.predict_eps:g}: {self.savings:.2f}x (bootstrap sd "
                       f"{self.savings_sd:.2f}, 16-84%: {lo:.2f}-{hi:.2f}, {len(self.replicates)} replicates)")
        return "\n".join(out)

    def to_json(self) -> dict:
        return asdict(self)


def sequential_calls(result: MLMCResult, batch_size: int, pilot_calls: float = 0.0) -> tuple[float, float]:
    """(MLMC, plain MC) sequential batched network calls, predicted simply: plain MC with N samples of n steps
    in batches of B makes n ceil(N / B) calls one after another; an MLMC run its rounds times the deepest
    level's M^l ceil(N_l / B) (an engine that runs a round's levels side by side; the driver today runs them
    one after another) plus its pilot's. The one place to change when the driver's execution changes."""
    mc = result.mc_steps * math.ceil(result.mc_samples / batch_size)
    depth = max(result.M**lv.level * math.ceil(lv.n_samples / batch_size) for lv in result.levels)
    return float(result.rounds * depth + pilot_calls), float(mc)


def _auto_pilot(laws, lmin: int, M: int, eps: float, n0: int, theta: float, batch_size: int, seed: int,
                pilot_fraction: float = 0.1, sim_batch: int = 1) -> tuple[LminChoice, float]:
    """The automatic-Lmin pilot as ``choose_lmin`` sizes it (climb to the first level where the coupling
    pays, then grow once by cost), its coupled levels above Lmin drawn from the synthetic levels in batches
    of ``sim_batch``; and its sequential calls in batches of ``batch_size``."""
    pixels = int(laws[lmin].mean.numel())
    top = next((l for l in sorted(laws) if l > lmin and float(laws[l].var.mean())
                < COUPLING_PAYS * float(laws[l].fine_var.mean())), max(laws))
    n = first_pilot(n0, pixels)
    predicted = math.sqrt(float(laws[lmin].fine_var.mean()) * M**lmin)
    predicted += sum(math.sqrt(float(laws[l].var.mean()) * level_cost(M, l, 0)) for l in range(lmin + 1, top + 1))
    unit = sum(level_cost(M, l, 0) for l in range(1, top + 1))
    target = min(n0, int(pilot_fraction * predicted**2 / ((1 - theta) * eps**2) / unit))
    grown = target >= 1.5 * n
    n = target if grown else n
    probe = SyntheticLevels(laws, M, 0, seed)
    pilot, batches = {}, {}
    for level in range(1, top + 1):
        batches[level] = math.ceil(n / sim_batch)
        if level > lmin:
            pilot[level] = probe(level, n, 0, 0)
        else:  # only counted (``unused_cost``)
            pilot[level] = LevelSums(n, LevelSums.zeros(pixels).sums, int(n * level_cost(M, level, 0)))
    calls = sum(M**l * math.ceil(n / batch_size) for l in pilot) * (2 if grown else 1)
    return LminChoice(lmin, top, {}, pilot, batches, M, n=n), float(calls)


def predict_run(laws, lmin: int, M: int, eps: float, *, lmax: int, n0: int, theta: float, batch_size: int,
                auto_lmin: bool, seed: int = 0, costs: tuple[dict, dict] | None = None) -> PredictedRun:
    """The driver at ``eps`` on the synthetic levels ``laws`` with per-sample ``costs`` (coupled, plain; default
    the diffusion levels'); Lmin fixed, and with ``auto_lmin`` the pilot priced and reused as ``choose_lmin``
    (diffusion levels) would. The sample counts do not depend on the batch size and a synthetic level draws
    any count in one call, so a round draws each level as one batch (a prediction of 10^9 samples in batches
    of 1000 would hold 10^6 batches); ``batch_size`` prices the sequential calls."""
    levels = SyntheticLevels(laws, M, lmin, seed, *(costs or (None, None)))
    sim_batch = SIM_BATCH
    pilot, pilot_calls = (_auto_pilot(laws, lmin, M, eps, n0, theta, batch_size, seed, sim_batch=sim_batch)
                          if auto_lmin else (None, 0.0))
    try:
        r, converged = mlmc(levels, eps, lmax=lmax, n0=n0, theta=theta, batch_size=sim_batch, pilot=pilot), True
    except WeakConvergenceFailure as e:
        r, converged = e.result, False
    seq, mc_seq = sequential_calls(r, batch_size, pilot_calls)
    return PredictedRun(float(eps), r.nfe, r.nfe_mc, r.nfe_mc / r.nfe, seq, mc_seq, r.levels[-1].level,
                        [lv.n_samples for lv in r.levels], r.mc_steps, r.mc_samples, r.method, converged)


def level_costs(result: MLMCResult, lmax: int) -> tuple[dict, dict]:
    """(coupled, plain) cost per sample of levels 0..lmax + 1 from a run: a coupled level costs what the run
    recorded where it sampled it, and grows by M^gamma per level above; a plain sample of P_l costs the Lmin
    level's M^(l - Lmin) times (the driver's rule for level functions without ``plain_cost``); below Lmin
    (only the automatic-Lmin pilot goes there) the diffusion levels' M^l + M^(l-1)."""
    M, lmin = result.M, result.lmin
    recorded = {lv.level: lv.cost for lv in result.levels if lv.level > lmin}
    top = max(recorded)
    coupled = {l: recorded.get(l, level_cost(M, l, -1)) for l in range(top + 1)}
    coupled.update({l: recorded[top] * M ** (result.gamma * (l - top)) for l in range(top + 1, lmax + 2)})
    plain = {l: result.levels[0].cost * float(M) ** (l - lmin) for l in range(lmax + 2)}
    return coupled, plain


def _median_run(runs: list[PredictedRun]) -> PredictedRun:
    """The run of median MLMC cost, with the median of each cost over the runs (synthetic runs are noisy:
    plain MC's count ~ V / (eps^2 - B^2) is steep in the bias estimate near eps)."""
    mid = sorted(runs, key=lambda r: r.nfe)[len(runs) // 2]
    med = {k: float(np.median([getattr(r, k) for r in runs])) for k in
           ("nfe", "nfe_mc", "sequential_calls", "mc_sequential_calls")}
    return replace(mid, **med, savings=med["nfe_mc"] / med["nfe"])


def bootstrap_moments(laws: dict[int, LevelLaw], moments: list[LevelMoments], lmin: int, M: int,
                      seed: int) -> list[LevelMoments]:
    """A parametric-bootstrap replicate of a run's levels: as many samples of each level as the run drew,
    from the synthetic laws fitted to it (pixels independent)."""
    levels = SyntheticLevels(laws, M, lmin, seed)
    return [level_moments(m.level, levels(m.level, m.n, 0, 0)) for m in moments if m.n > 1]


def predict_complexity(result: MLMCResult, eps_list=DEFAULT_EPS, *, predict_eps: float = 0.01,
                       config: MLMCConfig | None = None, lmax: int | None = None, n0: int | None = None,
                       theta: float | None = None, batch_size: int | None = None, auto_lmin: bool | None = None,
                       seeds: int = 5, replicates: int = 16, seed: int = 0) -> ComplexityPrediction:
    """Predicted MLMC and plain-MC costs at every eps of ``eps_list`` and at ``predict_eps`` from ``result``'s
    levels: the median over ``seeds`` synthetic driver runs per eps. At ``predict_eps`` also ``replicates``
    parametric-bootstrap replicates (0: none): the run's levels redrawn from the fitted laws, the laws
    refitted to them and the driver run again. ``config`` holds the settings of the runs to predict (default
    ``MLMCConfig()``; ``auto_lmin`` when its lmin is auto); ``lmax``, ``n0``, ``theta``, ``batch_size`` and
    ``auto_lmin``, when given, override it. Lmin is ``result``'s."""
    config = config or MLMCConfig()
    lmax = config.lmax if lmax is None else lmax
    n0, theta = config.n0 if n0 is None else n0, config.theta if theta is None else theta
    batch_size = config.batch_size if batch_size is None else batch_size
    auto_lmin = config.lmin == "auto" if auto_lmin is None else auto_lmin
    if not result.moments:
        raise InputError("result: no level moments to predict from (a result read back from JSON has none)")
    eps_all = sorted({float(e) for e in (*eps_list, predict_eps)}, reverse=True)
    if any(not (math.isfinite(e) and e > 0) for e in eps_all):
        raise InputError(f"eps_list: expected positive numbers, got {list(eps_list)} and predict_eps {predict_eps}")
    if seeds < 1 or replicates < 0:
        raise InputError(f"seeds/replicates: expected seeds >= 1 and replicates >= 0, got {seeds} and {replicates}")
    lmin, M = result.lmin, result.M
    lmax = max(lmax, result.levels[-1].level)
    kw = dict(lmax=lmax, n0=n0, theta=theta, batch_size=batch_size, auto_lmin=auto_lmin)
    kw["costs"] = level_costs(result, lmax)
    laws, rates = synthetic_laws(result.moments, lmin, M, lmax)
    rows = []
    for eps in eps_all:
        rows.append(_median_run([predict_run(laws, lmin, M, eps, seed=seed + k, **kw) for k in range(seeds)]))
    boot = []
    for k in range(replicates):
        laws_k, _ = synthetic_laws(bootstrap_moments(laws, result.moments, lmin, M, seed + 10_000 + k), lmin, M, lmax)
        r = predict_run(laws_k, lmin, M, predict_eps, seed=seed + 20_000 + k, **kw)
        boot.append((r.nfe, r.nfe_mc))
    point = next(r for r in rows if r.eps == float(predict_eps))
    savings = np.array([mc / n for n, mc in boot])
    return ComplexityPrediction(
        rows=rows, predict_eps=float(predict_eps), savings=point.savings,
        savings_sd=float(savings.std(ddof=1)) if len(boot) > 1 else math.nan,
        nfe_sd=float(np.std([n for n, _ in boot], ddof=1)) if len(boot) > 1 else math.nan,
        savings_interval=tuple(float(q) for q in np.percentile(savings, [16, 84])) if boot else (math.nan, math.nan),
        replicates=boot, alpha=rates.alpha, beta=rates.beta)
