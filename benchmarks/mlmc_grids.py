"""Which time grid, coupling, Lmin and M make MLMC pay: measured on the trained digits models and the
analytic mixture problem, and exactly on the Gaussian oracle.

- Analytic (exact, no sampling): the Gaussian oracle's V_l and |E[P_l - P_(l-1)]| for every grid family
  and every coupling on a single-Gaussian inpainting problem.
- A trained digits model (super-resolution or inpainting), or the analytic inpaint4x4 mixture problem with
  its exact score and exact answer (--model analytic): for every scheme and eps, one adaptive MLMC run
  and plain MC at matched eps on the grid MLMC chose; measured NFEs, savings and the error against a long
  reference run, fitted alpha/beta, V_l. The super-resolution reference is the one of
  benchmarks/mlmc_vs_mc.py (results/mlmc_vs_mc.json, ``digits_reference``, eps 0.003); for inpainting this
  script runs its own (--reference-eps) and keeps it in its result file for later runs.

    .venv/bin/python -m benchmarks.mlmc_grids --model superres   # after mlmc_vs_mc.py and `make demo`
    .venv/bin/python -m benchmarks.prepare_model --config configs/digits_inpaint.yaml --run-dir runs/digits_inpaint
    .venv/bin/python -m benchmarks.mlmc_grids --model inpaint
    .venv/bin/python -m benchmarks.mlmc_grids --model analytic
  Each writes results/mlmc_grids_<model>.json, rewritten after every scheme (--append adds to it). The
  committed results ran, in this order of schemes:
    --model inpaint --schemes logsnr/naive/auto logsnr/jacobian/auto uniform/naive/auto logsnr/weighted/auto
        edm/naive/auto uniform/weighted/3
    --model superres --schemes logsnr/naive/auto logsnr/jacobian/auto uniform/naive/auto uniform/weighted/3
        edm/naive/auto logsnr/naive/3 logsnr/naive/auto/M4 polynomial/naive/auto
    --model analytic --eps 0.1 0.05 0.02 --schemes logsnr/naive/auto logsnr/jacobian/auto edm/naive/auto
        uniform/naive/auto, then --append --eps 0.01 --schemes logsnr/naive/auto
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from benchmarks.machine import machine_info
from benchmarks.mlmc_bench import (
    ROOT, TRAINED_MODELS, analytic_target, label, log, make_scheme, run_mc, run_mlmc, slim, trained_model_paths,
    trained_target, write_result)

from lightning_mlmc.gaussian_oracle import GaussianOracle
from lightning_mlmc.problems import AnalyticSpec, gaussian_inpaint_spec

GRIDS = [("uniform", 7.0), ("polynomial", 2.0), ("logsnr", 7.0), ("edm", 7.0)]


def oracle_rows(levels=range(1, 11)) -> list[dict]:
    oracle = GaussianOracle(gaussian_inpaint_spec(4, 4))
    rows = []
    for grid, rho in GRIDS:
        scheme = make_scheme(grid=grid, rho=rho)
        for coupling in ("weighted", "naive", "jacobian"):
            mean, var = [], []
            for level in levels:
                m, v, _ = oracle.level_moments(level, coupling=coupling, grid=scheme.time_grid())
                mean.append(float(m.pow(2).mean().sqrt()))
                var.append(float(v.mean()))
            rows.append({"grid": label(scheme).split("/")[0], "coupling": coupling, "levels": list(levels),
                         "mean_l": mean, "V_l": var,
                         "beta_fine": float(-np.polyfit(list(levels)[-4:], np.log2(var[-4:]), 1)[0]),
                         "alpha_fine": float(-np.polyfit(list(levels)[-4:], np.log2(mean[-4:]), 1)[0])})
            log(json.dumps({k: rows[-1][k] for k in ("grid", "coupling", "alpha_fine", "beta_fine")}))
    return rows


def scheme_rows(target, schemes, eps_list, n0: int) -> list[dict]:
    rows = []
    for scheme in schemes:
        for eps in eps_list:
            ml = run_mlmc(target, scheme, eps, seed=0, n0=n0)
            mc = run_mc(target, scheme, ml["mc_steps"], ml["mc_samples"], seed=1000)
            row = {"scheme": label(scheme), "eps": eps, "lmin": ml["lmin"], "L": ml["L"], "alpha": ml["alpha"],
                   "beta": ml["beta"], "mlmc_nfe": ml["nfe"], "mc_nfe": mc["nfe"],
                   "savings_measured": mc["nfe"] / ml["nfe"], "savings_predicted": ml["savings"],
                   "mlmc_error": ml["error"], "mc_error": mc["error"], "rmse_bound": ml["rmse_bound"],
                   "converged": ml["converged"], "network_fraction": ml["network_fraction"],
                   "mlmc": slim(ml), "mc": slim(mc)}
            log(json.dumps({k: v for k, v in row.items() if k not in ("mlmc", "mc")}))
            rows.append(row)
    return rows


# The recommended scheme and its variants first (coupling, fixed Lmin, M = 4), then the other warps, then the
# uniform grid (the most expensive: it needs the most levels) and the seed's scheme (uniform, weighted, fixed
# Lmin 3). The file is rewritten after every scheme, so a cut-short run keeps its rows.
SCHEMES = {
    "logsnr/jacobian/auto": make_scheme("logsnr", "jacobian"), "uniform/jacobian/auto": make_scheme("uniform", "jacobian"),
    "logsnr/naive/auto": make_scheme("logsnr", "naive"), "logsnr/weighted/auto": make_scheme("logsnr", "weighted"),
    "logsnr/naive/3": make_scheme("logsnr", "naive", lmin=3), "logsnr/naive/auto/M4": make_scheme("logsnr", "naive", M=4),
    "edm/naive/auto": make_scheme("edm", "naive"), "polynomial/naive/auto": make_scheme("polynomial", "naive", rho=2.0),
    "uniform/naive/auto": make_scheme("uniform", "naive"), "uniform/weighted/3": make_scheme("uniform", "weighted", lmin=3),
}
MODELS = {**TRAINED_MODELS, "analytic": "analytic inpaint4x4 (two-component Gaussian mixture, exact score)"}
REFERENCE_SCHEME = make_scheme("logsnr", "naive")
ANALYTIC_SPEC = os.path.join(ROOT, "examples", "inpaint4x4.json")


def reference(args, target, previous: dict | None) -> dict:
    """The long MLMC run the errors are measured against: mlmc_vs_mc.json's for super-resolution, else this
    script's own (reused from the previous result file when it was made for the same checkpoint and eps)."""
    if args.model == "superres":
        with open(args.reference) as f:
            return json.load(f)["digits_reference"]
    old = (previous or {}).get("reference")
    same = old and os.path.realpath(old.get("checkpoint", "")) == os.path.realpath(args.checkpoint)
    if same and old["eps"] == args.reference_eps:
        log("reusing the reference run of", args.out)
        return old
    ref = run_mlmc(target, REFERENCE_SCHEME, args.reference_eps, seed=10_000, n0=args.n0, lmax=12)
    ref["checkpoint"] = os.path.realpath(args.checkpoint)
    log("reference:", json.dumps({k: ref[k] for k in ("L", "lmin", "nfe", "rmse_bound", "wall_seconds")}))
    return ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="superres")
    ap.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.02, 0.01])
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--checkpoint", help="default: runs/digits_<model>/export")
    ap.add_argument("--observation", help="default: runs/digits_<model>/observation_0.npz")
    ap.add_argument("--reference", default=os.path.join(ROOT, "benchmarks", "results", "mlmc_vs_mc.json"),
                    help="super-resolution: the result file holding the reference run")
    ap.add_argument("--reference-eps", type=float, default=0.002, help="inpainting: eps of the reference run")
    ap.add_argument("--out", help="default: benchmarks/results/mlmc_grids_<model>.json")
    ap.add_argument("--append", action="store_true",
                    help="add these schemes' rows to the existing result file (each run keeps its machine record)")
    args = ap.parse_args(argv)
    if args.model in TRAINED_MODELS:
        checkpoint, observation = trained_model_paths(args.model)
        args.checkpoint, args.observation = args.checkpoint or checkpoint, args.observation or observation
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", f"mlmc_grids_{args.model}.json")
    torch.set_num_threads(os.cpu_count() or 1)
    previous = json.load(open(args.out)) if os.path.exists(args.out) else None
    out = {"machine": machine_info(), "model": MODELS[args.model],
           "oracle_problem": "4x4 Gaussian inpainting (every other pixel, noise 0.1)", "oracle": oracle_rows()}
    if args.model == "analytic":
        target = analytic_target(AnalyticSpec.load(ANALYTIC_SPEC), MODELS[args.model])
        out["observation"] = os.path.relpath(ANALYTIC_SPEC, ROOT)
        out["reference"] = {"exact": "the exact posterior second moment"}
    else:
        target = trained_target(args.checkpoint, args.observation, MODELS[args.model])
        out["observation"] = os.path.relpath(args.observation, ROOT)
        out["reference"] = reference(args, target, previous)
        target.truth = torch.as_tensor(out["reference"]["estimate"], dtype=torch.float64)
    runs = [{"machine": out["machine"], "schemes": args.schemes, "complete": False}]
    rows = []
    if args.append and previous:
        # Rows of earlier runs stay, each run with the machine and commit that measured it.
        runs = previous["runs"] + runs
        rows = previous["rows"]
        out["machine"] = previous["machine"]
    out.update(runs=runs, rows=rows, complete=False)
    write_result(args.out, out)
    for name in args.schemes:
        for row in scheme_rows(target, [SCHEMES[name]], args.eps, args.n0):
            rows.append({**row, "commit": runs[-1]["machine"]["commit"]})
        runs[-1]["complete"] = name == args.schemes[-1]
        out["complete"] = all(r["complete"] for r in runs)
        write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
