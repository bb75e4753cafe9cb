"""Automatic Lmin: where the coupled corrections start to be cheaper than plain samples (chosen before
the driver runs, from a coupled pilot that the driver then reuses)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lightning_mlmc.errors import InputError
from lightning_mlmc.mlmc.config import MLMCConfig
from lightning_mlmc.mlmc.rounds import sample_levels
from lightning_mlmc.mlmc.checks import KURTOSIS_WARNING
from lightning_mlmc.mlmc.sums import LevelSums, level_stats


@dataclass
class LminChoice:
    """The automatic Lmin and the pilot it came from (coupled levels 1..top, ``n`` samples each)."""

    lmin: int
    top: int
    predicted: dict  # candidate Lmin -> predicted sum_l sqrt(V_l C_l) over the pilot levels
    pilot: dict  # level -> LevelSums of the coupled pilot (reused for levels > lmin)
    batches: dict  # level -> pilot batches used (the estimate's streams continue after them)
    M: int = 2
    rounds: int = 0  # engine rounds the pilot took
    sequential_calls: int = 0  # network calls made one after another
    excluded: dict = field(default_factory=dict)  # candidate -> why it was not chosen (Giles' kurtosis check)
    n: int = 0  # the pilot's samples per level before the kurtosis check grew the candidate's levels
    costs: dict = field(default_factory=dict)  # level -> cost of one coupled pilot sample (the levels' own)
    unchecked: str | None = None  # why the chosen Lmin's kurtosis could not be checked within the pilot's budget

    def unused_cost(self) -> tuple[float, int]:
        """(NFEs by the cost formula, network calls counted) of the pilot levels at or below Lmin: the part
        the estimate cannot reuse (a coupled sample is no plain sample)."""
        nfe, calls = 0.0, 0
        for level, sums in self.pilot.items():
            if level <= self.lmin:
                nfe += sums.n * self.costs.get(level, self.M**level + self.M ** (level - 1))
                calls += sums.calls
        return nfe, calls


DEFAULTS = MLMCConfig()
FIRST_CLIMB = 3  # levels the climb samples in its first round
KURTOSIS_PILOT = 128  # samples a pilot level needs before its kurtosis can show Giles' threshold (a sample
# kurtosis of n values is at most about n - 2)


def choose_lmin(levels, n: int, lmax: int, *, batch_size: int = DEFAULTS.batch_size, ratio: float = 0.25,
                eps: float | None = None, n_max: int | None = None, pilot_fraction: float = 0.1,
                theta: float = DEFAULTS.theta, budget: int = DEFAULTS.row_budget, progress=None) -> LminChoice:
    """Automatic Lmin from a pilot run of ``n`` coupled samples on levels 1, 2, ...

    The pilot stops at the first level whose coupled variance V_l is below ``ratio`` V[P_l] (the coupling
    has started to pay) or at ``lmax``; its first round samples levels 1..3 together, later rounds one level
    each (every round on the batched engine). With ``eps`` given it then grows, once, to the largest count (at
    most ``n_max``) whose cost stays within ``pilot_fraction`` of the MLMC cost it predicts,
    (sum_l sqrt(V_l C_l))^2 / ((1 - theta) eps^2), so a tight eps gets a reliable choice and a loose one a
    cheap one. Every candidate c below the top whose next level already has V_(c+1) < V[P_(c+1)] (the seed
    authors' rule: start where the corrections are cheaper than the samples) is scored by that predicted
    cost, sqrt(V[P_c] C_c) + sum_(l > c) sqrt(V_l C_l) with C_c = M^c and C_l = M^l + M^(l-1); the
    cheapest wins, unless Giles' kurtosis check rejects it: its own level and the coupled level above get at
    least ``KURTOSIS_PILOT`` samples (a smaller sample cannot show a kurtosis above 100), and a candidate
    whose levels show a kurtosis above ``KURTOSIS_WARNING`` (a variance estimate that cannot be trusted: the
    coarse sampler's rare outliers) is passed over for the next cheapest (``excluded`` says why).
    ``levels`` must offer ``with_lmin`` (a ``CoupledLevelSampler``); it is not changed.
    """
    if n < 2:
        raise InputError(f"n0: expected at least 2 pilot samples, got {n}")
    if not levels.can_change_lmin:
        raise InputError("lmin: 'auto' needs a level sampler that can change its Lmin (a CoupledLevelSampler)")
    probe = levels.with_lmin(0)  # every level >= 1 coupled
    M = probe.M
    pilot, batches, rounds, calls = {}, {}, 0, 0

    def draw(counts):  # one round of the batched engine over these levels
        nonlocal rounds, calls
        sums, stats = sample_levels(probe, counts, batch_size, budget, batches, progress, "automatic Lmin pilot")
        for level, part in sums.items():
            if level in pilot:
                pilot[level].add(part)
            else:
                pilot[level] = part
        rounds, calls = rounds + 1, calls + stats.calls

    def coupling_pays(level):
        st = level_stats(level, pilot[level], probe.cost(level))
        return st.var < ratio * st.var_fine

    # Climb: the first levels together (they are cheap), then one level a round until the coupling pays.
    draw({l: n for l in range(1, min(FIRST_CLIMB, lmax) + 1)})
    level = next((l for l in sorted(pilot) if coupling_pays(l)), max(pilot))
    while not coupling_pays(level) and level < lmax:
        level += 1
        draw({level: n})
    lmin, predicted = _select(pilot, probe)
    if eps is not None and predicted:
        unit = sum(probe.cost(l) for l in pilot)
        target = min(n_max or n, int(pilot_fraction * predicted[lmin] ** 2 / ((1 - theta) * eps**2) / unit))
        if target >= 1.5 * n:  # grow the pilot once, then choose again
            draw({l: target - n for l in pilot})
            lmin, predicted = _select(pilot, probe)
            n = target
    # Giles' kurtosis check on the levels the choice rests on: the candidate's own level and the first coupled
    # level above it; a pilot too small to see a kurtosis above the threshold grows there first, within
    # ``pilot_fraction`` of the predicted run (the driver's per-round re-check guards the rest).
    excluded: dict[int, str] = {}
    unchecked = None
    while lmin in predicted:
        check = [l for l in (lmin, lmin + 1) if l in pilot]
        want = KURTOSIS_PILOT
        if eps is not None:
            scale = probe.paths  # the levels' cost is per sample (a pair with antithetic pairs)
            run_cost = scale * predicted[lmin] ** 2 / ((1 - theta) * eps**2)
            want = min(want, max(n, int(pilot_fraction * run_cost / sum(probe.cost(l) for l in check))))
        short = {l: want - pilot[l].n for l in check if pilot[l].n < want}
        if short:
            draw(short)
            lmin, predicted = _select(pilot, probe, excluded)
            continue
        unchecked = (f"kurtosis of levels {check} not checked: {min(pilot[l].n for l in check)} pilot samples cannot "
                     f"show {KURTOSIS_WARNING:.0f} ({KURTOSIS_PILOT} would cost more than a tenth of the run)"
                     if want < KURTOSIS_PILOT else None)
        heavy = {l: level_stats(l, pilot[l], 0.0).kurtosis for l in check}
        heavy = {l: k for l, k in heavy.items() if k > KURTOSIS_WARNING}
        if not heavy:
            break
        excluded[lmin] = "; ".join(f"kurtosis {k:.3g} at level {l}" for l, k in heavy.items())
        lmin, predicted = _select(pilot, probe, excluded)
    return LminChoice(lmin, max(pilot), predicted, pilot, batches, M, rounds, calls, excluded, n,
                      {l: probe.cost(l) for l in pilot}, unchecked)


def _select(pilot: dict[int, LevelSums], probe, excluded=()) -> tuple[int, dict[int, float]]:
    """The candidate Lmin of least predicted cost (see ``choose_lmin``), none of ``excluded``, and every such
    candidate's score; the top pilot level when no candidate is left. Costs are the levels' own per path
    (``probe.with_lmin(c).cost``: NFEs M^l + M^(l-1) for one network)."""
    def level_cost(c: int, level: int) -> float:
        return probe.with_lmin(c).cost(level) / probe.paths

    var_fine, var_diff = {}, {}
    for level, sums in pilot.items():
        st = level_stats(level, sums, 0.0)
        c1, c2 = sums.sums["c1"] / sums.n, sums.sums["c2"] / sums.n
        var_diff[level], var_fine[level] = st.var, st.var_fine
        var_fine.setdefault(level - 1, float((c2 - c1**2).clamp_min(0).mean()))
    top = max(pilot)
    predicted = {}
    for c in range(0, top):
        if c in excluded or not var_diff[c + 1] < var_fine[c + 1]:
            continue
        cost = math.sqrt(var_fine[c] * level_cost(c, c))
        cost += sum(math.sqrt(var_diff[l] * level_cost(c, l)) for l in range(c + 1, top + 1))
        predicted[c] = cost
    if not predicted:
        return (top if excluded else top - 1), predicted
    return min(predicted, key=predicted.get), predicted


def pilot_sums(choice: LminChoice) -> dict[int, LevelSums]:
    """The pilot's coupled levels above Lmin: the same samples the estimate would draw there."""
    return {level: sums for level, sums in choice.pilot.items() if level > choice.lmin}
