"""Levels over networks: a cheaper "student" on the coarse levels, the teacher above a switch level.

The teacher is the exact score of a Gaussian problem and the "student" the exact score of a slightly different
Gaussian prior, so both posteriors are known in closed form (computed here with numpy, sharing no code with the
samplers or ``problems``). The MLMC estimate must be the teacher's posterior moments, whatever the student is:
the switch level (teacher minus student on one grid, same noise) carries the difference.

Mutations these catch (tried): the switch level's coarse path on the teacher (the sum telescopes to the
student's moments, 0.05-0.07 off per pixel, many times the bound); the switch level's coarse path on the
coarse grid (its mean is then no longer the networks' difference alone; the level-law test fails); the
engine sending every row to one network (the level-law test fails).
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from lightning_mlmc import ExactPosteriorEps
from lightning_mlmc.errors import InputError
from lightning_mlmc.mlmc import CoupledLevelSampler, MLMCConfig, mlmc
from lightning_mlmc.problems import AnalyticSpec

PRIOR = {"weights": [1.0], "means": [[0.5, -0.3, 0.2]], "covs": [[[1.0, 0.3, 0.0], [0.3, 0.8, 0.1], [0.0, 0.1, 0.5]]]}
A = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
NOISE, Y = 0.5, [0.4, 0.1]
SHIFT = [0.3, -0.3, 0.4]  # the student's prior mean moves by this, and its covariance grows by SCALE
SCALE = 1.3


def spec(shift=None) -> AnalyticSpec:
    if shift is None:
        return AnalyticSpec.from_dict({"prior": PRIOR, "operator": {"matrix": A}, "noise_std": NOISE, "y": Y})
    prior = {**PRIOR, "means": [list(np.add(PRIOR["means"][0], shift))],
             "covs": [(SCALE * np.array(PRIOR["covs"][0])).tolist()]}
    return AnalyticSpec.from_dict({"prior": prior, "operator": {"matrix": A}, "noise_std": NOISE, "y": Y})


def posterior_second_moment(shift=None) -> np.ndarray:
    """E[x_i^2 | y] of the linear-Gaussian problem: Sigma = (C^-1 + A^T A / s^2)^-1, mu = Sigma (C^-1 m + A^T y / s^2)
    (the student's: prior mean + ``shift``, covariance times ``SCALE``)."""
    C, m = np.array(PRIOR["covs"][0]), np.array(PRIOR["means"][0])
    if shift is not None:
        C, m = SCALE * C, m + np.array(shift)
    Am = np.array(A)
    prec = np.linalg.inv(C) + Am.T @ Am / NOISE**2
    cov = np.linalg.inv(prec)
    mu = cov @ (np.linalg.solve(C, m) + Am.T @ np.array(Y) / NOISE**2)
    return mu**2 + np.diag(cov)


def levels(seed=0, switch=3, lmin=2, coarse=True, antithetic=True):
    teacher = ExactPosteriorEps(spec())
    kw = dict(coarse_model=ExactPosteriorEps(spec(SHIFT)), switch=switch, coarse_cost=0.25) if coarse else {}
    return CoupledLevelSampler(teacher, torch.tensor(Y, dtype=torch.float64)[None], (3,), lmin=lmin, seed=seed,
                               antithetic=antithetic, **kw)


def test_the_student_is_a_different_answer():
    """The precondition of the tests below: the two posteriors differ by far more than eps."""
    gap = np.abs(posterior_second_moment(SHIFT) - posterior_second_moment()).max()
    assert gap > 0.1


def test_level_structure_costs_and_networks():
    """Steps, networks and costs of each level around the switch, and the rows each network evaluated."""
    lv = levels(switch=3, lmin=1)
    assert [lv.steps(l) for l in (1, 2, 3, 4, 5)] == [2, 4, 4, 8, 16]
    assert [lv.refines(l) for l in (1, 2, 3, 4)] == [True, True, False, True]
    assert [(lv.fine_network(l), lv.coarse_network(l)) for l in (2, 3, 4)] == [
        ("coarse", "coarse"), ("model", "coarse"), ("model", "model")]
    # per pair: level 1 plain student 2 steps, level 2 student 4 + 2, switch teacher 4 + student 4, level 4 teacher 8 + 4
    assert [lv.cost(l) for l in (1, 2, 3, 4)] == [2 * 0.5, 2 * 1.5, 2 * (4 + 1.0), 2 * 12.0]
    assert lv.plain_cost(3) == 2 * 4 and lv.plain_cost(2) == 2 * 4 * 0.25
    import lightning_mlmc.mlmc.engine as engine

    paths = lv.steppers(3, 5)
    stats = engine.run([paths], lv.networks, lv.y)
    assert stats.network_rows == {"model": 2 * 5 * 4, "coarse": 2 * 5 * 4}
    assert stats.calls == 2 * 4  # one call per network per step


def test_switch_level_mean_is_the_networks_difference():
    """The switch level's samples: the teacher's and the student's 4-step paths from the same noise, so its
    mean is E[P^T_4] - E[P^S_4]; both paths checked against one-network levels of the same seed-independent
    laws (their means over many samples within 5 standard errors)."""
    n = 4000
    sw = levels(seed=1, switch=3, lmin=1, antithetic=False)(3, n)
    teacher_4 = levels(seed=2, coarse=False, lmin=2, antithetic=False)(2, n)  # plain teacher, 4 steps
    student_4 = CoupledLevelSampler(ExactPosteriorEps(spec(SHIFT)), torch.tensor(Y, dtype=torch.float64)[None], (3,),
                                    lmin=2, seed=3)(2, n)
    fine, coarse = sw.sums["f1"] / n, sw.sums["c1"] / n
    for got, ref in ((fine, teacher_4), (coarse, student_4)):
        mean = ref.sums["f1"] / n
        var = ref.sums["f2"] / n - mean**2
        assert torch.all((got - mean).abs() <= 5 * torch.sqrt(2 * var / n)), (got, mean)
    # same noise: the paths are correlated (independent paths would give V[Y] = V[P^T] + V[P^S])
    y_var = sw.sums["y2"] / n - (sw.sums["y1"] / n) ** 2
    independent = (sw.sums["f2"] / n - fine**2) + (sw.sums["c2"] / n - coarse**2)
    assert torch.all(y_var < 0.5 * independent), (y_var, independent)


def test_two_network_mlmc_recovers_the_teachers_posterior(switch=3):
    """The driver on the two-network hierarchy (Lmin 2, pure MLMC: no plain-MC finish or raised Lmin that could
    leave the student out), 6 seeds at eps 0.05: the RMSE against the teacher's exact second moment within the
    chi-square bound of eps (a run that telescoped to the student's moments would be about 0.3 off); the
    result states the cost unit and the coarse network's row cost."""
    eps, seeds = 0.05, range(6)
    exact = posterior_second_moment()
    sq = []
    for seed in seeds:
        r = mlmc(levels(seed=seed, switch=switch), eps, lmax=12, fallback=False)
        assert r.lmin == 2 and r.levels[-1].level >= switch + 2
        sq.append(float(((np.array(r.estimate) - exact) ** 2).mean()))
        assert r.cost_unit.startswith("teacher NFE") and r.network_costs["coarse"]["row_cost"] == 0.25
    bound = math.sqrt(chi2.ppf(0.99, len(sq)) / len(sq)) * eps
    assert math.sqrt(np.mean(sq)) <= bound, (math.sqrt(np.mean(sq)), bound)


def test_bad_network_options_are_named():
    teacher = ExactPosteriorEps(spec())
    y = torch.tensor(Y, dtype=torch.float64)[None]
    with pytest.raises(InputError, match="switch"):
        CoupledLevelSampler(teacher, y, (3,), switch=2)
    with pytest.raises(InputError, match="switch"):
        CoupledLevelSampler(teacher, y, (3,), coarse_model=teacher, switch=0)
    with pytest.raises(InputError, match="coarse_cost"):
        CoupledLevelSampler(teacher, y, (3,), coarse_model=teacher, switch=2, coarse_cost=-1.0)
    # without coarse_cost: the FLOPs ratio of the two networks (one network against itself: 1)
    assert CoupledLevelSampler(teacher, y, (3,), coarse_model=teacher, switch=2).row_cost("coarse") == 1.0
    with pytest.raises(InputError, match="picard_window"):
        MLMCConfig(picard_window=8).level_sampler(teacher, y, (3,), coarse_model=teacher, switch=2)


# ------------------------------------------------------------------------------------------------
# The command line: --coarse-checkpoint on two exported networks of one problem


def _exported(tmp_path, name, operator, **kw):
    from lightning_mlmc.module import ScoreModule

    module = ScoreModule(operator=operator, attention=False, **kw)
    module.export(str(tmp_path / name))
    return str(tmp_path / name)


def test_cli_mlmc_with_a_coarse_checkpoint(tmp_path, capsys):
    """``mlmc --coarse-checkpoint``: the result states the teacher-NFE unit and the student's FLOPs ratio (a
    [8, 8] UNet against an [8, 16] one: below 1), the rows each network evaluated; a student of another
    problem, or one with an analytic --problem, is a one-line error with status 2."""
    import json

    from lightning_mlmc.cli import main as cli_main

    superres = {"name": "superres", "shape": [1, 8, 8], "noise_std": 0.05, "factor": 2, "upsample": "nearest"}
    teacher = _exported(tmp_path, "teacher", superres, channels=[8, 16])
    student = _exported(tmp_path, "student", superres, channels=[8, 8])
    other = _exported(tmp_path, "other", {"name": "denoise", "shape": [1, 8, 8], "noise_std": 0.1}, channels=[8, 8])
    np.save(tmp_path / "y.npy", np.zeros((1, 4, 4), np.float32))
    out = tmp_path / "m.json"
    rc = cli_main(["mlmc", "--checkpoint", teacher, "--observation", str(tmp_path / "y.npy"), "--eps", "0.2",
                   "--clip", "1", "--lmin", "1", "--switch", "2", "--lmax", "5", "--n0", "4",
                   "--coarse-checkpoint", student, "--out", str(out)])
    assert rc in (0, 3)
    r = json.loads(out.read_text())
    assert r["cost_unit"].startswith("teacher NFE") and r["switch"] == 2
    ratio = r["network_costs"]["coarse"]["row_cost"]
    assert 0 < ratio < 1 and r["network_costs"]["coarse"]["rows"] > 0 and r["network_costs"]["model"]["rows"] > 0
    capsys.readouterr()
    for args, needle in ((["--checkpoint", teacher, "--observation", str(tmp_path / "y.npy"), "--coarse-checkpoint",
                           other], "solves another problem"),
                         (["--checkpoint", teacher, "--observation", str(tmp_path / "y.npy"), "--switch", "2"],
                          "without a coarse network")):
        rc = cli_main(["mlmc", *args, "--eps", "0.2", "--lmin", "1", "--lmax", "3", "--out", str(tmp_path / "x.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_the_switch_pilot_uses_the_student_only_where_it_pays():
    """``choose_switch``: a student identical to the teacher at a quarter of its cost pays (the switch level
    has no variance); the same student at the teacher's cost does not (it adds a level and saves nothing)."""
    from lightning_mlmc.mlmc.run import choose_switch

    y = torch.tensor(Y, dtype=torch.float64)[None]
    teacher = ExactPosteriorEps(spec())
    same_cheap = CoupledLevelSampler(teacher, y, (3,), coarse_model=ExactPosteriorEps(spec()), switch=1, coarse_cost=0.25)
    chosen, why, cost = choose_switch(same_cheap, 2, 64, 1000, 4096)
    assert chosen.coarse_model is not None and chosen.switch == 3 and why.startswith("coarse network below level 3")
    assert cost == 64 * same_cheap.with_switch(3).cost(3)
    same_dear = CoupledLevelSampler(teacher, y, (3,), coarse_model=ExactPosteriorEps(spec()), switch=1, coarse_cost=1.0)
    chosen, why, _ = choose_switch(same_dear, 2, 64, 1000, 4096)
    assert chosen.coarse_model is None and chosen.switch is None and why.startswith("coarse network not used")
