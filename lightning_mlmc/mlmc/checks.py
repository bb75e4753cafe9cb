"""Giles' checks of a set of levels (Giles 2015, ``mlmc_test``; pymlmc prints the same warnings): a level
whose kurtosis exceeds 100 has an unreliable variance estimate (heavy-tailed level differences), and a
consistency check above 1 says E[P_l - P_(l-1)] and E[P_l] - E[P_(l-1)] disagree (a coupling error). Used by
``mlmc_test``'s table and by every adaptive run's result."""

from __future__ import annotations

import math

KURTOSIS_WARNING = 100.0  # Giles: above this a level's variance estimate is unreliable
CHECK_WARNING = 1.0  # Giles: above this E[P_f - P_c] and E[P_f] - E[P_c] disagree (a coupling error)


def consistency_check(prev, y1, f1, var_y, var_f, n: int, n_prev: int | None = None) -> float:
    """Giles' check |E[Pf - Pc] + E[P_(l-1)] - E[P_l]| / (3 (sd(Y_l) + sd(P_(l-1)) + sd(P_l)) / sqrt(N)), as the
    RMS over pixels; ``prev`` is (E[P_(l-1)], V[P_(l-1)]) of the level below (None at Lmin: 0). With levels of
    different sample counts (an adaptive run) each standard deviation is divided by the root of its own level's
    count (``n_prev`` for the level below)."""
    if prev is None:
        return 0.0
    pf1, pvar_f = prev
    n_prev = n if n_prev is None else n_prev
    num = (y1 + pf1 - f1).abs()
    den = 3.0 * (var_y.sqrt() / math.sqrt(n) + pvar_f.sqrt() / math.sqrt(n_prev) + var_f.sqrt() / math.sqrt(n))
    ok = den > 0
    return float((num[ok] / den[ok]).pow(2).mean().sqrt()) if ok.any() else 0.0


def kurtosis_warning(level: int, kurtosis: float, what: str = "level") -> str:
    return (f"kurtosis on {what} {level} = {kurtosis:.3g}: its variance estimate is unreliable "
            "(heavy-tailed level differences)")


def check_warning(level: int, check: float) -> str:
    return (f"maximum consistency error = {check:.3g} at level {level}: E[P_l - P_(l-1)] and E[P_l] - E[P_(l-1)] "
            "disagree (a coupling or level-function error)")


def level_checks(moments) -> tuple[dict[int, float], list[str]]:
    """(consistency check per coupled level, Giles' warnings) of an adaptive run's levels (``LevelMoments``
    with at least two samples): every coupled level whose kurtosis exceeds ``KURTOSIS_WARNING``, and the
    largest consistency check when it exceeds ``CHECK_WARNING``."""
    checks, warnings, prev = {}, [], None
    for m in moments:
        if m.n < 2:
            prev = None
            continue
        f1 = m.fine_sum / m.n
        var_f = (m.fine_sq / m.n - f1**2).clamp_min(0)
        if prev is not None and prev[0] == m.level - 1:
            checks[m.level] = consistency_check(prev[1:3], m.mean, f1, m.var, var_f, m.n, prev[3])
        prev = (m.level, f1, var_f, m.n)
    lmin = moments[0].level if moments else 0
    warnings += [kurtosis_warning(m.level, m.kurtosis) for m in moments
                 if m.level > lmin and m.n >= 2 and m.kurtosis > KURTOSIS_WARNING]
    if checks:
        worst = max(checks, key=checks.get)
        if checks[worst] > CHECK_WARNING:
            warnings.append(check_warning(worst, checks[worst]))
    return checks, warnings
