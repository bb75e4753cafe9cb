"""Logging for the UQ callbacks: scalars, images and tables to any Lightning logger, plus uq_summary.json.

With a ``WandbLogger``: images as ``wandb.Image``, tables as ``wandb.Table``, scalars in the history and
the run summary. With any other logger: scalars through ``log_metrics``; images and tables as PNG and CSV
files under ``<run folder>/uq/step_<global step>/``. Every scalar also goes to ``<run folder>/uq_summary.json``
(the latest values plus a history, the callbacks' settings and the latest table of each key), for users
without W&B. Call these on rank
zero only.
"""

from __future__ import annotations

import abc
import csv
import json
import math
import os
import shutil

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from typing_extensions import override


def run_folder(trainer: pl.Trainer) -> str:
    return trainer.default_root_dir


def media_folder(trainer: pl.Trainer) -> str:
    folder = os.path.join(run_folder(trainer), "uq", f"step_{trainer.global_step}")
    os.makedirs(folder, exist_ok=True)
    return folder


def log_scalars(trainer: pl.Trainer, scalars: dict[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=trainer.global_step)
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(scalars)
    _update_summary(trainer, scalars)


def log_images(trainer: pl.Trainer, key: str, paths: list[str]) -> None:
    """Images already written as PNG files (kept in the media folder for every logger)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=list(paths), step=trainer.global_step)
    folder = media_folder(trainer)
    for path in paths:
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
            shutil.copy(path, folder)


def log_table(trainer: pl.Trainer, key: str, columns: list[str], rows: list[list]) -> None:
    """A table for every logger, as CSV in the media folder, and the latest one under ``tables`` in
    uq_summary.json."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=rows, step=trainer.global_step)
    with open(os.path.join(media_folder(trainer), key.replace("/", "_") + ".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    summary = read_summary(trainer)
    summary.setdefault("tables", {})[key] = {"global_step": trainer.global_step, "columns": columns, "rows": rows}
    _write_summary(trainer, summary)


def log_config(trainer: pl.Trainer, params: dict) -> None:
    """Settings (nested dicts of plain values) as every logger's hyperparameters (the W&B run config) and
    under ``config`` in uq_summary.json."""
    for logger in trainer.loggers:
        logger.log_hyperparams(params)
    summary = read_summary(trainer)
    summary.setdefault("config", {}).update(params)
    _write_summary(trainer, summary)


def read_summary(trainer: pl.Trainer) -> dict:
    """uq_summary.json of the run folder: ``latest`` scalars, their ``history``, the logged ``config`` and the
    latest ``tables``."""
    path = os.path.join(run_folder(trainer), "uq_summary.json")
    if not os.path.isfile(path):
        return {"latest": {}, "history": []}
    with open(path) as f:
        return json.load(f)


def _write_summary(trainer: pl.Trainer, summary: dict) -> None:
    path = os.path.join(run_folder(trainer), "uq_summary.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, path)


def _update_summary(trainer: pl.Trainer, scalars: dict[str, float]) -> None:
    summary = read_summary(trainer)
    clean = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
    summary["latest"].update(clean)
    summary["history"].append({"epoch": trainer.current_epoch, "global_step": trainer.global_step, **clean})
    _write_summary(trainer, summary)


def validation_observations(trainer: pl.Trainer, n: int):
    """(truth, y) of the datamodule's fixed validation observations."""
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "validation_observations"):
        raise ValueError("the UQ callbacks need a datamodule with validation_observations(n) "
                         "(the datamodules of this package have it)")
    return dm.validation_observations(n)


def run_before_weight_averaging(callback: pl.Callback, trainer: pl.Trainer) -> None:
    """Move ``callback`` in front of any WeightAveraging callback.

    Lightning calls hooks in list order: the EMA callback swaps its averaged weights in at validation
    start and back out in its own ``on_validation_epoch_end``; running ours first means we see the EMA
    weights, which are the ones sampling should use.
    """
    from pytorch_lightning.callbacks import WeightAveraging

    callbacks = trainer.callbacks
    ema = [i for i, c in enumerate(callbacks) if isinstance(c, WeightAveraging)]
    mine = callbacks.index(callback)
    if ema and ema[0] < mine:
        callbacks.insert(ema[0], callbacks.pop(mine))


class ValidationUQCallback(pl.Callback, abc.ABC):
    """Shared schedule of the UQ callbacks: every ``every_n_epochs`` validation epochs (never during the
    sanity check) and once more at the end of fit unless that step was just covered. Subclasses set
    ``every_n_epochs`` and implement ``run(trainer, pl_module)``."""

    every_n_epochs: int = 1
    _last_step: int = -1

    @override
    def setup(self, trainer, pl_module, stage):
        run_before_weight_averaging(self, trainer)

    @override
    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._last_step = trainer.global_step
        self.run(trainer, pl_module)

    @override
    def on_fit_end(self, trainer, pl_module):
        if self._last_step != trainer.global_step:
            self._last_step = trainer.global_step
            self.run(trainer, pl_module)

    @abc.abstractmethod
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Sample, log on rank zero, and return the logged scalars (empty on other ranks)."""
