"""Picard-parallel sampling against the sequential sampler: rounds, NFEs, deviation, wall time.

    python -m benchmarks.picard                         # all three parts (analytic, PIADM curves, digits)
    python -m benchmarks.picard --parts analytic        # or piadm, solvers, digits; several may be given

analytic -> benchmarks/results/picard.json: the exact score of examples/inpaint4x4.json (a two-component
  mixture posterior), 64 samples. (1) The grid: DDPM and DDIM, 100 and 1000 steps, windows 16/64/256,
  tol 1e-1/1e-2/1e-3, for plain Picard with the old slide rule (prefix), plain Picard with ParaDiGMS' rule,
  and triangular Anderson (m = 2, ParaDiGMS' rule), seed 0. (2) Seeds: the configurations the issue names
  (1000-step DDPM window 256, 100-step DDIM window 64, tol 0.1), memory 0/1/2/3 and both slide rules, seeds
  0-4, on inpaint4x4 and bimodal2d.
piadm -> benchmarks/results/picard_piadm.json: error against the exact posterior versus rounds on the
  single-Gaussian gaussian_inpaint(4, 4) problem, every error exact (the output of a fixed-schedule sampler is
  affine in its draws: ``gaussian_oracle.affine_law``): the sequential DDPM and DDIM on uniform and log-SNR
  grids, PIADM-SDE and PIADM-ODE (with and without the corrector) on log-SNR and OU blocks.
solvers -> benchmarks/results/picard_solvers.json: DPM-Solver++(2M) against DDIM, weak order on the exact
  oracle and Picard over either (benchmarks/picard_solvers.py).
digits -> benchmarks/results/picard_digits.json: the trained digits super-resolution UNet (`make demo`'s
  checkpoint, first validation observation, float32): 1000-step DDPM window 256 (4 samples, seeds 0-1) and
  100-step DDIM window 64 (8 samples, seeds 0-4), tol 0.1, plain Picard against Anderson m = 2, both slide rules.

Rounds, NFEs and deviations are deterministic; wall times are not (the CPU is shared): every wall time is the
sequential sampler's and the scheme's, timed in the same run. Deviation: RMS over samples and pixels of the
difference from the sequential sample with the same seed, over the posterior's RMS pixel std (the tolerance
bound is tol: Picard's error a fraction tol of the sampling spread); also the max relative deviation.
On a GPU (``--device cuda``) every wall time ends with a device synchronisation after an untimed warm-up.
``python -m benchmarks.picard_tables`` prints the README tables from the result files.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from benchmarks.machine import machine_info
from lightning_mlmc import AnalyticSpec, ExactPosteriorEps, NoiseSource, sample
from lightning_mlmc.picard import picard_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# (label, anderson memory, slide rule, tolerance factor): "-tight" runs at a tenth of the tolerance, where
# Anderson's deviation from the sequential sample matches plain Picard's at the full tolerance.
GRID_SCHEMES = [("picard-prefix", 0, "prefix", 1), ("picard", 0, "paradigms", 1), ("anderson2", 2, "paradigms", 1)]
SEED_SCHEMES = [("picard-prefix", 0, "prefix", 1), ("picard", 0, "paradigms", 1), ("anderson1", 1, "paradigms", 1),
                ("anderson2", 2, "paradigms", 1), ("anderson3", 3, "paradigms", 1), ("anderson2-prefix", 2, "prefix", 1),
                ("anderson2-tight", 2, "paradigms", 0.1), ("anderson1-tight", 1, "paradigms", 0.1)]
DIGITS_SCHEMES = [("picard-prefix", 0, "prefix", 1), ("picard", 0, "paradigms", 1), ("anderson2", 2, "paradigms", 1),
                  ("anderson2-tight", 2, "paradigms", 0.1)]


def timed(device, run):
    """(output, wall seconds) of ``run()``, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tic = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - tic


def compare(part, problem, model, y, shape, dtype, device, sampler, steps, window, tol, schemes, seed, rows):
    """The sequential sampler and every scheme on one configuration, same seed; appends one row per scheme."""
    noise = lambda: NoiseSource(seed, shape, dtype=dtype, device=device)  # noqa: E731
    ref, seq_wall = timed(device, lambda: sample(model, y, noise(), steps=steps, sampler=sampler).samples)
    spread = float(ref.reshape(shape[0], -1).double().std(0).pow(2).mean().sqrt())
    for label, anderson, slide, factor in schemes:
        out, wall = timed(device, lambda: picard_sample(model, y, noise(), steps=steps, sampler=sampler, window=window,
                                                        tol=tol * factor, anderson=anderson, slide=slide))
        diff = (out.samples - ref).double()
        rows.append({"part": part, "problem": problem, "scheme": label, "anderson": anderson, "slide": slide, "sampler": sampler,
                     "steps": steps, "window": window, "tol": tol * factor, "seed": seed, "samples": shape[0],
                     "rounds": out.rounds, "nfe": out.nfe, "wall_seconds": wall, "seq_wall_seconds": seq_wall,
                     "speedup_rounds": steps / out.rounds, "speedup_wall": seq_wall / wall,
                     "rms_dev_over_spread": float(diff.pow(2).mean().sqrt()) / spread, "spread": spread,
                     "max_rel_dev": float(diff.abs().max() / ref.double().abs().max())})
        print(json.dumps(rows[-1]), flush=True)


def run_analytic(samples: int, device) -> dict:
    rows = []
    examples = os.path.join(ROOT, "examples")
    for name in ("inpaint4x4", "bimodal2d"):
        spec = AnalyticSpec.load(os.path.join(examples, f"{name}.json"))
        model, y = ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None]  # y on the CPU: the score keys its cache on it
        shape = (samples, *spec.shape)
        sample(model, y, NoiseSource(0, shape, device=device), steps=10)  # untimed warm-up
        if name == "inpaint4x4":  # the grid
            for sampler in ("ddpm", "ddim"):
                for steps, windows in ((100, (16, 64)), (1000, (16, 64, 256))):
                    for window in windows:
                        for tol in (1e-1, 1e-2, 1e-3):
                            compare("grid", name, model, y, shape, torch.float64, device, sampler, steps, window,
                                    tol, GRID_SCHEMES, 0, rows)
        for sampler, steps, window in (("ddpm", 1000, 256), ("ddim", 100, 64)):  # the configurations
            for seed in range(5):
                compare("seeds", name, model, y, shape, torch.float64, device, sampler, steps, window, 0.1,
                        SEED_SCHEMES, seed, rows)
    return {"samples": samples, "rows": rows}


def run_digits(args, device) -> dict:
    from lightning_mlmc.module import load_score_module

    module = load_score_module(args.checkpoint)
    model, shape = module.model.to(device).eval(), tuple(module.operator.shape)
    y = torch.as_tensor(np.load(args.observation)["y"])[None].to(device)
    rows = []
    with torch.no_grad():
        sample(model, y, NoiseSource(0, (4, *shape), dtype=torch.float32, device=device), steps=10)  # warm-up
        for sampler, steps, window, n, seeds in (("ddim", 100, 64, 8, range(5)), ("ddpm", 1000, 256, 4, range(2))):
            for seed in seeds:
                compare("digits", "digits_superres", model, y, (n, *shape), torch.float32, device, sampler, steps,
                        window, 0.1, DIGITS_SCHEMES, seed, rows)
    return {"checkpoint": os.path.relpath(args.checkpoint, ROOT), "observation": os.path.relpath(args.observation, ROOT),
            "parameters": sum(p.numel() for p in model.parameters()), "rows": rows}


def write(path: str, payload: dict, device) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine_info(), "device": str(device), **payload}, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=["analytic", "piadm", "digits", "solvers"],
                    default=["analytic", "piadm", "digits", "solvers"])
    ap.add_argument("--samples", type=int, default=64, help="samples per run on the analytic problems")
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "runs", "digits_superres", "checkpoints", "last.ckpt"),
                    help="trained digits model (`make demo` writes it); the digits part is skipped when missing")
    ap.add_argument("--observation", default=os.path.join(ROOT, "runs", "digits_superres", "observation_0.npz"))
    ap.add_argument("--device", default="cpu", help="where the network runs: cpu or cuda")
    ap.add_argument("--suffix", default="", help="appended to the result file names (e.g. _cuda)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible")
    torch.set_num_threads(os.cpu_count() or 1)
    out = lambda name: os.path.join(RESULTS, f"{name}{args.suffix}.json")  # noqa: E731
    if "analytic" in args.parts:
        write(out("picard"), run_analytic(args.samples, device), device)
    if "piadm" in args.parts:
        from benchmarks.picard_piadm import run_piadm

        write(out("picard_piadm"), run_piadm(), device)
    if "solvers" in args.parts:
        from benchmarks.picard_solvers import run_solvers

        write(out("picard_solvers"), run_solvers(), device)
    if "digits" in args.parts:
        if os.path.isfile(args.checkpoint):
            write(out("picard_digits"), run_digits(args, device), device)
        else:
            print(f"no trained model at {args.checkpoint}: run `make demo` first for the digits rows")


if __name__ == "__main__":
    main()
