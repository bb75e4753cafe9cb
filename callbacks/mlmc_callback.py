"""``MLMCCallback``: adaptive MLMC posterior moments for fixed validation observations, logged as a UQ dashboard."""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from typing_extensions import override

import callbacks.uq_logging as uq_logging
from lightning_mlmc.errors import InputError, WeakConvergenceFailure
from lightning_mlmc.figures import plot_levels, uq_map, zscore_histogram
from lightning_mlmc.mlmc import MLMCConfig, run_mlmc, run_mlmc_test
from lightning_mlmc.posterior import coverage, psnr, ssim


class MLMCCallback(uq_logging.ValidationUQCallback):
    """Runs Giles' adaptive MLMC (``lightning_mlmc.mlmc.mlmc``) on the EMA weights at validation time.

    For each of the first ``observations`` fixed validation observations it estimates the posterior mean
    and second moment in one run (payoff ``moments`` = [x, x^2], target RMSE ``eps`` averaged over both),
    with seed ``seed + i`` for observation i; observation 0 therefore reproduces
    ``lightning-mlmc mlmc --checkpoint CKPT --observation Y --payoff moments --clip C --eps E --seed S``
    with the same M, lmin, lmax, n0 and sampler. Logs (DESIGN.md section 7): ``mlmc/alpha``, ``beta``,
    ``gamma`` (means over observations), ``nfe``, ``nfe_mc`` (totals), ``savings`` (total nfe_mc / total
    nfe), ``rmse_bound`` (max), calibration against the validation truth (``psnr``, ``ssim``,
    ``coverage_1sd``, ``coverage_2sd``), the ``levels`` table, the ``convergence`` plots, the ``uq`` map
    and the ``zscore`` histogram. Under DDP every rank takes a share of each level's samples (the sums are
    all-reduced) and rank zero logs.

    Args:
        eps: target RMSE (> 0).
        observations: how many validation observations (>= 1).
        every_n_epochs: run every n validation epochs, and once more at the end of fit.
        scheme: ``default`` (the library's: log-SNR grid, naive coupling, automatic Lmin) or ``seed`` (the
            seed's uniform grid, weighted coupling, Lmin 3); the options below override it (None: the
            scheme's value), exactly as ``lightning-mlmc mlmc`` does.
        M, lmin, lmax, n0: MLMC refinement factor, coarsest/finest level (``lmin: auto`` picks Lmin from a
            coupled pilot run), largest pilot per level.
        sampler: ``ddpm`` or ``ddim``.
        grid, coupling: the time-grid family (``uniform``, ``polynomial``, ``logsnr``, ``edm``; ``rho`` for
            the warps) and the coarse-noise coupling (``naive``, ``weighted`` or ``jacobian`` with its
            ``data_std``), as on the CLI.
        seed: base seed.
        batch_size: samples per batched call.
        rates: ``adaptive`` fits alpha, beta, gamma from the adaptive run's levels; ``mlmc_test`` fits them
            from Giles' fixed-level ``mlmc_test`` (``rate_samples`` samples on every level lmin..lmax, as
            ``lightning-mlmc mlmc-test --levels lmax --samples rate_samples``), whose table (with kurtosis
            and the consistency check) is then the logged ``mlmc/levels``; the estimate, NFEs and savings
            still come from the adaptive run.
        clip: clamp samples to [-clip, clip] before the payoff (images live in [-1, 1]). Early in training
            a network's samples can be far outside the data range; without a clip their variance would
            make MLMC ask for an enormous number of samples. ``null`` disables it.
    """

    def __init__(self, eps: float = 0.1, observations: int = 2, every_n_epochs: int = 1,
                 scheme: Literal["default", "seed"] = "default", M: int | None = None,
                 lmin: int | Literal["auto"] | None = None, lmax: int | None = None, n0: int | None = None,
                 sampler: Literal["ddpm", "ddim"] | None = None,
                 grid: Literal["uniform", "polynomial", "logsnr", "edm"] | None = None, rho: float | None = None,
                 coupling: Literal["naive", "weighted", "jacobian"] | None = None, data_std: float | None = None,
                 seed: int = 0, batch_size: int | None = None, clip: float | None = 2.0,
                 rates: Literal["adaptive", "mlmc_test"] = "adaptive", rate_samples: int = 200):
        if not eps > 0:
            raise InputError(f"eps: expected a positive number, got {eps}")
        if observations < 1:
            raise InputError(f"observations: expected at least 1 validation observation, got {observations}")
        if every_n_epochs < 1:
            raise InputError(f"every_n_epochs: expected >= 1, got {every_n_epochs}")
        if rates not in ("adaptive", "mlmc_test"):
            raise InputError(f"rates: expected adaptive or mlmc_test, got {rates!r}")
        if rates == "mlmc_test" and rate_samples < 2:
            raise InputError("rates: mlmc_test needs rate_samples >= 2")
        # Everything else is the command line's MLMC configuration (its defaults unless set), validated there.
        self.config = MLMCConfig.from_scheme(scheme, grid=grid, rho=rho, coupling=coupling, data_std=data_std,
                                             sampler=sampler, M=M, lmin=lmin, lmax=lmax, n0=n0, payoff="moments",
                                             clip=clip, batch_size=batch_size, seed=seed)
        self.eps, self.observations, self.every_n_epochs = float(eps), int(observations), int(every_n_epochs)
        self.rates, self.rate_samples = rates, int(rate_samples)
        self.last_tests: list = []
        self.last_results: list = []

    @override
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        truth, y = uq_logging.validation_observations(trainer, self.observations)
        was_training = pl_module.training
        pl_module.eval()
        self.last_tests = []
        try:
            with torch.no_grad():
                results = [self._estimate(pl_module, y[i:i + 1].to(pl_module.device), i) for i in range(len(y))]
        finally:
            pl_module.train(was_training)
        self.last_results = results
        if trainer.is_global_zero:
            return self._log(trainer, pl_module, truth, y, results)
        return {}

    def _estimate(self, pl_module, y, i):
        levels = self.config.level_sampler(pl_module.model, y, tuple(pl_module.operator.shape), dtype=torch.float32,
                                           device=pl_module.device, seed=self.config.seed + i)
        if self.rates == "mlmc_test":
            self.last_tests.append(run_mlmc_test(self.config, levels, self.config.lmax, self.rate_samples))
        try:
            return run_mlmc(self.config, levels, self.eps)
        except WeakConvergenceFailure as e:  # keep the estimate; it is flagged as not converged
            return e.result

    def _log(self, trainer, pl_module, truth, y, results) -> dict:
        n = truth[0].numel()
        est = torch.stack([torch.as_tensor(np.asarray(r.estimate), dtype=torch.float64) for r in results])
        mean = est[:, :n].reshape(truth.shape).float()
        std = (est[:, n:] - est[:, :n] ** 2).clamp_min(0).sqrt().reshape(truth.shape).float()
        truth = truth.float()
        nfe, nfe_mc = sum(r.nfe for r in results), sum(r.nfe_mc for r in results)
        fits = self.last_tests or results
        scalars = {
            "mlmc/alpha": np.mean([r.alpha for r in fits]),
            "mlmc/beta": np.mean([r.beta for r in fits]),
            "mlmc/gamma": np.mean([r.gamma for r in fits]),
            "mlmc/nfe": nfe,
            "mlmc/nfe_mc": nfe_mc,
            "mlmc/savings": nfe_mc / nfe,
            "mlmc/savings_same_grid": sum(r.nfe_mc_same_grid for r in results) / nfe,
            "mlmc/finished_as_mc": float(np.mean([r.method == "mc" for r in results])),
            "mlmc/rmse_bound": max(r.rmse_bound for r in results),
            "mlmc/psnr": psnr(mean, truth),
            "mlmc/ssim": ssim(mean, truth) if truth.dim() == 4 else float("nan"),
            "mlmc/coverage_1sd": coverage(mean, std, truth, 1.0),
            "mlmc/coverage_2sd": coverage(mean, std, truth, 2.0),
            "mlmc/converged": float(all(r.converged for r in results)),
        }
        uq_logging.log_scalars(trainer, scalars)
        folder = uq_logging.media_folder(trainer)
        if self.last_tests:
            rows = [[i, row.level, self.rate_samples, row.mean, row.var, row.cost, row.kurtosis, row.check]
                    for i, t in enumerate(self.last_tests) for row in t.rows]
            columns = ["observation", "level", "n_samples", "mean", "var", "cost", "kurtosis", "check"]
        else:
            rows = [[i, lv.level, lv.n_samples, lv.mean, lv.var, lv.cost] for i, r in enumerate(results) for lv in r.levels]
            columns = ["observation", "level", "n_samples", "mean", "var", "cost"]
        uq_logging.log_table(trainer, "mlmc/levels", columns, rows)
        plots = plot_levels(results[0].levels, os.path.join(folder, "mlmc_convergence"), M=self.config.M)
        uq_logging.log_images(trainer, "mlmc/convergence", plots[:2])
        if truth.dim() == 4:
            obs_img = pl_module.operator.condition(y.to(pl_module.device).float())[:, : truth.shape[1]].cpu()
            path = os.path.join(folder, "mlmc_uq.png")
            uq_map(path, obs_img, truth, mean, std, title=f"MLMC eps {self.eps:g}, step {trainer.global_step}")
            uq_logging.log_images(trainer, "mlmc/uq", [path])
        path = os.path.join(folder, "mlmc_zscore.png")
        zscore_histogram(path, ((truth - mean) / std.clamp_min(1e-8)).numpy())
        uq_logging.log_images(trainer, "mlmc/zscore", [path])
        return scalars
