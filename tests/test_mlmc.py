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
from problems import EXAMPLES, bimodal2d, gaussian3d, gaussian_inpaint

from lightning_mlmc import ExactPosteriorEps, InputError, TimeGrid, WeakConvergenceFailure, exact_posterior
from lightning_mlmc.gaussian_oracle import GaussianOracle
from lightning_mlmc.mlmc import CoupledLevelSampler, level_stats, mlmc, mlmc_test

N = 6000


def _sampler(spec, **kw):
    return CoupledLevelSampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], spec.shape, **kw)


def _se_of_var(var_hat, kurt, n):
    """Standard error of a sample variance: var sqrt((kurtosis - 1) / n)."""
    return var_hat * math.sqrt(max(kurt - 1.0, 2.0) / n)


@pytest.mark.parametrize("coupling", ["weighted", "naive"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_levels_match_exact_oracle(coupling, sampler):
    """Per-pixel E[P_l - P_(l-1)] and V_l agree with the exact joint-chain oracle within 5 SE."""
    spec = gaussian3d()
    oracle = GaussianOracle(spec)
    samp = _sampler(spec, coupling=coupling, sampler=sampler, seed=3)
    for level in (1, 3, 5):
        s = samp(level, N)
        mean, var, _ = oracle.level_moments(level, coupling=coupling, sampler=sampler)
        y1 = s.sums["y1"] / N
        var_hat = s.sums["y2"] / N - y1**2
        assert torch.all((y1 - mean).abs() <= 5 * (var / N).sqrt() + 1e-12)
        kurt = level_stats(level, s, 1.0).kurtosis
        for i in range(3):
            assert abs(float(var_hat[i] - var[i])) <= 5 * _se_of_var(float(var[i]), kurt, N) + 1e-12


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


@pytest.fixture(scope="module")
def twenty_runs():
    """20 independent adaptive runs at eps = 0.05 on the bimodal problem (uniform grid, Lmin = 3)."""
    spec = bimodal2d()
    exact = exact_posterior(spec).second_moment
    eps = 0.05
    errs, bounds = [], []
    for seed in range(20):
        try:
            r = mlmc(_sampler(spec, seed=100 + seed, lmin=3), eps, lmin=3, lmax=12, n0=100)
        except WeakConvergenceFailure as e:  # still an estimate; counted as is
            r = e.result
        errs.append(float((torch.tensor(r.estimate) - exact).pow(2).mean()))
        bounds.append(r.rmse_bound)
    return eps, math.sqrt(np.mean(errs)), float(np.mean(bounds))


def test_adaptive_rmse_over_20_runs(twenty_runs):
    """Empirical RMSE against the exact posterior second moment <= 1.2 eps."""
    eps, rmse, _ = twenty_runs
    assert rmse <= 1.2 * eps


@pytest.mark.xfail(strict=True, reason="known: on the uniform grid the bias estimate from noisy fine levels "
                   "under-covers (measured RMSE 0.060 vs mean rmse_bound below it); issue 8 (grids, Lmin)")
def test_rmse_bound_covers_empirical_rmse(twenty_runs):
    _, rmse, mean_bound = twenty_runs
    assert rmse <= mean_bound


def test_same_seed_bit_identical_and_resume(tmp_path):
    spec = gaussian3d()
    a = mlmc(_sampler(spec, seed=9, lmin=2), 0.05, lmin=2, n0=50, batch_size=40)
    b = mlmc(_sampler(spec, seed=9, lmin=2), 0.05, lmin=2, n0=50, batch_size=40)
    assert a.estimate == b.estimate and a.levels == b.levels

    # Interrupt after a few batches, then resume from the state file: the same estimate.
    state = tmp_path / "state.json"
    calls = {"n": 0}
    inner = _sampler(spec, seed=9, lmin=2)

    def flaky(l, n, b, r):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return inner(l, n, b, r)

    flaky.pixels = inner.pixels
    with pytest.raises(KeyboardInterrupt):
        mlmc(flaky, 0.05, lmin=2, n0=50, batch_size=40, state_path=str(state))
    saved = json.loads(state.read_text())
    assert sum(v["n"] for v in saved["levels"].values()) > 0
    c = mlmc(inner, 0.05, lmin=2, n0=50, batch_size=40, state_path=str(state))
    assert c.estimate == a.estimate
    with pytest.raises(InputError, match="different arguments"):
        mlmc(inner, 0.04, lmin=2, n0=50, batch_size=40, state_path=str(state))


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
    assert res.complexity[0]["mlmc_cost"] > 0


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


@pytest.mark.parametrize("kw, field", [({"eps": 0.0}, "eps"), ({"eps": -1.0}, "eps"), ({"lmin": 3, "lmax": 2}, "lmin"),
                                       ({"M": 1}, "M")])
def test_driver_bad_arguments(kw, field):
    args = {"eps": 0.1, **kw}
    eps = args.pop("eps")
    with pytest.raises(InputError, match=field):
        mlmc(_sampler(bimodal2d()), eps, **args)


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


def test_cli_mlmc_test(tmp_path):
    out = tmp_path / "t.json"
    p = _cli("mlmc-test", "--problem", SPEC, "--levels", "5", "--samples", "500", "--lmin", "2",
             "--eps-list", "0.1", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "kurtosis" in p.stdout and "savings" in p.stdout
    assert len(json.loads(out.read_text())["rows"]) == 4


@pytest.mark.parametrize("args, needle", [
    (["--eps", "0"], "eps"), (["--eps", "-1"], "eps"), (["--eps", "0.1", "--M", "1"], "M"),
    (["--eps", "0.1", "--lmin", "5", "--lmax", "3"], "lmin"),
])
def test_cli_mlmc_bad_input(tmp_path, args, needle):
    out = tmp_path / "r.json"
    p = _cli("mlmc", "--problem", SPEC, *args, "--out", str(out))
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


def _dist_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec = bimodal2d()
    try:
        r = mlmc(_sampler(spec, seed=5, lmin=3), 0.05, lmin=3, lmax=12, n0=100)
    except WeakConvergenceFailure as e:
        r = e.result
    if rank == 0:
        with open(out, "w") as f:
            json.dump(r.to_json(), f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_consistent_with_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist.json"
    mp.spawn(_dist_worker, args=(2, port, str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    try:
        one = mlmc(_sampler(bimodal2d(), seed=5, lmin=3), 0.05, lmin=3, lmax=12, n0=100)
    except WeakConvergenceFailure as e:
        one = e.result
    diff = np.sqrt(np.mean((np.array(two["estimate"]) - np.array(one.estimate)) ** 2))
    assert diff <= 5 * math.hypot(two["rmse_bound"], one.rmse_bound)
    assert two["estimate"] != one.estimate  # different seed streams per rank
