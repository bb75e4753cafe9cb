"""Shared engine of benchmarks/mlmc_vs_mc.py and benchmarks/mlmc_grids.py.

A *target* is a score model, an observation and an exact (analytic) or reference (trained model) value of
E[f(X) | y]. ``run_mlmc`` runs the adaptive driver with a wall-clock timer around every network call;
``run_mc`` runs plain Monte Carlo on the finest grid MLMC chose (L), with N = V[P_L] / ((1 - theta) eps^2)
samples, the same matched-eps rule as the driver's ``nfe_mc``. Both report measured NFEs (network rows
actually evaluated) and the error against the truth, so savings are measured, not predicted.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from lightning_mlmc import ExactPosteriorEps, WeakConvergenceFailure, exact_posterior
from lightning_mlmc.mlmc import CoupledLevelSampler, MLMCConfig, make_payoff, run_mlmc as run_driver
from lightning_mlmc.sampling import NoiseSource, Streams, sample

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class TimedModel:
    """Wraps an eps-predictor: the wall time spent inside it, its calls and the rows of each call."""

    def __init__(self, model):
        self.model, self.seconds, self.rows, self.calls = model, 0.0, 0, []

    def __call__(self, x, y, t):
        tic = time.perf_counter()
        out = self.model(x, y, t)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)  # time the GPU's work, not only the kernel launches
        self.seconds += time.perf_counter() - tic
        self.rows += x.shape[0]
        self.calls.append(x.shape[0])
        return out


@dataclass
class Target:
    name: str
    model: object
    y: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    truth: torch.Tensor | None = None  # exact E[f(X)|y] (analytic) or a reference run (trained)
    truth_note: str = ""
    device: torch.device = torch.device("cpu")  # where the network runs (the model and y live there)


def make_scheme(grid: str = "logsnr", coupling: str = "naive", lmin="auto", M: int = 2, rho: float | None = None,
           sampler: str = "ddpm", data_std: float = 0.5) -> MLMCConfig:
    """An MLMC scheme of the benchmarks: the command line's configuration (automatic Lmin by default)."""
    return MLMCConfig(grid=grid, coupling=coupling, lmin=lmin, M=M, rho=rho, sampler=sampler, data_std=data_std)


def label(config: MLMCConfig) -> str:
    """grid/coupling/lmin/M/sampler, as in the result files and README tables."""
    grid = config.time_grid()
    g = f"{grid.kind}(rho={grid.rho:g})" if grid.kind in ("polynomial", "edm") else grid.kind
    c = f"jacobian({config.data_std:g})" if config.coupling == "jacobian" else config.coupling
    return f"{g}/{c}/lmin={config.lmin}/M={config.M}/{config.sampler}"


def analytic_target(spec, name: str) -> Target:
    return Target(name, ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], tuple(spec.shape), torch.float64,
                  torch.as_tensor(exact_posterior(spec).second_moment, dtype=torch.float64),
                  "exact posterior second moment")


def trained_target(checkpoint: str, observation: str, name: str, device="cpu") -> Target:
    from lightning_mlmc.cli.common import load_observation
    from lightning_mlmc.module import load_score_model

    device = torch.device(device)
    model = load_score_model(checkpoint).to(device)
    y = load_observation(observation, model.operator).to(device)
    return Target(name, model, y, tuple(model.operator.shape), torch.float32, device=device)


# The trained digits models of the benchmarks: `make demo` writes runs/digits_superres, and
# benchmarks/prepare_model.py runs/digits_inpaint (the exported model and observation_<i>.npz).
TRAINED_MODELS = {"superres": "digits super-resolution (trained UNet)", "inpaint": "digits inpainting (trained UNet)"}


def trained_model_paths(name: str) -> tuple[str, str]:
    """(exported model folder, observation 0) of a trained benchmark model."""
    run_dir = os.path.join(ROOT, "runs", f"digits_{name}")
    return os.path.join(run_dir, "export"), os.path.join(run_dir, "observation_0.npz")


def make_sampler(target: Target, config: MLMCConfig, seed: int, model=None) -> CoupledLevelSampler:
    return config.level_sampler(model or target.model, target.y, target.shape, dtype=target.dtype,
                                device=target.device, seed=seed)


def rmse_to_truth(estimate, truth) -> float:
    return float((torch.as_tensor(estimate, dtype=torch.float64) - truth).pow(2).mean().sqrt())


def run_mlmc(target: Target, scheme: MLMCConfig, eps: float, seed: int, *, n0: int | None = None,
             lmax: int | None = None, batch_size: int = 2000) -> dict:
    """One adaptive MLMC run of ``scheme`` (its n0 and lmax unless given), with a timer around the network."""
    timed = TimedModel(target.model)
    config = replace(scheme, n0=n0 or scheme.n0, lmax=lmax or scheme.lmax, batch_size=batch_size, seed=seed)
    s = make_sampler(target, config, seed, timed)
    tic = time.perf_counter()
    try:
        r, converged = run_driver(config, s, eps), True
    except WeakConvergenceFailure as e:
        r, converged = e.result, False
    wall = time.perf_counter() - tic
    out = {"scheme": label(scheme), "eps": eps, "seed": seed, "converged": converged, "method": r.method,
           "lmin": r.lmin, "L": r.levels[-1].level, "N_l": [lv.n_samples for lv in r.levels],
           "V_l": [lv.var for lv in r.levels], "mean_l": [lv.mean for lv in r.levels],
           "mean_debiased": [lv.mean_debiased for lv in r.levels], "var_fine": [lv.var_fine for lv in r.levels],
           "alpha": r.alpha, "beta": r.beta, "gamma": r.gamma, "nfe": r.nfe, "nfe_counted": r.nfe_counted,
           "network_rows": timed.rows, "pilot_nfe": r.pilot_nfe, "rounds": r.rounds, "nfe_mc": r.nfe_mc,
           "mc_steps": r.mc_steps, "mc_samples": r.mc_samples, "savings": r.savings,
           "nfe_mc_same_grid": r.nfe_mc_same_grid, "savings_same_grid": r.savings_same_grid,
           "rmse_bound": r.rmse_bound, "wall_seconds": wall, "network_seconds": timed.seconds,
           "network_fraction": timed.seconds / wall, "estimate": r.estimate}
    if target.truth is not None:
        out["error"] = rmse_to_truth(r.estimate, target.truth)
    return out


def driver_result(levels, eps: float, run=None, **kw):
    """The adaptive driver's result (``run``: ``mlmc`` by default), a weak-convergence failure's included."""
    from lightning_mlmc.mlmc import mlmc

    try:
        return (run or mlmc)(levels, eps, **kw)
    except WeakConvergenceFailure as e:
        return e.result


def run_mc(target: Target, scheme: MLMCConfig, steps: int, n: int, seed: int, *, batch_size: int = 2000,
           antithetic: bool = False) -> dict:
    """Plain MC with ``n`` samples of the ``steps``-step sampler on the scheme's grid (the alternative an MLMC
    result names: ``mc_steps`` x ``mc_samples``), its network rows counted; ``antithetic``: n pairs of paths."""
    payoff = make_payoff("second_moment")
    timed = TimedModel(target.model)
    total = torch.zeros(int(np.prod(target.shape)), dtype=torch.float64)
    paths = 2 if antithetic else 1
    tic, done, b = time.perf_counter(), 0, 0
    while done < n:
        nb = min(batch_size, n - done)
        noise = NoiseSource(seed, (paths * nb, *target.shape), stream=(Streams.PLAIN_MC + b,), dtype=target.dtype,
                            device=target.device, antithetic=antithetic)
        x = sample(timed, target.y, noise, steps=steps, sampler=scheme.sampler, grid=scheme.time_grid()).samples
        total += payoff(x.reshape(paths * nb, -1)).double().sum(0).cpu() / paths
        done, b = done + nb, b + 1
    est = total / n
    out = {"scheme": label(scheme), "seed": seed, "steps": steps, "n_samples": n, "antithetic": antithetic,
           "nfe": timed.rows, "wall_seconds": time.perf_counter() - tic, "estimate": est.tolist()}
    if target.truth is not None:
        out["error"] = rmse_to_truth(est, target.truth)
    return out


REFERENCE_STEPS = 1024


def plain_reference(target, pairs: int, batch: int = 50) -> dict:
    """Plain antithetic MC of the target's model at ``REFERENCE_STEPS`` steps: the estimate and its RMS standard error
    (from the spread of the batch means), independent of the MLMC code."""
    means, tic = [], time.perf_counter()
    for b in range(math.ceil(pairs / batch)):
        r = run_mc(target, MLMCConfig(), REFERENCE_STEPS, batch, 5000 + b, antithetic=True)
        means.append(np.array(r["estimate"]))
        log(f"  reference batch {b + 1}: {r['nfe']} NFEs")
    m = np.stack(means)
    return {"steps": REFERENCE_STEPS, "pairs": len(means) * batch, "estimate": m.mean(0).tolist(),
            "se_rms": float(np.sqrt((m.var(0, ddof=1) / len(m)).mean())), "seconds": time.perf_counter() - tic}


def summarise(runs: list[dict], key: str = "error") -> dict:
    """Mean NFE, measured RMSE over the runs (sqrt of the mean squared error) and its spread."""
    errs = [r[key] for r in runs if key in r]
    out = {"runs": len(runs), "nfe_mean": float(np.mean([r["nfe"] for r in runs]))}
    if errs:
        out["rmse_measured"] = float(math.sqrt(np.mean(np.square(errs))))
    return out


def slim(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "estimate"}


def log(*args):
    print(*args, flush=True)


def write_result(path: str, data: dict) -> None:
    """Write a benchmark result (JSON) and say so; rewritten whole each time, so partial runs stay readable."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    log(f"wrote {path}")
