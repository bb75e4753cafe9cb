"""The MLMC validation dashboard in a real fit: predicted complexity, training trends, callback = CLI.

One tiny fit (two validations, W&B offline) serves every test here; its run file is read back with
tests/wandb_records.py, and the command the callback prints is run through the real command line.
"""

import glob
import json
import math
import shlex

import numpy as np
import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from callbacks import MLMCCallback
from datamodules import DigitsDataModule
from lightning_mlmc.cli import build_parser
from lightning_mlmc.cli import main as cli_main
from lightning_mlmc.cli.mlmc_cmd import config_from_args
from lightning_mlmc.mlmc import MLMCConfig
from lightning_mlmc.module import ScoreModule
from tests.wandb_records import config, history_rows, summary

TRENDS = ["mlmc/alpha", "mlmc/beta", "mlmc/predicted_savings", "mlmc/coverage_1sd", "mlmc/psnr"]
# batch_size 4: every level draws more samples than a batch, so the CLI must pick the same noise streams
# batch by batch to reproduce the estimate.
MLMC_KW = dict(eps=0.25, observations=1, mlmc=MLMCConfig(lmin=1, lmax=3, n0=8, seed=5, batch_size=4, clip=2.0),
               complexity_eps=[0.1, 0.05],
               predict_eps=0.05, bootstrap=4)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    import wandb

    tmp = tmp_path_factory.mktemp("dashboard")
    pl.seed_everything(0)
    dm = DigitsDataModule({"name": "superres", "factor": 2, "noise_std": 0.05}, batch_size=32)
    module = ScoreModule(operator=dm.operator_config(), channels=[8, 16], attention=False, warmup_steps=2)
    cb = MLMCCallback(**MLMC_KW)
    logger = WandbLogger(project="dashboard-test", save_dir=str(tmp), offline=True)
    trainer = pl.Trainer(max_steps=4, limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0,
                         logger=logger, default_root_dir=str(tmp), enable_progress_bar=False, accelerator="cpu",
                         callbacks=[EMAWeightAveraging(decay=0.5), cb,
                                    ModelCheckpoint(dirpath=str(tmp / "ckpt"), save_last=True)])
    trainer.fit(module, dm)
    wandb.finish()
    run_file = glob.glob(str(tmp / "wandb" / "offline-run-*" / "run-*.wandb"))[0]
    return tmp, trainer, cb, run_file


def test_the_wandb_run_holds_the_prediction_table_plot_and_trends(fitted):
    tmp, trainer, cb, run_file = fitted
    rows = history_rows(run_file)
    scalars = [r for r in rows if "mlmc/alpha" in r]
    # Two validations, each logged at its global step (W&B charts every scalar against trainer/global_step).
    assert [r["trainer/global_step"] for r in scalars] == [2, 4]
    for r in scalars:
        assert all(k in r and math.isfinite(r[k]) for k in TRENDS), sorted(r)
        assert r["mlmc/predicted_savings"] > 0 and r["mlmc/predicted_savings_sd"] >= 0
    # The logged savings is the ratio of the predicted totals of the callback's own predictions.
    p = cb.last_predictions
    assert scalars[-1]["mlmc/predicted_savings"] == pytest.approx(
        sum(x.row(0.05).nfe_mc for x in p) / sum(x.row(0.05).nfe for x in p))
    media = {k.split("/_type")[0]: r[k] for r in rows for k in r if k.endswith("/_type")}
    assert media.get("mlmc/complexity") == "table-file"
    assert media.get("mlmc/complexity_plot") == media.get("mlmc/trends") == "images/separated"
    table = glob.glob(str(tmp / "wandb" / "offline-run-*" / "files" / "media" / "table" / "mlmc" / "complexity*.json"))
    data = json.load(open(sorted(table)[-1]))
    assert data["columns"][:4] == ["observation", "eps", "mlmc_nfe", "mc_nfe"]
    assert sorted(row[1] for row in data["data"]) == [0.05, 0.1]
    # The run summary holds the last values; so does uq_summary.json, with the history of both validations.
    last = summary(run_file)
    assert last["mlmc/predicted_savings"] == pytest.approx(scalars[-1]["mlmc/predicted_savings"])
    uq = json.loads((tmp / "uq_summary.json").read_text())
    assert uq["latest"]["mlmc/predicted_savings"] == pytest.approx(scalars[-1]["mlmc/predicted_savings"])
    assert [h["global_step"] for h in uq["history"] if "mlmc/alpha" in h] == [2, 4]
    assert uq["config"]["mlmc"]["batch_size"] == 4


def test_the_configuration_is_logged_as_the_cli_builds_it(fitted):
    tmp, trainer, cb, run_file = fitted
    logged = config(run_file)["mlmc"]
    logged = logged.get("value", logged)
    assert {k: logged[k] for k in MLMCConfig().to_json()} == cb.config.to_json()
    assert cb.config == MLMCConfig(payoff="mean_std", clip=2.0, lmin=1, lmax=3, n0=8, seed=5, batch_size=4)
    assert shlex.split(logged["command"]) == cb.last_command


def test_the_printed_command_reproduces_observation_0_bit_for_bit(fitted, capsys):
    """Bit for bit, not to rounding: the command carries every option (the row budget too), so the CLI run
    makes the same network calls on the same batch shapes, in this process, on the same threads."""
    tmp, trainer, cb, run_file = fitted
    res = cb.last_results[0]
    assert max(lv.n_samples for lv in res.levels) > cb.config.batch_size  # several noise streams on a level
    assert cb.last_command[:2] == ["lightning-mlmc", "mlmc"]
    rc = cli_main(cb.last_command[1:])
    assert rc in (0, 3)  # 3: the weak-convergence exit, which the callback's run then shares
    out = cb.last_command[cb.last_command.index("--out") + 1]
    cli = json.load(open(out))
    np.testing.assert_array_equal(np.asarray(cli["estimate"]), np.asarray(res.estimate))
    assert [lv["n_samples"] for lv in cli["levels"]] == [lv.n_samples for lv in res.levels]
    assert cli["nfe"] == res.nfe and cli["lmin"] == res.lmin


@pytest.mark.parametrize("config", [
    MLMCConfig(),
    MLMCConfig.from_scheme("seed", payoff="moments", clip=2.0, batch_size=7, row_budget=64, seed=3, theta=0.4),
    MLMCConfig(grid="polynomial", rho=3.0, coupling="jacobian", data_std=0.3, sampler="ddim", M=4, lmin=1, lmax=5),
])
def test_to_cli_args_round_trips_through_the_command_line(config):
    args = build_parser().parse_args(["mlmc", "--problem", "p.json", "--eps", "0.1", "--out", "o.json",
                                      *config.to_cli_args()])
    assert config_from_args(args) == config
