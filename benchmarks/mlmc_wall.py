"""Wall-clock MLMC against plain MC, side by side in one process, on the trained digits super-resolution model.

    .venv/bin/python -m benchmarks.mlmc_wall [--device cuda] [--eps 0.02 0.01]
    .venv/bin/python -m benchmarks.mlmc_wall --eps 0.1 --repeats 1 --out /tmp/w.json   # a quick check

At each eps, one MLMC run per execution and one plain MC, each timed with the network synchronised:
  mlmc per-level   every network call takes one batch of one level (the execution before the batched engine)
  mlmc batched     every batch of every level of a round advances together (row budget 4096)
  mlmc picard      as batched, each batch's fine and coarse paths solved by sliding-window Picard iteration
                   (lightning_mlmc.mlmc.picard_levels: window --window, tolerance --picard-tol, row budget
                   --picard-row-budget; a batch's window shrinks until its rows fit the budget)
  mc batched       the plain MC the MLMC result names (mc_steps x mc_samples), on the same engine and budget
  mc picard        the same plain MC with the Picard sampler (one batch, window --window, tol --tol)
with NFEs (``nfe``: the cost formula, what the driver plans with; ``network_rows``: the rows the network really
evaluated, more than nfe for the Picard runs), sequential network calls, rows per call and wall time; then the
cost of one network call at 1..4096 rows on this machine (median of repeats after a warm-up), and the wall time
that cost model predicts for each run from its calls' row counts. Writes benchmarks/results/mlmc_wall[_cuda].json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace

import numpy as np
import torch

from benchmarks.machine import machine_info
from benchmarks.mlmc_bench import ROOT, TimedModel, log, rmse_to_truth, trained_model_paths, trained_target, write_result
from lightning_mlmc import WeakConvergenceFailure
from lightning_mlmc.mlmc import MLMCConfig, engine, make_payoff, run_mlmc
from lightning_mlmc.mlmc.picard_levels import PICARD_TOL
from lightning_mlmc.picard import picard_sample
from lightning_mlmc.sampling import NoiseSource, Streams

ROW_SIZES = [2**k for k in range(13)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_costs(target, repeats: int) -> dict[int, float]:
    """Median seconds of one network call at each row count (random inputs, a mid-range time)."""
    costs = {}
    for rows in ROW_SIZES:
        x = torch.randn(rows, *target.shape, dtype=target.dtype, device=target.device)
        t = torch.full((rows,), 0.3, dtype=torch.float64, device=target.device)
        y = target.y.expand(rows, *target.y.shape[1:])
        with torch.no_grad():
            target.model(x, y, t)  # warm-up
            times = []
            for _ in range(repeats):
                sync(target.device)
                tic = time.perf_counter()
                target.model(x, y, t)
                sync(target.device)
                times.append(time.perf_counter() - tic)
        costs[rows] = float(np.median(times))
        log(f"call of {rows} rows: {1e3 * costs[rows]:.2f} ms ({1e6 * costs[rows] / rows:.1f} us a row)")
    return costs


def predicted_wall(costs: dict[int, float], calls: list[int]) -> float:
    """The cost model: each call's measured time at its row count, interpolated linearly in rows."""
    sizes = np.array(sorted(costs))
    values = np.array([costs[s] for s in sizes])
    return float(np.interp(calls, sizes, values).sum()) if calls else 0.0


def mlmc_run(target, config: MLMCConfig, eps: float, name: str) -> dict:
    timed = TimedModel(target.model)
    levels = config.level_sampler(timed, target.y, target.shape, dtype=target.dtype, device=target.device)
    sync(target.device)
    tic = time.perf_counter()
    try:
        r = run_mlmc(config, levels, eps)
    except WeakConvergenceFailure as e:
        r = e.result
    sync(target.device)
    return {"variant": name, "eps": eps, "nfe": r.nfe, "network_rows": timed.rows, "sequential_calls": len(timed.calls),
            "rows_per_call": timed.rows / max(len(timed.calls), 1), "wall_seconds": time.perf_counter() - tic,
            "rounds": r.rounds, "L": r.levels[-1].level, "lmin": r.lmin, "method": r.method, "mc_steps": r.mc_steps,
            "mc_samples": r.mc_samples, "nfe_mc": r.nfe_mc, "mc_sequential_calls": r.mc_sequential_calls,
            "row_budget": config.row_budget, "picard_window": config.picard_window,
            "picard_tol": config.picard_tol if config.picard_window else None,
            "error": rmse_to_truth(r.estimate, target.truth), "calls": timed.calls}


def mc_batched(target, config: MLMCConfig, steps: int, n: int, eps: float) -> dict:
    """The plain MC on the engine: batches of plain paths (streams PLAIN_MC + b), all advancing together."""
    timed = TimedModel(target.model)
    levels = config.level_sampler(timed, target.y, target.shape, dtype=target.dtype, device=target.device, seed=1000)
    level = round(math.log(steps, config.M))
    steppers, left, b = [], n, 0
    while left > 0:
        steppers.append(levels.steppers(level, min(config.batch_size, left), Streams.PLAIN_MC + b, 0, plain=True))
        left, b = left - config.batch_size, b + 1
    sync(target.device)
    tic = time.perf_counter()
    engine.run(steppers, levels.model, levels.y, config.row_budget)
    sync(target.device)
    wall = time.perf_counter() - tic
    total = sum(s.sums().sums["f1"] for s in steppers)
    return {"variant": "mc batched", "eps": eps, "steps": steps, "n_samples": n, "nfe": timed.rows,
            "network_rows": timed.rows, "sequential_calls": len(timed.calls), "rows_per_call": timed.rows / len(timed.calls),
            "wall_seconds": wall, "error": rmse_to_truth(total / n, target.truth), "calls": timed.calls}


def mc_picard(target, config: MLMCConfig, steps: int, n: int, eps: float, window: int, tol: float) -> dict:
    timed = TimedModel(target.model)
    noise = NoiseSource(1000, (n, *target.shape), dtype=target.dtype, device=target.device)
    sync(target.device)
    tic = time.perf_counter()
    out = picard_sample(timed, target.y, noise, steps=steps, sampler=config.sampler, window=window, tol=tol,
                        grid=config.time_grid())
    sync(target.device)
    wall = time.perf_counter() - tic
    est = make_payoff("second_moment")(out.samples.reshape(n, -1)).double().mean(0).cpu()
    return {"variant": "mc picard", "eps": eps, "steps": steps, "n_samples": n, "nfe": timed.rows,
            "network_rows": timed.rows, "sequential_calls": len(timed.calls), "rows_per_call": timed.rows / len(timed.calls),
            "wall_seconds": wall, "window": window, "tol": tol, "error": rmse_to_truth(est, target.truth),
            "calls": timed.calls}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.02, 0.01])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=64, help="Picard window (plain MC and Picard levels)")
    ap.add_argument("--tol", type=float, default=0.1, help="tolerance of the plain-MC Picard sampler")
    ap.add_argument("--picard-tol", type=float, default=PICARD_TOL, help="tolerance of the Picard levels")
    ap.add_argument("--picard-row-budget", type=int, default=None,
                    help="row budget of the Picard levels (default: the batched runs' 4096)")
    ap.add_argument("--repeats", type=int, default=5, help="timings per row count of the cost model")
    ap.add_argument("--reference", default=os.path.join(ROOT, "benchmarks", "results", "mlmc_vs_mc.json"))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible")
    torch.set_num_threads(os.cpu_count() or 1)
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results",
                                        "mlmc_wall.json" if device.type == "cpu" else f"mlmc_wall_{device.type}.json")
    target = trained_target(*trained_model_paths("superres"), "digits super-resolution (trained UNet)", device=device)
    with open(args.reference) as f:
        target.truth = torch.as_tensor(json.load(f)["digits_reference"]["estimate"], dtype=torch.float64)
    base = MLMCConfig(seed=args.seed, batch_size=1000)
    mlmc_run(target, base, 0.1, "warm-up")  # untimed: kernels, allocator, autotuning
    costs = call_costs(target, args.repeats)
    result = {"machine": machine_info(), "device": str(device), "model": target.name, "row_budget": base.row_budget,
              "call_seconds": {str(k): v for k, v in costs.items()}, "rows": []}
    variants = {"mlmc per-level": replace(base, row_budget=1), "mlmc batched": base}
    variants["mlmc picard"] = replace(base, picard_window=args.window, picard_tol=args.picard_tol,
                                      row_budget=args.picard_row_budget or base.row_budget)
    for eps in args.eps:
        runs = [mlmc_run(target, config, eps, name) for name, config in variants.items()]
        steps, n = runs[1]["mc_steps"], runs[1]["mc_samples"]
        runs.append(mc_batched(target, base, steps, n, eps))
        runs.append(mc_picard(target, base, steps, n, eps, args.window, args.tol))
        for r in runs:
            r["predicted_wall_seconds"] = predicted_wall(costs, r.pop("calls"))
            log(json.dumps(r))
        mc = runs[-2]
        for r in runs:
            r["savings_nfe"] = mc["nfe"] / r["nfe"]
            r["savings_rows"] = mc["network_rows"] / r["network_rows"]
            r["calls_over_mc_steps"] = r["sequential_calls"] / steps  # the bar for Picard levels: <= 1/4
            r["savings_wall"] = mc["wall_seconds"] / r["wall_seconds"]
            r["savings_predicted_wall"] = mc["predicted_wall_seconds"] / r["predicted_wall_seconds"]
        result["rows"] += runs
        write_result(out_path, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
