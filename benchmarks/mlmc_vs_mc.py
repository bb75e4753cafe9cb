"""MLMC against plain Monte Carlo at matched eps: measured NFEs, measured RMSE, rates, savings, network time.

For each problem and eps: ``--repeats`` adaptive MLMC runs (different seeds) and as many plain-MC runs on
the finest grid MLMC chose, with N = V[P_L] / ((1 - theta) eps^2). The RMSE is measured against the exact
posterior second moment (analytic inpainting, examples/inpaint4x4.json) or against a long reference MLMC
run at ``--reference-eps`` (trained digits super-resolution model; the reference's own rmse_bound is
recorded). Also the fraction of MLMC wall time spent inside the network (timer around every call).

    .venv/bin/python -m benchmarks.mlmc_vs_mc                      # both problems, writes results/mlmc_vs_mc.json
    .venv/bin/python -m benchmarks.mlmc_vs_mc --problems analytic  # seconds; no trained model needed

The digits rows need a trained model: ``make demo`` writes runs/digits_superres/export and observation_0.npz.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from benchmarks.machine import machine_info
from benchmarks.mlmc_bench import (ROOT, analytic_target, label, log, make_scheme, run_mc, run_mlmc, slim,
                                   summarise, trained_target, write_result)

from lightning_mlmc.mlmc import MLMCConfig
from lightning_mlmc.problems import AnalyticSpec


def compare(target, scheme: MLMCConfig, eps_list, repeats: int, n0: int) -> list[dict]:
    rows = []
    for eps in eps_list:
        ml = [run_mlmc(target, scheme, eps, seed, n0=n0) for seed in range(repeats)]
        # Paired: each MC run uses the finest grid and V[P_L] of the MLMC run with the same index.
        mc = [run_mc(target, scheme, eps, r["L"], r["var_fine"][-1], 1000 + i) for i, r in enumerate(ml)]
        sm, sc = summarise(ml), summarise(mc)
        row = {
            "problem": target.name, "scheme": label(scheme), "eps": eps, "repeats": repeats, "L": [r["L"] for r in ml],
            "lmin": [r["lmin"] for r in ml], "mlmc_nfe": sm["nfe_mean"], "mc_nfe": sc["nfe_mean"],
            "savings_measured": sc["nfe_mean"] / sm["nfe_mean"],
            "savings_predicted": float(np.mean([r["savings_predicted"] for r in ml])),
            "mlmc_rmse": sm.get("rmse_measured"), "mc_rmse": sc.get("rmse_measured"),
            "rmse_bound_mean": float(np.mean([r["rmse_bound"] for r in ml])),
            "alpha": float(np.mean([r["alpha"] for r in ml])), "beta": float(np.mean([r["beta"] for r in ml])),
            "network_fraction": float(np.mean([r["network_fraction"] for r in ml])),
            "mlmc_wall_seconds": float(np.mean([r["wall_seconds"] for r in ml])),
            "mc_wall_seconds": float(np.mean([r["wall_seconds"] for r in mc])),
            "converged": all(r["converged"] for r in ml),
            "mlmc_runs": [slim(r) for r in ml], "mc_runs": [slim(r) for r in mc],
        }
        log(json.dumps({k: v for k, v in row.items() if not k.endswith("_runs")}))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="analytic,digits")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.02, 0.01])
    ap.add_argument("--analytic-eps", type=float, nargs="+", default=[0.2, 0.1, 0.05])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--analytic-repeats", type=int, default=4)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--grid", default="logsnr")
    ap.add_argument("--coupling", default="naive")
    ap.add_argument("--lmin", default="auto")
    ap.add_argument("--M", type=int, default=2)
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "runs", "digits_superres", "export"))
    ap.add_argument("--observation", default=os.path.join(ROOT, "runs", "digits_superres", "observation_0.npz"))
    ap.add_argument("--reference-eps", type=float, default=0.003)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mlmc_vs_mc.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    scheme = make_scheme(grid=args.grid, coupling=args.coupling, lmin=args.lmin if args.lmin == "auto" else int(args.lmin),
                    M=args.M)
    out = {"machine": machine_info(), "scheme": label(scheme), "theta": 0.25, "rows": []}
    problems = args.problems.split(",")
    if "analytic" in problems:
        spec = AnalyticSpec.load(os.path.join(ROOT, "examples", "inpaint4x4.json"))
        target = analytic_target(spec, "analytic inpaint4x4")
        out["rows"] += compare(target, scheme, args.analytic_eps, args.analytic_repeats, args.n0)
    if "digits" in problems:
        target = trained_target(args.checkpoint, args.observation, "digits super-resolution (trained UNet)")
        ref = run_mlmc(target, scheme, args.reference_eps, seed=10_000, n0=args.n0)
        target.truth = torch.as_tensor(ref["estimate"], dtype=torch.float64)
        target.truth_note = f"MLMC reference at eps {args.reference_eps}"
        out["digits_reference"] = ref  # with its estimate: mlmc_grids.py measures against it
        log("reference:", json.dumps({k: ref[k] for k in ("L", "lmin", "nfe", "rmse_bound", "wall_seconds")}))
        out["rows"] += compare(target, scheme, args.eps, args.repeats, args.n0)
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
