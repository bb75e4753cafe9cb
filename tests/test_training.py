"""Training with a real Lightning Trainer, offline W&B, EMA, checkpoints, diffusers export, LightningCLI."""

import glob
import json
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from callbacks import FusedEMA
from datamodules import AnalyticDataModule, DigitsDataModule
from lightning_mlmc.cli import main as cli_main
from lightning_mlmc.errors import InputError
from lightning_mlmc.module import ScoreModule, load_exported, load_score_model, load_score_module
from tests.analytic_cases import EXAMPLES
from tests.torchvision_files import write_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SUPERRES = {"name": "superres", "factor": 2, "noise_std": 0.05}
TINY = {"channels": [8, 16], "attention": False, "warmup_steps": 2}


def tiny_module(dm, **kw) -> ScoreModule:
    return ScoreModule(operator=dm.operator_config(), **{**TINY, **kw})


def probe(model, dm, seed=0):
    """A fixed batch of network inputs and the outputs of ``model`` on them (float64 comparisons)."""
    x, y = dm.validation_observations(4)
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(x.shape, generator=g)
    t = torch.rand(4, generator=g)
    with torch.no_grad():
        return model(x_t, y, t)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One short real fit (6 steps) with W&B offline, EMA and a last.ckpt written during training."""
    tmp = tmp_path_factory.mktemp("fit")
    os.environ.setdefault("WANDB_MODE", "offline")
    pl.seed_everything(0)
    dm = DigitsDataModule(SUPERRES, batch_size=32)
    module = tiny_module(dm)
    logger = WandbLogger(project="lightning-mlmc-test", save_dir=str(tmp), offline=True)
    ckpt_cb = ModelCheckpoint(dirpath=str(tmp / "checkpoints"), save_last=True)
    trainer = pl.Trainer(max_steps=6, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=3,
                         logger=logger, callbacks=[EMAWeightAveraging(decay=0.5), ckpt_cb], log_every_n_steps=1,
                         enable_progress_bar=False, default_root_dir=str(tmp), accelerator="cpu")
    trainer.fit(module, dm)
    import wandb

    wandb.finish()
    return {"tmp": tmp, "dm": dm, "module": module, "ckpt": str(tmp / "checkpoints" / "last.ckpt")}


def test_fit_writes_an_offline_wandb_run_with_train_loss(fitted):
    runs = glob.glob(str(fitted["tmp"] / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    records = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    assert records and b"train/loss" in open(records[0], "rb").read()
    assert b"val/loss" in open(records[0], "rb").read()


def test_checkpoint_holds_ema_weights_and_loads_weights_only(fitted):
    ckpt = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)  # no pickled Python objects
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the averaged weights differ from the raw ones
    # After fit, the module holds the EMA weights (the callback copies them in at the end of training).
    module_state = fitted["module"].state_dict()
    for k, v in ema.items():
        torch.testing.assert_close(module_state[k], v, rtol=0, atol=0)


def test_checkpoint_and_export_round_trips_give_identical_outputs(fitted, tmp_path):
    dm, module = fitted["dm"], fitted["module"].eval()
    reference = probe(module, dm)
    loaded = load_score_module(fitted["ckpt"])
    assert torch.equal(probe(loaded, dm), reference)
    folder = tmp_path / "export"
    loaded.export(str(folder))
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "UNet2DModel"
    meta = json.loads((folder / "lightning_mlmc.json").read_text())
    assert meta["operator"] == dm.operator_config() and meta["schedule"] == {"beta_min": 0.1, "beta_max": 20.0}
    exported = load_exported(str(folder))
    assert torch.equal(probe(exported, dm), reference)
    assert torch.equal(probe(load_score_model(str(folder)), dm), reference)


def test_mlp_export_round_trip(tmp_path):
    dm = AnalyticDataModule(os.path.join(EXAMPLES, "bimodal2d.json"), num_train=64, num_val=8, num_test=8)
    module = ScoreModule(operator=dm.operator_config(), network="mlp", mlp_hidden=32, mlp_layers=2)
    torch.nn.init.normal_(module.model.network.out[-1].weight)  # the zero-initialised head would hide errors
    module.export(str(tmp_path / "mlp"))
    x = torch.randn(5, *dm.image_shape)
    y = dm.operator.observe(x)
    t = torch.rand(5)
    with torch.no_grad():
        assert torch.equal(load_exported(str(tmp_path / "mlp"))(x, y, t), module(x, y, t))


def test_resume_continues_the_ema_average(fitted, tmp_path):
    dm = fitted["dm"]
    before = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    assert int(before["averaging_state"]["n_averaged"]) == 6
    ckpt_cb = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    trainer = pl.Trainer(max_steps=9, limit_val_batches=0, logger=False, callbacks=[EMAWeightAveraging(decay=0.5),
                         ckpt_cb], enable_progress_bar=False, accelerator="cpu")
    trainer.fit(tiny_module(dm), dm, ckpt_path=fitted["ckpt"])
    after = torch.load(str(tmp_path / "last.ckpt"), map_location="cpu", weights_only=True)
    assert int(after["averaging_state"]["n_averaged"]) == 9
    assert after["global_step"] == 9


def test_fused_ema_gives_lightnings_ema_average(tmp_path):
    """FusedEMA (one foreach lerp per step) ends with the same averaged weights as EMAWeightAveraging."""
    dm = DigitsDataModule(SUPERRES, batch_size=32)
    weights = {}
    for name, ema in (("lightning", EMAWeightAveraging(decay=0.7)), ("fused", FusedEMA(decay=0.7))):
        pl.seed_everything(0)
        module = tiny_module(dm)
        trainer = pl.Trainer(max_steps=5, limit_val_batches=0, logger=False, enable_checkpointing=False,
                             callbacks=[ema], enable_progress_bar=False, accelerator="cpu",
                             default_root_dir=str(tmp_path / name))
        trainer.fit(module, dm)  # at train end the callback copies its average into the module
        weights[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        assert int(ema._average_model.n_averaged) == 5
    pl.seed_everything(0)
    raw = tiny_module(dm).state_dict()  # the initial weights: the average must have moved away from them
    for k, v in weights["lightning"].items():
        torch.testing.assert_close(weights["fused"][k], v, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(raw[k], v) for k, v in weights["fused"].items())
    with pytest.raises(InputError, match="decay"):
        FusedEMA(decay=1.0)


def test_a_run_made_with_lightnings_ema_resumes_with_fused_ema(fitted, tmp_path):
    """The fixture's checkpoint (EMAWeightAveraging) continues under FusedEMA with its callback state."""
    dm = fitted["dm"]
    saved = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)["callbacks"]["EMAWeightAveraging"]
    assert saved["latest_update_step"] > 0
    ema = FusedEMA(decay=0.5)
    # max_steps = the checkpoint's steps: nothing is left to train, so the state seen is the restored one.
    trainer = pl.Trainer(max_steps=6, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         callbacks=[ema], enable_progress_bar=False, accelerator="cpu")
    trainer.fit(tiny_module(dm), dm, ckpt_path=fitted["ckpt"])
    assert ema._latest_update_step == saved["latest_update_step"]


def test_unreadable_checkpoints_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="checkpoint: cannot read"):
        load_score_module(str(bad))
    with pytest.raises(InputError, match="checkpoint: no such file"):
        load_score_module(str(tmp_path / "missing.ckpt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(InputError, match="not a lightning-mlmc ScoreModule checkpoint"):
        load_score_module(str(tmp_path / "other.ckpt"))
    with pytest.raises(InputError, match="not an exported lightning-mlmc model"):
        load_exported(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# LightningCLI


LIGHT_CALLBACKS = """
trainer:
  callbacks:
    - class_path: callbacks.MLMCCallback
      init_args: {eps: 0.5, observations: 1, mlmc: {lmin: 1, lmax: 2, n0: 4, clip: 2.0}}
    - class_path: callbacks.PicardCallback
      init_args: {steps: 8, window: 4, observations: 1, samples_per_observation: 2}
    - class_path: pytorch_lightning.callbacks.EMAWeightAveraging
      init_args: {decay: 0.9}
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {save_last: true}
"""


def cli_fit(config, tmp_path, *extra):
    """Two training steps of a config, with its UQ callbacks at tiny settings (an untrained network's
    samples are far off, and the configs' MLMC targets would take minutes on them)."""
    light = tmp_path / "light_callbacks.yaml"
    light.write_text(LIGHT_CALLBACKS)
    return cli_main(["fit", "--config", os.path.join(CONFIGS, config), "--config", str(light),
                     "--trainer.max_steps", "2",
                     "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
                     "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(tmp_path), *extra])


def test_cli_fit_digits_superres_writes_checkpoint_config_and_wandb(tmp_path):
    assert cli_fit("digits_superres.yaml", tmp_path, "--model.channels", "[8, 16]") == 0
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    module = load_score_module(str(ckpt))
    assert module.operator.config()["name"] == "superres" and module.hparams.channels == [8, 16]
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert glob.glob(str(tmp_path / "**" / "config.yaml"), recursive=True)
    uq = json.loads((tmp_path / "uq_summary.json").read_text())["latest"]  # the configs' UQ callbacks ran
    assert "mlmc/savings" in uq and "picard/rounds" in uq
    for sub in ("validate", "test", "predict"):
        rc = cli_main([sub, "--config", os.path.join(CONFIGS, "digits_superres.yaml"), "--ckpt_path", str(ckpt),
                       "--model.channels", "[8, 16]", "--trainer.default_root_dir", str(tmp_path),
                       f"--trainer.limit_{'val' if sub == 'validate' else sub}_batches", "1",
                       "--trainer.enable_progress_bar", "false"])
        assert rc == 0, sub


@pytest.mark.slow
@pytest.mark.parametrize("config", ["digits_inpaint.yaml", "digits_denoise.yaml", "analytic_inpaint.yaml",
                                    "mnist_superres.yaml"])
def test_every_config_trains_without_edits(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name paths relative to the repository (examples/, data/)
    extra = []
    if config.startswith("mnist"):
        write_mnist(tmp_path / "data", n_train=64, n_test=16)
        extra = ["--data.init_args.root", str(tmp_path / "data"), "--data.init_args.val_size", "16",
                 "--data.init_args.num_workers", "0"]
    assert cli_fit(config, tmp_path, *extra) == 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_cli_with_wandb_disabled_falls_back_to_csv(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert cli_fit("digits_superres.yaml", tmp_path, "--model.channels", "[8, 16]") == 0
    metrics = glob.glob(str(tmp_path / "**" / "metrics.csv"), recursive=True)
    assert metrics and "train/loss" in open(metrics[0]).read()
    assert not glob.glob(str(tmp_path / "wandb" / "offline-run-*"))


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "lightning_mlmc", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("extra, needle", [
    (["--model.lrr", "0.1"], "lrr"),
    (["--data.init_args.operator", "{name: superres, factor: 3}"], "factor: 3 does not divide"),
    (["--data.init_args.operator", "{name: blur}"], "unknown operator 'blur'"),
    (["--ckpt_path", "missing.ckpt"], "ckpt_path: no such checkpoint file"),
])
def test_cli_bad_input_is_one_line_with_status_2(tmp_path, extra, needle):
    res = run_cli("fit", "--config", os.path.join(CONFIGS, "digits_superres.yaml"),
                  "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1", *extra)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_cli_unknown_dataset_and_garbage_checkpoint(tmp_path):
    res = run_cli("fit", "--config", os.path.join(CONFIGS, "mnist_superres.yaml"),
                  "--data.init_args.dataset", "svhn", "--trainer.default_root_dir", str(tmp_path))
    assert res.returncode == 2 and "svhn" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    bad = tmp_path / "bad.ckpt"
    bad.write_text("garbage")
    res = run_cli("validate", "--config", os.path.join(CONFIGS, "digits_superres.yaml"), "--ckpt_path", str(bad),
                  "--trainer.default_root_dir", str(tmp_path))
    assert res.returncode == 2 and "not a PyTorch checkpoint" in res.stderr, res.stderr


# ------------------------------------------------------------------------------------------------
# DDP

DDP_SCRIPT = r'''
import os, torch, pytorch_lightning as pl
from datamodules import DigitsDataModule
from lightning_mlmc.module import ScoreModule
pl.seed_everything(0)
dm = DigitsDataModule({{"name": "superres", "factor": 2, "noise_std": 0.05}}, batch_size=16)
module = ScoreModule(operator=dm.operator_config(), channels=[8, 16], attention=False, warmup_steps=2)
trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=3, limit_val_batches=0,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False)
trainer.fit(module, dm)
flat = torch.cat([p.detach().flatten() for p in module.parameters()])
torch.save(flat, os.path.join({out!r}, f"params_rank{{trainer.global_rank}}.pt"))
'''


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_parameters(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(out=str(tmp_path)))
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    p0, p1 = torch.load(tmp_path / "params_rank0.pt"), torch.load(tmp_path / "params_rank1.pt")
    assert torch.equal(p0, p1)
    init = ScoreModule(operator=DigitsDataModule(SUPERRES).operator_config(), channels=[8, 16], attention=False)
    assert p0.numel() == sum(p.numel() for p in init.parameters())


# ------------------------------------------------------------------------------------------------
# Sampling and MLMC from a trained model through the CLI


def test_cli_sample_from_checkpoint_and_export_agree(fitted, tmp_path):
    import numpy as np

    x, y = fitted["dm"].validation_observations(1)
    np.save(tmp_path / "y.npy", y[0].numpy())
    load_score_module(fitted["ckpt"]).export(str(tmp_path / "export"))
    outs = []
    for source in (fitted["ckpt"], str(tmp_path / "export")):
        out = tmp_path / f"s{len(outs)}.npz"
        rc = cli_main(["sample", "--checkpoint", source, "--observation", str(tmp_path / "y.npy"), "--sampler",
                       "ddpm", "--steps", "8", "--num-samples", "3", "--seed", "4", "--out", str(out)])
        assert rc == 0
        outs.append(np.load(out)["samples"])
    assert outs[0].shape == (3, 64) and np.array_equal(outs[0], outs[1])
    rc = cli_main(["sample", "--checkpoint", fitted["ckpt"], "--observation", str(tmp_path / "y.npy"), "--sampler",
                   "picard-ddpm", "--steps", "8", "--num-samples", "3", "--seed", "4", "--window", "8",
                   "--tol", "1e-6", "--out", str(tmp_path / "p.npz")])
    assert rc == 0
    np.testing.assert_allclose(np.load(tmp_path / "p.npz")["samples"], outs[0], atol=1e-4)


def test_cli_mlmc_from_checkpoint_writes_the_contract_keys(fitted, tmp_path):
    import numpy as np

    _, y = fitted["dm"].validation_observations(1)
    np.savez(tmp_path / "obs.npz", y=y[0].numpy())
    rc = cli_main(["mlmc", "--checkpoint", fitted["ckpt"], "--observation", str(tmp_path / "obs.npz"),
                   "--eps", "0.2", "--clip", "1", "--lmin", "1", "--lmax", "3", "--n0", "8",
                   "--out", str(tmp_path / "m.json")])
    # The 6-step network's samples are far off (hence --clip); 3 = weak convergence not reached by Lmax,
    # which still writes the estimate.
    assert rc in (0, 3)
    r = json.loads((tmp_path / "m.json").read_text())
    assert len(r["estimate"]) == 64 and {"alpha", "beta", "gamma", "nfe", "nfe_mc", "savings"} <= r.keys()


@pytest.mark.parametrize("args, needle", [
    (["--observation", "{y4x4}"], "checkpoint: no such file"),
    ([], "observation: --checkpoint needs --observation"),
    (["--observation", "{y8x8}"], "observation: expected shape [1, 4, 4]"),
    (["--observation", "{y4x4}", "--start", "masked"], "start: 'masked' needs an inpainting problem"),
])
def test_cli_checkpoint_bad_input(fitted, tmp_path, capsys, args, needle):
    import numpy as np

    np.save(tmp_path / "y4x4.npy", np.zeros((1, 4, 4), np.float32))
    np.save(tmp_path / "y8x8.npy", np.zeros((1, 8, 8), np.float32))
    ckpt = str(tmp_path / "missing.ckpt") if "no such" in needle else fitted["ckpt"]
    args = [a.format(y4x4=tmp_path / "y4x4.npy", y8x8=tmp_path / "y8x8.npy") for a in args]
    rc = cli_main(["sample", "--checkpoint", ckpt, *args, "--sampler", "ddpm", "--steps", "4",
                   "--num-samples", "2", "--out", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err


# ------------------------------------------------------------------------------------------------
# A trained network against the exact score


@pytest.mark.slow
def test_trained_mlp_score_approaches_the_exact_score_and_posterior():
    """bimodal2d: MLP trained on prior draws (y typical: Mahalanobis^2 0.2-0.6 under the prior predictive).

    Bars are quality bars for a 1,500-step CPU training, not statistical tolerances: relative eps error
    below 10% for t >= 0.3 and below 30% for t >= 0.05; posterior E[x^2] from the network's DDPM
    samples within 10% of the exact value, after removing the sampler's own discretisation bias (the
    same sampler with the exact score, same noise) and allowing 5 standard errors of the difference.
    """
    from lightning_mlmc import NoiseSource, sample
    from lightning_mlmc.problems import ExactPosteriorEps, eps_relative_error, exact_posterior

    pl.seed_everything(0)
    dm = AnalyticDataModule(os.path.join(EXAMPLES, "bimodal2d.json"), num_train=24000, num_val=256, batch_size=256)
    module = ScoreModule(operator=dm.operator_config(), network="mlp", mlp_hidden=128, mlp_layers=3, lr=2e-3,
                         warmup_steps=50)
    trainer = pl.Trainer(max_epochs=16, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, callbacks=[EMAWeightAveraging(decay=0.995)], accelerator="cpu")
    trainer.fit(module, dm)
    module = module.double().eval()
    spec = dm.spec
    errors = {t: eps_relative_error(module, spec, t) for t in (0.05, 0.1, 0.3, 0.5, 1.0)}
    assert all(e < 0.1 for t, e in errors.items() if t >= 0.3), errors
    assert all(e < 0.3 for e in errors.values()), errors
    n = 8000
    y = torch.as_tensor(spec.y)[None]
    x_net = sample(module, y, NoiseSource(1, (n, *spec.shape)), steps=100, sampler="ddpm").samples
    x_ref = sample(ExactPosteriorEps(spec), y, NoiseSource(1, (n, *spec.shape)), steps=100, sampler="ddpm").samples
    d = (x_net**2 - x_ref**2).reshape(n, -1)
    exact = exact_posterior(spec).second_moment
    diff = d.mean(0)
    se = d.std(0) / n**0.5
    assert torch.all(diff.abs() < 5 * se + 0.1 * exact), (diff, se, exact)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_converged_picard_matches_sequential_with_a_trained_network(fitted, sampler):
    """Float64 copy of the trained UNet: Picard at tol 1e-6 reproduces the sequential sample to 1e-5."""
    import copy

    from lightning_mlmc import NoiseSource, sample
    from lightning_mlmc.picard import picard_sample

    model = copy.deepcopy(fitted["module"].model).double().eval()
    _, y = fitted["dm"].validation_observations(1)
    y = y.double()
    shape = (2, 1, 8, 8)
    ref = sample(model, y, NoiseSource(7, shape), steps=20, sampler=sampler).samples
    out = picard_sample(model, y, NoiseSource(7, shape), steps=20, sampler=sampler, window=8, tol=1e-6)
    assert out.stats["converged"]
    assert float((out.samples - ref).abs().max() / ref.abs().max()) < 1e-5
    one = picard_sample(model, y, NoiseSource(7, shape), steps=20, sampler=sampler, window=1, tol=1e-6)
    assert torch.equal(one.samples, ref)  # window 1 is the sequential sampler, bit for bit
