"""`make demo`: the main job on the bundled default.

Until the training issue lands, the bundled default is the analytic 4x4 inpainting problem
(examples/inpaint4x4.json, exact score): posterior samples, a Picard-parallel run of the same sampler
and an adaptive MLMC estimate of the pixel-wise second moment, with its convergence plots. Everything
goes to runs/demo/.
"""

import json
import os
import sys

import numpy as np

from lightning_mlmc.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = os.path.join(HERE, "examples", "inpaint4x4.json")


def run(*argv):
    rc = main(list(argv))
    if rc != 0:
        sys.exit(rc)


if __name__ == "__main__":
    out = os.path.join(HERE, "runs", "demo")
    os.makedirs(out, exist_ok=True)
    common = ["--problem", SPEC, "--seed", "0"]
    run("sample", *common, "--sampler", "ddpm", "--steps", "256", "--num-samples", "2000",
        "--out", os.path.join(out, "ddpm.npz"))
    run("sample", *common, "--sampler", "picard-ddpm", "--steps", "256", "--num-samples", "2000",
        "--window", "64", "--tol", "1e-3", "--out", os.path.join(out, "picard.npz"))
    run("mlmc", *common, "--eps", "0.02", "--lmin", "3", "--lmax", "12", "--grid", "polynomial", "--rho", "2", "--out", os.path.join(out, "mlmc.json"),
        "--plots", os.path.join(out, "plots"))
    seq, par = np.load(os.path.join(out, "ddpm.npz")), np.load(os.path.join(out, "picard.npz"))
    stats = json.loads(str(par["stats"]))
    r = json.load(open(os.path.join(out, "mlmc.json")))
    print("\nsummary")
    print(f"  Picard: {stats['rounds']} rounds for {stats['steps']} steps; max |picard - sequential| = "
          f"{np.abs(seq['samples'] - par['samples']).max():.2e}")
    print(f"  MLMC:   alpha {r['alpha']:.2f}  beta {r['beta']:.2f}  nfe {r['nfe']:.0f}  vs MC {r['nfe_mc']:.0f}  "
          f"savings {r['savings']:.2f}x  rmse bound {r['rmse_bound']:.3g}")
    print(f"  outputs in {out}")
