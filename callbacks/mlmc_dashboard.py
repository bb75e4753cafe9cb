"""What ``MLMCCallback`` logs beyond one run's numbers: the predicted complexity across eps (table, plot and
``mlmc/predicted_savings`` with its bootstrap spread), the training trends, and the command line that
reproduces observation 0."""

from __future__ import annotations

import math
import os

import numpy as np
import pytorch_lightning as pl

import callbacks.uq_logging as uq_logging
from lightning_mlmc.figures import complexity_plot, trends_plot
from lightning_mlmc.mlmc.complexity import ComplexityPrediction

TREND_KEYS = ["mlmc/alpha", "mlmc/beta", "mlmc/predicted_savings", "mlmc/coverage_1sd", "mlmc/coverage_2sd",
              "mlmc/psnr"]


def complexity_scalars(predictions: list[ComplexityPrediction | None]) -> dict[str, float]:
    """Totals over the observations at ``predict_eps``: predicted MLMC and plain-MC NFEs, their ratio (as
    ``mlmc/savings`` is the ratio of totals) and its bootstrap standard deviation (replicate k of the total
    is the sum of every observation's replicate k). Observations without a prediction (None) are left out;
    none at all: no scalars."""
    predictions = [p for p in predictions if p is not None]
    if not predictions:
        return {}
    rows = [p.row(p.predict_eps) for p in predictions]
    nfe, nfe_mc = sum(r.nfe for r in rows), sum(r.nfe_mc for r in rows)
    boot = [p.replicates for p in predictions]
    k = min(len(b) for b in boot)
    ratios = [sum(b[i][1] for b in boot) / sum(b[i][0] for b in boot) for i in range(k)]
    return {"mlmc/predicted_savings": nfe_mc / nfe,
            "mlmc/predicted_savings_sd": float(np.std(ratios, ddof=1)) if k > 1 else math.nan,
            "mlmc/predicted_nfe": nfe, "mlmc/predicted_nfe_mc": nfe_mc}


def log_complexity(trainer: pl.Trainer, predictions: list[ComplexityPrediction | None], folder: str) -> None:
    """The ``mlmc/complexity`` table (one row per observation and eps) and the cost-versus-eps plot of the
    totals over the observations (``mlmc/complexity_plot``); observations without a prediction left out."""
    columns = ["observation", *ComplexityPrediction.COLUMNS]
    rows = [[i, *row] for i, p in enumerate(predictions) if p is not None for row in p.table()]
    predictions = [p for p in predictions if p is not None]
    if not predictions:
        return
    uq_logging.log_table(trainer, "mlmc/complexity", columns, rows)
    eps = [r.eps for r in predictions[0].rows]
    total = lambda key: [sum(getattr(p.rows[j], key) for p in predictions) for j in range(len(eps))]  # noqa: E731
    path = os.path.join(folder, "mlmc_complexity.png")
    complexity_plot(path, eps, total("nfe"), total("nfe_mc"),
                    title=f"predicted cost, {len(predictions)} observation(s), step {trainer.global_step}")
    uq_logging.log_images(trainer, "mlmc/complexity_plot", [path])


def log_trends(trainer: pl.Trainer, folder: str) -> None:
    """alpha, beta, predicted savings, coverage and PSNR against the global step so far (from
    uq_summary.json, so the PNG serves users without W&B; W&B also charts every scalar against
    ``trainer/global_step``)."""
    history = [h for h in uq_logging.read_summary(trainer)["history"] if "mlmc/alpha" in h]
    path = os.path.join(folder, "mlmc_trends.png")
    trends_plot(path, history, TREND_KEYS)
    uq_logging.log_images(trainer, "mlmc/trends", [path])


def checkpoint_path(trainer: pl.Trainer) -> str:
    """Where the run's last checkpoint is written (``ModelCheckpoint(save_last=True)``), else a placeholder."""
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "save_last", False) and cb.dirpath:
            return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
    return "CHECKPOINT.ckpt"
