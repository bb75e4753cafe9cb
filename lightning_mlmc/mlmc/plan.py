"""Giles' rates and sample counts, and the predictions the driver plans its rounds with.

alpha, beta, gamma are fitted by least squares on log_M of the (debiased) |E[Y_l]|, V_l and C_l against l
over the coupled levels (floors 0.5 as in Giles' code; alpha is capped at 1, the samplers' weak order, and
fitted from the largest |E[Y_l]| on: coarser levels are pre-asymptotic). A plan extrapolates V_l and the
remaining bias to the levels not sampled yet, so that one round can take every level a run will need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lightning_mlmc.mlmc.estimates import (
    LevelMoments,
    bias_of_level,
    debiased_rms,
    pooled_plain_variance,
    remaining_bias_weights,
    sizing_variance,
)

MAX_ALPHA = 1.0  # the weak order of the DDPM/DDIM exponential integrators


@dataclass(frozen=True)
class Rates:
    alpha: float
    beta: float
    gamma: float
    alpha_se: float = 0.0  # standard error of the fitted alpha (0 when given; 0.5 when assumed)
    resolved: bool = True  # alpha was fitted on at least two levels past the largest mean (or given)


def fit_rate(levels: list[int], values: list[float], M: int, weights=None) -> float:
    """-slope of log_M(values) against level (weighted least squares with ``weights``, 1 / sd of each log),
    floored at 0.5 as in Giles' code."""
    v = np.maximum(np.asarray(values, dtype=float), 1e-300)
    if len(levels) < 2:
        return 0.5
    slope = np.polyfit(np.asarray(levels, dtype=float), np.log(v) / np.log(M), 1, w=weights)[0]
    return float(max(0.5, -slope))


def fit_growth(levels: list[int], costs: list[float], M: int) -> float:
    """Slope of log_M(cost) against level (gamma), floored at 0.5 as in Giles' code."""
    if len(levels) < 2:
        return 1.0
    return float(max(0.5, np.polyfit(np.asarray(levels, float), np.log(costs) / np.log(M), 1)[0]))


def fit_rates(moments: list[LevelMoments], lmin: int, M: int, cost, alpha0=None, beta0=None, gamma0=None) -> Rates:
    """alpha, beta, gamma from the coupled levels (fixed where given).

    alpha is fitted on the debiased |E[Y_l]| (noise floor removed; Giles' fix for vanishing values) from the
    largest of them on: the coarser levels before it are pre-asymptotic (on the diffusion problems their
    means change sign and grow) and would flatten the slope, the finer ones past it are where the weak
    error expansion holds. With fewer than two levels past the peak alpha is not resolved: it is taken as 1
    (the samplers' weak order, the cap) for planning, and the bias test cannot pass yet. Its standard error
    (delta method on the logs) tells the bias test how far to trust extrapolations over several levels."""
    coupled = [m for m in moments if m.level > lmin and m.n > 1 and m.refines]  # a network switch is no refinement
    lv = [m.level for m in coupled]
    vars_ = [float(m.var.mean()) for m in coupled]
    means = [debiased_rms(m) for m in coupled]
    for i in range(1, len(coupled)):  # Giles' fix for possible zero values at fine levels
        means[i] = max(means[i], 0.5 * means[i - 1] / M ** (alpha0 or 1.0))
        vars_[i] = max(vars_[i], 0.5 * vars_[i - 1] / M ** (beta0 or 1.0))
    alpha, alpha_se, resolved = alpha0, 0.0, True
    if alpha0 is None:
        peak = max(range(len(means)), key=lambda i: means[i]) if means else 0
        points = list(zip(lv, means))[peak:]
        if len(points) >= 2:  # weighted by the precision of each log mean (sparse levels' are poor)
            sd = _log_sd(points, {m.level: m for m in coupled}, M)
            alpha = min(MAX_ALPHA, fit_rate([p[0] for p in points], [p[1] for p in points], M,
                                            weights=1.0 / np.maximum(sd, 0.01)))
            alpha_se = _slope_se(points, {m.level: m for m in coupled}, M)
        else:
            alpha, alpha_se, resolved = MAX_ALPHA, 0.5, False
    beta = beta0 if beta0 is not None else fit_rate(lv, vars_, M)
    gamma = gamma0 if gamma0 is not None else fit_growth(lv, [cost(l) for l in lv], M)
    return Rates(alpha, beta, gamma, alpha_se, resolved)


def _log_sd(points: list[tuple[int, float]], by_level: dict, M: int) -> np.ndarray:
    """sd of log_M of each level mean (the delta method: se / (m ln M)), at most 1 (a relative error above 1
    says no more than 1 does)."""
    return np.array([min(1.0, math.sqrt(float(by_level[l].var.mean()) / by_level[l].n) / max(m, 1e-300))
                     / math.log(M) for l, m in points])


def _slope_se(points: list[tuple[int, float]], by_level: dict, M: int) -> float:
    """Standard error of the least-squares slope of log_M |E[Y_l]| on l, from each mean's standard error
    (the delta method: sd(log_M m) = se / (m ln M))."""
    x = np.array([p[0] for p in points], dtype=float)
    sd = _log_sd(points, by_level, M)
    dx = x - x.mean()
    return float(min(0.5, math.sqrt(((dx / (dx**2).sum()) ** 2 * sd**2).sum())))


def optimal_samples(var: list[float], cost: list[float], budget: float) -> list[int]:
    """Giles' N_l = ceil( sqrt(V_l / C_l) sum_k sqrt(V_k C_k) / budget ): the cheapest N_l whose estimator
    variance sum_l V_l / N_l is ``budget`` ((1 - theta) eps^2 in Giles' algorithm)."""
    total = sum(math.sqrt(v * c) for v, c in zip(var, cost))
    return [math.ceil(math.sqrt(v / c) * total / budget) if v > 0 else 0 for v, c in zip(var, cost)]


@dataclass(frozen=True)
class Plan:
    """Sample counts for levels lmin..L (L may be beyond the sampled ones) and what they cost."""

    L: int
    samples: dict  # level -> N_l (total, not additional)
    budget: float  # the variance budget eps^2 - B_L^2 the counts meet
    bias2: float  # the squared bias of level L the budget leaves room for
    cost: float  # sum_l N_l C_l


PRIOR_SAMPLES = 10  # the weight, in samples, of the fitted V_l in a level's sizing variance


def level_variances(moments: list[LevelMoments], lmin: int | None = None, M: int = 2) -> dict[int, float]:
    """The V_l the driver sizes N_l with (levels with two samples or more).

    A coupled level's own V_l from a few samples is too noisy to size with (from five samples it is often
    half the truth, and the run then misses its RMSE target; sized one standard error up it is often
    twice, and the run overspends); it is pooled with the V_l that the fit of log V_l against l over the
    coupled levels predicts, as if that prediction were ``PRIOR_SAMPLES`` more samples:
    V = (N_l V_l + k V_fit) / (N_l + k). The plain level Lmin uses every path of its law one standard error up
    (``plain_level_variance``); every other level, while fewer than three coupled levels exist, its own V_l one
    standard error up (``sizing_variance``)."""
    out = {m.level: sizing_variance(m) for m in moments if m.n > 1}
    plain = plain_level_variance(moments, lmin)
    if plain is not None:
        out[lmin] = plain
    coupled = [m for m in moments if lmin is not None and m.level > lmin and m.n > 1 and m.refines]
    if len(coupled) < 3:
        return out
    x = np.array([m.level for m in coupled], dtype=float)
    w = np.array([m.n for m in coupled], dtype=float)
    logv = np.log(np.maximum([float(m.var.mean()) for m in coupled], 1e-300))
    slope, intercept = np.polyfit(x, logv, 1, w=np.sqrt(w))
    for m in coupled:
        fit = math.exp(intercept + slope * m.level)
        out[m.level] = (m.n * float(m.var.mean()) + PRIOR_SAMPLES * fit) / (m.n + PRIOR_SAMPLES)
    return out


def plain_level_variance(moments: list[LevelMoments], lmin: int | None) -> float | None:
    """V[P_Lmin] one standard error up, from every path of that law the run holds: the samples of the plain
    level Lmin and the coarse paths of level Lmin + 1 (independent streams; a network switch's coarse paths
    are another grid's and do not count). None when Lmin has fewer than two samples."""
    by = {m.level: m for m in moments}
    base = by.get(lmin) if lmin is not None else None
    if base is None or base.n < 2:
        return None
    above = by.get(lmin + 1)
    if above is None or above.n < 1 or not above.refines:
        return sizing_variance(base)
    var, n = pooled_plain_variance(moments, lmin, lmin)
    return var * (1.0 + math.sqrt(max(base.kurtosis, 3.0) - 1.0) / math.sqrt(n))


MAX_JUMP = 2  # levels a plan may add at once (the extrapolation is only as good as alpha)


def plan(moments: list[LevelMoments], lmin: int, M: int, cost, eps: float, theta: float, rates: Rates, lmax: int,
         floor: int = 0, min_L: int = 0, jump: int = MAX_JUMP) -> Plan:
    """The predicted cheapest MLMC run from here: over L from the finest sampled level Ls to lmax, the
    squared bias B_L^2 = B_Ls^2 M^(-2 alpha (L - Ls)) (extrapolated; at most theta eps^2) leaves the variance
    budget eps^2 - B_L^2, whose optimal N_l cost (sum_l sqrt(V_l C_l))^2 / budget, with V_l extrapolated by
    beta above the sampled levels; the L of least cost wins (a finer L buys variance budget with cost).
    ``floor``: the fewest samples a level not yet sampled gets (its mean and V_l must be estimable);
    ``min_L``: the coarsest L considered; ``jump``: how many levels past it at most."""
    Ls = moments[-1].level
    tail = remaining_bias_weights(moments, lmin, M, rates.alpha, alpha_se=rates.alpha_se)
    b2 = bias_of_level(moments, Ls, tail).value if tail else eps**2  # the most likely L; the test decides
    var = level_variances(moments, lmin, M)
    last = max(var) if var else lmin
    best = None
    top = min(lmax, max(Ls, min_L) + jump)
    for L in range(min(max(Ls, min_L), lmax), top + 1):
        bias2 = b2 * M ** (-2 * rates.alpha * (L - Ls))
        if bias2 > theta * eps**2 and L < top:
            continue
        bias2 = min(bias2, theta * eps**2)
        vl = [var.get(l, var.get(last, 0.0) * M ** (-rates.beta * (l - last))) for l in range(lmin, L + 1)]
        cl = [cost(l) for l in range(lmin, L + 1)]
        budget = eps**2 - bias2
        ns = optimal_samples(vl, cl, budget)
        samples = {l: max(n, floor) if l > Ls else n for l, n in zip(range(lmin, L + 1), ns)}
        candidate = Plan(L, samples, budget, bias2, sum(samples[l] * c for l, c in zip(range(lmin, L + 1), cl)))
        if best is not None and candidate.cost >= best.cost:
            break  # the costs fall, then rise, with L
        best = candidate
    return best


def predicted_plain_mc(moments: list[LevelMoments], lmin: int, M: int, eps: float, rates: Rates, lmax: int,
                       plain_cost) -> tuple[int, int, float]:
    """(level, samples, cost) of the cheapest plain MC predicted from here, over the sampled levels and the
    finer ones up to lmax (their bias extrapolated by alpha, their V[P_l] taken as the finest level's)."""
    from lightning_mlmc.mlmc.estimates import pooled_plain_variance

    tail = remaining_bias_weights(moments, lmin, M, rates.alpha, alpha_se=rates.alpha_se)
    Ls = moments[-1].level
    best = (Ls, 0, math.inf)
    var_fine = math.nan
    for level in range(lmin, lmax + 1):
        if level <= Ls:
            var, _ = pooled_plain_variance(moments, level, lmin)
            var_fine = var if math.isfinite(var) else var_fine
            b2 = bias_of_level(moments, level, tail).upper if tail or level == Ls else eps**2
            if not tail and level == Ls:
                b2 = math.inf  # no coupled level: the bias is unknown
        else:
            var = var_fine
            b2 = bias_of_level(moments, Ls, tail).upper * M ** (-2 * rates.alpha * (level - Ls)) if tail else math.inf
        if not math.isfinite(var) or b2 >= eps**2:
            continue
        n = max(2, math.ceil(var / (eps**2 - b2)))
        if n * plain_cost(level) < best[2]:
            best = (level, n, n * plain_cost(level))
    return best


def first_pilot(n0: int, pixels: int) -> int:
    """The first pilot per level: enough samples that the pixel-averaged variances rest on about 32
    values (their relative error about 25%), at least 4 and at most n0."""
    return max(4, min(n0, math.ceil(32 / max(pixels, 1)) + 1))
