"""Triangular Anderson memory per sampler, by measurement: Picard rounds for memory 0 (plain Picard), 1, 2 and 3.

    python -m benchmarks.picard_anderson                     # analytic problems, then the demo model if present
    python -m benchmarks.picard_anderson --parts analytic    # or digits
    python -m benchmarks.picard_anderson --export /path/to/runs/digits_superres/export

-> benchmarks/results/picard_anderson.json. The sliding-window Picard sampler (ParaDiGMS slide rule) of every
sampler (DDPM, DDIM, DPM-Solver++(2M)) at several step counts, windows and tolerances, on the log-SNR grid (the
command line's default) and the uniform grid (the library's), 64 samples, seeds 0-2, on:
  tuned    the two example specs the Anderson default (memory 2) was measured on (README, benchmarks/picard.py):
           examples/bimodal2d.json and examples/inpaint4x4.json, exact scores;
  held out problems that default never saw, exact scores too: a 3-D three-component mixture observed twice
           (``mixture3d``), an 8-D four-component mixture observed through 3 random projections (``mixture8d``),
           bimodal2d at another observation (y = 1.1, one mode dominant), the single Gaussians of the tests
           (``gaussian3d``) and ``problems.gaussian_inpaint_spec(3, 3)``;
  digits   the trained demo UNet (digits super-resolution, float32, its first validation observation), when its
           export is there: 100-step DDPM/DDIM/DPM-Solver++(2M) window 64 and 1000-step DDPM window 256, tol 0.1,
           log-SNR grid, 8 and 4 samples, seeds 0-1.
Rounds (sequential batched network calls) are deterministic for a seed. Each row also has the deviation from
the sequential sample with the same noise (RMS over samples and pixels, over the posterior's RMS pixel std: the
tolerance bound is tol). The summary gives, per sampler and memory, the geometric mean over configurations of
rounds(m) / rounds(0) (all, tuned, held out, digits) and how often memory m needs more rounds than plain Picard;
the default it picks is the memory with the smallest geometric mean over all configurations, 0 unless that
is below 0.97 (a saving of at least 3%) and below 1 on the held-out problems as well.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch

from benchmarks.machine import machine_info
from lightning_mlmc import AnalyticSpec, ExactPosteriorEps, NoiseSource, TimeGrid, sample
from lightning_mlmc.picard import picard_sample
from lightning_mlmc.problems import gaussian_inpaint_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MEMORIES = (0, 1, 2, 3)
GRIDS = ("logsnr", "uniform")  # the command line's default grid and the library's (the seed's)
# (sampler, steps, window, tol): the library's default window and tolerance (16, 1e-3), the README's
# configurations (1000-step DDPM window 256, 100-step DDIM window 64, tol 0.1) and a few in between.
ANALYTIC_CONFIGS = [
    ("ddpm", 100, 16, 1e-3), ("ddpm", 100, 64, 0.1), ("ddpm", 1000, 64, 1e-2), ("ddpm", 1000, 256, 0.1),
    ("ddim", 100, 16, 1e-3), ("ddim", 100, 64, 0.1), ("ddim", 100, 16, 0.1), ("ddim", 1000, 256, 0.1),
    ("dpm2m", 100, 16, 1e-3), ("dpm2m", 100, 64, 0.1),
]
DIGITS_CONFIGS = [("ddpm", 100, 64, 0.1, 8), ("ddim", 100, 64, 0.1, 8), ("dpm2m", 100, 64, 0.1, 8),
                  ("ddpm", 1000, 256, 0.1, 4)]


def mixture3d() -> AnalyticSpec:
    """Three correlated 3-D components, two noisy linear observations: a multimodal posterior."""
    return AnalyticSpec.from_dict({
        "prior": {"weights": [0.5, 0.3, 0.2],
                  "means": [[1.0, 0.0, -0.5], [-1.0, 0.8, 0.3], [0.2, -1.0, 1.0]],
                  "covs": [[[0.3, 0.1, 0.0], [0.1, 0.2, 0.05], [0.0, 0.05, 0.25]],
                           [[0.2, -0.05, 0.0], [-0.05, 0.3, 0.1], [0.0, 0.1, 0.2]],
                           [[0.15, 0.0, 0.05], [0.0, 0.15, 0.0], [0.05, 0.0, 0.3]]]},
        "operator": {"matrix": [[1.0, 1.0, 0.0], [0.0, 1.0, -1.0]]},
        "noise_std": 0.2,
        "y": [0.3, -0.4],
    })


def mixture8d() -> AnalyticSpec:
    """Four random 8-D components (seeded), observed through 3 random unit projections with noise 0.1."""
    rng = np.random.default_rng(8)
    means = rng.normal(0.0, 1.0, (4, 8))
    covs = []
    for _ in range(4):
        a = rng.normal(0.0, 0.3, (8, 8))
        covs.append((a @ a.T / 8 + 0.05 * np.eye(8)).tolist())
    matrix = rng.normal(0.0, 1.0, (3, 8))
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    y = matrix @ (0.5 * (means[0] + means[1])) + 0.1 * rng.normal(size=3)
    return AnalyticSpec.from_dict({"prior": {"weights": [0.25] * 4, "means": means.tolist(), "covs": covs},
                                   "operator": {"matrix": matrix.tolist()}, "noise_std": 0.1, "y": y.tolist()})


def gaussian3d() -> AnalyticSpec:
    """The tests' single correlated 3-D Gaussian with two observations (tests/analytic_cases.py)."""
    return AnalyticSpec.from_dict({
        "prior": {"weights": [1.0], "means": [[0.5, -0.3, 0.2]],
                  "covs": [[[1.0, 0.3, 0.0], [0.3, 0.8, 0.1], [0.0, 0.1, 0.5]]]},
        "operator": {"matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]},
        "noise_std": 0.2,
        "y": [0.4, 0.1],
    })


def problems() -> list[tuple[str, str, AnalyticSpec]]:
    """(group, name, spec) of every analytic problem."""
    examples = os.path.join(ROOT, "examples")
    bimodal = AnalyticSpec.load(os.path.join(examples, "bimodal2d.json"))
    return [("tuned", "bimodal2d", bimodal),
            ("tuned", "inpaint4x4", AnalyticSpec.load(os.path.join(examples, "inpaint4x4.json"))),
            ("held_out", "mixture3d", mixture3d()),
            ("held_out", "mixture8d", mixture8d()),
            ("held_out", "bimodal2d_y1.1", bimodal.with_observation([1.1])),
            ("held_out", "gaussian3d", gaussian3d()),
            ("held_out", "gaussian_inpaint3x3", gaussian_inpaint_spec(3, 3))]


def measure(group, problem, model, y, shape, dtype, sampler, steps, window, tol, seed, grid) -> list[dict]:
    """The sequential sampler and Picard with every Anderson memory on one configuration and seed."""
    noise = lambda: NoiseSource(seed, shape, dtype=dtype)  # noqa: E731
    ref = sample(model, y, noise(), steps=steps, sampler=sampler, grid=grid).samples.double()
    spread = float(ref.reshape(shape[0], -1).std(0).pow(2).mean().sqrt())
    rows = []
    for m in MEMORIES:
        tic = time.perf_counter()
        out = picard_sample(model, y, noise(), steps=steps, sampler=sampler, window=window, tol=tol, anderson=m,
                            grid=grid)
        diff = out.samples.double() - ref
        rows.append({"group": group, "problem": problem, "grid": grid.kind, "sampler": sampler, "steps": steps,
                     "window": window,
                     "tol": tol, "seed": seed, "samples": shape[0], "anderson": m, "rounds": out.rounds,
                     "nfe": out.nfe, "converged": out.stats["converged"],
                     "rms_dev_over_spread": float(diff.pow(2).mean().sqrt()) / spread,
                     "wall_seconds": time.perf_counter() - tic})
    print(json.dumps({k: rows[0][k] for k in ("problem", "grid", "sampler", "steps", "window", "tol", "seed")}),
          "rounds", [r["rounds"] for r in rows], flush=True)
    return rows


def run_analytic(samples: int, seeds: int) -> list[dict]:
    rows = []
    for group, name, spec in problems():
        model, y = ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None]  # y on the CPU: the score keys on it
        for grid in GRIDS:
            for sampler, steps, window, tol in ANALYTIC_CONFIGS:
                for seed in range(seeds):
                    rows += measure(group, name, model, y, (samples, *spec.shape), torch.float64, sampler, steps,
                                    window, tol, seed, TimeGrid(grid))
    return rows


def run_digits(export: str, observation: str, seeds: int) -> list[dict]:
    from lightning_mlmc.module import load_score_model

    model = load_score_model(export).eval()
    shape = tuple(model.operator.shape)
    y = torch.as_tensor(np.load(observation)["y"])[None]
    rows = []
    with torch.no_grad():
        for sampler, steps, window, tol, n in DIGITS_CONFIGS:
            for seed in range(seeds):
                rows += measure("digits", "digits_superres", model, y, (n, *shape), torch.float32, sampler, steps,
                                window, tol, seed, TimeGrid("logsnr"))
    return rows


def _config(row: dict) -> tuple:
    return tuple(row[k] for k in ("group", "problem", "grid", "sampler", "steps", "window", "tol", "seed"))


def summarize(rows: list[dict]) -> dict:
    """Per sampler and memory: geometric means of rounds(m) / rounds(0) by group, how often m needs more or fewer
    rounds than plain Picard, the largest deviation over tol; the default memory it picks; and the mean rounds of
    every (sampler, steps, window, tol, group) over problems, grids and seeds."""
    plain = {_config(r): r["rounds"] for r in rows if r["anderson"] == 0}
    gm = lambda xs: float(math.exp(np.mean(np.log(xs)))) if xs else None  # noqa: E731
    by_sampler = {}
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        table = {}
        for m in MEMORIES[1:]:
            mine = [r for r in rows if r["sampler"] == sampler and r["anderson"] == m]
            ratio = [(r["group"], r["rounds"] / plain[_config(r)]) for r in mine]
            table[m] = {"all": gm([v for _, v in ratio]),
                        **{g: gm([v for gg, v in ratio if gg == g]) for g in ("tuned", "held_out", "digits")},
                        "more_rounds": sum(v > 1 for _, v in ratio), "fewer_rounds": sum(v < 1 for _, v in ratio),
                        "configurations": len(ratio),
                        "max_dev_over_tol": max(r["rms_dev_over_spread"] / r["tol"] for r in mine)}
        best = min(table, key=lambda m: (table[m]["all"], m))
        ok = table[best]["all"] < 0.97 and (table[best]["held_out"] or 0.0) < 1.0
        by_sampler[sampler] = {"ratio_to_plain": table, "default_anderson": best if ok else 0}
    mean_rounds = {}
    for r in rows:
        key = (r["sampler"], r["steps"], r["window"], r["tol"], r["group"])
        mean_rounds.setdefault(key, {m: [] for m in MEMORIES})[r["anderson"]].append(r["rounds"])
    return {"by_sampler": by_sampler,
            "mean_rounds": [{"sampler": k[0], "steps": k[1], "window": k[2], "tol": k[3], "group": k[4],
                             **{f"m{m}": float(np.mean(v)) for m, v in by_m.items()}}
                            for k, by_m in mean_rounds.items()]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=["analytic", "digits"], default=["analytic", "digits"])
    ap.add_argument("--samples", type=int, default=64, help="samples per run on the analytic problems")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per analytic configuration (2 on the demo model)")
    ap.add_argument("--export", default=os.path.join(ROOT, "runs", "digits_superres", "export"),
                    help="the trained demo model (`make demo` writes it); the digits part is skipped when missing")
    ap.add_argument("--observation", default=None, help="default: observation_0.npz beside the export folder")
    ap.add_argument("--out", default=os.path.join(RESULTS, "picard_anderson.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    machine = machine_info()  # stamped when the run starts
    rows, digits = [], None
    if "analytic" in args.parts:
        rows += run_analytic(args.samples, args.seeds)
    if "digits" in args.parts:
        observation = args.observation or os.path.join(os.path.dirname(os.path.abspath(args.export)),
                                                       "observation_0.npz")
        if os.path.isdir(args.export) and os.path.isfile(observation):
            rows += run_digits(args.export, observation, min(args.seeds, 2))
            digits = {"export": args.export, "observation": observation}
        else:
            print(f"no trained model at {args.export}: run `make demo` first for the digits rows")
    payload = {"machine": machine, "digits_model": digits, "memories": list(MEMORIES), "summary": summarize(rows),
               "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    print(json.dumps(payload["summary"]["by_sampler"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
