"""What keeps a driver run from trusting what its pilot could not see: levels that show no variation (a
discontinuous payoff's zeros), sparse level means, heavy tails that show up after the pilot, and plans that
grow past what plain MC or a higher Lmin would cost.

- levels without variation are floored (``estimates.floor_untrusted``) and, when no neighbour varies, sampled
  further (``untrusted_growth``, up to ``trust_cap``); sparse levels get samples before a finer level when the
  weak rate cannot be resolved from them (``sparse_growth``);
- before every round the run compares what MLMC still plans with what a plain MC and an MLMC run from a higher
  Lmin would still need, and switches to the cheapest (``decide``); rounds are capped by what the run has
  spent (``capped``), so a plan can grow only so far before it is checked again.

The functions take the driver's run (``driver._Run``), as ``finish.py``'s do.
"""

from __future__ import annotations

import math

import torch

from lightning_mlmc.mlmc.checks import KURTOSIS_WARNING
from lightning_mlmc.mlmc.estimates import (
    NORMAL_NONZERO,
    RELIABLE_VALUES,
    LevelMoments,
    near_normal,
    pooled_plain_variance,
    untrusted,
)
from lightning_mlmc.mlmc.estimates import SquaredBias, remaining_bias_weights
from lightning_mlmc.mlmc.plan import Rates, optimal_samples, plan

ROUND_GROWTH = 12  # a round costs at most this many times what the run has spent before it (``capped``)
UPPER_SHARE = 2.0  # ``topup``: the bias's upper value may take up to this many times its share theta eps^2
SETTLE_SE = 1.5  # ``settle`` aims the bias estimate's standard errors this many times within its room
RAISE_GAIN = 2.0  # Lmin is raised when that cuts what MLMC still needs by at least this factor (``decide``)
UPPER_COUNT = 4.74  # 95% upper bound of a Poisson count of which one was seen (``trust_cap``)


# -- levels that show no variation, and sparse ones ------------------------------------------------------------
def trust_cap(run, moments: list[LevelMoments], level: int) -> int:
    """The samples after which a level without variation is accepted as it is.

    With k nonzero differences seen in n samples, the count's 95% upper bound is about 3 (k = 0) or 4.74
    (k = 1) (Poisson), so |E[Y_l]| <= 4.74 J / n, J the size of a difference, taken as twice the standard
    deviation of P_l (a jump across a discontinuity of the payoff); n = 2 * 4.74 J / (sqrt(theta) eps) keeps
    that below half the bias's share of eps."""
    var, _ = pooled_plain_variance(moments, level, run.lmin)
    jump = 2.0 * math.sqrt(var) if math.isfinite(var) else 0.0
    return max(run.s.n0, math.ceil(2 * UPPER_COUNT * jump / (math.sqrt(run.s.theta) * run.s.eps)))


def untrusted_growth(run, moments: list[LevelMoments]) -> dict[int, int]:
    """More samples (four times as many, up to ``trust_cap``) at the coupled levels that show (nearly) no
    variation and have no trusted coupled neighbour to take Giles' floors from (``floor_untrusted``: a floored
    level is sized and tested with its floors, as in Giles' drivers); until then the run does not decide L or
    N_l from them."""
    out = {}
    for m in untrusted(moments, run.lmin):
        cap = trust_cap(run, moments, m.level)
        if not m.floored and m.n < cap:
            out[m.level] = min(3 * m.n, cap - m.n)
    return out


def sparse_growth(run, moments: list[LevelMoments]) -> dict[int, int]:
    """Samples that bring the coupled levels whose means rest on few nonzero differences (``near_normal``) to
    about ``NORMAL_NONZERO`` of them (at most four times their count): when the weak rate cannot be resolved
    from such means, more of them is cheaper information than a finer level."""
    out = {}
    for m in moments:
        if m.level > run.lmin and not near_normal(m):
            want = math.ceil(m.n * NORMAL_NONZERO / max(m.nonzero, 1.0))
            out[m.level] = min(want, 4 * m.n) - m.n
    return {l: k for l, k in out.items() if k > 0}


def settle(run, moments: list[LevelMoments], rates: Rates, bias: SquaredBias, room: float) -> dict[int, int]:
    """An undecided bias test (its value within its share, its upper value not): samples at the levels the bias
    estimate rests on that bring ``SETTLE_SE`` of its standard errors within the room left by its value, at the
    least cost: the variance of the bias estimate, sum_l w_l / N_l with w_l the squared weight of level l's mean
    times V_l, must shrink by (1.5 se / gap)^2 (at most 4); Giles' optimal allocation for that
    (``optimal_samples``) gives each level its N_l."""
    gap = room - bias.value
    if gap <= 0:
        return {}
    factor = min(4.0, (SETTLE_SE * bias.se / gap) ** 2)
    tail = remaining_bias_weights(moments, run.lmin, run.M, rates.alpha, alpha_se=rates.alpha_se)
    levels = [m for m in moments if m.level in tail]
    w = [tail[m.level] ** 2 * float(m.var.mean()) for m in levels]
    current = sum(wl / m.n for wl, m in zip(w, levels))
    if factor <= 1.0 or current <= 0:
        return {}
    target = optimal_samples(w, [run.levels.cost(m.level) for m in levels], current / factor)
    return {m.level: k - m.n for m, k in zip(levels, target) if k > m.n}


def topup(run, moments: list[LevelMoments], var: list[float], cost: list[float], bias: SquaredBias,
          room: float) -> dict[int, int] | None:
    """An undecided bias test paid for by the variance: when the bias's point value is within its share
    theta eps^2 and its upper value (one standard error up) within ``UPPER_SHARE`` times that, the run may
    size the variance for what that upper value leaves, eps^2 - upper, instead of settling the bias or
    adding a finer level (the run takes the cheapest of the three). The estimated MSE, bias one standard
    error up, still stays within eps^2; only the split moves (Collier et al. 2015 choose it per run too).
    Returns the samples still needed for that budget (level -> more samples; {} when none), or None when the
    upper value is too large for it."""
    if bias.value > room or bias.upper > UPPER_SHARE * room:
        return None
    more = optimal_samples(var, cost, run.s.eps**2 - bias.upper)
    return {m.level: k - m.n for m, k in zip(moments, more) if k > m.n}


# -- what the run has spent and still plans ------------------------------------------------------------------
def spent(run) -> float:
    """NFEs spent so far (by the cost formula; the unused pilot, plain samples and dropped levels included)."""
    st = run.st
    return (sum(s.n * run.levels.cost(l) for l, s in st.sums.items()) + st.pilot_nfe
            + sum(s.n * run.plain_cost(l) for l, s in st.plain.items()))


def planned_more(run, moments: list[LevelMoments], rates: Rates, more: dict[int, int] | None = None) -> float:
    """NFEs MLMC still plans: the predicted run's N_l beyond the samples drawn (or ``more``, the next round,
    where larger), and the growth of levels without variation."""
    p = run.predicted_mlmc(moments, rates)
    n = {m.level: m.n for m in moments}
    more = more or {}
    extra = {l: max(p.samples.get(l, 0) - n.get(l, 0), more.get(l, 0)) for l in set(p.samples) | set(more)}
    total = sum(k * run.levels.cost(l) for l, k in extra.items())
    for l, k in untrusted_growth(run, moments).items():
        total += max(0, k - extra.get(l, 0)) * run.levels.cost(l)
    return total


def capped(run, more: dict[int, int]) -> dict[int, int]:
    """The next round, scaled down (every level alike) to at most ``ROUND_GROWTH`` times what the run has
    spent so far. A plan sized from estimates that a heavy tail has not shown yet (or from a pilot it fooled)
    then cannot spend the run's budget many times over in one round before it is checked again (``decide``)
    with what this round saw; a run planned well from a pilot of ``pilot_fraction`` (0.1) of its cost draws
    its main round in one (about ten times the pilot)."""
    price = sum(k * run.levels.cost(l) for l, k in more.items())
    cap = ROUND_GROWTH * spent(run)
    if price <= cap or cap <= 0:
        return more
    n = {l: s.n for l, s in run.st.sums.items()}
    # a level keeps at least ``floor`` samples in all (its mean and variance must be estimable)
    return {l: max(min(k, run.s.floor - n.get(l, 0)), math.floor(k * cap / price), 0) for l, k in more.items()}


# -- switching: plain MC, or MLMC from a higher Lmin ---------------------------------------------------------
def _heavy(moments: list[LevelMoments]) -> str:
    heavy = [f"level {m.level}: kurtosis {m.kurtosis:.3g}" for m in moments if m.kurtosis > KURTOSIS_WARNING]
    return f" ({'; '.join(heavy)})" if heavy else ""


def higher_lmin(run, moments: list[LevelMoments], rates: Rates) -> tuple[int, dict[int, int], float] | None:
    """(Lmin k, the samples its run would still draw, their NFEs) of the cheapest MLMC run from a higher Lmin,
    predicted as the run's own plan is, or None. Level k becomes plain: its variance is V[P_k] pooled over
    the paths of that law the run holds, its samples are fresh (the coupled ones are dropped, their cost kept);
    the coupled levels above are kept. Heavy tails on the coarse levels (a sampler with few steps that is
    occasionally far off) make the lower levels cost more than they save: the plan then says so."""
    if not run.can_finish_plain() or len(moments) < 3:
        return None
    by = {m.level: m for m in moments}
    best = None
    for k in [m.level for m in moments if m.level > run.lmin][:-1]:
        fine, coarse = by[k], by.get(k + 1)
        n = fine.n + (coarse.n if coarse is not None else 0)
        if n * fine.mean.numel() < RELIABLE_VALUES:
            continue
        s1 = fine.fine_sum + (coarse.coarse_sum if coarse is not None else 0.0)
        s2 = fine.fine_sq + (coarse.coarse_sq if coarse is not None else 0.0)
        var = ((s2 / n - (s1 / n) ** 2).clamp_min(0.0) * (n / (n - 1)))
        plain = LevelMoments(k, n, s1 / n, var, s1, s2, torch.zeros_like(s1), torch.zeros_like(s1), 3.0)
        levels_k = run.levels.with_lmin(k)
        p = plan([plain, *(m for m in moments if m.level > k)], k, run.M, levels_k.cost, run.s.eps, run.s.theta,
                 rates, run.s.lmax, floor=run.s.floor, min_L=max(k + 2, run.min_L(moments)))
        draws = {l: (c if l == k else max(0, c - by[l].n if l in by else c)) for l, c in p.samples.items()}
        cost = sum(c * levels_k.cost(l) for l, c in draws.items())
        if best is None or cost < best[2]:
            best = (k, draws, cost)
    return best


def raise_lmin(run, k: int) -> None:
    """Make level k the run's plain Lmin: the levels at and below it are dropped (their cost stays in ``nfe``,
    counted as ``pilot_nfe``), level k starts afresh with plain samples from new streams."""
    st = run.st
    for level in [l for l in st.sums if l <= k]:
        st.pilot_nfe += st.sums[level].n * run.levels.cost(level)
        st.pilot_calls += st.sums[level].calls
        del st.sums[level]
        st.pending.pop(level, None)
    run.levels, run.lmin, st.lmin = run.levels.with_lmin(k), k, k
    st.ensure(k)


def decide(run, moments: list[LevelMoments], rates: Rates, more: dict[int, int] | None = None) -> str:
    """``mlmc`` (go on), ``mc`` (finish as plain MC) or ``lmin`` (Lmin raised; the next round is pending):
    after the pilot, and again before every MLMC round (``more``: the samples that round would draw), the
    cheapest of the three from here on (sunk cost not counted), so a run whose plan grows (a heavy-tailed level
    whose outliers show up late, a level that needed more samples than its pilot said) does not walk on.

    Plain MC is sized with its bias one standard error up, the extrapolated tail's uncertainty included, as
    MLMC's own test is. The honest ``nfe_mc`` (point estimates) is not a safe thing to switch to: a pilot
    fooled by a heavy tail made such a switch miss by 6.7 eps in a test, with 4-step samples, and switching
    whenever spent plus planned exceeded it raised the RMSE of Giles' GBM test to 1.5 eps. Plain MC runs at a
    level below the finest sampled one (at the finest, its bias rested on an extrapolation from 12 samples in
    two DDIM runs of the demo model, which then missed by 1.2 eps); it draws fresh samples (the ones that
    decided the switch would bias it). The reason is kept (``mc_reason``, ``lmin_reason``)."""
    if not (run.s.fallback and run.can_finish_plain()) or len(moments) < 2:
        return "mlmc"
    finest = moments[-1].level - 1  # a plain MC's bias must rest on a measured level above it, not on extrapolation
    mlmc_more = planned_more(run, moments, rates, more)
    mc = run.plain_alternative(moments, rates, finest=finest, cautious=True)
    mc_more = mc.cost if mc.meets_eps else math.inf
    raised = higher_lmin(run, moments, rates) if more is not None else None
    lmin_more = raised[2] if raised is not None else math.inf
    st = run.st
    # A higher Lmin must cut what MLMC still needs by RAISE_GAIN: it drops the samples drawn below it and its plan
    # rests on a plain variance pooled from fewer paths (on Gaussian levels a raise for a predicted 17% saving
    # ended 26% dearer); plain MC, the last resort, only has to be cheaper.
    if RAISE_GAIN * lmin_more < mlmc_more and lmin_more <= mc_more:
        k, draws, _ = raised
        st.lmin_reason = (f"round {st.rounds}: MLMC from Lmin {k} needed {lmin_more:.6g} more NFEs, from Lmin "
                          f"{run.lmin} {mlmc_more:.6g} more" + _heavy(moments))
        raise_lmin(run, k)
        run.grow_to(max(st.L, max(draws)))  # the raised run's plan may reach past the finest level so far
        st.pending.update(capped(run, draws))
        return "lmin"
    if mc_more >= min(mlmc_more, lmin_more):
        return "mlmc"
    st.mc_level = mc.level
    st.mc_reason = (f"round {st.rounds}: plain MC with {mc.steps} steps needed {mc_more:.6g} more NFEs, MLMC "
                    f"{mlmc_more:.6g} more" + _heavy(moments))
    return "mc"
