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


def choose_lmin(levels, n: int, lmax: int, *, batch_size: int = 1000, ratio: float = 0.25) -> LminChoice:
    """Automatic Lmin from a pilot run of ``n`` coupled samples on levels 1, 2, ...

    The pilot stops at the first level whose coupled variance V_l is below ``ratio`` V[P_l] (the coupling
    has started to pay) or at ``lmax``. Every candidate c below it whose next level already has
    V_(c+1) < V[P_(c+1)] (the seed authors' rule: start where the corrections are cheaper than the
    samples) is scored by the MLMC cost it predicts, sqrt(V[P_c] C_c) + sum_(l > c) sqrt(V_l C_l) with
    C_c = M^c and C_l = M^l + M^(l-1) (the optimal N_l make the total cost proportional to its square);
    the cheapest wins. ``levels`` must offer ``with_lmin`` (a ``CoupledLevelSampler``); it is not changed.
    """
    if n < 2:
        raise InputError(f"n0: expected at least 2 pilot samples, got {n}")
    if not hasattr(levels, "with_lmin"):
        raise InputError("lmin: 'auto' needs a level sampler that can change its Lmin (a CoupledLevelSampler)")
    probe = levels.with_lmin(0)  # every level >= 1 coupled
    M, pixels = probe.M, probe.pixels
    pilot, batches, var_fine, var_diff = {}, {}, {}, {}
    level = 0
    while level < lmax:
        level += 1
        sums, used = sample_level(probe, level, n, batch_size, 0, pixels)
        pilot[level], batches[level] = sums, used
        st = level_stats(level, sums, probe.cost(level))
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
        cost = math.sqrt(var_fine[c] * level_cost(M, c, c))
        cost += sum(math.sqrt(var_diff[l] * level_cost(M, l, c)) for l in range(c + 1, top + 1))
        predicted[c] = cost
    lmin = min(predicted, key=predicted.get) if predicted else top - 1
    return LminChoice(lmin, top, predicted, pilot, batches, M)


def pilot_sums(choice: LminChoice) -> dict[int, LevelSums]:
    """The pilot's coupled levels above Lmin: the same samples the estimate would draw there."""
    return {level: sums for level, sums in choice.pilot.items() if level > choice.lmin}
