"""Giles' adaptive MLMC driver (Giles 2008, 2015; pymlmc's ``mlmc``) for vector payoffs, planned in few
rounds, with honest savings and a plain-MC finish when that is cheaper.

Each round draws every pending sample, then one phase decides what the next round draws:

    pilot   N0 samples on levels Lmin..Lmin+2, sized by cost: a first small pilot predicts the run's cost
            and the pilot grows to at most ``pilot_fraction`` of it (``_pilot_growth``)
    decide  predicted plain MC cheaper than the predicted MLMC run? finish as plain MC (``_mc_round``)
    mlmc    plan L and every N_l from the fitted rates in one round (``plan``), then Giles' loop:
            the bias test at L (``_bias_test``), the optimal N_l for the variance left by the bias
            (``optimal_samples``), a new level (several at once when the extrapolation says so) when the
            test fails, more samples at the finest levels when it is undecided (``_settle``)

Vector payoffs (n pixels): the MSE target is the pixel-averaged MSE <= eps^2; level means and biases are
averaged over pixels with their noise floor removed (``estimates``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from lightning_mlmc.errors import InputError, WeakConvergenceFailure
from lightning_mlmc.progress import Progress
from lightning_mlmc.mlmc.estimates import (
    LevelMoments,
    asymptotic_level,
    SquaredBias,
    bias_of_level,
    NORMAL_NONZERO,
    floor_untrusted,
    near_normal,
    level_moments,
    plain_mc_alternative,
    pooled_plain_variance,
    remaining_bias_weights,
    tail_relative_sd,
    untrusted,
)
import lightning_mlmc.mlmc.engine as engine
import lightning_mlmc.mlmc.finish as finish
import lightning_mlmc.mlmc.rounds as rounds
from lightning_mlmc.mlmc.levels import LevelFunction
from lightning_mlmc.mlmc.checks import KURTOSIS_WARNING
from lightning_mlmc.mlmc.lmin import LminChoice
from lightning_mlmc.mlmc.plan import MAX_ALPHA, MAX_JUMP, Rates, fit_rates, level_variances, optimal_samples, plan
from lightning_mlmc.mlmc.result import MLMCResult
from lightning_mlmc.mlmc.state import DriverState, fingerprint

MAX_ROUNDS = 60  # a run that has not decided by then stops, unconverged, with its estimate
SETTLE_SE = 1.5
ROUND_GROWTH = 12  # a round costs at most this many times what the run has spent before it (``capped``)
UPPER_COUNT = 4.74  # 95% upper bound of a Poisson count of which one was seen (``trust_cap``)


@dataclass(frozen=True)
class Settings:
    eps: float
    theta: float  # the largest share of eps^2 the bias may take (the variance gets the rest)
    lmax: int
    n0: int  # the largest pilot per level
    n_start: int  # the first pilot per level (it grows by cost)
    pilot_fraction: float  # the pilot's share of the predicted cost of the run
    floor: int  # the fewest samples a new level gets
    batch_size: int
    row_budget: int  # the most rows one network call takes
    fallback: bool  # finish as plain MC when the pilot predicts it cheaper
    alpha0: float | None
    beta0: float | None
    gamma0: float | None


class _Run:
    """One driver run: the level function, the settings, the resumable state and the phases."""

    def __init__(self, levels: LevelFunction, settings: Settings, state: DriverState):
        self.levels, self.s, self.st = levels, settings, state
        self.M, self.lmin = levels.M, levels.lmin
        self.progress = None

    # -- pilot set-up -----------------------------------------------------------------------------------
    def start(self, pilot: LminChoice | None) -> None:
        st, s = self.st, self.s
        if pilot is not None:
            for level, sums in pilot.pilot.items():
                if level > self.lmin:  # coupled levels are the same whatever Lmin is: keep their samples
                    st.sums[level], st.batches[level] = sums, pilot.batches[level]
            st.pilot_nfe, st.pilot_calls = pilot.unused_cost()
            st.rounds, st.sequential_calls = pilot.rounds, pilot.sequential_calls
            st.batches[self.lmin] = pilot.batches.get(self.lmin, 0)  # fresh streams for the now plain level
        st.lmin = self.lmin
        st.L = min(max([self.lmin + 2, *st.sums]), s.lmax)
        st.pilot_n = max(s.n_start, pilot.n if pilot is not None else 0)  # not the kurtosis check's extra
        for level in range(self.lmin, st.L + 1):
            st.ensure(level)
            st.pending[level] = max(0, st.pilot_n - st.sums[level].n)
        st.save()

    # -- update the sample sums ---------------------------------------------------------------------------
    def sample_pending(self) -> None:
        """One round: every pending sample of every level, together on the batched engine."""
        rounds.run_round(self.levels, self.st, self.s.batch_size, self.s.row_budget, self.progress)

    # -- estimates ----------------------------------------------------------------------------------------
    def moments(self) -> list[LevelMoments]:
        """Moments of the levels sampled so far (Lmin up to the finest with samples)."""
        out = []
        for level in range(self.lmin, self.st.L + 1):
            if level not in self.st.sums or self.st.sums[level].n == 0:
                break
            out.append(level_moments(level, self.st.sums[level]))
        return out

    def rates(self, moments: list[LevelMoments]) -> Rates:
        return fit_rates(moments, self.lmin, self.M, self.levels.cost, self.s.alpha0, self.s.beta0, self.s.gamma0)

    def estimates(self) -> tuple[list[LevelMoments], Rates]:
        """The levels' moments with Giles' floors on the levels that show no variation, and the fitted rates."""
        moments = self.moments()
        rates = self.rates(moments)
        return floor_untrusted(moments, self.lmin, self.M, rates.alpha, rates.beta), rates

    # -- levels that show no variation ----------------------------------------------------------------------
    def trust_cap(self, moments: list[LevelMoments], level: int) -> int:
        """The samples after which a level without variation is accepted as it is.

        With k nonzero differences seen in n samples, the count's 95% upper bound is about 3 (k = 0) or 4.74
        (k = 1) (Poisson), so |E[Y_l]| <= 4.74 J / n, J the size of a difference, taken as twice the standard
        deviation of P_l (a jump across a discontinuity of the payoff); n = 2 * 4.74 J / (sqrt(theta) eps)
        keeps that below half the bias's share of eps."""
        var, _ = pooled_plain_variance(moments, level, self.lmin)
        jump = 2.0 * math.sqrt(var) if math.isfinite(var) else 0.0
        return max(self.s.n0, math.ceil(2 * UPPER_COUNT * jump / (math.sqrt(self.s.theta) * self.s.eps)))

    def untrusted_growth(self, moments: list[LevelMoments]) -> dict[int, int]:
        """More samples (four times as many, up to ``trust_cap``) at the coupled levels that show (nearly) no
        variation and have no trusted coupled neighbour to take Giles' floors from (``floor_untrusted``: a
        floored level is sized and tested with its floors, as in Giles' drivers); until then the run does
        not decide L or N_l from them."""
        out = {}
        for m in untrusted(moments, self.lmin):
            cap = self.trust_cap(moments, m.level)
            if not m.floored and m.n < cap:
                out[m.level] = min(3 * m.n, cap - m.n)
        return out

    def bias(self, moments: list[LevelMoments], rates: Rates) -> tuple[SquaredBias, float]:
        """(the pooled squared bias of the estimate at L, the largest lower confidence value of the finest
        levels' own extrapolations): Giles takes the largest extrapolation; the pooled estimate is far more
        precise, and a finest level whose own extrapolation clearly exceeds it still fails the test. "Clearly"
        is two standard errors of the level mean, and alpha two standard errors up (at most the samplers'
        weak order): an alpha fitted on a few noisy means must not fail the test outright by itself."""
        tail = remaining_bias_weights(moments, self.lmin, self.M, rates.alpha, alpha_se=rates.alpha_se)
        if not tail:
            return SquaredBias(math.inf, 0.0), math.inf
        L = moments[-1].level
        alpha = min(MAX_ALPHA, rates.alpha + 2.0 * rates.alpha_se)
        scale = 1.0 / (self.M**alpha - 1.0)
        normal = {m.level for m in moments if near_normal(m)}  # a sparse level's lower value is not one
        lowers = [bias_of_level(moments, L, {lv: scale * self.M ** (-(L - lv) * alpha)}).lower
                  for lv in tail if lv in normal] or [0.0]
        rel = tail_relative_sd(self.M, rates.alpha, rates.alpha_se)
        return bias_of_level(moments, L, tail, rel), max(lowers)

    def min_L(self, moments: list[LevelMoments]) -> int:
        """The coarsest L the bias test may accept: one level above the first asymptotic one (or above
        the finest sampled level while none is), and at least Lmin + 2 as in Giles' algorithm."""
        first = asymptotic_level(moments, self.lmin)
        return min(self.s.lmax, max(self.lmin + 2, (first if first is not None else moments[-1].level) + 1))

    # -- pilot --------------------------------------------------------------------------------------------
    def pilot_growth(self, moments: list[LevelMoments], rates: Rates) -> dict[int, int]:
        """More pilot samples before anything is decided from the pilot: first up to an asymptotic level, then at
        the levels that show no variation (``untrusted_growth``), then, when the pilot so far is cheap next to
        the run it predicts, all pilot levels grow to the largest count (at most n0) whose cost stays within
        ``pilot_fraction`` of the predicted cost of the cheaper method (nothing when that is less than 1.5
        times the current pilot)."""
        st, s = self.st, self.s
        low = self.min_L(moments)
        if moments[-1].level < low:  # climb to an asymptotic level first (pilot samples each)
            for level in range(st.L + 1, low + 1):
                st.ensure(level)
            st.L = max(st.L, low)
            return {l: max(0, st.pilot_n - st.sums[l].n) for l in range(self.lmin, low + 1)}
        grow = self.untrusted_growth(moments)
        if grow:
            return grow
        predicted = self.predicted_mlmc(moments, rates).cost
        mc = self.plain_alternative(moments, rates)
        if s.fallback and self.can_finish_plain() and mc.meets_eps:
            predicted = min(predicted, mc.cost)
        unit = sum(self.levels.cost(l) for l in range(self.lmin, st.L + 1))
        target = min(s.n0, int(s.pilot_fraction * predicted / unit))
        if target < 1.5 * st.pilot_n:
            return {}
        st.pilot_n = target
        return {l: max(0, target - st.sums[l].n) for l in range(self.lmin, st.L + 1)}

    def predicted_mlmc(self, moments, rates, min_L: int = 0, jump: int = MAX_JUMP):
        return plan(moments, self.lmin, self.M, self.levels.cost, self.s.eps, self.s.theta, rates, self.s.lmax,
                    floor=self.s.floor, min_L=max(min_L, self.min_L(moments)), jump=jump)

    def plain_alternative(self, moments, rates, finest: int | None = None, cautious: bool = False):
        return plain_mc_alternative(moments, self.lmin, self.M, self.s.eps, rates.alpha, self.plain_cost,
                                    finest=finest, alpha_se=rates.alpha_se, cautious=cautious)

    def plain_cost(self, level: int) -> float:
        plain = getattr(self.levels, "plain_cost", None)
        return plain(level) if plain is not None else self.levels.cost(self.lmin) * self.M ** (level - self.lmin)

    def can_finish_plain(self) -> bool:
        return hasattr(self.levels, "with_lmin")

    def decide(self, moments: list[LevelMoments], rates: Rates, more: dict[int, int] | None = None) -> str:
        """mlmc, or mc when plain MC is predicted to cost less from here on than MLMC (sunk cost not counted):
        after the pilot, and again before every MLMC round (``more``: the samples that round would draw), so
        that a run whose plan grows (a heavy-tailed level whose outliers show up late, a level that needed more
        samples than its pilot said) finishes as plain MC instead of walking on; rounds are capped
        (``capped``), so a plan can grow only so far before it is checked again.

        Plain MC is sized with its bias one standard error up, the extrapolated tail's uncertainty included,
        as MLMC's own test is. The honest ``nfe_mc`` (point estimates) is not a safe thing to switch to: a
        pilot fooled by a heavy tail made such a switch miss by 6.7 eps in a test, with 4-step samples, and
        switching whenever spent plus planned exceeded it raised the RMSE of Giles' GBM test to 1.5 eps. Plain
        MC runs at a sampled level: below the finest, or at the finest once MLMC itself could stop there (its
        rates resolved, the level asymptotic); it draws fresh samples (the ones that decided the switch would
        bias it). The reason is kept (``mc_reason``)."""
        if not (self.s.fallback and self.can_finish_plain()) or len(moments) < 2:
            return "mlmc"
        finest = moments[-1].level
        if not (rates.resolved and finest >= self.min_L(moments)):
            finest -= 1  # a plain MC's bias must rest on a measured level above it, not on extrapolation alone
        mlmc_more = self.planned_more(moments, rates, more)
        mc = self.plain_alternative(moments, rates, finest=finest, cautious=True)
        if not (mc.meets_eps and mc.cost < mlmc_more):
            return "mlmc"
        why = f"plain MC with {mc.steps} steps needed {mc.cost:.6g} more NFEs, MLMC {mlmc_more:.6g} more"
        self.st.mc_level = mc.level
        heavy = [f"level {m.level}: kurtosis {m.kurtosis:.3g}" for m in moments if m.kurtosis > KURTOSIS_WARNING]
        self.st.mc_reason = f"round {self.st.rounds}: {why}" + (f" ({'; '.join(heavy)})" if heavy else "")
        return "mc"

    def planned_more(self, moments: list[LevelMoments], rates: Rates, more: dict[int, int] | None = None) -> float:
        """NFEs MLMC still plans: the predicted run's N_l beyond the samples drawn (or ``more``, the next round,
        where larger), and the growth of levels without variation."""
        p = self.predicted_mlmc(moments, rates)
        n = {m.level: m.n for m in moments}
        more = more or {}
        extra = {l: max(p.samples.get(l, 0) - n.get(l, 0), more.get(l, 0)) for l in set(p.samples) | set(more)}
        total = sum(k * self.levels.cost(l) for l, k in extra.items())
        for l, k in self.untrusted_growth(moments).items():
            total += max(0, k - extra.get(l, 0)) * self.levels.cost(l)
        return total

    def capped(self, more: dict[int, int]) -> dict[int, int]:
        """The next round, scaled down (every level alike) to at most ``ROUND_GROWTH`` times what the run has
        spent so far. A plan sized from estimates that a heavy tail has not shown yet (or from a pilot it
        fooled) then cannot spend the run's budget many times over in one round before it is checked again
        (``decide``) with what this round saw; a run planned well from a pilot of ``pilot_fraction`` (0.1) of
        its cost draws its main round in one (about ten times the pilot)."""
        price = sum(k * self.levels.cost(l) for l, k in more.items())
        cap = ROUND_GROWTH * self.spent()
        if price <= cap or cap <= 0:
            return more
        n = {l: s.n for l, s in self.st.sums.items()}
        # a level keeps at least ``floor`` samples in all (its mean and variance must be estimable)
        return {l: max(min(k, self.s.floor - n.get(l, 0)), math.floor(k * cap / price), 0) for l, k in more.items()}

    def spent(self) -> float:
        """NFEs spent so far (by the cost formula, the pilot's unused part and plain samples included)."""
        st = self.st
        return (sum(s.n * self.levels.cost(l) for l, s in st.sums.items()) + st.pilot_nfe
                + sum(s.n * self.plain_cost(l) for l, s in st.plain.items()))

    # -- plain-MC finish (finish.py) ---------------------------------------------------------------------
    def mc_round(self, moments: list[LevelMoments], rates: Rates) -> dict[int, int]:
        return finish.mc_round(self, moments, rates)

    # -- MLMC ---------------------------------------------------------------------------------------------
    def mlmc_round(self, moments: list[LevelMoments], rates: Rates) -> tuple[dict[int, int], bool]:
        """(samples to draw next, converged), in Giles' order: the optimal N_l for the variance the bias
        leaves first; once they are drawn (the run is almost converged) the bias test at L decides, on
        those samples rather than the pilot's: within its share -> done; clearly above it -> finer levels;
        undecided -> more samples at the finest levels, or a new level when that is cheaper."""
        more, converged = self._mlmc_round(moments, rates)
        grow = self.untrusted_growth(moments)  # levels without variation: sampled further before the run ends
        if grow:
            return {l: max(more.get(l, 0), grow.get(l, 0)) for l in set(more) | set(grow)}, False
        return more, converged

    def _mlmc_round(self, moments: list[LevelMoments], rates: Rates) -> tuple[dict[int, int], bool]:
        st, s = self.st, self.s
        bias, single = self.bias(moments, rates)
        room = s.theta * s.eps**2
        # Several levels at once only when the test fails outright (a bias clearly above its share); when the
        # test fails on uncertainty (a point estimate above it, rates not resolved), one level at a time: an
        # extrapolation by an uncertain alpha would jump too far.
        outright = single > room or bias.lower > room or st.L < self.min_L(moments)
        new_L, grow = self.add_levels(moments, rates, MAX_JUMP)
        fails = bias.value > room or single > room or not rates.resolved or st.L < self.min_L(moments)
        sparse = self.sparse_growth(moments) if fails and not outright and bias.value <= room else {}
        price = lambda d: sum(k * self.levels.cost(l) for l, k in d.items())  # noqa: E731
        if sparse and (new_L == st.L or price(sparse) < price(grow)):
            return sparse, False  # alpha unresolved on sparse levels: more samples there, before a finer level
        if fails:  # finer levels, planned from the point estimates
            if new_L == st.L:
                return {}, False
            self.grow_to(new_L)
            return grow, False
        sizing = level_variances(moments, self.lmin, self.M)
        var = [sizing[m.level] for m in moments]
        cost = [self.levels.cost(m.level) for m in moments]
        ns = optimal_samples(var, cost, s.eps**2 - min(bias.upper, room))
        dn = {m.level: max(0, k - m.n) for m, k in zip(moments, ns)}
        if any(dn[m.level] > 0.01 * m.n for m in moments):
            return dn, False  # not converged yet: draw the samples the variance needs, then test
        if bias.upper <= room:  # converged once the estimated MSE is within eps^2 (``finish.rmse_estimate``)
            short = {l: k for l, k in dn.items() if k > 0}
            return short, not short
        settle = self.settle(moments, rates, bias, room) if bias.value <= room else {}
        sparse = self.sparse_growth(moments)
        if sparse and price(sparse) < min(price(grow) if st.L < s.lmax else math.inf, price(settle) if settle else math.inf):
            return sparse, False  # the cheapest information first: sparse levels' means
        if st.L < s.lmax and (not settle or price(grow) < price(settle)):
            self.grow_to(new_L)
            return grow, False
        if not settle or (st.L == s.lmax and price(settle) > s.n0 * self.levels.cost(st.L + 1)):
            return {}, False  # undecidable at Lmax within the price of a level: stop, unconverged
        return settle, False

    def sparse_growth(self, moments: list[LevelMoments]) -> dict[int, int]:
        """Samples that bring the coupled levels whose means rest on few nonzero differences (``near_normal``)
        to about ``NORMAL_NONZERO`` of them (at most four times their count): when the weak rate cannot be
        resolved from such means, more of them is cheaper information than a finer level."""
        out = {}
        for m in moments:
            if m.level > self.lmin and not near_normal(m):
                want = math.ceil(m.n * NORMAL_NONZERO / max(m.nonzero, 1.0))
                out[m.level] = min(want, 4 * m.n) - m.n
        return {l: k for l, k in out.items() if k > 0}

    def add_levels(self, moments: list[LevelMoments], rates: Rates, jump: int = MAX_JUMP) -> tuple[int, dict[int, int]]:
        """(new L, samples to draw): the levels the extrapolated bias asks for (at least L + 1, at most
        ``jump`` more, at most Lmax), the new ones with at least ``floor`` samples, and the N_l of every level
        for that L."""
        L = self.st.L
        if L >= self.s.lmax:
            return L, {}
        p = self.predicted_mlmc(moments, rates, min_L=max(L + 1, self.min_L(moments)), jump=jump)
        new_L = p.L
        n = {m.level: m.n for m in moments}
        counts = {l: p.samples.get(l, self.s.floor) for l in range(self.lmin, new_L + 1)}
        for level in range(moments[-1].level + 1, new_L + 1):
            counts[level] = max(counts[level], self.s.floor)
        return new_L, {l: max(0, k - n.get(l, 0)) for l, k in counts.items()}

    def grow_to(self, L: int) -> None:
        for level in range(self.st.L + 1, L + 1):
            self.st.ensure(level)
        self.st.L = L

    def settle(self, moments: list[LevelMoments], rates: Rates, bias: SquaredBias, room: float) -> dict[int, int]:
        """Samples at the levels the bias estimate rests on that bring its two standard errors within the room
        left by its value, at the least cost: the variance of the bias estimate, sum_l w_l / N_l with w_l the
        squared weight of level l's mean times V_l, must shrink by (2 se / gap)^2 (at most 4); Giles' optimal
        allocation for that (``optimal_samples``) gives each level its N_l."""
        gap = room - bias.value
        if gap <= 0:
            return {}
        factor = min(4.0, (SETTLE_SE * bias.se / gap) ** 2)
        tail = remaining_bias_weights(moments, self.lmin, self.M, rates.alpha, alpha_se=rates.alpha_se)
        levels = [m for m in moments if m.level in tail]
        w = [tail[m.level] ** 2 * float(m.var.mean()) for m in levels]
        current = sum(wl / m.n for wl, m in zip(w, levels))
        if factor <= 1.0 or current <= 0:
            return {}
        target = optimal_samples(w, [self.levels.cost(m.level) for m in levels], current / factor)
        return {m.level: k - m.n for m, k in zip(levels, target) if k > m.n}

    # -- result -------------------------------------------------------------------------------------------
    def result(self, converged: bool, wall_seconds: float, method: str) -> MLMCResult:
        return finish.result(self, converged, wall_seconds, method)


def first_pilot(n0: int, pixels: int) -> int:
    """The first pilot per level: enough samples that the pixel-averaged variances rest on about 32
    values (their relative error about 25%), at least 4 and at most n0."""
    return max(4, min(n0, math.ceil(32 / max(pixels, 1)) + 1))


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
    row_budget: int = engine.DEFAULT_ROW_BUDGET,
    state_path: str | None = None,
    state_key: str = "",
    pilot: LminChoice | None = None,
    n_start: int | None = None,
    pilot_fraction: float = 0.1,
    floor: int = 4,
    fallback: bool = True,
    progress: Progress | None = None,
) -> MLMCResult:
    """Giles' adaptive MLMC driver (Giles 2015, Algorithm 1) for a vector payoff, in planned rounds.

    Args:
        levels: the level function (``LevelFunction``: a ``CoupledLevelSampler``, or a plain function
            wrapped in ``UserLevels``); its M, Lmin and cost per level are the driver's.
        eps: target RMSE (pixel-averaged).
        lmax: the finest level allowed; n0: the largest pilot per level.
        theta: the largest share of eps^2 the bias may take; the variance gets eps^2 minus the bias's upper
            confidence value (at least (1 - theta) eps^2).
        alpha0, beta0, gamma0: fixed rates (fitted when None, floored at 0.5 as Giles).
        batch_size: samples per batch (each batch is one noise stream); the sums are saved as batches finish.
        row_budget: the most rows one network call takes; a round advances all its batches together.
        state_path: JSON file of the per-level sums; an existing one (same ``state_key``) is resumed.
        pilot: an automatic-Lmin pilot (``choose_lmin``) for ``levels`` at its Lmin: its coupled levels above
            Lmin are reused and the rest is counted in ``nfe`` (``pilot_nfe``).
        n_start: the first pilot per level (default ``first_pilot``: about 32 values per level, so 2 samples
            of a 16-pixel payoff and 33 of a scalar one); the pilot then grows by cost.
        pilot_fraction: the pilot's largest share of the predicted cost of the run.
        floor: the fewest samples a newly added level gets.
        fallback: finish as plain MC when the pilot predicts it cheaper (needs ``levels.with_lmin``).
        progress: where to report each round's progress (``lightning_mlmc.progress.for_terminal()`` on a
            terminal; nothing by default).

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
    if not 0 < pilot_fraction <= 1:
        raise InputError(f"pilot_fraction: expected a number in (0, 1], got {pilot_fraction}")
    if pilot is not None and pilot.lmin != lmin:
        raise InputError(f"pilot: chose lmin={pilot.lmin}, but the levels start at lmin={lmin}")
    settings = Settings(float(eps), theta, lmax, n0, n_start or first_pilot(n0, levels.pixels), pilot_fraction,
                        floor, batch_size, row_budget, fallback, alpha0, beta0, gamma0)
    key = fingerprint(key=state_key, eps=eps, M=levels.M, lmax=lmax, n0=n0, theta=theta, alpha0=alpha0,
                      beta0=beta0, gamma0=gamma0, batch_size=batch_size, n_start=settings.n_start,
                      pilot_fraction=pilot_fraction, floor=floor, fallback=fallback)
    st = DriverState(state_path, key, levels.pixels)
    run = _Run(levels, settings, st)
    run.progress = progress
    if st.load():
        if st.lmin is not None and st.lmin != lmin:
            raise InputError(f"state: {state_path} holds a run with lmin={st.lmin}, not {lmin}")
    else:
        run.start(pilot)

    converged = False
    while st.rounds < MAX_ROUNDS:
        run.sample_pending()
        moments, rates = run.estimates()
        if st.phase == "pilot":
            more = run.pilot_growth(moments, rates)
            if more:
                st.pending.update(more)
                st.save()
                continue
            st.phase = run.decide(moments, rates)
        if st.phase == "mlmc":
            more, converged = run.mlmc_round(moments, rates)
            if more and run.decide(moments, rates, more) == "mc":
                st.phase = "mc"
            else:
                st.pending.update(run.capped(more))
        if st.phase == "mc":  # plain samples at the finish's level; levels without variation still grow
            plain, grow = run.mc_round(moments, rates), run.untrusted_growth(moments)
            st.pending_plain.update(plain)
            st.pending.update(grow)
            more, converged = {**plain, **grow}, True
        st.save()
        if not more:
            break
    if progress is not None:
        progress.close()
    result = run.result(converged, time.perf_counter() - tic, st.phase if st.phase != "pilot" else "mlmc")
    if pilot is not None:  # what the automatic Lmin passed over (Giles' kurtosis check)
        result.warnings[:0] = [f"automatic Lmin passed over Lmin {c}: {why}" for c, why in sorted(pilot.excluded.items())]
    if not converged:
        raise WeakConvergenceFailure(
            f"weak convergence failed: the bias estimate {result.bias_estimate:.3g} still exceeds sqrt(theta) eps = "
            f"{math.sqrt(theta) * eps:.3g} at L = {st.L} (lmax {lmax}); raise --lmax or eps", result)
    return result
