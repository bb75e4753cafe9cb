"""Levels over networks, measured: teacher-only MLMC, MLMC with a distilled student on the coarse levels, and the
cheapest plain MC, side by side on the demo model (observation 0, second moment, antithetic pairs as by default).

For each eps and seed: MLMC on the teacher alone; MLMC with the student (``--coarse-checkpoint``) below the switch
level (just above Lmin by default, and each ``--switches`` value); and the plain MC the teacher-only run names
(antithetic or not, whichever its estimates say is cheaper), run for real. Costs in teacher NFEs by FLOPs (a
student row counts its FLOPs over a teacher row's, ``torch.utils.flop_counter``), in GFLOPs, and in CPU wall time
measured around each run; each network's measured seconds per row too. Errors against an independent reference:
plain antithetic MC of the teacher with 1024 DDPM steps (``--reference-pairs`` pairs; its standard error stated;
kept in the JSON and reused). The student's training time comes from benchmarks/results/student.json
(``benchmarks.prepare_student``).

    .venv/bin/python -m benchmarks.mlmc_student [--eps 0.01 0.005 0.003] [--seeds 3] [--student DIR]

Needs `make demo`'s model (runs/digits_superres) and a student (benchmarks.prepare_student). Writes
benchmarks/results/mlmc_student.json.
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
from benchmarks.mlmc_bench import ROOT, log, plain_reference, rmse_to_truth, run_mc, trained_target, write_result
from lightning_mlmc import WeakConvergenceFailure
from lightning_mlmc.cli.common import load_coarse_model
from lightning_mlmc.mlmc import MLMCConfig, run_mlmc
from lightning_mlmc.mlmc.network_cost import flops_per_row

OUT = os.path.join(ROOT, "benchmarks", "results", "mlmc_student.json")
RUN_DIR = os.path.join(ROOT, "runs", "digits_superres")
def mlmc_run(target, config: MLMCConfig, eps: float, coarse=None) -> dict:
    levels = config.level_sampler(target.model, target.y, target.shape, dtype=target.dtype, device=target.device,
                                  coarse_model=coarse)
    tic = time.perf_counter()
    try:
        r = run_mlmc(config, levels, eps)
    except WeakConvergenceFailure as e:
        r = e.result
    return {"seed": config.seed, "switch": r.scheme.get("switch"),
            "nfe": r.nfe, "wall_seconds": time.perf_counter() - tic, "error": rmse_to_truth(r.estimate, target.truth),
            "converged": r.converged, "method": r.method, "lmin": r.lmin, "L": r.levels[-1].level,
            "samples": [lv.n_samples for lv in r.levels], "level_var": [lv.var for lv in r.levels],
            "network_costs": r.network_costs, "mc_steps": r.mc_steps, "mc_samples": r.mc_samples,
            "mc_antithetic": r.mc_antithetic, "nfe_mc": r.nfe_mc, "rmse_estimate": r.rmse_estimate}


def summary(runs: list[dict], gflops: float) -> dict:
    return {"runs": len(runs), "nfe_mean": float(np.mean([r["nfe"] for r in runs])),
            "gflops_mean": float(np.mean([r["nfe"] for r in runs])) * gflops,
            "wall_mean": float(np.mean([r["wall_seconds"] for r in runs])),
            "rmse": float(math.sqrt(np.mean([r["error"] ** 2 for r in runs]))),
            "max_error": float(max(r["error"] for r in runs))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.005, 0.003])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--student", default=os.path.join(RUN_DIR, "student", "export"))
    p.add_argument("--switches", type=int, nargs="*", default=[], help="fixed switch levels to compare as well")
    p.add_argument("--reference-pairs", type=int, default=1050)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the 2-core machine: one thread measured faster for these small networks
    target = trained_target(os.path.join(RUN_DIR, "export"), os.path.join(RUN_DIR, "observation_0.npz"),
                            "digits super-resolution, observation 0")
    coarse = load_coarse_model(args.student, target.model)
    out = {"machine": machine_info()}
    if os.path.exists(OUT):
        with open(OUT) as f:
            out = {**json.load(f), "machine": machine_info()}
    flops = {"teacher": flops_per_row(target.model, target.shape, target.y),
             "student": flops_per_row(coarse, target.shape, target.y)}
    out["flops_per_row"], out["student"] = flops, args.student
    student_json = os.path.join(ROOT, "benchmarks", "results", "student.json")
    if os.path.exists(student_json):
        with open(student_json) as f:
            out["student_training"] = json.load(f)
    if "reference" not in out or out["reference"].get("pairs", 0) < args.reference_pairs:
        out["reference"] = plain_reference(target, args.reference_pairs)
        write_result(OUT, out)
    target = replace(target, truth=torch.tensor(out["reference"]["estimate"], dtype=torch.float64))
    gflops = flops["teacher"] / 1e9
    rows = []
    for eps in args.eps:
        row = {"eps": eps, "teacher": [], "student": [], "mc": []}
        row.update({f"student_switch_{s}": [] for s in args.switches})
        for seed in range(args.seeds):
            t = mlmc_run(target, MLMCConfig(seed=seed), eps)
            row["teacher"].append(t)
            row["student"].append(mlmc_run(target, MLMCConfig(seed=seed, coarse_checkpoint=args.student), eps, coarse))
            for s in args.switches:
                row[f"student_switch_{s}"].append(
                    mlmc_run(target, MLMCConfig(seed=seed, coarse_checkpoint=args.student, switch=s), eps, coarse))
            n = t["mc_samples"] // (2 if t["mc_antithetic"] else 1)
            m = run_mc(target, MLMCConfig(), t["mc_steps"], n, 1000 + seed, antithetic=t["mc_antithetic"])
            row["mc"].append({k: v for k, v in m.items() if k != "estimate"})
        for key in [k for k in row if k not in ("eps",)]:
            row[f"{key}_summary"] = summary(row[key], gflops)
        row["student_over_teacher"] = row["student_summary"]["nfe_mean"] / row["teacher_summary"]["nfe_mean"]
        rows.append(row)
        log(f"eps {eps}: teacher {row['teacher_summary']}, student {row['student_summary']} "
            f"({row['student_over_teacher']:.2f}x), plain MC {row['mc_summary']}")
        out["rows"] = rows
        write_result(OUT, out)


if __name__ == "__main__":
    main()
