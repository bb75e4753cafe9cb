"""How the driver sizes its levels and splits eps^2 between the bias and the variance.

- the plain level Lmin is sized from every path of its law: its own samples and the coarse paths of level
  Lmin + 1 (not across a network switch, whose coarse paths are another grid's);
- an undecided bias test (estimate within theta eps^2, upper value above it) may be paid for by the variance
  (``guards.topup``): N_l sized for eps^2 minus the bias's upper value, when that is the cheapest decision.

The oracles are numpy's sample variance of the concatenated samples, the variance sum over levels computed
here, and the exact expectation of a level function whose level means are known in closed form.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lightning_mlmc.mlmc.driver as driver
import lightning_mlmc.mlmc.guards as guards
from lightning_mlmc.errors import WeakConvergenceFailure
from lightning_mlmc.mlmc.driver import mlmc
from lightning_mlmc.mlmc.estimates import SquaredBias, level_moments, sizing_variance
from lightning_mlmc.mlmc.plan import level_variances, plain_level_variance
from lightning_mlmc.mlmc.protocol import UserLevels
from lightning_mlmc.mlmc.sums import LevelSums
from tests.test_mlmc_truth import rmse_bound_factor


def _moments(refines_above: bool):
    g = np.random.default_rng(3)
    plain = g.normal(1.0, 2.0, size=(5, 3))  # level 1 = Lmin: P_1
    coarse = g.normal(1.0, 2.0, size=(7, 3))  # level 2's coarse paths: P_1 again
    fine = coarse + g.normal(0.1, 0.3, size=(7, 3))
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    m1 = level_moments(1, LevelSums.from_payoffs(t(plain), None, 5))
    m2 = level_moments(2, LevelSums.from_payoffs(t(fine), t(coarse), 14), refines=refines_above)
    return [m1, m2], plain, coarse


def test_the_plain_level_is_sized_from_every_path_of_its_law():
    """V[P_Lmin] from the 5 plain samples and the 7 coarse paths of the level above (12 samples), one standard
    error up with the plain level's kurtosis; a variance from the plain samples alone (or from all 14 paths)
    fails."""
    moments, plain, coarse = _moments(refines_above=True)
    both = np.concatenate([plain, coarse])
    exact = float(np.var(both, axis=0, ddof=1).mean())
    k = max(moments[0].kurtosis, 3.0)
    assert plain_level_variance(moments, 1) == pytest.approx(exact * (1 + math.sqrt(k - 1) / math.sqrt(12)), rel=1e-12)
    assert level_variances(moments, 1, 2)[1] == plain_level_variance(moments, 1)


def test_a_network_switch_above_lmin_is_not_pooled():
    """The level above a network switch (``refines`` false) has coarse paths of another law: Lmin keeps its
    own samples' variance."""
    moments, plain, _ = _moments(refines_above=False)
    assert plain_level_variance(moments, 1) == sizing_variance(moments[0])
    k = max(moments[0].kurtosis, 3.0)
    own = float(np.var(plain, axis=0, ddof=1).mean())
    assert sizing_variance(moments[0]) == pytest.approx(own * (1 + math.sqrt(k - 1) / math.sqrt(5)), rel=1e-12)


def test_topup_sizes_the_variance_for_the_bias_upper_value():
    """Within its room (estimate <= theta eps^2, upper value <= twice that) the top-up's N_l meet
    sum_l V_l / N_l <= eps^2 - upper (summed here), and no fewer samples per level would do by much (Giles'
    optimum); outside it, None. Sizing for eps^2 - theta eps^2 instead would miss the first inequality."""
    eps, room = 0.1, 0.25 * 0.01
    var, cost = [0.5, 0.02, 0.004], [1.0, 3.0, 6.0]
    moments = [SimpleNamespace(level=l, n=10) for l in range(3)]
    run = SimpleNamespace(s=SimpleNamespace(eps=eps))
    bias = SquaredBias(value=0.8 * room, se=0.9 * room)  # upper 1.7 room
    more = guards.topup(run, moments, var, cost, bias, room)
    n = [10 + more.get(l, 0) for l in range(3)]
    assert sum(v / k for v, k in zip(var, n)) <= eps**2 - bias.upper
    split = [math.ceil(math.sqrt(v / c) * sum(math.sqrt(a * b) for a, b in zip(var, cost)) / (eps**2 - room))
             for v, c in zip(var, cost)]
    assert sum(v / k for v, k in zip(var, split)) > eps**2 - bias.upper  # theta's split alone would not do
    lagrange = [math.sqrt(v / c) * sum(math.sqrt(a * b) for a, b in zip(var, cost)) / (eps**2 - bias.upper)
                for v, c in zip(var, cost)]
    assert all(k <= max(10, math.ceil(x)) for k, x in zip(n, lagrange))
    assert guards.topup(run, moments, var, cost, SquaredBias(1.1 * room, 0.1 * room), room) is None
    assert guards.topup(run, moments, var, cost, SquaredBias(0.5 * room, 1.6 * room), room) is None
    # every level already holds enough: nothing more
    assert guards.topup(run, [SimpleNamespace(level=l, n=10**6) for l in range(3)], var, cost, bias, room) == {}


def test_runs_that_pay_the_bias_with_variance_keep_the_rmse(monkeypatch):
    """20 driver runs on a scalar level function with E[Y_l] = b 2^-l (so E[P] = 1 + b exactly) and noisy fine
    levels, where the bias test is often undecided: the top-up decides some runs; every converged run
    certifies an RMSE within eps, and the RMSE over the 20 runs against 1 + b is within the chi-square bound
    of eps (accepting an upper value beyond twice the room, or sizing for theta's split, inflates it)."""
    eps, b = 0.01, 1.0
    decided = []
    latest = {}
    topup = guards.topup

    def spy_topup(*args):
        latest["out"] = topup(*args)
        return latest["out"]

    step = driver._Run._mlmc_round

    def spy_round(self, moments, rates):
        latest["out"] = None
        more, converged = step(self, moments, rates)
        if latest["out"] is not None and more is latest["out"]:
            decided.append(True)
        return more, converged

    monkeypatch.setattr(guards, "topup", spy_topup)
    monkeypatch.setattr(driver._Run, "_mlmc_round", spy_round)
    errors = []
    for seed in range(20):
        def fn(level, n, batch, rank, seed=seed):
            g = torch.Generator().manual_seed(1_000_003 * seed + 1009 * level + 7 * batch + rank)
            x = 1.0 + torch.randn(n, 1, generator=g, dtype=torch.float64)
            if level == 0:
                return LevelSums.from_payoffs(x, None, n)
            y = b * 2.0**-level + 0.3 * 2.0 ** (-0.75 * level) * torch.randn(n, 1, generator=g, dtype=torch.float64)
            return LevelSums.from_payoffs(x + y, x, n)

        try:
            r = mlmc(UserLevels(fn, M=2, pixels=1), eps, lmax=12)
        except WeakConvergenceFailure as e:
            r = e.result
        if r.converged:
            assert r.rmse_estimate <= eps * (1 + 1e-12)
        errors.append((r.estimate[0] - (1.0 + b)) ** 2)
    assert decided, "the top-up never decided a run: the test does not exercise it"
    assert math.sqrt(np.mean(errors)) <= rmse_bound_factor(20) * eps
