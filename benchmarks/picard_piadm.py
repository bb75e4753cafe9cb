"""PIADM error-versus-rounds curves against the sequential samplers, every error exact (see benchmarks/picard.py).

On gaussian_inpaint(4, 4) (16 pixels, a single-Gaussian posterior) the exact score makes every fixed-schedule
sampler affine in its standard normal draws, so the law of its output is Gaussian and exact: the sequential
samplers' from the Gaussian oracle's recursion, PIADM's from ``affine_law``. Error: RMS over pixels of the
error in E[x^2] (the MLMC payoff), and of the error in the mean.
"""

import torch

from lightning_mlmc import ExactPosteriorEps, NoiseSource, TimeGrid, exact_posterior
from lightning_mlmc.gaussian_oracle import GaussianOracle, affine_law
from lightning_mlmc.picard import piadm_sample, piadm_times
from lightning_mlmc.problems import gaussian_inpaint_spec

SEQ_STEPS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
GRIDS = ((4, 8), (4, 16), (8, 8), (8, 16), (8, 32), (16, 16))
SWEEPS = (2, 3, 4, 6, 8)
# (label, piadm_sample keywords): PIADM-ODE's corrector off, with two sweeps per run, solved exactly
CORRECTORS = (("none", {}), ("k2", {"corrector": True, "corrector_sweeps": 2}), ("exact", {"corrector": True}))


def errors(law, post) -> dict:
    return {"err_m2": float((law.second_moment - post.second_moment).pow(2).mean().sqrt()),
            "err_mean": float((law.mean - post.mean).pow(2).mean().sqrt())}


def run_piadm() -> dict:
    spec = gaussian_inpaint_spec(4, 4)
    model, y = ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None]
    post, oracle = exact_posterior(spec), GaussianOracle(spec)
    rows = []
    for sampler in ("ddim", "ddpm"):
        for grid in ("uniform", "logsnr"):
            for n in SEQ_STEPS:
                rows.append({"kind": "sequential", "sampler": sampler, "grid": grid, "steps": n, "rounds": n, "nfe": n,
                             **errors(oracle.law(n, sampler, TimeGrid(grid)), post)})
            print(rows[-1], flush=True)
    for sampler in ("ddim", "ddpm"):
        for clock in ("logsnr", "ou"):
            for blocks, points in GRIDS:
                times = piadm_times(blocks, points, clock=clock)
                on_grid = errors(oracle.law(len(times) - 1, sampler, times=times), post)
                for sweeps in SWEEPS:
                    for label, kw in (CORRECTORS if sampler == "ddim" else CORRECTORS[:1]):
                        if clock == "ou" and label == "exact":
                            continue
                        run = lambda nz: piadm_sample(model, y, nz, blocks=blocks, points=points,  # noqa: E731
                                                      sweeps=sweeps, sampler=sampler, clock=clock, **kw)
                        cost = run(NoiseSource(0, (1, *spec.shape)))
                        rows.append({"kind": "piadm", "sampler": sampler, "clock": clock, "blocks": blocks,
                                     "points": points, "sweeps": sweeps, "corrector": label, "steps": len(times) - 1,
                                     "rounds": cost.rounds, "nfe": cost.nfe,
                                     **errors(affine_law(lambda nz: run(nz).samples, spec.shape), post),
                                     "seq_on_grid_err_m2": on_grid["err_m2"]})
                        print(rows[-1], flush=True)
    return {"problem": "gaussian_inpaint(4, 4)", "rows": rows}
