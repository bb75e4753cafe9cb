"""Giles' adaptive MLMC driver (Giles 2008, 2015; pymlmc's ``mlmc``) for vector payoffs.

The loop reads like Giles' pseudo-code; each phase is a short function:

    pilot: N0 samples on levels Lmin..Lmin+2
    repeat
        update the sample sums (``_sample_pending``)
        estimate mean_l, V_l and the rates alpha, beta, gamma (``_rates``)
        set the optimal number of additional samples (``optimal_samples``)
        if (almost) converged: estimate the remaining bias (``_bias``); settle an inconclusive test with
            samples at the finest levels (``_settle``), else add a level (``_add_level``) or stop at Lmax
    until no more samples are needed

Vector payoffs (n pixels): mean_l is the RMS over pixels of the per-pixel mean of Y_l, V_l the mean over
pixels of the per-pixel variance; the MSE target is the pixel-averaged MSE <= eps^2.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from lightning_mlmc.errors import InputError, WeakConvergenceFailure
from lightning_mlmc.mlmc.levels import LevelFunction
from lightning_mlmc.mlmc.lmin import LminChoice
from lightning_mlmc.mlmc.state import DriverState, fingerprint
from lightning_mlmc.mlmc.sums import LevelSums, LevelStats, all_reduce, level_stats, rank_share


@dataclass
class MLMCResult:
    """Result of the adaptive MLMC driver (the RESULT.json of DESIGN.md section 6 plus diagnostics)."""

    estimate: list
    levels: list[LevelStats]
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


@dataclass(frozen=True)
class Rates:
    """Level means and variances after Giles' fix for vanishing values, and the fitted rates."""

    mean: list[float]  # coupled levels Lmin+1..L
    var: list[float]
    alpha: float
    beta: float
    gamma: float


def fit_rate(levels: list[int], values: list[float], M: int) -> float:
    """-slope of log_M(values) against level, floored at 0.5 as in Giles' code."""
    v = np.maximum(np.asarray(values, dtype=float), 1e-300)
    if len(levels) < 2:
        return 0.5
    slope = np.polyfit(np.asarray(levels, dtype=float), np.log(v) / np.log(M), 1)[0]
    return float(max(0.5, -slope))


def fit_growth(levels: list[int], costs: list[float], M: int) -> float:
    """Slope of log_M(cost) against level (gamma), floored at 0.5 as in Giles' code."""
    if len(levels) < 2:
        return 1.0
    return float(max(0.5, np.polyfit(np.asarray(levels, float), np.log(costs) / np.log(M), 1)[0]))


def optimal_samples(var: list[float], cost: list[float], eps: float, theta: float) -> list[int]:
    """Giles' N_l = ceil( sqrt(V_l / C_l) sum_k sqrt(V_k C_k) / ((1 - theta) eps^2) ): the fewest samples
    whose estimator variance sum_l V_l / N_l is (1 - theta) eps^2."""
    total = sum(math.sqrt(v * c) for v, c in zip(var, cost))
    return [math.ceil(math.sqrt(v / c) * total / ((1 - theta) * eps**2)) for v, c in zip(var, cost)]


class _Run:
    """One driver run: the settings, the state and the phases of Giles' algorithm."""

    def __init__(self, levels: LevelFunction, eps: float, lmax: int, n0: int, theta: float, alpha0, beta0, gamma0,
                 batch_size: int, state: DriverState):
        self.levels, self.eps, self.lmax, self.n0, self.theta = levels, eps, lmax, n0, theta
        self.alpha0, self.beta0, self.gamma0, self.batch_size = alpha0, beta0, gamma0, batch_size
        self.st, self.M, self.lmin = state, levels.M, levels.lmin

    # -- pilot ---------------------------------------------------------------------------------------
    def start(self, pilot: LminChoice | None) -> None:
        """N0 samples on levels Lmin..Lmin+2, reusing an automatic-Lmin pilot's coupled levels above Lmin."""
        st = self.st
        if pilot is not None:
            for level, sums in pilot.pilot.items():
                if level > self.lmin:  # coupled levels are the same whatever Lmin is: keep their samples
                    st.sums[level], st.batches[level] = sums, pilot.batches[level]
            st.pilot_nfe, st.pilot_calls = pilot.unused_cost()
            st.batches[self.lmin] = pilot.batches.get(self.lmin, 0)  # fresh streams for the now plain level
        st.lmin = self.lmin
        st.L = min(max([self.lmin + 2, *st.sums]), self.lmax)
        for level in range(self.lmin, st.L + 1):
            st.ensure(level)
            st.pending[level] = max(0, self.n0 - st.sums[level].n)
        st.save()

    # -- update the sample sums -----------------------------------------------------------------------
    def sample_pending(self) -> None:
        st = self.st
        for level in sorted(st.pending):
            while st.pending[level] > 0:
                nb = min(self.batch_size, st.pending[level])
                share, rank = rank_share(nb)
                part = self.levels(level, share, st.batches[level], rank) if share > 0 else LevelSums.zeros(st.pixels)
                st.sums[level].add(all_reduce(part))
                st.batches[level] += 1
                st.pending[level] -= nb
                st.save()

    # -- estimates ------------------------------------------------------------------------------------
    def statistics(self) -> list[LevelStats]:
        return [level_stats(l, self.st.sums[l], self.levels.cost(l)) for l in range(self.lmin, self.st.L + 1)]

    def rates(self, ls: list[LevelStats]) -> Rates:
        M = self.M
        coupled = [s for s in ls if s.level > self.lmin]
        lv = [s.level for s in coupled]
        ml, vl = [s.mean for s in coupled], [s.var for s in coupled]
        # Giles' fix for possible zero values at fine levels.
        a_tmp, b_tmp = (self.alpha0 or 1.0), (self.beta0 or 1.0)
        for i in range(1, len(coupled)):
            ml[i] = max(ml[i], 0.5 * ml[i - 1] / M**a_tmp)
            vl[i] = max(vl[i], 0.5 * vl[i - 1] / M**b_tmp)
        # alpha from the levels past the largest |mean_l|: the coarse levels before it are pre-asymptotic
        # (mean_l grows there on the uniform grid) and would flatten the fitted weak rate.
        peak = int(np.argmax(ml)) if ml else 0
        alpha = self.alpha0 if self.alpha0 is not None else fit_rate(lv[peak:], ml[peak:], M)
        beta = self.beta0 if self.beta0 is not None else fit_rate(lv, vl, M)
        gamma = self.gamma0 if self.gamma0 is not None else fit_growth(lv, [s.cost for s in coupled], M)
        return Rates(ml, vl, alpha, beta, gamma)

    # -- bias test --------------------------------------------------------------------------------------
    def bias(self, rates: Rates, ls: list[LevelStats]) -> float:
        """Giles' estimate max_r mean_(L-r) / M^(r alpha) / (M^alpha - 1), with each |E[Y_l]| replaced by its
        upper confidence bound mean_l + 2 SE: a noisy small mean at a level with few samples must not end
        the refinement early (it did on the bimodal problem, where Y_l is heavy-tailed). The extrapolation
        also caps alpha at 1, the samplers' weak order: a steeper slope fitted from a few noisy levels would
        promise a bias that the scheme cannot deliver."""
        M = self.M
        coupled = [s for s in ls if s.level > self.lmin]
        up = [m + 2.0 * math.sqrt(s.var / max(s.n_samples, 1)) for m, s in zip(rates.mean, coupled)]
        a = min(rates.alpha, 1.0)
        return max(up[-1 - r] / M ** (r * a) for r in range(min(3, len(up)))) / (M**a - 1)

    def settle(self, rates: Rates, ls: list[LevelStats]) -> dict[int, int] | None:
        """Samples that make a statistically inconclusive bias test conclusive, or None when it fails.

        Each of the finest levels in the test must have mean_l + 2 SE within its share of the bias
        budget, room_l = sqrt(theta) eps (M^a - 1) M^(r a). A level with mean_l - 2 SE > room_l fails the
        test outright (a finer level is needed: None); one with mean_l - 2 SE <= room_l < mean_l + 2 SE
        is undecided, and more samples decide it: N >= 4 V_l / (room_l - mean_l)^2 where mean_l < room_l,
        at least twice and at most four times its current count per round."""
        M, a = self.M, min(rates.alpha, 1.0)
        coupled = [s for s in ls if s.level > self.lmin]
        need = {}
        for r in range(min(3, len(coupled))):
            s, m = coupled[-1 - r], rates.mean[-1 - r]
            room = math.sqrt(self.theta) * self.eps * (M**a - 1) * M ** (r * a)
            se = math.sqrt(s.var / s.n_samples)
            if m - 2.0 * se > room:
                return None
            if m + 2.0 * se > room:
                wanted = 4 * s.var / (room - m) ** 2 if m < room else math.inf
                need[s.level] = int(min(max(wanted, 2 * s.n_samples), 4 * s.n_samples)) - s.n_samples
        return need

    def add_level(self, var: list[float], cost: list[float], beta: float) -> dict[int, int]:
        """Level L + 1 with its V_L extrapolated by beta; the new optimal additional samples per level."""
        st = self.st
        st.L += 1
        st.ensure(st.L)
        var = var + [var[-1] / self.M**beta]
        cost = cost + [self.levels.cost(st.L)]
        ns = optimal_samples(var, cost, self.eps, self.theta)
        # Giles (2015) gives the new level only its extrapolated optimal N_L, which can be 1 or 2 samples:
        # its V_L and mean then come from nothing and the bias test and rmse_bound go wrong. A floor of 10
        # samples keeps them estimated (Giles 2008 gave every new level N0, which at the finest levels costs
        # more than the whole optimal estimate).
        ns[-1] = max(ns[-1], min(self.n0, 10))
        return {l: max(0, n - st.sums[l].n) for l, n in zip(range(self.lmin, st.L + 1), ns)}

    # -- result -----------------------------------------------------------------------------------------
    def result(self, converged: bool, wall_seconds: float) -> MLMCResult:
        st, M, theta, eps = self.st, self.M, self.theta, self.eps
        ls = self.statistics()
        rates = self.rates(ls)
        estimate = sum(st.sums[l].sums["y1"] / st.sums[l].n for l in range(self.lmin, st.L + 1))
        # rmse_bound is an upper confidence bound, not a point estimate of the RMSE: each V_l is raised by two
        # standard errors of a sample variance, V_l sqrt((kurtosis - 1) / N_l), and the bias term is already
        # the upper (mean + 2 SE) estimate of the bias test.
        var_est = sum(s.var / s.n_samples * (1 + 2 * math.sqrt(max(s.kurtosis - 1, 0.0) / s.n_samples)) for s in ls)
        bias = self.bias(rates, ls)
        nfe = sum(s.n_samples * s.cost for s in ls) + st.pilot_nfe
        # V[P_L] barely depends on L; take it from the finest level with enough samples to estimate it.
        var_pl = next((s.var_fine for s in reversed(ls) if s.n_samples >= min(100, self.n0)), ls[0].var_fine)
        nfe_mc = var_pl * M**st.L / ((1 - theta) * eps**2)
        return MLMCResult(
            estimate=estimate.tolist(), levels=ls, alpha=rates.alpha, beta=rates.beta, gamma=rates.gamma,
            nfe=float(nfe), nfe_counted=int(sum(s.calls for s in ls) + st.pilot_calls), nfe_mc=float(nfe_mc),
            savings=float(nfe_mc / nfe), eps=float(eps), rmse_bound=float(math.sqrt(var_est + bias**2)),
            bias_estimate=float(bias), wall_seconds=wall_seconds, M=M, lmin=self.lmin, theta=theta,
            converged=converged, pilot_nfe=float(st.pilot_nfe),
        )


def mlmc(
    levels: LevelFunction,
    eps: float,
    *,
    lmax: int = 10,
    n0: int = 100,
    theta: float = 0.25,
    alpha0: float | None = None,
    beta0: float | None = None,
    gamma0: float | None = None,
    batch_size: int = 1000,
    state_path: str | None = None,
    state_key: str = "",
    pilot: LminChoice | None = None,
) -> MLMCResult:
    """Giles' adaptive MLMC driver (Giles 2015, Algorithm 1) for a vector payoff.

    Args:
        levels: the level function (``LevelFunction``: a ``CoupledLevelSampler``, or a plain function
            wrapped in ``UserLevels``); its M, Lmin and cost per level are the driver's.
        eps: target RMSE (pixel-averaged).
        lmax: the finest level allowed; n0: pilot samples per level.
        theta: the share of eps^2 given to the bias (the variance gets 1 - theta).
        alpha0, beta0, gamma0: fixed rates (fitted when None, floored at 0.5 as Giles).
        batch_size: samples per level-function call; the sums are saved after every batch.
        state_path: JSON file of the per-level sums; an existing one (same ``state_key``) is resumed.
        pilot: an automatic-Lmin pilot (``choose_lmin``) for ``levels`` at its Lmin: its coupled levels above
            Lmin are reused and the rest is counted in ``nfe`` (``pilot_nfe``).

    Raises:
        WeakConvergenceFailure: Lmax reached and the bias test still fails (``.result`` has the estimate).
    """
    tic = time.perf_counter()
    if not isinstance(levels, LevelFunction):
        raise InputError("levels: expected a level function with M, lmin, pixels and cost (a CoupledLevelSampler, "
                         "or a plain function wrapped in UserLevels(fn, M=...))")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise InputError(f"eps: expected a positive number, got {eps}")
    lmin = levels.lmin
    if not isinstance(lmin, int) or lmin < 0 or lmax < lmin + 1:
        raise InputError(f"lmin/lmax: expected 0 <= lmin < lmax, got lmin={lmin}, lmax={lmax}")
    if n0 < 2:
        raise InputError(f"n0: expected at least 2 pilot samples, got {n0}")
    if not 0 < theta < 1:
        raise InputError(f"theta: expected 0 < theta < 1, got {theta}")
    if pilot is not None and pilot.lmin != lmin:
        raise InputError(f"pilot: chose lmin={pilot.lmin}, but the levels start at lmin={lmin}")
    key = fingerprint(key=state_key, eps=eps, M=levels.M, lmax=lmax, n0=n0, theta=theta, alpha0=alpha0,
                      beta0=beta0, gamma0=gamma0, batch_size=batch_size)
    st = DriverState(state_path, key, levels.pixels)
    run = _Run(levels, eps, lmax, n0, theta, alpha0, beta0, gamma0, batch_size, st)
    if st.load():
        if st.lmin is not None and st.lmin != lmin:
            raise InputError(f"state: {state_path} holds a run with lmin={st.lmin}, not {lmin}")
    else:
        run.start(pilot)

    converged = True
    while True:
        run.sample_pending()
        ls = run.statistics()
        rates = run.rates(ls)
        var = [ls[0].var] + rates.var
        cost = [s.cost for s in ls]
        ns = optimal_samples(var, cost, eps, theta)
        dn = {s.level: max(0, n - s.n_samples) for s, n in zip(ls, ns)}
        if all(dn[l] <= 0.01 * st.sums[l].n for l in dn):  # (almost) converged: test the bias
            if not run.bias(rates, ls) > math.sqrt(theta) * eps:
                break
            # An inconclusive test is settled with samples at the finest levels when that costs less than a
            # new level (10 samples); at Lmax, while a round costs less than n0 samples of the level that
            # cannot be added (Giles 2008's price of a level; the rounds at least double the counts, so they
            # end). A failing test needs a new level.
            more = run.settle(rates, ls)
            budget = (min(n0, 10) if st.L < lmax else n0) * levels.cost(st.L + 1)
            if more and sum(n * levels.cost(l) for l, n in more.items()) <= budget:
                dn.update(more)
            elif st.L == lmax:
                converged = False
                break
            else:
                dn = run.add_level(var, cost, rates.beta)
        if sum(dn.values()) == 0:
            break
        st.pending.update(dn)
        st.save()

    result = run.result(converged, time.perf_counter() - tic)
    if not converged:
        raise WeakConvergenceFailure(
            f"weak convergence failed: the bias estimate {result.bias_estimate:.3g} still exceeds sqrt(theta) eps = "
            f"{math.sqrt(theta) * eps:.3g} at Lmax = {lmax}; raise --lmax or eps", result)
    return result
