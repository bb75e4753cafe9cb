"""DistillModule: a student eps-network trained on a frozen teacher's eps, with a real Lightning Trainer."""

import glob
import json
import os

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from callbacks import FusedEMA
from datamodules import DigitsDataModule
from lightning_mlmc.cli import main as cli_main
from lightning_mlmc.distill import DistillModule, flops_per_row, weights_sha256
from lightning_mlmc.errors import InputError
from lightning_mlmc.module import ScoreModel, ScoreModule, load_score_model
from tests.test_training import CONFIGS, SUPERRES, probe

STUDENT = {"channels": [8, 8], "attention": False, "warmup_steps": 2}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An exported tiny teacher (random weights: any fixed eps-network is a teacher) and its datamodule."""
    folder = tmp_path_factory.mktemp("teacher") / "export"
    dm = DigitsDataModule(SUPERRES, batch_size=32)
    torch.manual_seed(0)
    ScoreModule(operator=dm.operator_config(), channels=[8, 16], attention=False).export(str(folder))
    return {"dm": dm, "export": str(folder), "model": load_score_model(str(folder))}


def mismatch(module, dm) -> float:
    """The student's mean eps mismatch on the validation set (fixed draws)."""
    x0, y = dm.validation_observations(64)
    with torch.no_grad():
        return float(module.losses(x0, y, torch.Generator().manual_seed(3))["eps_mismatch"].mean())


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    """40 steps of distillation with offline W&B, FusedEMA and checkpoints; the student is exported at the end."""
    tmp = tmp_path_factory.mktemp("distill")
    os.environ.setdefault("WANDB_MODE", "offline")
    pl.seed_everything(0)
    dm = teacher["dm"]
    module = DistillModule(teacher["export"], operator=dm.operator_config(), lr=5e-3, **STUDENT)
    before = mismatch(module, dm)
    logger = WandbLogger(project="lightning-mlmc-test", save_dir=str(tmp), offline=True)
    trainer = pl.Trainer(max_steps=40, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=20,
                         logger=logger, callbacks=[FusedEMA(decay=0.5), ModelCheckpoint(dirpath=str(tmp / "checkpoints"),
                         save_last=True)], log_every_n_steps=1, enable_progress_bar=False,
                         default_root_dir=str(tmp), accelerator="cpu")
    trainer.fit(module, dm)
    import wandb

    wandb.finish()
    return {"tmp": tmp, "module": module, "before": before, "after": mismatch(module, dm)}


def test_distillation_reduces_the_eps_mismatch_and_logs_it(distilled):
    assert distilled["after"] < 0.5 * distilled["before"], (distilled["before"], distilled["after"])
    runs = glob.glob(str(distilled["tmp"] / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    record = open(runs[0], "rb").read()
    for key in (b"train/loss", b"val/loss", b"val/eps_mismatch", b"val/teacher_dsm"):
        assert key in record, key


def test_the_export_loads_like_the_teachers_and_records_teacher_and_flops(distilled, teacher):
    folder = distilled["tmp"] / "export"
    student = load_score_model(str(folder))
    assert isinstance(student, ScoreModel)
    dm = teacher["dm"]
    out = probe(student, dm)
    assert out.shape == (4, *dm.image_shape)
    assert torch.equal(out, probe(distilled["module"].eval(), dm))  # the module's weights (the EMA average)
    meta = json.loads((folder / "lightning_mlmc.json").read_text())
    source = meta["distilled_from"]
    assert source["teacher"] == os.path.abspath(teacher["export"])
    assert source["teacher_sha256"] == weights_sha256(teacher["model"].network)
    assert source["flops_per_row"] == flops_per_row(teacher["model"])
    assert meta["flops_per_row"] == flops_per_row(student) and 0 < meta["flops_per_row"] < source["flops_per_row"]
    assert meta["parameters"] == sum(p.numel() for p in student.network.parameters())
    assert source["global_step"] == 40 and source["train_seconds"] > 0
    assert meta["operator"] == dm.operator_config()


def test_the_checkpoint_holds_the_student_only(distilled):
    ckpt = torch.load(str(distilled["tmp"] / "checkpoints" / "last.ckpt"), map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("model.network.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["channels"] == [8, 8]


def test_the_loss_targets_the_teachers_eps_not_the_noise(teacher):
    """A student equal to the teacher is the loss's minimiser: its mismatch and gradient are exactly zero, while
    the denoising loss (the DSM target eps) is not; dsm_weight adds that loss."""
    dm = teacher["dm"]
    x0, y = dm.validation_observations(16)
    module = DistillModule(teacher["export"], channels=[8, 16], attention=False, student_init=teacher["export"],
                           dsm_weight=0.0)
    losses = module.losses(x0, y, torch.Generator().manual_seed(1))
    assert torch.equal(losses["eps_mismatch"], torch.zeros(16))
    assert torch.equal(losses["loss"], torch.zeros(16))
    assert losses["dsm"].min() > 1e-3
    losses["loss"].mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in module.parameters())
    mixed = DistillModule(teacher["export"], channels=[8, 16], attention=False, student_init=teacher["export"],
                          dsm_weight=0.25).losses(x0, y, torch.Generator().manual_seed(1))
    torch.testing.assert_close(mixed["loss"], 0.25 * losses["dsm"], rtol=0, atol=0)


def test_the_draws_are_the_teachers_training_draws(teacher):
    """(x_t, t, eps) come from the teacher's training distribution: the student's DSM loss equals a ScoreModule's
    (the teacher's training loss) on the same network and generator."""
    dm = teacher["dm"]
    x0, y = dm.validation_observations(8)
    module = DistillModule(teacher["export"], **STUDENT)
    plain = ScoreModule(operator=dm.operator_config(), **STUDENT)
    plain.model.network.load_state_dict(module.model.network.state_dict())
    with torch.no_grad():
        got = module.losses(x0, y, torch.Generator().manual_seed(5))["dsm"]
        want = plain.dsm_loss(x0, y, torch.Generator().manual_seed(5))
    assert torch.equal(got, want)


def test_bad_input_is_a_named_error(teacher, tmp_path):
    with pytest.raises(InputError, match="model.teacher: no such file"):
        DistillModule(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="model.teacher: .*not an exported"):
        DistillModule(str(tmp_path))
    denoise = {"name": "denoise", "noise_std": 0.1, "shape": [1, 8, 8]}
    with pytest.raises(InputError, match="model.operator: .*not the teacher's"):
        DistillModule(teacher["export"], operator=denoise)
    with pytest.raises(InputError, match="model.student_init: .*does not fit"):
        DistillModule(teacher["export"], channels=[16, 16], student_init=teacher["export"])
    with pytest.raises(InputError, match="model.dsm_weight"):
        DistillModule(teacher["export"], dsm_weight=-1.0)


def test_cli_distill_trains_and_exports_the_student(teacher, tmp_path, capsys):
    args = ["distill", "--config", os.path.join(CONFIGS, "digits_superres_student.yaml"),
            "--model.channels", "[8, 8]", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), "--model.export_dir", str(tmp_path / "student")]
    assert cli_main([*args, "--model.teacher", teacher["export"]]) == 0
    meta = json.loads((tmp_path / "student" / "lightning_mlmc.json").read_text())
    assert meta["distilled_from"]["teacher"] == os.path.abspath(teacher["export"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    capsys.readouterr()
    assert cli_main([*args, "--model.teacher", str(tmp_path / "missing")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "model.teacher: no such file" in err[0], err
