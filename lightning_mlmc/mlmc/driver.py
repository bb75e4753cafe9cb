"""Giles' adaptive MLMC driver (Giles 2008, 2015; pymlmc's ``mlmc``) for vector payoffs, planned in few
rounds, with honest savings and a plain-MC finish when that is cheaper.

Each round draws every pending sample, then one phase decides what the next round draws:

    pilot   N0 samples on levels Lmin..Lmin+2, sized by cost: a first small pilot predicts the run's cost
            and the pilot grows to at most ``pilot_fraction`` of it (``_pilot_growth``)
    decide  predicted plain MC cheaper than the predicted MLMC run? finish as plain MC (``_mc_round``)
    mlmc    plan L and every N_l from the fitted rates in one round (``plan``), then Giles' loop: the optimal
            N_l for the variance left by the bias (``optimal_samples``), the bias test at L, a new level
            (several when the extrapolation says so) when it fails, the cheapest way to decide it when it
            is undecided (``guards.settle``, ``guards.topup``, a new level)

Vector payoffs (n pixels): the MSE target is the pixel-averaged MSE <= eps^2; level means and biases are
averaged over pixels with their noise floor removed (``estimates``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from lightning_mlmc.errors import InputError, WeakConvergenceFailure
from lightning_mlmc.progress import Progress
from lightning_mlmc.mlmc.estimates import (LevelMoments, SquaredBias, asymptotic_level, bias_of_level, floor_untrusted,
                                            level_moments, near_normal, plain_mc_alternative, remaining_bias_weights,
                                            tail_relative_sd)
import lightning_mlmc.mlmc.engine as engine
import lightning_mlmc.mlmc.finish as finish
import lightning_mlmc.mlmc.guards as guards
import lightning_mlmc.mlmc.rounds as rounds
from lightning_mlmc.mlmc.config import MLMCConfig
from lightning_mlmc.mlmc.protocol import LevelFunction
from lightning_mlmc.mlmc.lmin import LminChoice
from lightning_mlmc.mlmc.plan import MAX_ALPHA, MAX_JUMP, Rates, first_pilot, fit_rates, level_variances, optimal_samples, plan  # noqa: F401,E501
from lightning_mlmc.mlmc.result import MLMCResult
from lightning_mlmc.mlmc.state import DriverState, fingerprint

DEFAULTS = MLMCConfig()  # the one source of the driver's defaults
MAX_ROUNDS = 60  # a run that has not decided by then stops, unconverged, with its estimate


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
        self.engine = engine.EngineStats()  # this process's rounds: rows and seconds per network

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
        self.engine.add(rounds.run_round(self.levels, self.st, self.s.batch_size, self.s.row_budget, self.progress))

    # -- estimates ----------------------------------------------------------------------------------------
    def moments(self) -> list[LevelMoments]:
        """Moments of the levels sampled so far (Lmin up to the finest with samples)."""
        out = []
        for level in range(self.lmin, self.st.L + 1):
            if level not in self.st.sums or self.st.sums[level].n == 0:
                break
            out.append(level_moments(level, self.st.sums[level], refines=self.levels.refines(level)))
        return out

    def rates(self, moments: list[LevelMoments]) -> Rates:
        return fit_rates(moments, self.lmin, self.M, self.levels.cost, self.s.alpha0, self.s.beta0, self.s.gamma0)

    def estimates(self) -> tuple[list[LevelMoments], Rates]:
        """The levels' moments with Giles' floors on the levels that show no variation, and the fitted rates."""
        moments = self.moments()
        rates = self.rates(moments)
        return floor_untrusted(moments, self.lmin, self.M, rates.alpha, rates.beta), rates

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
        low = max(self.lmin + 2, (first if first is not None else moments[-1].level) + 1)
        # two refining levels above a network switch: the bias extrapolates from the finest network's levels
        switches = [l for l in range(self.lmin + 1, self.s.lmax + 1) if not self.levels.refines(l)]
        if switches:
            low = max(low, switches[-1] + 2)
        return min(self.s.lmax, low)

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
        grow = guards.untrusted_growth(self, moments)
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
                                    steps_of=self.levels.steps, finest=finest, alpha_se=rates.alpha_se,
                                    cautious=cautious, pairs=self.levels.antithetic)

    def plain_cost(self, level: int) -> float:
        return self.levels.plain_cost(level)

    def can_finish_plain(self) -> bool:
        return self.levels.can_change_lmin

    # -- plain-MC finish (finish.py) ---------------------------------------------------------------------
    def mc_round(self, moments: list[LevelMoments], rates: Rates) -> dict[int, int]:
        return finish.mc_round(self, moments, rates)

    # -- MLMC ---------------------------------------------------------------------------------------------
    def mlmc_round(self, moments: list[LevelMoments], rates: Rates) -> tuple[dict[int, int], bool]:
        """(samples to draw next, converged), in Giles' order: the optimal N_l for the variance the bias
        leaves first; once they are drawn the bias test at L decides, on those samples rather than the pilot's:
        within its share -> done; clearly above it -> finer levels; undecided -> the cheapest of more samples at
        the finest levels (``settle``), a new level, or a variance sized for the bias's upper value (``topup``)."""
        more, converged = self._mlmc_round(moments, rates)
        grow = guards.untrusted_growth(self, moments)  # levels without variation: sampled further before the run ends
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
        new_L, grow = self.add_levels(moments, rates, MAX_JUMP if outright else 0)
        fails = bias.value > room or single > room or not rates.resolved or st.L < self.min_L(moments)
        sparse = guards.sparse_growth(self, moments) if fails and not outright and bias.value <= room else {}
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
        # Giles' split: the variance gets at most (1 - theta) eps^2, however small the bias turns out (a bias measured
        # small late would otherwise leave no margin for variances that heavy-tailed levels underestimate)
        ns = optimal_samples(var, cost, s.eps**2 - room)
        dn = {m.level: max(0, k - m.n) for m, k in zip(moments, ns)}
        if any(dn[m.level] > 0.01 * m.n for m in moments):
            return dn, False  # not converged yet: draw the samples the variance needs, then test
        if bias.upper <= room:  # converged once the estimated MSE is within eps^2 (``finish.rmse_estimate``)
            short = {l: k for l, k in dn.items() if k > 0}
            return short, not short
        settle = guards.settle(self, moments, rates, bias, room) if bias.value <= room else {}
        topup = guards.topup(self, moments, var, cost, bias, room)  # the bias's uncertainty paid by the variance
        if topup is not None and not any(k > 0.01 * st.sums[l].n for l, k in topup.items()):
            return topup, not topup
        sparse = guards.sparse_growth(self, moments)
        others = min(price(grow) if st.L < s.lmax else math.inf, price(settle) if settle else math.inf)
        if sparse and price(sparse) < others:
            return sparse, False  # the cheapest information first: sparse levels' means
        if topup and price(topup) <= others:
            return topup, False
        if st.L < s.lmax and (not settle or price(grow) < price(settle)):
            self.grow_to(new_L)
            return grow, False
        if not settle or (st.L == s.lmax and price(settle) > s.n0 * self.levels.cost(st.L + 1)):
            return {}, False  # undecidable at Lmax within the price of a level: stop, unconverged
        return settle, False

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

    # -- result -------------------------------------------------------------------------------------------
    def result(self, converged: bool, wall_seconds: float, method: str) -> MLMCResult:
        return finish.result(self, converged, wall_seconds, method)


def mlmc(
    levels: LevelFunction,
    eps: float,
    *,
    lmax: int = DEFAULTS.lmax,
    n0: int = DEFAULTS.n0,
    theta: float = DEFAULTS.theta,
    alpha0: float | None = None,
    beta0: float | None = None,
    gamma0: float | None = None,
    batch_size: int = DEFAULTS.batch_size,
    row_budget: int = DEFAULTS.row_budget,
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
        theta: the bias's share of eps^2: its estimate at most theta eps^2 and its upper value at most twice
            that (``guards.topup``); the variance gets the rest, at most (1 - theta) eps^2.
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
        if st.lmin_reason is not None and st.lmin is not None and st.lmin > lmin:  # the run raised its Lmin
            run.levels, run.lmin = levels.with_lmin(st.lmin), st.lmin
        elif st.lmin is not None and st.lmin != lmin:
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
            st.phase = guards.decide(run, moments, rates)
        if st.phase == "mlmc":
            more, converged = run.mlmc_round(moments, rates)
            decision = guards.decide(run, moments, rates, more) if more else "mlmc"
            if decision == "mc":
                st.phase, st.pending = "mc", {l: 0 for l in st.pending}
            elif decision == "mlmc":
                st.pending.update(guards.capped(run, more))  # (``lmin``: the raised run's first round is pending)
        if st.phase == "mc":  # plain samples at the finish's level; levels without variation still grow
            plain, grow = run.mc_round(moments, rates), guards.untrusted_growth(run, moments)
            if plain is None:  # its bias no longer leaves room (a level grown since said more): MLMC goes on
                st.phase, st.mc_level, st.mc_reason = "mlmc", None, None
                more, converged = run.mlmc_round(moments, rates)
                st.pending.update(guards.capped(run, more))
                st.save()
                continue
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
        if pilot.unchecked:
            result.warnings.insert(0, f"automatic Lmin {pilot.lmin}: {pilot.unchecked}")
    if not converged:
        raise WeakConvergenceFailure(
            f"weak convergence failed: the bias estimate {result.bias_estimate:.3g} still exceeds sqrt(theta) eps = "
            f"{math.sqrt(theta) * eps:.3g} at L = {st.L} (lmax {lmax}); raise --lmax or eps", result)
    return result
