"""Which time grid, coupling, Lmin and M make MLMC pay: measured on the trained digits model and exactly
on the analytic oracle.

- Analytic (exact, no sampling): the Gaussian oracle's V_l and |E[P_l - P_(l-1)]| for every grid family
  and both couplings on a single-Gaussian inpainting problem.
- Trained digits super-resolution model: for every scheme and eps, one adaptive MLMC run and plain MC at
  matched eps on the grid MLMC chose; measured NFEs, savings and the error against the reference run of
  benchmarks/mlmc_vs_mc.py (results/mlmc_vs_mc.json, ``digits_reference``), fitted alpha/beta, V_l.

    .venv/bin/python benchmarks/mlmc_grids.py      # after mlmc_vs_mc.py; writes results/mlmc_grids.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402
from mlmc_bench import ROOT, Scheme, log, run_mc, run_mlmc, slim, trained_target, write_result  # noqa: E402

from lightning_mlmc.gaussian_oracle import GaussianOracle  # noqa: E402
from lightning_mlmc.problems import gaussian_inpaint_spec  # noqa: E402

GRIDS = [("uniform", 7.0), ("polynomial", 2.0), ("logsnr", 7.0), ("edm", 7.0)]


def oracle_rows(levels=range(1, 11)) -> list[dict]:
    oracle = GaussianOracle(gaussian_inpaint_spec(4, 4))
    rows = []
    for grid, rho in GRIDS:
        scheme = Scheme(grid=grid, rho=rho)
        for coupling in ("weighted", "naive"):
            mean, var = [], []
            for level in levels:
                m, v, _ = oracle.level_moments(level, coupling=coupling, grid=scheme.time_grid())
                mean.append(float(m.pow(2).mean().sqrt()))
                var.append(float(v.mean()))
            rows.append({"grid": scheme.label.split("/")[0], "coupling": coupling, "levels": list(levels),
                         "mean_l": mean, "V_l": var,
                         "beta_fine": float(-np.polyfit(list(levels)[-4:], np.log2(var[-4:]), 1)[0]),
                         "alpha_fine": float(-np.polyfit(list(levels)[-4:], np.log2(mean[-4:]), 1)[0])})
            log(json.dumps({k: rows[-1][k] for k in ("grid", "coupling", "alpha_fine", "beta_fine")}))
    return rows


def digits_rows(target, schemes, eps_list, n0: int) -> list[dict]:
    rows = []
    for scheme in schemes:
        for eps in eps_list:
            ml = run_mlmc(target, scheme, eps, seed=0, n0=n0)
            mc = run_mc(target, scheme, eps, ml["L"], ml["var_fine"][-1], seed=1000)
            row = {"scheme": scheme.label, "eps": eps, "lmin": ml["lmin"], "L": ml["L"], "alpha": ml["alpha"],
                   "beta": ml["beta"], "mlmc_nfe": ml["nfe"], "mc_nfe": mc["nfe"],
                   "savings_measured": mc["nfe"] / ml["nfe"], "savings_predicted": ml["savings_predicted"],
                   "mlmc_error": ml["error"], "mc_error": mc["error"], "rmse_bound": ml["rmse_bound"],
                   "converged": ml["converged"], "network_fraction": ml["network_fraction"],
                   "mlmc": slim(ml), "mc": slim(mc)}
            log(json.dumps({k: v for k, v in row.items() if k not in ("mlmc", "mc")}))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.02, 0.01])
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "runs", "digits_superres", "export"))
    ap.add_argument("--observation", default=os.path.join(ROOT, "runs", "digits_superres", "observation_0.npz"))
    ap.add_argument("--reference", default=os.path.join(ROOT, "benchmarks", "results", "mlmc_vs_mc.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mlmc_grids.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"machine": machine_info(), "oracle_problem": "4x4 Gaussian inpainting (every other pixel, noise 0.1)",
           "oracle": oracle_rows()}
    with open(args.reference) as f:
        ref = json.load(f)["digits_reference"]
    target = trained_target(args.checkpoint, args.observation, "digits super-resolution (trained UNet)")
    target.truth = torch.as_tensor(ref["estimate"], dtype=torch.float64)
    # The recommended scheme and its variants first (coupling, fixed Lmin, M = 4), then the other warps, then
    # the uniform grid (the most expensive: it needs the most levels) and the seed's scheme (uniform,
    # weighted, fixed Lmin 3). The file is rewritten after every row, so a cut-short run keeps its rows.
    schemes = [Scheme("logsnr", "naive"), Scheme("logsnr", "weighted"), Scheme("logsnr", "naive", lmin=3),
               Scheme("logsnr", "naive", M=4), Scheme("edm", "naive"), Scheme("polynomial", "naive", rho=2.0),
               Scheme("uniform", "naive"), Scheme("uniform", "weighted", lmin=3)]
    out["digits"] = []
    for scheme in schemes:
        out["digits"] += digits_rows(target, [scheme], args.eps, args.n0)
        out["complete"] = scheme == schemes[-1]
        write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
