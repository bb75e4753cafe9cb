"""DPM-Solver++(2M) against DDIM: weak order on the exact oracle, and Picard over either (see benchmarks/picard.py).

Weak order: gaussian_inpaint(4, 4), the exact law of each solver's output (affine in x_T) against the exact
probability-flow map's law from the same start (``GaussianOracle.flow_law``: only the discretisation error),
and against the exact posterior (discretisation plus the error of starting from N(0, I) at t = 1), on four
grid families, 8..512 steps; slopes fitted over 32..256 steps. Picard: inpaint4x4's exact score, 64 samples,
seed 0, the log-SNR grid, both solvers, windows 16 and the whole grid, tol 0.1 and 0.01, plain and Anderson m = 2.
"""

import os

import numpy as np
import torch

from lightning_mlmc import AnalyticSpec, ExactPosteriorEps, NoiseSource, TimeGrid, exact_posterior, sample
from lightning_mlmc.gaussian_oracle import GaussianOracle, affine_law
from lightning_mlmc.picard import picard_sample
from lightning_mlmc.problems import gaussian_inpaint_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (8, 16, 32, 64, 128, 256, 512)


def weak_order() -> list[dict]:
    spec = gaussian_inpaint_spec(4, 4)
    model, y = ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None]
    flow, post = GaussianOracle(spec).flow_law(), exact_posterior(spec)
    rows = []
    for kind in ("logsnr", "uniform", "edm", "polynomial"):
        for name in ("ddim", "dpm2m"):
            errs = []
            for n in STEPS:
                run = lambda nz: sample(model, y, nz, sampler=name, steps=n, grid=TimeGrid(kind)).samples  # noqa: E731
                law = affine_law(run, spec.shape)
                err = float((law.second_moment - flow.second_moment).pow(2).mean().sqrt())
                errs.append(err)
                rows.append({"kind": "weak", "grid": kind, "solver": name, "steps": n, "err_flow_m2": err,
                             "err_posterior_m2": float((law.second_moment - post.second_moment).pow(2).mean().sqrt())})
            fit = [i for i, n in enumerate(STEPS) if 32 <= n <= 256]
            slope = float(np.polyfit(np.log([STEPS[i] for i in fit]), np.log([errs[i] for i in fit]), 1)[0])
            rows.append({"kind": "slope", "grid": kind, "solver": name, "slope": slope})
            print(rows[-1], flush=True)
    return rows


def picard_rounds() -> list[dict]:
    spec = AnalyticSpec.load(os.path.join(ROOT, "examples", "inpaint4x4.json"))
    model, y, shape = ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], (64, *spec.shape)
    grid, rows = TimeGrid("logsnr"), []
    for name in ("ddim", "dpm2m"):
        for steps in (25, 50, 100):
            ref = sample(model, y, NoiseSource(0, shape), sampler=name, steps=steps, grid=grid).samples
            spread = float(ref.reshape(shape[0], -1).std(0).pow(2).mean().sqrt())
            for window in sorted({16, steps}):
                for tol in (0.1, 0.01):
                    for anderson in (0, 2):
                        out = picard_sample(model, y, NoiseSource(0, shape), steps=steps, grid=grid, sampler=name,
                                            window=window, tol=tol, anderson=anderson)
                        rows.append({"kind": "picard", "solver": name, "steps": steps, "window": window, "tol": tol,
                                     "anderson": anderson, "rounds": out.rounds, "nfe": out.nfe,
                                     "rms_dev_over_spread": float((out.samples - ref).pow(2).mean().sqrt()) / spread})
                        print(rows[-1], flush=True)
    return rows


def run_solvers() -> dict:
    return {"rows": weak_order() + picard_rounds()}
