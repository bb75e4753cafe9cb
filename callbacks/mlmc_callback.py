"""``MLMCCallback``: adaptive MLMC posterior mean and std maps for fixed validation observations, logged as a UQ
dashboard."""

from __future__ import annotations

import os
import shlex
from dataclasses import replace
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

import callbacks.mlmc_dashboard as dashboard
import callbacks.uq_logging as uq_logging
from lightning_mlmc.errors import InputError, WeakConvergenceFailure
from lightning_mlmc.figures import plot_levels, uq_map, zscore_histogram
from lightning_mlmc.mlmc import MLMCConfig, run_mlmc, run_mlmc_test
from lightning_mlmc.mlmc.complexity import DEFAULT_EPS, predict_complexity
from lightning_mlmc.posterior import coverage, psnr, ssim


CLIP = 2.0  # the callback's clip: early in training samples can be far outside the data range [-1, 1]


class MLMCCallback(uq_logging.ValidationUQCallback):
    """Runs Giles' adaptive MLMC (``lightning_mlmc.mlmc.mlmc``) on the EMA weights at validation time.

    For each of the first ``observations`` fixed validation observations it estimates the posterior mean
    and pixel-std maps (payoff ``mean_std``: target RMSE ``eps`` over both maps, ``maps.mean_std_maps``; each
    map's RMSE estimate is logged as ``mlmc/mean_rmse`` and ``mlmc/std_rmse``, and coverage is measured
    against sqrt(std^2 + mean_rmse^2), the spread of truth minus an estimated mean) with ``config``, the ``MLMCConfig`` the command line builds (the library's defaults unless an option
    says otherwise), and seed ``seed + i`` for observation i. It logs the configuration (the W&B run config,
    ``config`` in uq_summary.json) and prints the ``lightning-mlmc mlmc`` command (every field of ``config``
    as an option, ``--device``, the run's last checkpoint and observation 0 written as
    ``mlmc_observation_0.npy`` in the run folder) that reproduces observation 0's estimate bit for bit on the
    checkpoint saved at that step (same batch size, hence the same noise streams, whatever the N_l).

    Logs (DESIGN.md section 7): ``mlmc/alpha``, ``beta``, ``gamma`` (means over observations), ``nfe``,
    ``nfe_mc`` (totals), ``savings`` (total nfe_mc / total nfe), ``savings_same_grid``, ``rmse_estimate``
    (max: the RMSE each run certifies, at most eps when it converged) and ``rmse_bound`` (max: an upper
    confidence bound, which may exceed eps), calibration against the validation truth (``psnr``, ``ssim``, ``coverage_1sd``,
    ``coverage_2sd``), the ``levels`` table, the ``convergence`` plots, the ``uq`` map and the ``zscore``
    histogram; what MLMC would buy at other eps, predicted from each run's levels by the driver's own rules
    (``lightning_mlmc.mlmc.complexity``): ``mlmc/predicted_savings`` at ``predict_eps`` (total predicted
    plain-MC NFEs over total predicted MLMC NFEs) with its bootstrap ``predicted_savings_sd``,
    ``predicted_nfe``, ``predicted_nfe_mc``, the ``complexity`` table over ``complexity_eps`` and its
    cost-versus-eps plot ``complexity_plot``; and ``mlmc/trends`` (alpha, beta, predicted savings, coverage
    and PSNR against the global step, a PNG for loggers without charts; every scalar is also a W&B line chart
    against ``trainer/global_step``). With ``rates: mlmc_test`` the test's NFEs (its automatic-Lmin pilot
    included) are ``mlmc/rate_test_nfe``; ``mlmc/nfe`` stays the adaptive runs' (as the CLI's) and
    ``mlmc/nfe_total`` counts both. Under DDP every rank takes a share of each level's samples (the sums are
    all-reduced) and rank zero predicts and logs.

    Args:
        eps: target RMSE (> 0).
        observations: how many validation observations (>= 1).
        every_n_epochs: run every n validation epochs, and once more at the end of fit.
        mlmc: the ``MLMCConfig`` of the runs, the same object (and options) as ``lightning-mlmc mlmc``'s; in a
            LightningCLI config ``mlmc: {lmin: auto, lmax: 10, ...}``, the seed's scheme as ``{grid: uniform,
            coupling: weighted, lmin: 3}``, a distilled student on the coarse levels as ``{coarse_checkpoint:
            DIR}``. Default: the library's defaults with ``clip`` 2.0. Its payoff is always ``mean_std`` (the
            callback logs the mean and std maps) and its seed is observation 0's (``seed + i`` for i).
        rates: ``adaptive`` fits alpha, beta, gamma from the adaptive run's levels; ``mlmc_test`` fits them
            from Giles' fixed-level ``mlmc_test`` (``rate_samples`` samples on every level lmin..lmax, as
            ``lightning-mlmc mlmc-test --levels lmax --samples rate_samples``), whose table (with kurtosis
            and the consistency check) is then the logged ``mlmc/levels``; the estimate, NFEs and savings
            still come from the adaptive run.
        predict_eps: the eps of ``mlmc/predicted_savings``; complexity_eps: the eps of the complexity table.
        bootstrap: parametric-bootstrap replicates of the prediction at ``predict_eps`` (0: no spread).

    The default eps 0.1 keeps a validation affordable for an early network too (the cost grows like eps^-2:
    at eps 0.02 a run on the digits model after 15 epochs planned 4 million NFEs). Its prediction at eps
    0.01 is rough: on the trained digits model a run draws about 4 samples a level and the predicted savings
    scatter from 0.08x to 1.2x over three seeds against a measured 1.08x (benchmarks/mlmc_prediction.py);
    at eps 0.02 (the digits configs) a run costs 2.7-5.4k NFEs there and predicts 0.76x-1.24x.
    """

    def __init__(self, eps: float = 0.1, observations: int = 2, every_n_epochs: int = 1,
                 mlmc: MLMCConfig | None = None, rates: Literal["adaptive", "mlmc_test"] = "adaptive",
                 rate_samples: int = 200, predict_eps: float = 0.01, complexity_eps: list[float] = list(DEFAULT_EPS),
                 bootstrap: int = 16):
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
        if not predict_eps > 0:
            raise InputError(f"predict_eps: expected a positive number, got {predict_eps}")
        if not complexity_eps or not all(e > 0 for e in complexity_eps):
            raise InputError(f"complexity_eps: expected a list of positive numbers, got {complexity_eps}")
        if bootstrap < 0 or bootstrap == 1:
            raise InputError(f"bootstrap: expected 0 (no spread) or at least 2 replicates, got {bootstrap}")
        if mlmc is not None and not isinstance(mlmc, MLMCConfig):
            raise InputError(f"mlmc: expected an MLMCConfig (its options as a mapping in a config file), got {mlmc!r}")
        # Everything else is the command line's MLMC configuration, validated there.
        self.config = replace(mlmc or MLMCConfig(clip=CLIP), payoff="mean_std")
        self._coarse = None  # the loaded coarse network of config.coarse_checkpoint
        self.eps, self.observations, self.every_n_epochs = float(eps), int(observations), int(every_n_epochs)
        self.rates, self.rate_samples = rates, int(rate_samples)
        self.predict_eps, self.complexity_eps = float(predict_eps), [float(e) for e in complexity_eps]
        self.bootstrap = int(bootstrap)
        self.last_tests: list = []
        self.last_results: list = []
        self.last_predictions: list = []
        self.last_command: list[str] = []

    def cli_command(self, checkpoint: str, observation: str, out: str, device: str = "cpu",
                    index: int = 0) -> list[str]:
        """The ``lightning-mlmc mlmc`` command that reproduces observation ``index``'s estimate (given its y
        as ``observation``) on ``checkpoint``: every option of ``config``, its seed ``seed + index``."""
        config = replace(self.config, seed=self.config.seed + index)
        return ["lightning-mlmc", "mlmc", "--checkpoint", checkpoint, "--observation", observation, "--device", device,
                *config.to_cli_args(), "--eps", repr(self.eps), "--out", out]

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
        if not trainer.is_global_zero:
            return {}
        for i, r in enumerate(results):  # Giles' warnings, and a switch to plain MC, reach the console
            for w in r.warnings + ([f"finished as plain MC at {r.mc_reason}"] if r.method == "mc" else []):
                rank_zero_warn(f"MLMCCallback, observation {i}: {w}")
        self.last_predictions = [self.predict(r, i) for i, r in enumerate(results)]
        self._log_command(trainer, pl_module, y)
        return self._log(trainer, pl_module, truth, y, results)

    def predict(self, result, i: int = 0):
        """What runs of this configuration would cost at the complexity table's eps (``predict_complexity``)
        from observation ``i``'s run ``result``; None, with a warning, when it has too few levels to predict from."""
        c = self.config
        try:
            return predict_complexity(result, self.complexity_eps, predict_eps=self.predict_eps, config=c,
                                      replicates=self.bootstrap, seed=c.seed + i)
        except (InputError, ArithmeticError, ValueError) as e:  # a diagnostic: it never stops training
            rank_zero_warn(f"MLMCCallback: no complexity prediction for observation {i}: {type(e).__name__}: {e}")
            return None

    def _log_command(self, trainer, pl_module, y) -> None:
        """Write observation 0's y into the run folder, log the configuration and print the command."""
        folder = uq_logging.run_folder(trainer)
        observation = os.path.join(folder, "mlmc_observation_0.npy")
        os.makedirs(folder, exist_ok=True)
        np.save(observation, y[0].cpu().numpy())
        self.last_command = self.cli_command(dashboard.checkpoint_path(trainer), observation,
                                             os.path.join(folder, "mlmc_observation_0.json"), str(pl_module.device))
        settings = {"eps": self.eps, "rates": self.rates, "predict_eps": self.predict_eps}
        uq_logging.log_config(trainer, {"mlmc": {**self.config.to_json(), **settings,
                                                 "command": shlex.join(self.last_command)}})
        print(f"MLMCCallback, step {trainer.global_step}: observation 0 is reproduced by\n  "
              + shlex.join(self.last_command), flush=True)

    def _estimate(self, pl_module, y, i):
        if self.config.coarse_checkpoint is not None and self._coarse is None:
            from lightning_mlmc.cli.common import load_coarse_model

            self._coarse = load_coarse_model(self.config.coarse_checkpoint, pl_module.model)
        levels = self.config.level_sampler(pl_module.model, y, tuple(pl_module.operator.shape), dtype=torch.float32,
                                           device=pl_module.device, seed=self.config.seed + i, coarse_model=self._coarse)
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
        std = est[:, n:].reshape(truth.shape).float()  # payoff mean_std: [mean map, std map]
        # Coverage with the maps' own uncertainty in mind: truth - estimated mean has the posterior's variance
        # plus the mean map's squared error, so it is measured against sqrt(std^2 + rmse_mean^2).
        mean_rmse = torch.tensor([r.maps.get("mean_rmse", 0.0) for r in results], dtype=torch.float32)
        spread = (std**2 + mean_rmse.reshape(-1, *([1] * (std.dim() - 1))) ** 2).sqrt()
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
            "mlmc/rmse_estimate": max(r.rmse_estimate for r in results),
            "mlmc/psnr": psnr(mean, truth),
            "mlmc/ssim": ssim(mean, truth) if truth.dim() == 4 else float("nan"),
            "mlmc/coverage_1sd": coverage(mean, spread, truth, 1.0),
            "mlmc/coverage_2sd": coverage(mean, spread, truth, 2.0),
            "mlmc/mean_rmse": max(r.maps.get("mean_rmse", float("nan")) for r in results),
            "mlmc/std_rmse": max(r.maps.get("std_rmse", float("nan")) for r in results),
            "mlmc/converged": float(all(r.converged for r in results)),
            **dashboard.complexity_scalars(self.last_predictions),
        }
        if self.last_tests:
            scalars["mlmc/rate_test_nfe"] = sum(t.nfe + t.pilot_nfe for t in self.last_tests)
        scalars["mlmc/nfe_total"] = nfe + scalars.get("mlmc/rate_test_nfe", 0.0)
        uq_logging.log_scalars(trainer, scalars)
        folder = uq_logging.media_folder(trainer)
        dashboard.log_complexity(trainer, self.last_predictions, folder)
        dashboard.log_trends(trainer, folder)
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
        zscore_histogram(path, ((truth - mean) / spread.clamp_min(1e-8)).numpy())
        uq_logging.log_images(trainer, "mlmc/zscore", [path])
        return scalars
