"""MLMC and plain MC wall time on each device, side by side in one run, on the trained digits model.

    python -m benchmarks.mlmc_device --devices cpu cuda [--eps 0.01] [--model superres]

For each device: one adaptive MLMC run (log-SNR grid, naive coupling, automatic Lmin, M = 2, the same seed)
and plain MC at matched eps on the finest grid MLMC chose (N = V[P_L] / ((1 - theta) eps^2)), with their
NFEs, wall times, the time inside the network (synchronised on a GPU) and the wall-clock savings; then the
largest difference between the devices' MLMC estimates (the noise is drawn on the CPU, so the devices
sample the same paths up to float32 rounding). Writes benchmarks/results/mlmc_device.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from benchmarks.machine import machine_info
from benchmarks.mlmc_bench import (ROOT, TRAINED_MODELS, label, log, make_scheme, run_mc, run_mlmc, slim,
                                   trained_model_paths, trained_target, write_result)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--model", choices=sorted(TRAINED_MODELS), default="superres")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mlmc_device.json"))
    args = ap.parse_args(argv)
    if any(torch.device(d).type == "cuda" for d in args.devices) and not torch.cuda.is_available():
        ap.error("--devices: cuda asked for, but no CUDA GPU is visible")
    torch.set_num_threads(os.cpu_count() or 1)
    checkpoint, observation = trained_model_paths(args.model)
    scheme = make_scheme(grid="logsnr", coupling="naive", lmin="auto")
    rows, estimates = [], {}
    for device in args.devices:
        target = trained_target(checkpoint, observation, TRAINED_MODELS[args.model], device=device)
        run_mlmc(target, scheme, 0.1, args.seed + 1)  # untimed warm-up (CUDA context, kernels, autotuning)
        ml = run_mlmc(target, scheme, args.eps, args.seed)
        mc = run_mc(target, scheme, ml["mc_steps"], ml["mc_samples"], args.seed + 1000)
        estimates[device] = np.asarray(ml["estimate"])
        rows.append({"device": device, "mlmc": slim(ml), "mc": slim(mc),
                     "savings_nfe": mc["nfe"] / ml["nfe"], "savings_wall": mc["wall_seconds"] / ml["wall_seconds"]})
        log(f"{device}: MLMC {ml['nfe']:.0f} NFEs in {ml['wall_seconds']:.1f} s (network {ml['network_fraction']:.0%}), "
            f"MC {mc['nfe']} NFEs in {mc['wall_seconds']:.1f} s: savings {rows[-1]['savings_nfe']:.2f}x NFE, "
            f"{rows[-1]['savings_wall']:.2f}x wall")
    first = estimates[args.devices[0]]
    result = {"machine": machine_info(), "model": TRAINED_MODELS[args.model],
              "observation": os.path.relpath(observation, ROOT), "scheme": label(scheme), "eps": args.eps,
              "rows": rows,
              "max_abs_estimate_diff": {d: float(np.abs(e - first).max()) for d, e in estimates.items()}}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
