"""MLMC against the exact oracle of the joint fine/coarse chain, and the driver's contracts."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tests.analytic_cases import EXAMPLES, Counting, bimodal2d, gaussian3d, gaussian_inpaint
from tests.rounding import assert_agree_to_rounding, exact_score_ops, mlmc_relative_tolerance

from lightning_mlmc import ExactPosteriorEps, InputError, TimeGrid, WeakConvergenceFailure, exact_posterior
from lightning_mlmc.diffusion import step_coefficients
from lightning_mlmc.gaussian_oracle import GaussianOracle
from lightning_mlmc.mlmc import (
    CoupledLevelSampler,
    LevelSums,
    UserLevels,
    coarse_noise_weights,
    level_stats,
    mlmc,
    mlmc_auto,
    mlmc_test,
)
from lightning_mlmc.schedule import VPSchedule

N = 6000
GRIDS = [TimeGrid(), TimeGrid("polynomial", rho=2.0), TimeGrid("logsnr"), TimeGrid("edm")]


def _sampler(spec, **kw):
    return CoupledLevelSampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], spec.shape, **kw)


def _se_of_var(var_hat, kurt, n):
    """Standard error of a sample variance: var sqrt((kurtosis - 1) / n)."""
    return var_hat * math.sqrt(max(kurt - 1.0, 2.0) / n)


def test_coupling_variances_differ_as_the_oracle_says():
    """The oracle tells weighted and naive apart; the sampler reproduces the difference's sign."""
    spec = gaussian3d()
    oracle = GaussianOracle(spec)
    vw = float(oracle.level_moments(5, coupling="weighted")[1].mean())
    vn = float(oracle.level_moments(5, coupling="naive")[1].mean())
    assert vw != pytest.approx(vn, rel=1e-3)
    # Deterministic sampler: both couplings identical (x_T only).
    a = oracle.level_moments(4, sampler="ddim", coupling="weighted")[1]
    b = oracle.level_moments(4, sampler="ddim", coupling="naive")[1]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("grid", [TimeGrid(), TimeGrid("polynomial", rho=2.0), TimeGrid("edm")])
def test_fitted_rates_match_exact_slopes(grid):
    """alpha and beta fitted from sampled levels 5..9 agree with the oracle's exact slopes within 0.15."""
    spec = gaussian3d()
    oracle = GaussianOracle(spec)
    levels = list(range(5, 10))
    exact_m = [float(oracle.level_moments(l, grid=grid)[0].pow(2).mean().sqrt()) for l in levels]
    exact_v = [float(oracle.level_moments(l, grid=grid)[1].mean()) for l in levels]
    a_exact = -np.polyfit(levels, np.log2(exact_m), 1)[0]
    b_exact = -np.polyfit(levels, np.log2(exact_v), 1)[0]
    samp = _sampler(spec, seed=4, grid=grid)
    stats = [level_stats(l, samp(l, 3000), samp.cost(l)) for l in levels]
    a_fit = -np.polyfit(levels, np.log2([s.mean for s in stats]), 1)[0]
    b_fit = -np.polyfit(levels, np.log2([s.var for s in stats]), 1)[0]
    assert abs(a_fit - a_exact) < 0.15
    assert abs(b_fit - b_exact) < 0.15


def test_batched_calls_and_cost():
    spec = bimodal2d()
    samp = _sampler(spec, M=3, lmin=1)
    s = samp(3, 10)
    # Fine 27 evaluations + coarse 9, counted from the calls actually made.
    assert s.calls == 10 * (27 + 9) and samp.cost(3) == 36
    assert samp(1, 10).calls == 10 * 3 and samp.cost(1) == 3


def _adaptive(levels, eps, lmin, **kw):
    """The driver with Lmin fixed by the sampler, or chosen from a pilot first (``lmin="auto"``)."""
    return mlmc_auto(levels, eps, **kw) if lmin == "auto" else mlmc(levels.with_lmin(lmin), eps, **kw)


def _twenty_adaptive_runs(spec, grid, eps, lmin):
    exact = exact_posterior(spec).second_moment
    errs, bounds = [], []
    for seed in range(20):
        samp = _sampler(spec, seed=100 + seed, grid=grid)
        try:
            r = _adaptive(samp, eps, lmin, lmax=12, n0=100)
        except WeakConvergenceFailure as e:  # still an estimate; counted as is
            r = e.result
        errs.append(float((torch.tensor(r.estimate) - exact).pow(2).mean()))
        bounds.append(r.rmse_bound)
    return math.sqrt(np.mean(errs)), float(np.mean(bounds))


def test_an_undecidable_bias_test_at_lmax_ends():
    """Levels with E[Y_4] exactly on the bias budget keep the test inconclusive however many samples are
    drawn. At Lmax the driver tops up the finest levels only while a round costs less than n0 samples of
    the next level, so it stops (and says it did not converge) instead of sampling forever."""
    eps, n0, lmax = 0.1, 20, 4
    rounds = []

    def level_fn(level, n, batch_index, rank):
        rounds.append(level)
        if len(rounds) > 10_000:
            raise RuntimeError("runaway top-ups")
        g = torch.Generator().manual_seed(1000 * level + batch_index)
        z = torch.randn(n, 1, generator=g, dtype=torch.float64)
        if level == 0:
            return LevelSums.from_payoffs(1.0 + z, None, n)
        mu, sd = 0.5 * eps * 2.0 ** (lmax - level), 0.1 * 2.0 ** (-level / 2)
        return LevelSums.from_payoffs(mu + sd * z, torch.zeros_like(z), n)

    cost = lambda l: 2.0**l + (2.0 ** (l - 1) if l else 0)  # noqa: E731
    try:
        r = mlmc(UserLevels(level_fn, M=2, cost_fn=cost, pixels=1), eps, lmax=lmax, n0=n0, batch_size=10**6)
    except WeakConvergenceFailure as e:
        r = e.result
    top = {lv.level: lv.n_samples for lv in r.levels}
    assert len(r.levels) == lmax + 1
    # Each round at least doubles a level's count and costs at most n0 C_(L+1): the counts stay bounded.
    assert all(top[l] * cost(l) <= 4 * n0 * cost(lmax + 1) + 4 * 1000 for l in (2, 3, 4))


@pytest.mark.slow
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.kind)
def test_every_grid_keeps_the_rmse_guarantee_and_the_bound_covers(grid):
    """20 adaptive runs (automatic Lmin) on the Gaussian inpainting problem, for every grid family: the
    empirical RMSE against the exact second moment within the chi-square bound of eps over 20 runs, and of the
    mean reported rmse_bound (an upper bound on the true RMSE: the realized RMSE of 20 runs may exceed it by
    the same chi-square factor, no more)."""
    from tests.test_mlmc_truth import rmse_bound_factor

    eps = 0.1
    rmse, mean_bound = _twenty_adaptive_runs(gaussian_inpaint(), grid, eps, "auto")
    assert rmse <= rmse_bound_factor(20) * eps
    assert rmse <= rmse_bound_factor(20) * mean_bound


class _InterruptMidRound(Counting):
    """The exact score, counting calls and rows; Ctrl-C (KeyboardInterrupt) at the first call after the state
    file shows a driver round past the pilot (round 2 on) with some, not all, of its batches finished."""

    def __init__(self, spec, state):
        super().__init__(spec)
        self.state = state

    def forward(self, x, y, t):
        if self.state.exists():
            saved = json.loads(self.state.read_text())
            if saved["rounds"] >= 2 and 0 < len(saved["round_done"]) < len(saved["round"]):
                raise KeyboardInterrupt
        return super().forward(x, y, t)


def test_same_seed_bit_identical_and_resume_to_rounding(tmp_path):
    """The same command twice (same batches, same grouping, same threads): bit-identical. The same run with
    every batch alone in its network calls (row budget 7), or interrupted so mid-round and resumed with the
    default row budget (the round's unfinished batches and every later round grouped into other calls): the
    same sample counts, the resumed run evaluates exactly the rows the uninterrupted run did less those its
    state file holds, and the estimate agrees to float rounding (tests/rounding.py: on Intel CPUs MKL rounds
    the exact score's batched einsum differently by batch shape; the resumed estimate then differs by 2 ulps).

    Wrong resumes this catches (each tried once): re-drawing the batches the interrupted round had finished
    from new noise streams (the estimate moves by 7e-3, against a tolerance of 1e-12); dropping their sums (the
    driver then draws other sample counts); re-running them on their own streams (the right estimate, but
    the resumed run evaluates their rows again)."""
    spec = gaussian3d()
    y = torch.as_tensor(spec.y)[None]
    run = lambda model, **kw: mlmc(CoupledLevelSampler(model, y, spec.shape, seed=9, lmin=2), 0.05,  # noqa: E731
                                   n0=50, batch_size=40, **kw)
    a, b = run(ExactPosteriorEps(spec)), run(ExactPosteriorEps(spec))
    assert a.estimate == b.estimate and a.levels == b.levels
    tol = mlmc_relative_tolerance(a.levels, exact_score_ops(spec))

    alone = run(ExactPosteriorEps(spec), row_budget=7)  # < a batch's rows: one batch a call
    assert alone.sequential_calls > a.sequential_calls
    assert [lv.n_samples for lv in alone.levels] == [lv.n_samples for lv in a.levels]
    assert_agree_to_rounding(alone.estimate, a.estimate, tol, what="row budget 7 vs 4096")

    # Ctrl-C mid-round in the one-batch-a-call run: two rounds or more done, the next one partly finished.
    state = tmp_path / "state.json"
    with pytest.raises(KeyboardInterrupt):
        run(_InterruptMidRound(spec, state), row_budget=7, state_path=str(state))
    saved = json.loads(state.read_text())
    assert saved["rounds"] >= 2 and 0 < len(saved["round_done"]) < len(saved["round"])
    held = sum(v["calls"] for part in ("levels", "round_done", "plain") for v in saved[part].values())
    model = Counting(spec)
    c = run(model, state_path=str(state))
    assert [lv.n_samples for lv in c.levels] == [lv.n_samples for lv in a.levels]
    assert_agree_to_rounding(c.estimate, a.estimate, tol, what="resumed vs uninterrupted")
    assert model.rows == a.nfe_counted - held - saved["pilot_calls"] and c.nfe_counted == a.nfe_counted
    with pytest.raises(InputError, match="different arguments"):
        mlmc(CoupledLevelSampler(ExactPosteriorEps(spec), y, spec.shape, seed=9, lmin=2), 0.04, n0=50,
             batch_size=40, state_path=str(state))


def test_weak_convergence_failure_keeps_the_estimate():
    spec = gaussian3d()
    with pytest.raises(WeakConvergenceFailure) as info:
        mlmc(_sampler(spec, seed=1), 0.003, lmax=2, n0=20)
    assert info.value.result is not None and len(info.value.result.estimate) == 3


def test_mlmc_test_tables_consistency_and_kurtosis():
    spec = gaussian_inpaint()
    res = mlmc_test(_sampler(spec, seed=2, lmin=2), 6, 2000, eps_list=[0.05])
    assert all(r.check < 1 for r in res.rows)
    assert all(np.isfinite(r.kurtosis) and r.kurtosis > 0 for r in res.rows[1:])
    text = res.tables()
    assert "l  ave(Pf-Pc)  ave(Pf)  var(Pf-Pc)  var(Pf)  kurtosis  check  cost" in text
    assert "eps  value  mlmc_cost  std_cost  savings  N_l" in text
    assert res.complexity[0].mlmc_cost > 0
    assert res.warnings == []


def test_mlmc_test_warns_as_giles_does():
    """A level function whose coarse path is not the previous level's fine path (an off-by-0.5 coarse mean)
    fails the consistency check; a level difference that is mostly zero with rare large jumps has a huge
    kurtosis. mlmc_test says both, as Giles' code does."""

    def inconsistent(level, n, batch, rank):
        g = torch.Generator().manual_seed(1000 * level + batch)
        z = torch.randn(n, 1, generator=g, dtype=torch.float64)
        pf = 1.0 + 2.0**-level + z
        return LevelSums.from_payoffs(pf, None if level == 0 else pf - 2.0**-level + 0.5, n)

    res = mlmc_test(UserLevels(inconsistent, M=2), 3, 2000)
    assert any("consistency" in w for w in res.warnings) and "WARNING" in res.tables()

    def heavy_tailed(level, n, batch, rank):
        g = torch.Generator().manual_seed(1000 * level + batch)
        jump = (torch.rand(n, 1, generator=g, dtype=torch.float64) < 1e-3).double() * 10.0
        pf = torch.ones(n, 1, dtype=torch.float64) + (jump if level else 0.0)
        return LevelSums.from_payoffs(pf, None if level == 0 else torch.ones_like(pf), n)

    res = mlmc_test(UserLevels(heavy_tailed, M=2), 2, 20000)
    assert any("kurtosis" in w for w in res.warnings)


def test_payoffs():
    spec = bimodal2d()
    s = _sampler(spec, payoff="mean", seed=1)(0, 100)
    s2 = _sampler(spec, payoff=lambda x: x**2, seed=1)(0, 100)
    s3 = _sampler(spec, seed=1)(0, 100)
    assert torch.equal(s2.sums["y1"], s3.sums["y1"]) and not torch.equal(s.sums["y1"], s3.sums["y1"])
    with pytest.raises(InputError, match="payoff"):
        _sampler(spec, payoff=lambda x: x.sum(1))(0, 10)
    with pytest.raises(InputError, match="payoff"):
        _sampler(spec, payoff="median")


@pytest.mark.parametrize("kw, field", [({"M": 1}, "M"), ({"coupling": "x"}, "coupling"), ({"sampler": "euler"}, "sampler")])
def test_sampler_bad_arguments(kw, field):
    with pytest.raises(InputError, match=field):
        _sampler(bimodal2d(), **kw)


@pytest.mark.parametrize("kw, field", [({"eps": 0.0}, "eps"), ({"eps": -1.0}, "eps"), ({"lmax": 2}, "lmin"),
                                       ({"n0": 1}, "n0"), ({"theta": 1.0}, "theta")])
def test_driver_bad_arguments(kw, field):
    args = {"eps": 0.1, **kw}
    eps = args.pop("eps")
    with pytest.raises(InputError, match=field):
        mlmc(_sampler(bimodal2d(), lmin=3), eps, **args)
    with pytest.raises(InputError, match="level function"):
        mlmc(lambda level, n, b, r: None, 0.1)


SPEC = os.path.join(EXAMPLES, "bimodal2d.json")


def _cli(*args):
    exe = shutil.which("lightning-mlmc", path=os.path.dirname(sys.executable))
    return subprocess.run([exe, *args], capture_output=True, text=True)


def test_cli_mlmc_json_and_plots(tmp_path):
    out = tmp_path / "r.json"
    p = _cli("mlmc", "--problem", SPEC, "--eps", "0.05", "--lmin", "3", "--lmax", "12", "--seed", "1",
             "--out", str(out), "--plots", str(tmp_path / "plots"))
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    for k in ["estimate", "levels", "alpha", "beta", "gamma", "nfe", "nfe_mc", "savings", "eps", "rmse_bound", "wall_seconds"]:
        assert k in r
    assert all(set(["level", "n_samples", "mean", "var", "cost"]) <= set(lv) for lv in r["levels"])
    assert sorted(os.listdir(tmp_path / "plots")) == ["cost.png", "mean.png", "samples.png", "variance.png"]


def test_cli_mlmc_auto_lmin_and_grid(tmp_path):
    out = tmp_path / "r.json"
    p = _cli("mlmc", "--problem", SPEC, "--eps", "0.05", "--lmin", "auto", "--grid", "logsnr", "--lmax", "12",
             "--coupling", "weighted", "--out", str(out))
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["levels"][0]["level"] == r["lmin"] and r["nfe"] >= r["pilot_nfe"] >= 0
    p = _cli("mlmc-test", "--problem", SPEC, "--levels", "4", "--samples", "10", "--lmin", "auto",
             "--out", str(tmp_path / "t.json"))  # Lmin chosen from a pilot, then the table from it
    assert p.returncode == 0, p.stderr
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert rows[-1]["level"] == 4 and len(rows) <= 4


def test_cli_mlmc_jacobian_coupling(tmp_path):
    out = tmp_path / "r.json"
    p = _cli("mlmc", "--problem", SPEC, "--eps", "0.1", "--lmin", "auto", "--grid", "logsnr", "--coupling",
             "jacobian", "--data-std", "0.5", "--out", str(out))
    assert p.returncode == 0, p.stderr
    exact = exact_posterior(bimodal2d()).second_moment
    r = json.loads(out.read_text())
    assert float((torch.tensor(r["estimate"]) - exact).pow(2).mean().sqrt()) <= 5 * r["rmse_bound"]
    p = _cli("mlmc", "--problem", SPEC, "--eps", "0.1", "--coupling", "jacobian", "--data-std", "-1",
             "--out", str(tmp_path / "bad.json"))
    assert p.returncode == 2 and "data-std" in p.stderr and "Traceback" not in p.stderr


def test_cli_mlmc_test(tmp_path):
    out = tmp_path / "t.json"
    p = _cli("mlmc-test", "--problem", SPEC, "--levels", "5", "--samples", "500", "--lmin", "2",
             "--eps-list", "0.1", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "kurtosis" in p.stdout and "savings" in p.stdout
    assert len(json.loads(out.read_text())["rows"]) == 4


@pytest.mark.parametrize("args, needle", [
    (["--eps", "0"], "eps"), (["--eps", "-1"], "eps"), (["--eps", "0.1", "--M", "1"], "M"),
    (["--eps", "0.1", "--lmin", "5", "--lmax", "3"], "lmin"), (["--eps", "0.1", "--lmin", "soon"], "lmin"),
    (["--eps", "0.1", "--coupling", "best"], "coupling"), (["--eps", "0.1", "--grid", "log"], "grid"),
])
def test_cli_mlmc_bad_input(tmp_path, args, needle):
    out = tmp_path / "r.json"
    p = _cli("mlmc", "--problem", SPEC, *args, "--out", str(out))
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Issue 8: coupling default, automatic Lmin, every grid.

@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.kind)
@pytest.mark.parametrize("problem", [gaussian3d, gaussian_inpaint])
def test_naive_coupling_is_the_better_default(problem, grid):
    """The default coupling (naive) has the smaller exact V_l at the fine levels on every grid."""
    oracle = GaussianOracle(problem())
    for level in (6, 8):
        vw = float(oracle.level_moments(level, coupling="weighted", grid=grid)[1].mean())
        vn = float(oracle.level_moments(level, coupling="naive", grid=grid)[1].mean())
        assert vn < vw
    assert _sampler(problem()).coupling == "naive"


def test_jacobian_weights_reduce_to_the_seeds_and_to_the_exact_step_jacobian():
    """data_std 0 holds x0_hat fixed: the seed's weights. data_std 1 is the VP prior's own scale, where the
    exact score makes every step's Jacobian m_t / m_s: w_i is c_i times the later sub-steps' m_t / m_s."""
    fine = step_coefficients(TimeGrid("logsnr").times(16, 1.0, VPSchedule()), True, VPSchedule())
    for j in range(8):
        torch.testing.assert_close(coarse_noise_weights(fine, j, 2, "jacobian", 0.0),
                                   coarse_noise_weights(fine, j, 2, "weighted"))
        w = coarse_noise_weights(fine, j, 2, "jacobian", 1.0)
        k = 2 * j + 1  # the later sub-step
        expect = torch.stack([fine.noise[k - 1] * fine.mean_t[k] / torch.exp(VPSchedule().log_mean(fine.s[k])),
                              fine.noise[k]])
        torch.testing.assert_close(w, expect / expect.norm())
    with pytest.raises(InputError, match="coupling"):
        coarse_noise_weights(fine, 0, 2, "optimal")
    with pytest.raises(InputError, match="data_std"):
        _sampler(gaussian3d(), coupling="jacobian", data_std=float("nan"))


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.kind)
@pytest.mark.parametrize("problem", [gaussian3d, gaussian_inpaint])
def test_jacobian_coupling_beats_naive_on_the_oracle(problem, grid):
    """Weights carried by the step Jacobian for Gaussian data of std 0.5 correlate the coarse noise with
    what the fine path accumulated better than equal weights: exactly smaller V_l at every level (2-15%
    at levels 6-8, and 6x-100x at level 2 on the warped grids, where the coarse step is long)."""
    oracle = GaussianOracle(problem())
    for level in (2, 4, 6, 8):
        vn = float(oracle.level_moments(level, coupling="naive", grid=grid)[1].mean())
        vj = float(oracle.level_moments(level, coupling="jacobian", data_std=0.5, grid=grid)[1].mean())
        assert vj < vn


def _exact_lmin_costs(spec, grid, top):
    """sqrt(V[P_c] C_c) + sum_(l > c) sqrt(V_l C_l) from the exact oracle, for every candidate c < top."""
    oracle = GaussianOracle(spec)
    vf = {l: float(oracle.level_moments(l, grid=grid, coupling="naive", single=True)[1].mean())
          for l in range(top + 1)}
    vd = {l: float(oracle.level_moments(l, grid=grid, coupling="naive")[1].mean()) for l in range(1, top + 1)}
    return {c: math.sqrt(vf[c] * 2**c) + sum(math.sqrt(vd[l] * 3 * 2 ** (l - 1)) for l in range(c + 1, top + 1))
            for c in range(top) if vd[c + 1] < vf[c + 1]}


@pytest.mark.parametrize("grid", [TimeGrid(), TimeGrid("logsnr")], ids=lambda g: g.kind)
def test_auto_lmin_matches_the_exact_choice(grid):
    """The pilot's Lmin predicts a cost within 10% of the best candidate under the exact oracle."""
    from lightning_mlmc.mlmc import choose_lmin

    spec = gaussian_inpaint()
    samp = _sampler(spec, grid=grid, seed=5, lmin=4)
    choice = choose_lmin(samp, 2000, 10)
    assert samp.lmin == 4 and choice.lmin in choice.predicted  # the sampler is not changed
    exact = _exact_lmin_costs(spec, grid, choice.top)
    assert exact[choice.lmin] <= 1.1 * min(exact.values())


def test_auto_lmin_driver_counts_the_pilot_and_resumes(tmp_path):
    spec = gaussian_inpaint()
    calls = {"rows": 0}

    class Counting(ExactPosteriorEps):
        def forward(self, x, y, t):
            calls["rows"] += x.shape[0]
            return super().forward(x, y, t)

    samp = CoupledLevelSampler(Counting(spec), torch.as_tensor(spec.y)[None], spec.shape, grid=TimeGrid("logsnr"),
                               seed=2)
    r = mlmc_auto(samp, 0.05, lmax=12, n0=50)
    assert samp.lmin == 0 and r.levels[0].level == r.lmin  # the chosen Lmin is the result's, not the sampler's
    assert r.nfe_counted == calls["rows"]  # pilot levels at or below Lmin included
    assert r.nfe == pytest.approx(sum(lv.n_samples * lv.cost for lv in r.levels) + r.pilot_nfe)
    if r.lmin > 0:
        assert r.pilot_nfe > 0

    # Interrupted after the pilot and a few batches, resumed from --state: the same estimate.
    state = tmp_path / "state.json"
    inner = CoupledLevelSampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], spec.shape,
                                grid=TimeGrid("logsnr"), seed=2)
    ref = mlmc_auto(inner, 0.05, lmax=12, n0=50, batch_size=30)

    class Flaky(ExactPosteriorEps):  # Ctrl-C at the first network call after a batch of a driver round finished
        def forward(self, x, y, t):
            if state.exists():
                saved = json.loads(state.read_text())
                if saved["round"] and saved["round_done"]:
                    raise KeyboardInterrupt
            return super().forward(x, y, t)

    flaky = CoupledLevelSampler(Flaky(spec), torch.as_tensor(spec.y)[None], spec.shape, grid=TimeGrid("logsnr"),
                                seed=2)
    with pytest.raises(KeyboardInterrupt):
        mlmc_auto(flaky, 0.05, lmax=12, n0=50, batch_size=30, state_path=str(state))
    saved = json.loads(state.read_text())
    assert saved["round"] and saved["round_done"]  # the round under way and the batches it finished
    fresh = CoupledLevelSampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], spec.shape,
                                grid=TimeGrid("logsnr"), seed=2)
    again = mlmc_auto(fresh, 0.05, lmax=12, n0=50, batch_size=30, state_path=str(state))
    # The batches left run together in other calls than they would have: the same estimate to rounding.
    assert again.lmin == ref.lmin and again.nfe == ref.nfe
    assert [lv.n_samples for lv in again.levels] == [lv.n_samples for lv in ref.levels]
    assert_agree_to_rounding(again.estimate, ref.estimate, mlmc_relative_tolerance(ref.levels, exact_score_ops(spec)),
                             what="resumed vs uninterrupted (automatic Lmin)")


def test_driver_rejects_a_pilot_or_state_of_another_lmin(tmp_path):
    from lightning_mlmc.mlmc import choose_lmin

    spec = gaussian3d()
    samp = _sampler(spec, seed=1)
    pilot = choose_lmin(samp, 20, 6)
    with pytest.raises(InputError, match="pilot"):
        mlmc(samp.with_lmin(pilot.lmin + 1), 0.1, pilot=pilot)
    state = tmp_path / "s.json"
    mlmc(samp.with_lmin(1), 0.2, n0=20, state_path=str(state))
    with pytest.raises(InputError, match="lmin=1"):
        mlmc(samp.with_lmin(2), 0.2, n0=20, state_path=str(state))


def test_the_readmes_own_level_function_example_runs():
    """The README's pymlmc-style example (a plain function wrapped in UserLevels) runs as printed and lands
    within 3 eps of the exact Black-Scholes price (the driver targets RMSE eps; 3 eps is a 3-sigma band)."""
    import re

    from lightning_mlmc.mlmc.gbm import black_scholes_call

    readme = open(os.path.join(os.path.dirname(EXAMPLES), "README.md")).read()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "euler_call" in b)
    scope: dict = {}
    exec(compile(code.replace("print(", "(lambda *a: None)("), "README.md", "exec"), scope)  # noqa: S102
    exact = black_scholes_call(100.0, 100.0, 0.05, 0.2, 1.0)
    assert abs(exact - 10.4506) < 1e-4
    assert abs(scope["result"].estimate[0] - exact) <= 3 * 0.1
