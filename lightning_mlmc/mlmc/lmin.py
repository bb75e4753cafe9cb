"""Automatic Lmin: where the coupled corrections start to be cheaper than plain samples (chosen before
the driver runs, from a coupled pilot that the driver then reuses)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_mlmc.errors import InputError
from lightning_mlmc.mlmc.levels import level_cost
from lightning_mlmc.mlmc.sums import LevelSums, level_stats, sample_level


@dataclass
class LminChoice:
    """The automatic Lmin and the pilot it came from (coupled levels 1..top, ``n`` samples each)."""

    lmin: int
    top: int
    predicted: dict  # candidate Lmin -> predicted sum_l sqrt(V_l C_l) over the pilot levels
    pilot: dict  # level -> LevelSums of the coupled pilot (reused for levels > lmin)
    batches: dict  # level -> pilot batches used (the estimate's streams continue after them)
    M: int = 2

    def unused_cost(self) -> tuple[float, int]:
        """(NFEs by the cost formula, network calls counted) of the pilot levels at or below Lmin: the part
        the estimate cannot reuse (a coupled sample is no plain sample)."""
        nfe, calls = 0.0, 0
        for level, sums in self.pilot.items():
            if level <= self.lmin:
                nfe += sums.n * (self.M**level + self.M ** (level - 1))
                calls += sums.calls
        return nfe, calls


def choose_lmin(levels, n: int, lmax: int, *, batch_size: int = 1000, ratio: float = 0.25, eps: float | None = None,
                n_max: int | None = None, pilot_fraction: float = 0.1, theta: float = 0.5) -> LminChoice:
    """Automatic Lmin from a pilot run of ``n`` coupled samples on levels 1, 2, ...

    The pilot stops at the first level whose coupled variance V_l is below ``ratio`` V[P_l] (the coupling
    has started to pay) or at ``lmax``. With ``eps`` given it then grows, once, to the largest count (at
    most ``n_max``) whose cost stays within ``pilot_fraction`` of the MLMC cost it predicts,
    (sum_l sqrt(V_l C_l))^2 / ((1 - theta) eps^2), so a tight eps gets a reliable choice and a loose one a
    cheap one. Every candidate c below the top whose next level already has V_(c+1) < V[P_(c+1)] (the seed
    authors' rule: start where the corrections are cheaper than the samples) is scored by that predicted
    cost, sqrt(V[P_c] C_c) + sum_(l > c) sqrt(V_l C_l) with C_c = M^c and C_l = M^l + M^(l-1); the
    cheapest wins. ``levels`` must offer ``with_lmin`` (a ``CoupledLevelSampler``); it is not changed.
    """
    if n < 2:
        raise InputError(f"n0: expected at least 2 pilot samples, got {n}")
    if not hasattr(levels, "with_lmin"):
        raise InputError("lmin: 'auto' needs a level sampler that can change its Lmin (a CoupledLevelSampler)")
    probe = levels.with_lmin(0)  # every level >= 1 coupled
    M, pixels = probe.M, probe.pixels
    pilot, batches = {}, {}
    level = 0
    while level < lmax:  # climb
        level += 1
        pilot[level], batches[level] = sample_level(probe, level, n, batch_size, 0, pixels)
        st = level_stats(level, pilot[level], probe.cost(level))
        if st.var < ratio * st.var_fine:
            break
    lmin, predicted = _select(pilot, M)
    if eps is not None and predicted:
        unit = sum(probe.cost(l) for l in pilot)
        target = min(n_max or n, int(pilot_fraction * predicted[lmin] ** 2 / ((1 - theta) * eps**2) / unit))
        if target >= 1.5 * n:  # grow the pilot once, then choose again
            for level in pilot:
                more, used = sample_level(probe, level, target - n, batch_size, batches[level], pixels)
                pilot[level].add(more)
                batches[level] += used
            lmin, predicted = _select(pilot, M)
    return LminChoice(lmin, max(pilot), predicted, pilot, batches, M)


def _select(pilot: dict[int, LevelSums], M: int) -> tuple[int, dict[int, float]]:
    """The candidate Lmin of least predicted cost (see ``choose_lmin``) and every candidate's score."""
    var_fine, var_diff = {}, {}
    for level, sums in pilot.items():
        st = level_stats(level, sums, 0.0)
        c1, c2 = sums.sums["c1"] / sums.n, sums.sums["c2"] / sums.n
        var_diff[level], var_fine[level] = st.var, st.var_fine
        var_fine.setdefault(level - 1, float((c2 - c1**2).clamp_min(0).mean()))
    top = max(pilot)
    predicted = {}
    for c in range(0, top):
        if not var_diff[c + 1] < var_fine[c + 1]:
            continue
        cost = math.sqrt(var_fine[c] * level_cost(M, c, c))
        cost += sum(math.sqrt(var_diff[l] * level_cost(M, l, c)) for l in range(c + 1, top + 1))
        predicted[c] = cost
    return (min(predicted, key=predicted.get) if predicted else top - 1), predicted


def pilot_sums(choice: LminChoice) -> dict[int, LevelSums]:
    """The pilot's coupled levels above Lmin: the same samples the estimate would draw there."""
    return {level: sums for level, sums in choice.pilot.items() if level > choice.lmin}
