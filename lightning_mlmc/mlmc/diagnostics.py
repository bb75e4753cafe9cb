"""Giles' ``mlmc_test``: the convergence table of fixed levels (with kurtosis and the consistency check),
the fitted rates, and the complexity table of adaptive runs at a list of eps."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from lightning_mlmc.errors import InputError, WeakConvergenceFailure
from lightning_mlmc.mlmc.checks import (
    CHECK_WARNING,
    KURTOSIS_WARNING,
    check_warning,
    consistency_check,
    kurtosis_warning,
)
from lightning_mlmc.mlmc.config import MLMCConfig
from lightning_mlmc.mlmc.driver import mlmc
from lightning_mlmc.mlmc.plan import fit_growth, fit_rate
from lightning_mlmc.mlmc.protocol import LevelFunction

DEFAULTS = MLMCConfig()
from lightning_mlmc.mlmc.rounds import sample_levels
from lightning_mlmc.mlmc.sums import level_stats

@dataclass
class ConvergenceRow:
    level: int
    mean: float  # ave(Pf - Pc) (RMS over pixels)
    mean_fine: float  # ave(Pf)
    var: float  # var(Pf - Pc)
    var_fine: float  # var(Pf)
    kurtosis: float
    check: float  # Giles' consistency check, RMS over pixels
    cost: float
    calls: int


@dataclass
class ComplexityRow:
    eps: float
    value: float  # RMS over pixels of the estimate
    mlmc_cost: float
    std_cost: float
    savings: float
    N_l: list
    converged: bool


@dataclass
class MLMCTestResult:
    rows: list[ConvergenceRow]
    alpha: float
    beta: float
    gamma: float
    complexity: list[ComplexityRow] = field(default_factory=list)
    wall_seconds: float = 0.0
    nfe: float = 0.0  # of the convergence table: samples x cost per level (the eps runs have their own)
    pilot_nfe: float = 0.0  # of the automatic-Lmin pilot run before it (``run_mlmc_test``)
    warnings: list[str] = field(default_factory=list)
    sequential_calls: int = 0  # network calls of the table's round

    def to_json(self) -> dict:
        return asdict(self)

    def tables(self) -> str:
        out = ["l  ave(Pf-Pc)  ave(Pf)  var(Pf-Pc)  var(Pf)  kurtosis  check  cost"]
        for r in self.rows:
            out.append(f"{r.level:<2d} {r.mean:11.4e} {r.mean_fine:9.4e} {r.var:11.4e} {r.var_fine:9.4e} "
                       f"{r.kurtosis:9.2f} {r.check:6.3f} {r.cost:6.0f}")
        out.extend(f"WARNING: {w}" for w in self.warnings)
        out.append(f"alpha = {self.alpha:.3f}  beta = {self.beta:.3f}  gamma = {self.gamma:.3f}")
        if self.complexity:
            out.append("eps  value  mlmc_cost  std_cost  savings  N_l")
            for c in self.complexity:
                out.append(f"{c.eps:.4g} {c.value:.5g} {c.mlmc_cost:.4g} {c.std_cost:.4g} "
                           f"{c.savings:.2f} {' '.join(str(n) for n in c.N_l)}")
        return "\n".join(out)


def mlmc_test(levels: LevelFunction, finest: int, samples: int, eps_list=(), *, n0: int = DEFAULTS.n0,
              theta: float = DEFAULTS.theta, lmax: int = DEFAULTS.lmax, batch_size: int = DEFAULTS.batch_size,
              budget: int = DEFAULTS.row_budget,
              progress=None) -> MLMCTestResult:
    """Giles' mlmc_test: ``samples`` coupled samples on every level Lmin..``finest`` (one round of the batched
    engine), the convergence table with kurtosis and the consistency check (and his warnings), fitted rates,
    then one adaptive run per eps."""
    if finest <= levels.lmin:
        raise InputError(f"levels: expected more than lmin = {levels.lmin}, got {finest}")
    tic = time.perf_counter()
    rows, prev = [], None
    table, stats = sample_levels(levels, {l: samples for l in range(levels.lmin, finest + 1)}, batch_size, budget,
                                 progress=progress, what="mlmc_test")
    for l in range(levels.lmin, finest + 1):
        s = table[l]
        st = level_stats(l, s, levels.cost(l))
        n = s.n
        y1, f1 = s.sums["y1"] / n, s.sums["f1"] / n
        var_y = (s.sums["y2"] / n - y1**2).clamp_min(0)
        var_f = (s.sums["f2"] / n - f1**2).clamp_min(0)
        check = consistency_check(prev, y1, f1, var_y, var_f, n)
        prev = (f1, var_f)
        rows.append(ConvergenceRow(l, st.mean, st.mean_fine, st.var, st.var_fine, st.kurtosis, check, st.cost, s.calls))
    coupled = [r for r in rows if r.level > levels.lmin]
    lv = [r.level for r in coupled]
    alpha = fit_rate(lv, [r.mean for r in coupled], levels.M)
    beta = fit_rate(lv, [r.var for r in coupled], levels.M)
    gamma = fit_growth(lv, [r.cost for r in coupled], levels.M)
    res = MLMCTestResult(rows, alpha, beta, gamma, warnings=_warnings(rows), sequential_calls=stats.calls,
                         nfe=float(sum(r.cost for r in rows) * samples))
    for e in eps_list:
        try:
            r, converged = mlmc(levels, e, lmax=lmax, n0=n0, theta=theta, batch_size=batch_size, row_budget=budget,
                                progress=progress), True
        except WeakConvergenceFailure as fail:
            r, converged = fail.result, False
        res.complexity.append(ComplexityRow(e, float(np.sqrt(np.mean(np.square(r.estimate)))), r.nfe, r.nfe_mc,
                                            r.savings, [lv_.n_samples for lv_ in r.levels], converged))
    res.wall_seconds = time.perf_counter() - tic
    return res


def _warnings(rows: list[ConvergenceRow]) -> list[str]:
    out = []
    if rows[-1].kurtosis > KURTOSIS_WARNING:
        out.append(kurtosis_warning(rows[-1].level, rows[-1].kurtosis, "the finest level"))
    worst = max(rows, key=lambda r: r.check)
    if worst.check > CHECK_WARNING:
        out.append(check_warning(worst.level, worst.check))
    return out
