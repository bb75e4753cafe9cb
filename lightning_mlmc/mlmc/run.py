"""Running an ``MLMCConfig``: automatic Lmin first (``choose_lmin``), then Giles' driver or ``mlmc_test``.

``run_mlmc`` and ``run_mlmc_test`` take the config and a level sampler built from it
(``config.level_sampler(...)``); every default is the config's.
"""

from __future__ import annotations

import math
import time

from lightning_mlmc.errors import WeakConvergenceFailure
from lightning_mlmc.mlmc.config import MLMCConfig
from lightning_mlmc.mlmc.diagnostics import MLMCTestResult, mlmc_test
from lightning_mlmc.mlmc.driver import first_pilot, mlmc
from lightning_mlmc.mlmc.levels import CoupledLevelSampler
from lightning_mlmc.mlmc.lmin import choose_lmin
from lightning_mlmc.mlmc.result import MLMCResult
from lightning_mlmc.mlmc.rounds import sample_levels
from lightning_mlmc.mlmc.state import DriverState

DEFAULTS = MLMCConfig()


def mlmc_auto(levels: CoupledLevelSampler, eps: float, *, lmax: int = DEFAULTS.lmax, n0: int = DEFAULTS.n0,
              batch_size: int = DEFAULTS.batch_size, state_path: str | None = None, switch_above_lmin: bool = False,
              **driver_kw) -> MLMCResult:
    """The adaptive driver with Lmin chosen first from a coupled pilot (``choose_lmin``; a resumed run keeps
    the saved choice). The pilot's levels above Lmin are reused by the driver and the rest is counted in
    ``nfe``; ``levels`` itself is not changed (the driver gets a copy at the chosen Lmin).

    ``switch_above_lmin`` (levels over two networks): Lmin is chosen on the coarse network's own levels (a
    cheap pilot, counted in ``nfe`` and not reused) and the switch set just above it, so the coarse network
    runs the plain level and the teacher every level above."""
    tic = time.perf_counter()
    pilot, lmin = None, DriverState.peek_lmin(state_path) if state_path else None
    probe = levels.coarse_levels() if switch_above_lmin else levels
    if lmin is None:
        pilot = choose_lmin(probe, driver_kw.get("n_start") or first_pilot(n0, levels.pixels), lmax,
                            batch_size=batch_size, eps=eps, budget=driver_kw.get("row_budget", DEFAULTS.row_budget),
                            progress=driver_kw.get("progress"),
                            n_max=n0, pilot_fraction=driver_kw.get("pilot_fraction", 0.1),
                            theta=driver_kw.get("theta", DEFAULTS.theta))
        lmin = pilot.lmin
    pilot_seconds = time.perf_counter() - tic
    unused, why = 0.0, None
    if switch_above_lmin:  # the coarse network's pilot: not the levels the driver runs
        if pilot is not None:
            unused = sum(s.n * pilot.costs[l] for l, s in pilot.pilot.items()) * levels.row_cost("coarse")
        n = pilot.n if pilot is not None else first_pilot(n0, levels.pixels)
        levels, why, cost = choose_switch(levels, lmin, n, batch_size, driver_kw.get("row_budget", DEFAULTS.row_budget))
        unused += cost
        pilot = None
    try:
        result = mlmc(levels.with_lmin(lmin), eps, lmax=lmax, n0=n0, batch_size=batch_size, state_path=state_path,
                      pilot=pilot, **driver_kw)
    except WeakConvergenceFailure as failure:  # the estimate so far rides along; its wall time too
        _add_pilot(failure.result, pilot_seconds, unused, why)
        raise
    return _add_pilot(result, pilot_seconds, unused, why)


SWITCH_PILOT_BATCH = 2**30  # the switch pilot's stream (no estimate draws from it)


def choose_switch(levels: CoupledLevelSampler, lmin: int, n: int, batch_size: int, budget: int):
    """(levels, why, cost): whether the coarse network pays on the plain level Lmin, from ``n`` pilot samples of
    the switch level at Lmin's grid (teacher minus student, same noise; its own stream). The teacher's plain
    level costs sqrt(V[P^T] C^T) in Giles' sum_l sqrt(V_l C_l), the student's plain level and the switch level
    sqrt(V[P^S] C^S) + sqrt(V_sw C_sw) (the levels above are the teacher's either way); the cheaper wins. A
    student whose difference from the teacher varies as much as the teacher's samples do buys nothing."""
    two = levels.with_switch(lmin + 1).with_lmin(lmin)
    sums, _ = sample_levels(two, {lmin + 1: n}, batch_size, budget, {lmin + 1: SWITCH_PILOT_BATCH})
    s = sums[lmin + 1]
    var = lambda a, b: float((s.sums[b] / s.n - (s.sums[a] / s.n) ** 2).clamp_min(0).mean())  # noqa: E731
    v_teacher, v_student, v_switch = var("f1", "f2"), var("c1", "c2"), var("y1", "y2")
    teacher = math.sqrt(v_teacher * two.teacher_levels().with_lmin(lmin).cost(lmin))
    student = math.sqrt(v_student * two.cost(lmin)) + math.sqrt(v_switch * two.cost(lmin + 1))
    what = (f"switch pilot ({n} samples at {two.steps(lmin)} steps): teacher alone {teacher:.3g}, student and switch "
            f"{student:.3g} in sum sqrt(V C) (V[P_teacher] {v_teacher:.3g}, V[P_student] {v_student:.3g}, "
            f"V[teacher - student] {v_switch:.3g})")
    cost = n * two.cost(lmin + 1)
    if student < teacher:
        return two, f"coarse network below level {lmin + 1}: {what}", cost
    return levels.teacher_levels(), f"coarse network not used: {what}", cost


def _add_pilot(result: MLMCResult, seconds: float, cost: float, why: str | None = None) -> MLMCResult:
    result.wall_seconds += seconds
    if why is not None:
        result.scheme["switch_reason"] = why
    if cost:
        result.pilot_nfe += cost
        result.nfe += cost
        result.savings = result.nfe_mc / result.nfe
        result.savings_same_grid = result.nfe_mc_same_grid / result.nfe
    return result


def run_mlmc(config: MLMCConfig, levels: CoupledLevelSampler, eps: float, *, state_path: str | None = None,
             state_key: str = "", progress=None) -> MLMCResult:
    """Giles' adaptive MLMC with ``config``'s settings on ``levels`` (``config.level_sampler(...)``), Lmin
    chosen automatically first when ``config.lmin`` is ``"auto"`` (``mlmc_auto``); payoff ``mean_std`` runs
    ``maps.mean_std_maps`` (two driver runs)."""
    if config.payoff == "mean_std":
        from lightning_mlmc.mlmc.maps import mean_std_maps

        return mean_std_maps(_run_driver, config, levels, eps, state_path=state_path, state_key=state_key,
                             progress=progress)
    return _run_driver(config, levels, eps, state_path=state_path, state_key=state_key, progress=progress)


def _run_driver(config: MLMCConfig, levels, eps: float, *, state_path=None, state_key: str = "", progress=None):
    kw = dict(lmax=config.lmax, n0=config.n0, theta=config.theta, batch_size=config.batch_size,
              row_budget=config.row_budget, state_path=state_path, state_key=state_key, progress=progress)
    if config.lmin != "auto":
        return mlmc(levels, eps, **kw)
    follow = config.coarse_checkpoint is not None and config.switch is None
    return mlmc_auto(levels, eps, switch_above_lmin=follow, **kw)


def run_mlmc_test(config: MLMCConfig, levels: CoupledLevelSampler, finest: int, samples: int,
                  eps_list=(), progress=None) -> MLMCTestResult:
    """Giles' ``mlmc_test`` with ``config``'s settings on ``levels``: the levels Lmin..``finest`` (with
    ``lmin: auto``, Lmin chosen first from a coupled pilot of ``samples`` samples per level)."""
    pilot_nfe = 0.0
    if config.lmin == "auto":
        follow = config.coarse_checkpoint is not None and config.switch is None
        pilot = choose_lmin(levels.coarse_levels() if follow else levels, min(samples, config.n0), finest,
                            batch_size=config.batch_size, budget=config.row_budget, progress=progress)
        levels = (levels.with_switch(pilot.lmin + 1) if follow else levels).with_lmin(pilot.lmin)
        pilot_nfe = float(sum(s.n * pilot.costs[l] for l, s in pilot.pilot.items()))
        if follow:
            pilot_nfe *= levels.row_cost("coarse")
    result = mlmc_test(levels, finest, samples, eps_list, n0=config.n0, theta=config.theta, lmax=config.lmax,
                       batch_size=config.batch_size, budget=config.row_budget, progress=progress)
    result.pilot_nfe = pilot_nfe
    return result
