"""Picard-parallel sampling against the sequential sampler, side by side in one run.

    python -m benchmarks.picard [--samples 64]
    python -m benchmarks.picard --skip-analytic --digits-steps 1000 --digits-samples 4 \
        --out benchmarks/results/picard_digits_1000.json

Analytic problem (examples/inpaint4x4.json, exact score): 100- and 1000-step DDPM and DDIM,
windows 16/64/256, tol 1e-1/1e-2/1e-3, plain Picard vs Anderson (m = 2), and the PIADM block scheme
for K = 1, 2, 4, 8 sweeps; then the same on the trained digits super-resolution UNet (`make demo`'s
checkpoint, its first validation observation). Reports rounds (sequential batched calls), nfe, wall time, the wall-clock
speedup against the sequential sampler timed in the same run, and the max relative deviation from the
sequential sample. Writes benchmarks/results/picard.json (picard_cuda.json with ``--device cuda``).

On a GPU (``--device cuda``) the network runs there (the analytic score in float64, the UNet in float32,
TF32 allowed as in training); every wall time ends with a device synchronisation, and each configuration
is preceded by an untimed warm-up of the sequential sampler so kernel loading and autotuning are not timed.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from benchmarks.machine import machine_info

from lightning_mlmc import AnalyticSpec, ExactPosteriorEps, NoiseSource, sample
from lightning_mlmc.module import load_score_module
from lightning_mlmc.picard import piadm_sample, piadm_times, picard_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(device, run):
    """(output, wall seconds) of ``run()``, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tic = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - tic


def run_problem(problem, model, y, shape, rows, dtype=torch.float64, steps_list=(100, 1000), device="cpu"):
    """Every scheme on one model, against the sequential sampler timed in the same run."""
    device = torch.device(device)
    noise = lambda: NoiseSource(0, shape, dtype=dtype, device=device)  # noqa: E731 - the same seed for every scheme
    sample(model, y, noise(), steps=10, sampler="ddpm")  # untimed warm-up (CUDA context, kernels, autotuning)
    for sampler in ("ddpm", "ddim"):
        for steps in steps_list:
            ref, seq_wall = timed(device, lambda: sample(model, y, noise(), steps=steps, sampler=sampler).samples)
            scale = float(ref.abs().max())
            for window in (16, 64, 256):
                for tol in (1e-1, 1e-2, 1e-3):
                    for anderson in (0, 2):
                        out, wall = timed(device, lambda: picard_sample(model, y, noise(), steps=steps, sampler=sampler,
                                                                        window=window, tol=tol, anderson=anderson))
                        rows.append({"problem": problem, "scheme": "picard" if not anderson else "anderson",
                                     "sampler": sampler, "steps": steps, "window": window, "tol": tol,
                                     "rounds": out.rounds, "nfe": out.nfe, "wall_seconds": wall,
                                     "seq_wall_seconds": seq_wall, "speedup_rounds": steps / out.rounds,
                                     "speedup_wall": seq_wall / wall,
                                     "max_rel_dev": float((out.samples - ref).abs().max()) / scale})
                        print(json.dumps(rows[-1]), flush=True)
        # PIADM: 8 blocks x 12 points (+ Tweedie); reference = sequential on the same grid.
        blocks, points = 8, 12
        times = piadm_times(blocks, points)
        ref, seq_wall = timed(device, lambda: sample(model, y, noise(), times=times, sampler=sampler).samples)
        for k in (1, 2, 4, 8):
            out, wall = timed(device, lambda: piadm_sample(model, y, noise(), blocks=blocks, points=points,
                                                           sweeps=k, sampler=sampler))
            rows.append({"problem": problem, "scheme": "piadm", "sampler": sampler, "steps": len(times) - 1,
                         "blocks": blocks, "points": points, "sweeps": k, "rounds": out.rounds, "nfe": out.nfe,
                         "wall_seconds": wall, "seq_wall_seconds": seq_wall,
                         "speedup_rounds": (len(times) - 1) / out.rounds, "speedup_wall": seq_wall / wall,
                         "max_rel_dev": float((out.samples - ref).abs().max()) / float(ref.abs().max())})
            print(json.dumps(rows[-1]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64, help="samples per run on the analytic problem")
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "runs", "digits_superres", "checkpoints", "last.ckpt"),
                    help="trained digits model (`make demo` writes it); skipped when missing")
    ap.add_argument("--observation", default=os.path.join(ROOT, "runs", "digits_superres", "observation_0.npz"))
    ap.add_argument("--digits-samples", type=int, default=16, help="samples per run on the digits model")
    ap.add_argument("--digits-steps", type=int, nargs="+", default=[100], help="step counts on the digits model")
    ap.add_argument("--skip-analytic", action="store_true", help="only the digits rows")
    ap.add_argument("--device", default="cpu", help="where the network runs: cpu or cuda")
    ap.add_argument("--out", default=None,
                    help="result file (default benchmarks/results/picard.json, picard_cuda.json on a GPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible")
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results",
                                        "picard.json" if device.type == "cpu" else f"picard_{device.type}.json")
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    if not args.skip_analytic:
        spec = AnalyticSpec.load(os.path.join(ROOT, "examples", "inpaint4x4.json"))
        # y stays on the CPU: the exact score keys its posterior cache on it and computes on x_t's device.
        run_problem("inpaint4x4", ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None],
                    (args.samples, *spec.shape), rows, device=device)
    digits = None
    if os.path.isfile(args.checkpoint):
        model = load_score_module(args.checkpoint).model.to(device)
        y = torch.as_tensor(np.load(args.observation)["y"])[None].to(device)
        digits = {"checkpoint": os.path.relpath(args.checkpoint, ROOT), "observation": os.path.relpath(args.observation, ROOT),
                  "samples": args.digits_samples, "parameters": sum(p.numel() for p in model.parameters())}
        # 100-step samplers only: on 2 CPU cores a 1000-step UNet grid costs minutes per configuration.
        run_problem("digits_superres", model, y, (args.digits_samples, *model.operator.shape), rows,
                    dtype=torch.float32, steps_list=tuple(args.digits_steps), device=device)
    else:
        print(f"no trained model at {args.checkpoint}: run `make demo` first for the digits rows")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"machine": machine_info(), "device": str(device), "samples": args.samples, "digits": digits,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
