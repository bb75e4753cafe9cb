"""Distil the digits super-resolution teacher into a student and measure what the student buys a coarse MLMC level.

    .venv/bin/python -m benchmarks.prepare_student                       # the config's student, ~5 min
    .venv/bin/python -m benchmarks.prepare_student --name c16x32 --channels 16 32   # an alternative

Needs `make demo`'s teacher (runs/digits_superres/export, observation_0.npz). Trains the student with
`lightning-mlmc distill --config configs/digits_superres_student.yaml` (W&B offline) into
runs/digits_superres/student/export (an alternative --name N: runs/digits_superres/student_N/), unless --reuse and
that export exists, then measures:
- parameters and FLOPs per row of both networks (torch.utils.flop_counter, from the export's metadata);
- the eps mismatch |eps_student - eps_teacher|^2 (and both networks' DSM loss) on the 180 validation images,
  8 fixed draws of (t, eps) each from the teacher's training distribution;
- both networks on the same 200 DDPM paths (64 steps, the MLMC default log-SNR grid, one NoiseSource) for
  observation 0: Var(P_teacher - P_student) / Var(P_teacher) for P = x and x^2 (per-pixel variances averaged over
  pixels, as MLMC's V_l), the RMS differences of their means and second moments, and the sampling seconds;
- the two-level MLMC cost factor (sqrt(flops ratio) + sqrt(var ratio of x^2))^2 against plain MC on the teacher.

Writes benchmarks/results/student.json (one entry per --name under "runs"; other names are kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

import torch

from benchmarks.machine import machine_info
from benchmarks.mlmc_bench import ROOT, log, write_result
from lightning_mlmc.cli import main as cli_main
from lightning_mlmc.cli.common import load_observation
from lightning_mlmc.module import EXPORT_CONFIG, diffuse, load_score_model
from lightning_mlmc.sampling import NoiseSource, sample
from lightning_mlmc.schedule import TimeGrid
from lightning_mlmc.train_cli import datamodule_from_config

CONFIG = os.path.join(ROOT, "configs", "digits_superres_student.yaml")
RUN_DIR = os.path.join(ROOT, "runs", "digits_superres")
OUT = os.path.join(ROOT, "benchmarks", "results", "student.json")
GRID = "logsnr"  # the MLMC default grid


def train(args, run_dir: str) -> None:
    # A fresh run folder: Lightning would otherwise resume from the last.ckpt a previous run left there (the CLI's
    # OnExceptionCheckpoint makes fit's ckpt_path default to "last"), timer included.
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["distill", "--config", CONFIG, "--model.teacher", args.teacher, "--trainer.default_root_dir", run_dir,
            "--model.export_dir", os.path.join(run_dir, "export"), "--trainer.enable_progress_bar", "false"]
    if args.channels:
        argv += ["--model.channels", json.dumps(args.channels)]
    if args.attention:
        argv += ["--model.attention", "true"]
    if args.dsm_weight is not None:
        argv += ["--model.dsm_weight", str(args.dsm_weight)]
    if args.max_steps:
        argv += ["--trainer.max_steps", str(args.max_steps)]
    if args.max_time:
        argv += ["--trainer.max_time", args.max_time]
    rc = cli_main(argv)
    if rc != 0:
        raise SystemExit(rc)


@torch.no_grad()
def eps_losses(teacher, student, draws: int = 8, t_min: float = 1e-3) -> dict:
    """Mean eps mismatch and both DSM losses on the validation images, ``draws`` fixed (t, eps) per image."""
    dm = datamodule_from_config(CONFIG)
    x0, y = dm.validation_observations(len(dm.split("val")))
    sums = {"eps_mismatch": 0.0, "student_dsm": 0.0, "teacher_dsm": 0.0}
    for k in range(draws):
        x_t, t, eps = diffuse(x0, teacher.schedule, t_min, torch.Generator().manual_seed(1000 + k))
        e_t, e_s = teacher(x_t, y, t), student(x_t, y, t)
        sums["eps_mismatch"] += float((e_s - e_t).pow(2).mean()) / draws
        sums["student_dsm"] += float((e_s - eps).pow(2).mean()) / draws
        sums["teacher_dsm"] += float((e_t - eps).pow(2).mean()) / draws
    return {**sums, "rows": int(x0.shape[0]) * draws}


def paired_paths(teacher, student, y, paths: int, steps: int, seed: int = 0) -> dict:
    """Both networks on the same DDPM paths; variance ratios and moment differences of P = x and x^2."""
    shape = (paths, *teacher.operator.shape)
    out, seconds = {}, {}
    for name, model in (("teacher", teacher), ("student", student)):
        noise = NoiseSource(seed, shape, dtype=torch.float32)
        tic = time.perf_counter()
        out[name] = sample(model, y, noise, steps=steps, sampler="ddpm", grid=TimeGrid(GRID)).samples.double()
        seconds[name] = time.perf_counter() - tic
    result = {"paths": paths, "steps": steps, "sampler": "ddpm", "grid": GRID, "seed": seed,
              "sampling_seconds": seconds, "seconds_ratio": seconds["student"] / seconds["teacher"]}
    for label, f in (("x", lambda x: x), ("x2", lambda x: x * x)):
        p_t, p_s = f(out["teacher"]).flatten(1), f(out["student"]).flatten(1)
        result[f"var_ratio_{label}"] = float((p_t - p_s).var(0).mean() / p_t.var(0).mean())
        result[f"rms_mean_diff_{label}"] = float((p_t.mean(0) - p_s.mean(0)).pow(2).mean().sqrt())
        # The difference's own standard error (shared noise): how much of the RMS difference is sampling noise.
        result[f"rms_mean_diff_{label}_se"] = float(((p_t - p_s).var(0) / paths).mean().sqrt())
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="default", help="the run's name (default: the config's student)")
    ap.add_argument("--teacher", default=os.path.join(RUN_DIR, "export"))
    ap.add_argument("--observation", default=os.path.join(RUN_DIR, "observation_0.npz"))
    ap.add_argument("--channels", type=int, nargs="+", help="student widths (default: the config's)")
    ap.add_argument("--attention", action="store_true", help="self-attention in the student")
    ap.add_argument("--dsm-weight", type=float, help="default: the config's")
    ap.add_argument("--max-steps", type=int, help="training steps (default: the config's 3000)")
    ap.add_argument("--max-time", default="00:00:10:00", help="a safety cap DD:HH:MM:SS, above the config's 5 "
                    "minutes so that the step count, not the machine's load, ends training and runs compare")
    ap.add_argument("--paths", type=int, default=200)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="seed of the shared noise of the paths")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training and measuring (1: on a "
                    "busy 2-core machine a training step took 0.11 s with one thread and 0.2-1.7 s with two)")
    ap.add_argument("--reuse", action="store_true", help="measure an existing export instead of training")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(args.threads)
    run_dir = os.path.join(RUN_DIR, "student" if args.name == "default" else f"student_{args.name}")
    export = os.path.join(run_dir, "export")
    if not (args.reuse and os.path.isfile(os.path.join(export, EXPORT_CONFIG))):
        train(args, run_dir)
    with open(os.path.join(export, EXPORT_CONFIG)) as f:
        meta = json.load(f)
    teacher, student = load_score_model(args.teacher), load_score_model(export)
    source = meta["distilled_from"]
    row = {
        "export": os.path.relpath(export, ROOT),
        "student": {"channels": list(student.network.config.block_out_channels),
                    "attention": any("Attn" in b for b in student.network.config.down_block_types)},
        "train_seconds": source["train_seconds"], "global_step": source["global_step"], "threads": args.threads,
        "dsm_weight": source["dsm_weight"],
        "parameters": {"teacher": source["parameters"], "student": meta["parameters"]},
        "flops_per_row": {"teacher": source["flops_per_row"], "student": meta["flops_per_row"]},
        "flops_ratio": meta["flops_per_row"] / source["flops_per_row"],
    }
    log(f"{args.name}: {row['student']}, {row['global_step']} steps in {row['train_seconds']:.0f} s; "
        f"FLOPs ratio {row['flops_ratio']:.3f}")
    row["eps"] = eps_losses(teacher, student, t_min=source["t_min"])
    log(f"  eps mismatch {row['eps']['eps_mismatch']:.5f} (DSM: student {row['eps']['student_dsm']:.4f}, "
        f"teacher {row['eps']['teacher_dsm']:.4f})")
    y = load_observation(args.observation, teacher.operator)
    row["paths"] = paired_paths(teacher, student, y, args.paths, args.steps, args.seed)
    p = row["paths"]
    row["mlmc_cost_factor_x2"] = (math.sqrt(row["flops_ratio"]) + math.sqrt(p["var_ratio_x2"])) ** 2
    log(f"  Var ratio x {p['var_ratio_x']:.4f}, x^2 {p['var_ratio_x2']:.4f}; RMS second-moment difference "
        f"{p['rms_mean_diff_x2']:.4f} (se {p['rms_mean_diff_x2_se']:.4f}); seconds ratio {p['seconds_ratio']:.2f}; "
        f"MLMC cost factor {row['mlmc_cost_factor_x2']:.3f}")
    result = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            result = json.load(f)
    result.update({"machine": machine_info(), "teacher": os.path.relpath(os.path.abspath(args.teacher), ROOT),
                   "observation": os.path.relpath(os.path.abspath(args.observation), ROOT),
                   "config": os.path.relpath(CONFIG, ROOT)})
    result.setdefault("runs", {})[args.name] = {**row, "machine": result["machine"]}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
