"""UQ callbacks in a real fit: offline W&B run read back from its run file, CSV fallback, CLI agreement."""

import glob
import json
import math
import os

import numpy as np
import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from callbacks import MLMCCallback, PicardCallback
from datamodules import DigitsDataModule
from lightning_mlmc.cli import main as cli_main
from lightning_mlmc.errors import InputError
from lightning_mlmc.mlmc import MLMCConfig
from lightning_mlmc.module import ScoreModule
from tests.wandb_records import history

SCALARS = ["mlmc/alpha", "mlmc/beta", "mlmc/gamma", "mlmc/nfe", "mlmc/nfe_mc", "mlmc/savings", "mlmc/rmse_bound",
           "mlmc/psnr", "mlmc/ssim", "mlmc/coverage_1sd", "mlmc/coverage_2sd", "picard/rounds", "picard/nfe",
           "picard/steps", "picard/speedup_rounds", "picard/speedup_wall", "picard/max_abs_diff"]
MLMC_KW = dict(eps=0.2, observations=1, mlmc=MLMCConfig(M=2, lmin=1, lmax=3, n0=8, seed=3, clip=2.0))


def fit(tmp_path, logger, steps=4, **mlmc_kw):
    pl.seed_everything(0)
    dm = DigitsDataModule({"name": "superres", "factor": 2, "noise_std": 0.05}, batch_size=32)
    module = ScoreModule(operator=dm.operator_config(), channels=[8, 16], attention=False, warmup_steps=2)
    mlmc_cb = MLMCCallback(**{**MLMC_KW, **mlmc_kw})
    picard_cb = PicardCallback(steps=10, window=4, tol=0.1, observations=1, samples_per_observation=2)
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=1, val_check_interval=steps, num_sanity_val_steps=1,
                         logger=logger, default_root_dir=str(tmp_path), enable_progress_bar=False,
                         callbacks=[EMAWeightAveraging(decay=0.5), mlmc_cb, picard_cb,
                                    ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)],
                         accelerator="cpu")
    trainer.fit(module, dm)
    return trainer, dm, module, mlmc_cb


def test_fit_with_callbacks_writes_every_key_to_the_offline_wandb_run(tmp_path):
    import wandb

    trainer, *_ = fit(tmp_path, WandbLogger(project="uq-test", save_dir=str(tmp_path), offline=True))
    wandb.finish()
    run_file = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))[0]
    logged = history(run_file)
    for key in SCALARS:
        assert key in logged and all(math.isfinite(v) for v in logged[key]), key
    # Media and tables are history entries describing files: {"_type": "images/separated" | "table-file", ...}.
    for key in ("mlmc/uq", "mlmc/convergence", "mlmc/zscore", "picard/residuals", "mlmc/levels"):
        assert f"{key}/_type" in logged, (key, sorted(logged))
    media = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "**" / "*.*"), recursive=True)
    assert any(p.endswith(".png") for p in media) and any(p.endswith(".json") for p in media)
    summary = json.loads((tmp_path / "uq_summary.json").read_text())["latest"]
    assert all(k in summary and summary[k] is not None for k in SCALARS)
    # Ran once at the validation epoch; not again at fit end (same global step); none at the sanity check.
    assert len(logged["mlmc/alpha"]) == 1


def test_csv_logger_gets_scalars_pngs_and_tables(tmp_path):
    trainer, *_ = fit(tmp_path, CSVLogger(str(tmp_path), name="csv"))
    metrics = glob.glob(str(tmp_path / "csv" / "**" / "metrics.csv"), recursive=True)
    header = open(metrics[0]).readline()
    assert all(k in header for k in SCALARS)
    media = os.listdir(tmp_path / "uq" / f"step_{trainer.global_step}")
    assert {"mlmc_uq.png", "mlmc_zscore.png", "picard_residuals.png", "mlmc_levels.csv"} <= set(media)
    assert any(m.startswith("mlmc_convergence") or m == "mlmc_convergence" for m in media)


def cli_on_fitted_checkpoint(tmp_path, dm, command, *args):
    """Run ``command`` of the CLI on the fit's last.ckpt and first validation observation (the callback's
    settings: mean_std payoff, clip 2, lmin 1, seed 3); returns (exit status, result JSON)."""
    _, y = dm.validation_observations(1)
    np.save(tmp_path / "y.npy", y[0].numpy())
    out = tmp_path / f"{command}.json"
    rc = cli_main([command, "--checkpoint", str(tmp_path / "ckpt" / "last.ckpt"), "--observation",
                   str(tmp_path / "y.npy"), "--payoff", "mean_std", "--clip", "2", "--lmin", "1", "--seed", "3",
                   *args, "--out", str(out)])
    return rc, json.loads(out.read_text())


def test_logged_savings_and_rates_equal_the_cli_on_the_same_checkpoint(tmp_path):
    trainer, dm, module, cb = fit(tmp_path, False)
    # The callback ran at the validation of the last step, with the EMA weights the checkpoint stores.
    res = cb.last_results[0]
    rc, cli = cli_on_fitted_checkpoint(tmp_path, dm, "mlmc", "--eps", "0.2", "--M", "2", "--lmax", "3", "--n0", "8")
    assert rc in (0, 3)
    for key in ("alpha", "beta", "gamma", "nfe", "nfe_mc", "savings"):
        assert cli[key] == pytest.approx(getattr(res, key), rel=1e-6, abs=1e-9), key
    np.testing.assert_allclose(cli["estimate"], res.estimate, rtol=1e-5, atol=1e-6)


def test_mlmc_test_rates_equal_the_cli_mlmc_test(tmp_path):
    trainer, dm, module, cb = fit(tmp_path, False, rates="mlmc_test", rate_samples=16)
    test = cb.last_tests[0]
    rc, cli = cli_on_fitted_checkpoint(tmp_path, dm, "mlmc-test", "--levels", "3", "--samples", "16")
    assert rc == 0
    for key in ("alpha", "beta", "gamma"):
        assert cli[key] == pytest.approx(getattr(test, key), rel=1e-6), key
    assert [r["kurtosis"] for r in cli["rows"]] == pytest.approx([r.kurtosis for r in test.rows], rel=1e-6)
    # The test's NFEs have their own key and are in the total: 16 samples (antithetic pairs by default: two
    # paths each) of levels 1 (plain, 2 steps), 2 (4 + 2) and 3 (8 + 4); Lmin is fixed, so no pilot.
    uq = json.loads((tmp_path / "uq_summary.json").read_text())["latest"]
    assert cb.config.antithetic and uq["mlmc/rate_test_nfe"] == 16 * 2 * (2 + 6 + 12)
    assert uq["mlmc/nfe_total"] == uq["mlmc/nfe"] + 16 * 2 * (2 + 6 + 12)
    assert uq["mlmc/nfe"] == cb.last_results[0].nfe


@pytest.mark.parametrize("make, field", [
    (lambda: MLMCCallback(rates="fixed"), "rates"),
    (lambda: MLMCCallback(eps=0), "eps"),
    (lambda: MLMCCallback(observations=0), "observations"),
    (lambda: MLMCCallback(mlmc=MLMCConfig(lmin=4, lmax=2)), "lmin"),
    (lambda: MLMCCallback(mlmc={"M": 2}), "mlmc"),
    (lambda: PicardCallback(window=0), "window"),
    (lambda: PicardCallback(tol=0), "tol"),
    (lambda: PicardCallback(sampler="euler"), "sampler"),
])
def test_callback_arguments_are_validated_at_construction(make, field):
    with pytest.raises(InputError, match=field):
        make()


def test_callbacks_run_before_the_ema_callback_so_they_see_the_averaged_weights(tmp_path):
    ema, cb = EMAWeightAveraging(), MLMCCallback()
    trainer = pl.Trainer(callbacks=[ema, cb], logger=False, default_root_dir=str(tmp_path))
    cb.setup(trainer, None, "fit")
    assert trainer.callbacks.index(cb) < trainer.callbacks.index(ema)


def test_a_config_file_nests_the_mlmc_options(tmp_path):
    """LightningCLI builds MLMCCallback(mlmc=MLMCConfig(...)) from a nested mapping in the YAML (the options are
    MLMCConfig's, not re-declared by the callback); a field MLMCConfig does not have is refused."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "configs", "digits_superres.yaml")).read()
    line = next(l for l in text.splitlines() if "init_args: {observations: 2, every_n_epochs: 80}" in l)
    good = tmp_path / "good.yaml"
    good.write_text(text.replace(line, "      init_args: {observations: 2, mlmc: {lmax: 9, theta: 0.3, clip: 1.5}}"))
    res = subprocess.run([sys.executable, "-m", "lightning_mlmc", "fit", "--config", str(good), "--print_config"],
                         capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "lmax: 9" in res.stdout and "theta: 0.3" in res.stdout and "clip: 1.5" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(line, "      init_args: {observations: 2, mlmc: {lmaxx: 9}}"))
    res = subprocess.run([sys.executable, "-m", "lightning_mlmc", "fit", "--config", str(bad), "--print_config"],
                         capture_output=True, text=True, cwd=root)
    assert res.returncode != 0 and "lmaxx" in res.stderr
