"""The MLMC driver on cases nobody tuned it to, measured: heavy tails on a trained model, a discontinuous
payoff, and a level function with rare outliers.

- ``ddim``: the demo's super-resolution model (`make demo`'s export, observation 0) with the deterministic
  sampler, whose 4-step paths have rare outliers: `lightning-mlmc mlmc --checkpoint runs/digits_superres/export
  --observation runs/digits_superres/observation_0.npz --eps 0.01 --sampler ddim --seed S` for S = 1..6 (the
  same runs, batch size 1000), each with its cost, Lmin, method, the plain MC it names, and its error against
  a long reference run of the same sampler (MLMC at eps 0.003, seed 100); with antithetic pairs (the default,
  ``ddim``) and without (``ddim_single``, ``--no-antithetic``).
- ``digital``: Giles' digital call under GBM (``GBMDigital``), 20 seeds at eps 0.02 and 0.01, M = 4 and 2:
  RMSE against the exact price and the largest cost over the median.
- ``outliers``: ``tests.robust_cases.RareOutliers`` (outliers one sample in 1000 or 200), 10 seeds at eps 0.02
  with automatic Lmin: cost over the exact cheapest plain MC, RMSE.

    .venv/bin/python -m benchmarks.mlmc_robust [--parts ddim digital outliers]

Writes benchmarks/results/mlmc_robust.json.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch

from benchmarks.machine import machine_info
from benchmarks.mlmc_bench import (ROOT, driver_result, log, rmse_to_truth, run_mlmc, slim, trained_model_paths,
                                   trained_target, write_result)
from lightning_mlmc.mlmc import MLMCConfig, mlmc_auto
from lightning_mlmc.mlmc.gbm import GBMDigital
from tests.robust_cases import RareOutliers
from tests.test_mlmc_robust import _cheapest_plain_mc

OUT = os.path.join(ROOT, "benchmarks", "results", "mlmc_robust.json")


def ddim_rows(seeds=range(1, 7), eps=0.01, ref_eps=0.003, antithetic: bool = True) -> dict:
    target = trained_target(*trained_model_paths("superres"), "digits super-resolution (DDIM)")
    config = MLMCConfig(sampler="ddim", antithetic=antithetic)
    log(f"reference: DDIM MLMC at eps {ref_eps}")
    ref = run_mlmc(target, config, ref_eps, 100, batch_size=1000)
    log(f"  {ref['nfe']:.0f} NFEs, L {ref['L']}, rmse_bound {ref['rmse_bound']:.4f}")
    truth = torch.as_tensor(ref["estimate"], dtype=torch.float64)
    runs = []
    for seed in seeds:
        r = run_mlmc(target, config, eps, seed, batch_size=1000)
        r["error"] = rmse_to_truth(r["estimate"], truth)
        r["cost_over_named_mc"] = r["nfe"] / r["nfe_mc"]
        runs.append(slim(r))
        log(f"  seed {seed}: lmin {r['lmin']}, {r['method']}, {r['nfe']:.0f} NFEs, plain MC named {r['nfe_mc']:.0f} "
            f"({r['mc_steps']} x {r['mc_samples']}): {r['cost_over_named_mc']:.2f}x, error {r['error']:.4f}")
    return {"eps": eps, "reference": {k: ref[k] for k in ("eps", "nfe", "L", "lmin", "rmse_bound", "wall_seconds")},
            "runs": runs, "max_cost_over_named_mc": max(r["cost_over_named_mc"] for r in runs),
            "max_error": max(r["error"] for r in runs)}


def digital_rows(seeds=range(20)) -> list[dict]:
    rows = []
    for M in (4, 2):
        for eps in (0.02, 0.01):
            costs, errors, methods = [], [], []
            for seed in seeds:
                g = GBMDigital(seed=seed, M=M)
                r = driver_result(g, eps, lmax=10)
                costs.append(r.nfe)
                errors.append(r.estimate[0] - g.exact)
                methods.append(r.method)
            row = {"M": M, "eps": eps, "runs": len(costs), "median_cost": float(np.median(costs)),
                   "max_over_median": float(max(costs) / np.median(costs)),
                   "rmse_over_eps": float(math.sqrt(np.mean(np.square(errors))) / eps), "finished_as_mc": methods.count("mc")}
            rows.append(row)
            log(f"  digital M {M} eps {eps}: {row}")
    return rows


def outlier_rows(seeds=range(10), eps=0.02) -> list[dict]:
    rows = []
    for q, A in ((0.001, 200.0), (0.005, 200.0)):
        ratios, errors, methods = [], [], []
        for seed in seeds:
            p = RareOutliers(seed=seed, q=q, A=A)
            r = driver_result(p, eps, mlmc_auto, lmax=12)
            ratios.append(r.nfe / _cheapest_plain_mc(p, eps))
            errors.append(r.estimate[0] - p.exact)
            methods.append(r.method)
        row = {"q": q, "A": A, "eps": eps, "cost_over_cheapest_mc": [round(x, 3) for x in ratios],
               "max_cost_over_cheapest_mc": max(ratios), "rmse_over_eps": float(math.sqrt(np.mean(np.square(errors))) / eps),
               "finished_as_mc": methods.count("mc"), "cheapest_mc": _cheapest_plain_mc(RareOutliers(q=q, A=A), eps)}
        rows.append(row)
        log(f"  outliers q {q} A {A}: {row}")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="*", default=["ddim", "digital", "outliers"])
    args = p.parse_args(argv)
    out = {"machine": machine_info()}
    if os.path.exists(OUT):
        import json

        with open(OUT) as f:
            out = {**json.load(f), "machine": machine_info()}
    if "digital" in args.parts:
        out["digital"] = digital_rows()
    if "outliers" in args.parts:
        out["outliers"] = outlier_rows()
    if "ddim" in args.parts:  # with antithetic pairs (the default) and without (the command before them)
        out["ddim"] = ddim_rows()
        write_result(OUT, out)
        out["ddim_single"] = ddim_rows(antithetic=False)
    write_result(OUT, out)


if __name__ == "__main__":
    main()
