"""How a driver run ends: the plain-MC finish (when the pilot predicted plain MC cheaper) and the result
with its honest comparison (``estimates.plain_mc_alternative``) and Giles' same-grid figure."""

from __future__ import annotations

import math

import lightning_mlmc.mlmc.engine as engine
from lightning_mlmc.mlmc.estimates import (
    LevelMoments,
    SquaredBias,
    bias_of_level,
    debiased_rms,
    pooled_plain_variance,
    remaining_bias_weights,
    tail_relative_sd,
)
from lightning_mlmc.mlmc.checks import level_checks
from lightning_mlmc.mlmc.plan import Rates, level_variances
from lightning_mlmc.mlmc.result import MLMCResult
from lightning_mlmc.mlmc.sums import LevelStats, level_stats, world_size


def plain_samples(run, moments: list[LevelMoments], level: int, fresh: bool = False):
    """(sum, sum of squares, n) of the samples of P_level the run holds: the fine paths of that level, the
    coarse paths of the next (independent streams, the same law) and the plain samples drawn for the finish;
    ``fresh``: only the last, drawn after the switch.

    The estimate of a plain-MC finish uses the fresh samples only: the others decided the switch (a run
    finishes as plain MC where the pilot made that level look cheap and unbiased), and reusing them biases
    the estimate (on a digital option the runs that switched missed by +0.75 eps on average when they were
    reused). They still size the finish: their variance is as good as any."""
    by = {m.level: m for m in moments}
    parts = []
    if level in by and not fresh:
        parts.append((by[level].fine_sum, by[level].fine_sq, by[level].n))
    if level + 1 in by and level + 1 > run.lmin and not fresh:
        parts.append((by[level + 1].coarse_sum, by[level + 1].coarse_sq, by[level + 1].n))
    if level in run.st.plain:
        p = run.st.plain[level]
        parts.append((p.sums["f1"], p.sums["f2"], p.n))
    return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)


def mc_bias(run, moments: list[LevelMoments], rates: Rates) -> SquaredBias:
    """The squared bias of plain MC at the finish's level: the sampled level means above it plus the tail."""
    tail = remaining_bias_weights(moments, run.lmin, run.M, rates.alpha, alpha_se=rates.alpha_se)
    return bias_of_level(moments, run.st.mc_level, tail, tail_relative_sd(run.M, rates.alpha, rates.alpha_se))


def plain_variance(run, moments: list[LevelMoments], level: int) -> float:
    """Pixel-averaged V[P_level] over every sample of P_level the run holds (``plain_samples``)."""
    s1, s2, n = plain_samples(run, moments, level)
    return float(((s2 / n - (s1 / n) ** 2).clamp_min(0.0) * (n / max(n - 1, 1))).mean())


def mc_bias2(run, moments: list[LevelMoments], rates: Rates) -> float:
    """The squared bias a plain-MC finish is sized with: one standard error up when that leaves room for a
    variance (at least (1 - theta) eps^2, as MLMC's own bias share), else the point estimate (a finish chosen
    because MLMC would lose against the plain MC it names: that one's own sizing)."""
    bias = mc_bias(run, moments, rates)
    return bias.upper if bias.upper <= run.s.theta * run.s.eps**2 else bias.value


def mc_round(run, moments: list[LevelMoments], rates: Rates) -> dict[int, int] | None:
    """Fresh plain samples the finish still needs at its level: V[P_l] / (eps^2 - B^2) (``mc_bias2``; none
    once its estimated MSE, V[P_l] / n + B^2, is within eps^2); None when B^2 leaves less than a tenth of eps^2
    (the run then goes back to MLMC)."""
    level = run.st.mc_level
    var, have = plain_variance(run, moments, level), plain_samples(run, moments, level, fresh=True)[2]
    room = run.s.eps**2 - mc_bias2(run, moments, rates)
    if room < 0.1 * run.s.eps**2:
        return None  # the bias estimate leaves (almost) no room: the finish cannot meet eps at this level
    if have > 0 and var / have <= room:
        return {}
    need = math.ceil(var / room) - have
    return {level: max(need, math.ceil(0.01 * have), 2 - have, 1)}


def rmse_estimate(run, moments: list[LevelMoments], rates: Rates, method: str) -> float:
    """The RMSE the driver itself certifies, the number ``converged`` compares with eps: the estimator's
    variance from the variances the run sizes N_l with, plus the squared bias one standard error up."""
    if method == "mc":
        n = plain_samples(run, moments, run.st.mc_level, fresh=True)[2]
        return math.sqrt(plain_variance(run, moments, run.st.mc_level) / max(n, 1) + mc_bias2(run, moments, rates))
    sizing = level_variances(moments, run.lmin, run.M)
    var = sum(sizing.get(m.level, 0.0) / m.n for m in moments if m.n > 0)
    bias, _ = run.bias(moments, rates)
    return math.sqrt(var + bias.upper) if math.isfinite(bias.upper) else math.inf


def result(run, converged: bool, wall_seconds: float, method: str) -> MLMCResult:
    st, s, M = run.st, run.s, run.M
    raw = run.moments()
    moments, rates = run.estimates()  # Giles' floors on the levels that show no variation
    checks, warnings = level_checks(raw)
    stats = [_stats(run, m, moments, checks.get(m.level, 0.0)) for m in raw]
    bias, _ = run.bias(moments, rates)
    plain_nfe = sum(p.n * run.plain_cost(l) for l, p in st.plain.items())
    nfe = sum(x.n_samples * x.cost for x in stats) + st.pilot_nfe + plain_nfe
    calls = sum(x.calls for x in stats) + st.pilot_calls + sum(p.calls for p in st.plain.values())
    mc = run.plain_alternative(moments, rates)
    if method == "mc":
        s1, s2, n = plain_samples(run, moments, st.mc_level, fresh=True)
        estimate = s1 / n
        var = float(((s2 / n - estimate**2).clamp_min(0.0) * (n / max(n - 1, 1))).mean()) / n
        bias2 = mc_bias(run, moments, rates).bound
    else:
        estimate = sum(m.mean for m in raw)
        # rmse_bound is an upper confidence bound: each V_l raised by two standard errors of a sample
        # variance, V_l sqrt((kurtosis - 1) / N_l), and the bias at its upper confidence value.
        var = sum(x.var / x.n_samples * (1 + 2 * math.sqrt(max(x.kurtosis - 1, 0.0) / x.n_samples))
                  for x in stats if x.n_samples > 0)
        bias2 = bias.bound
    same = same_grid(run, moments)
    nfe_mc = min(mc.cost, same) if mc.meets_eps and math.isfinite(same) else (mc.cost if mc.meets_eps else same)
    return MLMCResult(
        estimate=estimate.tolist(), levels=stats, alpha=rates.alpha, beta=rates.beta, gamma=rates.gamma,
        nfe=float(nfe), nfe_counted=int(calls), nfe_mc=float(nfe_mc), savings=float(nfe_mc / nfe),
        eps=float(s.eps), rmse_bound=float(math.sqrt(var + bias2)) if math.isfinite(bias2) else math.inf,
        rmse_estimate=rmse_estimate(run, moments, rates, method),
        bias_estimate=float(math.sqrt(bias2)) if math.isfinite(bias2) else math.inf,
        wall_seconds=wall_seconds, M=M, lmin=run.lmin, theta=s.theta, converged=converged,
        pilot_nfe=float(st.pilot_nfe), method=method, mc_level=st.mc_level if method == "mc" else None,
        mc_reason=st.mc_reason if method == "mc" else None, lmin_reason=st.lmin_reason,
        mc_steps=int(mc.steps), mc_samples=int(mc.samples) * (2 if mc.antithetic else 1),  # paths: nfe_mc = steps x
        mc_meets_eps=bool(mc.meets_eps), mc_antithetic=bool(mc.antithetic),  # samples (pairs: twice the pairs)
        nfe_mc_same_grid=float(same), savings_same_grid=float(same / nfe), rounds=st.rounds,
        sequential_calls=int(st.sequential_calls), rows_per_call=calls / max(st.sequential_calls, 1),
        mc_sequential_calls=engine.plain_mc_calls(int(mc.steps), int(mc.samples) * (2 if mc.antithetic else 1),
                                                  s.batch_size * (2 if mc.antithetic else 1), s.row_budget),
        world_size=world_size(), scheme=dict(run.levels.scheme), warnings=warnings,
        cost_unit=run.levels.cost_unit, network_costs=network_costs(run),
        moments=moments,
    )


def network_costs(run) -> dict:
    """Per network of a level function over networks: its row cost (in the cost unit), and the rows it
    evaluated and the seconds per row measured in this process's rounds (the engine's batch sizes)."""
    out = {}
    for name, info in run.levels.network_costs().items():
        rows, seconds = run.engine.network_rows.get(name, 0), run.engine.network_seconds.get(name, 0.0)
        out[name] = {**info, "rows": rows, "seconds_per_row": seconds / rows if rows else None}
    return out


def _stats(run, m: LevelMoments, moments: list[LevelMoments], check: float) -> LevelStats:
    x = level_stats(m.level, run.st.sums[m.level], run.levels.cost(m.level))
    x.mean_debiased = debiased_rms(m)
    x.var_plain = pooled_plain_variance(moments, m.level, run.lmin)[0]
    x.check = check
    x.floored = next(f.floored for f in moments if f.level == m.level)
    return x


def same_grid(run, moments: list[LevelMoments]) -> float:
    """Giles' comparison: plain MC on the run's finest grid, V[P_L] C_L / ((1 - theta) eps^2)."""
    L = moments[-1].level
    var, _ = pooled_plain_variance(moments, L, run.lmin)
    return var * run.plain_cost(L) / ((1 - run.s.theta) * run.s.eps**2) if math.isfinite(var) else math.nan
