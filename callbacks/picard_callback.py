"""``PicardCallback``: sequential against Picard-parallel sampling on validation observations, same seed."""

from __future__ import annotations

import os

import numpy as np
import pytorch_lightning as pl
import torch
from typing_extensions import override

import callbacks.uq_logging as uq_logging
from lightning_mlmc.errors import InputError
from lightning_mlmc.figures import residual_plot
from lightning_mlmc.picard import picard_sample
from lightning_mlmc.samplers import DEFAULT_SAMPLER, SamplerName, SlideRule, get_sampler
from lightning_mlmc.sampling import NoiseSource, call_model, sample


class PicardCallback(uq_logging.ValidationUQCallback):
    """Times the sequential sampler and the sliding-window Picard sampler (ParaDiGMS) on the EMA weights.

    Both use the same ``NoiseSource`` (seed ``seed``) on ``samples_per_observation`` samples of each of the
    first ``observations`` validation observations, in one batch. Logs ``picard/rounds``, ``nfe``, ``steps``,
    ``speedup_rounds`` (steps / rounds), ``speedup_wall`` (median sequential over median Picard wall time of
    ``repeats`` alternated runs after an untimed warm-up),
    ``max_abs_diff`` (max |Picard - sequential|) and the residual-per-round plot. Runs on rank zero.

    Args:
        steps: sampler steps; sampler: a sampler of the registry (``lightning_mlmc.samplers``; default ddpm).
        window, tol, anderson, slide: the Picard options (window >= 1; tol > 0, in units of each step's DDPM noise
            std; triangular Anderson memory, 0 = plain Picard; slide rule ``paradigms`` or ``prefix``); None, the
            default, takes the sampler's measured default (``SamplerSpec.picard``).
        observations, samples_per_observation: batch; every_n_epochs: cadence (and once at the end of fit);
        repeats: timed runs of each sampler after a warm-up, alternated (the wall speedup is the ratio of the medians).
    """

    def __init__(self, steps: int = 100, window: int | None = None, tol: float | None = None,
                 anderson: int | None = None, slide: SlideRule | None = None, sampler: SamplerName = DEFAULT_SAMPLER,
                 observations: int = 2, samples_per_observation: int = 4, every_n_epochs: int = 1, seed: int = 0,
                 repeats: int = 3):
        if steps < 1:
            raise InputError(f"steps: expected >= 1, got {steps}")
        options = get_sampler(sampler).picard.with_overrides(window, tol, anderson, slide)  # validated there
        if observations < 1 or samples_per_observation < 1:
            raise InputError("observations/samples_per_observation: expected at least 1 of each")
        if every_n_epochs < 1:
            raise InputError(f"every_n_epochs: expected >= 1, got {every_n_epochs}")
        if repeats < 1:
            raise InputError(f"repeats: expected >= 1, got {repeats}")
        self.repeats = int(repeats)
        self.steps, self.window, self.tol = int(steps), options.window, float(options.tol)
        self.anderson, self.slide = options.anderson, options.slide
        self.sampler, self.observations, self.samples = sampler, int(observations), int(samples_per_observation)
        self.every_n_epochs, self.seed = int(every_n_epochs), int(seed)

    @override
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        if not trainer.is_global_zero:
            return {}
        _, y = uq_logging.validation_observations(trainer, self.observations)
        y = y.repeat_interleave(self.samples, dim=0).to(pl_module.device)
        shape = (y.shape[0], *pl_module.operator.shape)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                noise = lambda: NoiseSource(self.seed, shape, dtype=torch.float32, device=pl_module.device)  # noqa: E731
                self._warm_up(pl_module, y, shape)
                seq_walls, par_walls = [], []
                for _ in range(self.repeats):  # alternated, so a slow spell of the machine hits both
                    seq = sample(pl_module.model, y, noise(), steps=self.steps, sampler=self.sampler)
                    par = picard_sample(pl_module.model, y, noise(), steps=self.steps, sampler=self.sampler,
                                        window=self.window, tol=self.tol, anderson=self.anderson,
                                        slide=self.slide)
                    seq_walls.append(seq.wall_seconds)
                    par_walls.append(par.wall_seconds)
        finally:
            pl_module.train(was_training)
        scalars = {
            "picard/rounds": par.rounds,
            "picard/nfe": par.nfe,
            "picard/steps": self.steps,
            "picard/speedup_rounds": self.steps / par.rounds,
            "picard/speedup_wall": float(np.median(seq_walls) / np.median(par_walls)),
            "picard/max_abs_diff": float((par.samples - seq.samples).abs().max()),
        }
        uq_logging.log_scalars(trainer, scalars)
        path = os.path.join(uq_logging.media_folder(trainer), "picard_residuals.png")
        residual_plot(path, par.stats["residuals"], self.tol)
        uq_logging.log_images(trainer, "picard/residuals", [path])
        return scalars

    def _warm_up(self, pl_module, y, shape) -> None:
        """One untimed network call at each batch size the samplers use (the sequential batch and a full
        Picard window of it): first calls pay for allocations and kernel selection."""
        for copies in (1, min(self.window, self.steps)):
            x = torch.zeros((copies * shape[0], *shape[1:]), device=pl_module.device)
            call_model(pl_module.model, x, y.repeat(copies, *([1] * (y.dim() - 1))), 0.5)
