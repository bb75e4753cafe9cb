"""MLMC against the cheapest plain Monte Carlo, side by side in one run, measured.

For each problem, scheme and eps: ``--repeats`` adaptive MLMC runs (different seeds) and, for each, the plain
MC estimator its result names (``mc_steps`` x ``mc_samples``: the fewest NFEs of a plain MC that meets eps by
the run's own estimates) run for real, so both NFE columns are counted network rows and both errors are
measured: against the exact posterior second moment (analytic inpaint4x4), the Black-Scholes price (Giles'
GBM call) or a long reference MLMC run (the trained digits super-resolution model). Giles' same-grid figure
(plain MC on the run's finest grid, V[P_L] C_L / ((1 - theta) eps^2)) is reported beside it.

    .venv/bin/python -m benchmarks.mlmc_vs_mc                          # all problems
    .venv/bin/python -m benchmarks.mlmc_vs_mc --problems gbm analytic  # minutes; no trained model needed

The digits rows need `make demo`'s model (runs/digits_superres/export, observation_0.npz). Writes
benchmarks/results/mlmc_vs_mc.json; `python -m benchmarks.mlmc_tables` prints the README tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch

from benchmarks.machine import machine_info
from benchmarks.mlmc_bench import (ROOT, analytic_target, label, log, run_mc, run_mlmc, slim, trained_model_paths,
                                   trained_target, write_result)
from lightning_mlmc import WeakConvergenceFailure
from lightning_mlmc.mlmc import MLMCConfig, mlmc
from lightning_mlmc.mlmc.gbm import GBMCall
from lightning_mlmc.problems import AnalyticSpec

SCHEMES = {"default": MLMCConfig(), "seed": MLMCConfig.from_scheme("seed")}
EPS = {"digits": [0.1, 0.05, 0.02, 0.01, 0.005], "analytic": [0.1, 0.05, 0.02], "gbm": [0.1, 0.05, 0.02]}
# the seed's scheme (uniform grid) on the trained model: plain MC at eps 0.005 would need ~1M NFEs per run here
SEED_EPS = {"digits": [0.05, 0.02, 0.01]}
REPEATS = {"digits": 3, "analytic": 4, "gbm": 20}


def rmse(errors) -> float:
    return float(math.sqrt(np.mean(np.square(errors))))


def diffusion_rows(target, scheme_name: str, eps: float, repeats: int) -> dict:
    scheme = SCHEMES[scheme_name]
    ml = [run_mlmc(target, scheme, eps, seed) for seed in range(repeats)]
    mc = [run_mc(target, scheme, r["mc_steps"], r["mc_samples"], 1000 + i) for i, r in enumerate(ml)]
    return summary(target.name, scheme_name, label(scheme), eps, ml, mc)


def gbm_rows(eps: float, repeats: int) -> dict:
    """Giles' test (M = 4, N0 = 1000), with its plain-MC alternative run at the named level."""
    ml, mc = [], []
    for seed in range(repeats):
        g = GBMCall(seed=seed)
        try:
            r, converged = mlmc(g, eps, n0=1000), True
        except WeakConvergenceFailure as e:
            r, converged = e.result, False
        ml.append({"seed": seed, "converged": converged, "method": r.method, "L": r.levels[-1].level,
                   "N_l": [lv.n_samples for lv in r.levels], "nfe": r.nfe, "network_rows": r.nfe_counted,
                   "rounds": r.rounds, "alpha": r.alpha, "beta": r.beta, "nfe_mc": r.nfe_mc,
                   "mc_steps": r.mc_steps, "mc_samples": r.mc_samples, "savings": r.savings,
                   "savings_same_grid": r.savings_same_grid, "rmse_bound": r.rmse_bound,
                   "error": abs(r.estimate[0] - g.exact)})
        level = round(math.log(r.mc_steps, g.M))
        s = g.with_lmin(level)(level, r.mc_samples, 10_000 + seed, 0)
        mc.append({"seed": seed, "steps": r.mc_steps, "n_samples": s.n, "nfe": s.calls,
                   "error": abs(float(s.sums["f1"][0]) / s.n - g.exact)})
    return summary("Giles' GBM European call (Euler-Maruyama, M = 4)", "giles", "M=4, N0=1000", eps, ml, mc)


def summary(problem, scheme_name, scheme_label, eps, ml, mc) -> dict:
    row = {
        "problem": problem, "scheme": scheme_name, "scheme_label": scheme_label, "eps": eps, "repeats": len(ml),
        "methods": [r["method"] for r in ml], "L": [r["L"] for r in ml], "rounds": [r["rounds"] for r in ml],
        "mlmc_nfe": float(np.mean([r["nfe"] for r in ml])), "mc_nfe": float(np.mean([r["nfe"] for r in mc])),
        "mc_steps": [r["steps"] for r in mc], "mc_samples": [r["n_samples"] for r in mc],
        "savings_measured": float(np.mean([r["nfe"] for r in mc]) / np.mean([r["nfe"] for r in ml])),
        "savings_reported": float(np.mean([r["savings"] for r in ml])),
        "savings_same_grid": float(np.median([r["savings_same_grid"] for r in ml])),
        "mlmc_rmse": rmse([r["error"] for r in ml]), "mc_rmse": rmse([r["error"] for r in mc]),
        "rmse_bound_mean": float(np.mean([r["rmse_bound"] for r in ml])),
        "alpha": float(np.mean([r["alpha"] for r in ml])), "beta": float(np.mean([r["beta"] for r in ml])),
        "converged": all(r["converged"] for r in ml),
        "mlmc_wall_seconds": float(np.mean([r.get("wall_seconds", math.nan) for r in ml])),
        "mc_wall_seconds": float(np.mean([r.get("wall_seconds", math.nan) for r in mc])),
        "mlmc_runs": [slim(r) for r in ml], "mc_runs": [slim(r) for r in mc],
    }
    log(json.dumps({k: v for k, v in row.items() if not k.endswith("_runs")}))
    return row


def digits_reference(args, target) -> dict:
    """The long MLMC run the digits errors are measured against (kept from the previous result file when it
    was made for the same model folder and eps)."""
    previous = json.load(open(args.out)).get("digits_reference") if os.path.exists(args.out) else None
    if previous and previous.get("eps") == args.reference_eps and previous.get("model") == args.checkpoint:
        log("reusing the reference run of", args.out)
        return previous
    ref = run_mlmc(target, SCHEMES["default"], args.reference_eps, seed=10_000)
    ref["model"] = args.checkpoint
    log("reference:", json.dumps({k: ref[k] for k in ("L", "lmin", "nfe", "rmse_bound", "wall_seconds")}))
    return ref


def _add(out: dict, rows: list[dict], problem: str, path: str) -> None:
    """Append rows and rewrite the result file (a long run keeps what it measured if stopped)."""
    for row in rows:
        row["problem_key"] = problem
        row["machine"] = out["machine"]
    out["rows"] += rows
    write_result(path, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", choices=sorted(EPS), default=["gbm", "analytic", "digits"])
    ap.add_argument("--schemes", nargs="+", choices=sorted(SCHEMES), default=["default", "seed"])
    ap.add_argument("--eps", type=float, nargs="+", help="override every problem's eps list")
    ap.add_argument("--repeats", type=int, help="override every problem's repeats")
    ap.add_argument("--reference-eps", type=float, default=0.003)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mlmc_vs_mc.json"))
    args = ap.parse_args(argv)
    args.checkpoint, args.observation = trained_model_paths("superres")
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"machine": machine_info(), "schemes": {k: SCHEMES[k].to_json() for k in args.schemes}, "rows": []}
    if os.path.exists(args.out):  # keep what other problems measured (rows of an older format are dropped)
        old = json.load(open(args.out))
        out["rows"] = [r for r in old.get("rows", []) if r.get("problem_key", args.problems[0]) not in args.problems]
        if "digits_reference" in old:
            out["digits_reference"] = old["digits_reference"]
    for problem in args.problems:
        eps_list, repeats = args.eps or EPS[problem], args.repeats or REPEATS[problem]
        if problem == "gbm":
            rows = [gbm_rows(eps, repeats) for eps in eps_list]
        else:
            if problem == "analytic":
                target = analytic_target(AnalyticSpec.load(os.path.join(ROOT, "examples", "inpaint4x4.json")),
                                         "analytic inpaint4x4 (two-component mixture, exact score)")
            else:
                target = trained_target(args.checkpoint, args.observation, "digits super-resolution (trained UNet)")
                out["digits_reference"] = digits_reference(args, target)
                write_result(args.out, out)
                target.truth = torch.as_tensor(out["digits_reference"]["estimate"], dtype=torch.float64)
            rows = []
            for name in args.schemes:
                for eps in (eps_list if name != "seed" or args.eps else SEED_EPS.get(problem, eps_list)):
                    rows.append(diffusion_rows(target, name, eps, repeats))
                    _add(out, rows[-1:], problem, args.out)
            continue
        _add(out, rows, problem, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
