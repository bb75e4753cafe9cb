"""``lightning-mlmc fit|validate|test|predict --config configs/<name>.yaml``: LightningCLI for ``ScoreModule``;
``lightning-mlmc distill --config ...`` is ``fit`` for ``distill.DistillModule`` (a student of a trained teacher).

The datamodule is chosen by ``class_path`` in the config (``datamodules.DigitsDataModule``, ...), so the
library never imports ``datamodules``. The datamodule's operator is linked into ``model.operator``.

Run folder: ``trainer.default_root_dir``. Unless set otherwise, checkpoints go to its ``checkpoints/``
and the W&B run to its ``wandb/``.

Logging: W&B runs offline by default (configs set ``offline: true``; this module points ``WANDB_DIR``/``WANDB_CACHE_DIR``/``WANDB_DATA_DIR`` there); ``wandb sync``
uploads later. ``--trainer.logger.init_args.offline=false`` goes online. With ``WANDB_MODE=disabled``
(or W&B not installed) a ``CSVLogger`` writing to the same folder replaces it; so does a W&B run that
fails to start (logging never kills a run; a warning says why).

Interrupted fits (SIGTERM, Ctrl-C) write ``checkpoints/interrupted.ckpt`` (full training state);
``lightning-mlmc fit --config ... --ckpt_path <root>/checkpoints/interrupted.ckpt`` finishes the run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import warnings
import zipfile

import pytorch_lightning as pl
from pytorch_lightning.callbacks import OnExceptionCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_mlmc.errors import InputError
from lightning_mlmc.module import ScoreModule

WANDB_LOGGER = "pytorch_lightning.loggers.WandbLogger"
INTERRUPTED = "interrupted"  # <root>/checkpoints/interrupted.ckpt: written when a fit is stopped


def _logger_entries(logger):
    if isinstance(logger, list):
        return logger
    return [] if logger in (None, True, False) else [logger]


def configure_wandb_env(save_dir: str) -> None:
    """Keep every W&B file (runs, cache, artifacts) under ``save_dir`` unless the user set them."""
    os.makedirs(save_dir, exist_ok=True)
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", ".wandb_cache"), ("WANDB_DATA_DIR", ".wandb_data")):
        os.environ.setdefault(var, os.path.abspath(os.path.join(save_dir, sub)))


class MLMCLightningCLI(LightningCLI):
    """LightningCLI with the data -> model operator link and offline-first W&B."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data", "model.operator", compute_fn=lambda dm: dm.operator_config(),
                              apply_on="instantiate")

    @override
    def before_fit(self) -> None:
        root = self.trainer.default_root_dir
        # SIGTERM (or Ctrl-C) mid-epoch: Lightning stops after the current batch and calls on_exception;
        # this writes the full training state, so `--ckpt_path <root>/checkpoints/interrupted.ckpt` resumes.
        self.trainer.callbacks.append(OnExceptionCheckpoint(os.path.join(root, "checkpoints"), INTERRUPTED))
        self.trainer.loggers = [_working_logger(lg, root) for lg in self.trainer.loggers]

    @override
    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        # Before Lightning itself opens --ckpt_path (to read its hyper-parameters).
        check_ckpt_path((self.config[sub] if sub else self.config).get("ckpt_path"))

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        wandb_off = os.environ.get("WANDB_MODE") == "disabled" or importlib.util.find_spec("wandb") is None
        root = trainer.get("default_root_dir") or os.getcwd()
        for callback in trainer.get("callbacks") or []:
            if str(callback.get("class_path", "")).endswith("ModelCheckpoint") and not callback["init_args"].get("dirpath"):
                callback["init_args"]["dirpath"] = os.path.join(root, "checkpoints")
        entries = _logger_entries(trainer.get("logger"))
        for i, entry in enumerate(entries):
            if entry.get("class_path") not in (WANDB_LOGGER, "lightning.pytorch.loggers.WandbLogger"):
                continue
            args = entry["init_args"]
            if args.get("save_dir") in (None, "", "."):  # "." is WandbLogger's own default
                args["save_dir"] = root
            save_dir = args["save_dir"]
            if wandb_off:
                entries[i] = type(entry)(class_path="pytorch_lightning.loggers.CSVLogger",
                                         init_args=type(args)(save_dir=save_dir, name=args.get("name") or "csv"))
                continue
            if args.get("offline") is None:
                args["offline"] = True
            configure_wandb_env(save_dir)
        if isinstance(trainer.get("logger"), list):
            trainer["logger"] = entries
        elif entries:
            trainer["logger"] = entries[0]


def _working_logger(logger, root: str):
    """Logging never kills a run: a W&B logger whose run cannot start (unwritable WANDB_DIR, a broken
    install, a failed service) is replaced by a CSVLogger in the run folder, with a warning."""
    if not isinstance(logger, pl.loggers.WandbLogger):
        return logger
    try:
        for folder in {logger.save_dir, os.environ.get("WANDB_DIR")} - {None, ""}:
            _check_writable(folder)
        logger.experiment  # noqa: B018 - starts the (offline) W&B run now rather than mid-training
        return logger
    except Exception as e:  # noqa: BLE001 - any W&B failure; the metrics go to CSV instead
        message = " ".join(str(e).split())[:200]
        warnings.warn(f"W&B logging failed ({type(e).__name__}: {message}); logging to CSV in {root} instead",
                      stacklevel=2)
        return pl.loggers.CSVLogger(save_dir=root, name="csv")


def _check_writable(folder: str) -> None:
    """Raise OSError unless ``folder`` exists (or can be made) and takes a file."""
    import tempfile

    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder):
        pass


def datamodule_from_config(path: str) -> pl.LightningDataModule:
    """The datamodule a LightningCLI config names (its ``data.class_path`` and ``init_args``), as
    LightningCLI would build it; the library itself names no datamodule class."""
    import importlib

    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)["data"]
        module, _, name = data["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (OSError, KeyError, TypeError, ImportError, AttributeError, yaml.YAMLError) as e:
        raise InputError(f"config: cannot build the datamodule of {path!r} ({type(e).__name__}: {e})") from None
    return cls(**(data.get("init_args") or {}))


def check_ckpt_path(path) -> None:
    """A ``--ckpt_path`` must be a readable checkpoint file (Lightning's aliases last/best/hpc pass)."""
    if path in (None, "last", "best", "hpc", "registry"):
        return
    if not os.path.isfile(path):
        raise InputError(f"ckpt_path: no such checkpoint file {path!r}")
    if not zipfile.is_zipfile(path):
        raise InputError(f"ckpt_path: {path!r} is not a PyTorch checkpoint (not a torch.save zip archive)")


def run_lightning_cli(argv: list[str]) -> int:
    """Run a LightningCLI subcommand; parse and config errors become one-line ``InputError`` s.
    ``distill ...`` runs ``fit ...`` with ``DistillModule`` as the model."""
    from jsonargparse import ArgumentError

    model_class = ScoreModule
    if argv and argv[0] == "distill":
        from lightning_mlmc.distill import DistillModule

        model_class, argv = DistillModule, ["fit", *argv[1:]]

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # "Seed set to 0" would be a second stderr line in front of a one-line error; the seed is in config.yaml.
    logging.getLogger("lightning_fabric.utilities.seed").setLevel(logging.WARNING)
    try:
        MLMCLightningCLI(
            model_class,
            pl.LightningDataModule,
            subclass_mode_data=True,
            args=argv,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
        )
    except SIGTERMException:
        print("lightning-mlmc: stopped by SIGTERM; the training state is in checkpoints/"
              f"{INTERRUPTED}.ckpt under the run folder (resume with --ckpt_path)", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - jsonargparse wraps errors raised while instantiating
        cause = _input_error_in_chain(e)
        if cause is not None:
            raise cause from None
        if isinstance(e, ArgumentError):
            raise InputError(_one_line(str(e))) from None
        if isinstance(e, FileNotFoundError):
            raise InputError(f"file not found: {e.filename or e}") from None
        raise
    finally:
        _finish_wandb()
    return 0


def _finish_wandb() -> None:
    """Close the W&B run this command opened, so a second command in the same process gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _input_error_in_chain(exc: BaseException) -> InputError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
          "- Expected a <class 'NoneType'>", "- Problem with given class_path")


def _one_line(message: str) -> str:
    """jsonargparse nests the reason under 'Parser key' headers; keep the key path and the first reason."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    keys = [m.group(1) for ln in lines if (m := re.match(r'Parser key "(.+)":', ln))]
    reasons = [ln.lstrip("- ") for ln in lines if not ln.startswith(("Parser key",) + _NOISE)]
    if keys and reasons:
        return f"{'.'.join(keys)}: {reasons[0]}"
    return " ".join(lines[:2]) if lines else "invalid arguments"
