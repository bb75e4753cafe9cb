"""The same answers on a CUDA GPU as on the CPU (skipped where no GPU is visible, as in CI).

Float64 paths (analytic problems, MLMC level sums) must agree with the CPU to rounding; the float32 UNet
is compared with TF32 switched off, so the only differences are float32 reordering inside cuDNN/cuBLAS.
"""

import json
import math
import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from tests.analytic_cases import EXAMPLES, bimodal2d, inpaint4x4
from pytorch_lightning.loggers import CSVLogger

from callbacks import FusedEMA, MLMCCallback, PicardCallback
from datamodules import DigitsDataModule
from lightning_mlmc import ExactPosteriorEps, NoiseSource, TimeGrid, sample
from lightning_mlmc.cli import main as cli_main
from lightning_mlmc.mlmc import SUM_NAMES, CoupledLevelSampler, MLMCConfig, mlmc_auto
from lightning_mlmc.module import ScoreModule, load_score_module
from lightning_mlmc.picard import picard_sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_on_cuda_equal_the_cpu_on_the_exact_score(sampler):
    spec = inpaint4x4()
    model, y, shape = ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], (32, *spec.shape)
    cpu = sample(model, y, NoiseSource(5, shape), steps=100, sampler=sampler, grid=TimeGrid("logsnr")).samples
    gpu = sample(model, y, NoiseSource(5, shape, device=CUDA), steps=100, sampler=sampler,
                 grid=TimeGrid("logsnr")).samples
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float64
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("anderson", [0, 2])
def test_picard_on_cuda_matches_the_sequential_sampler(anderson):
    spec = bimodal2d()
    model, y, shape = ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], (64, *spec.shape)
    ref = sample(model, y, NoiseSource(8, shape, device=CUDA), steps=200, sampler="ddpm").samples
    out = picard_sample(model, y, NoiseSource(8, shape, device=CUDA), steps=200, sampler="ddpm", window=64,
                        tol=1e-7, anderson=anderson)
    assert out.samples.device.type == "cuda" and out.stats["converged"]
    assert float((out.samples - ref).abs().max() / ref.abs().max()) < 1e-5
    assert out.rounds < 200


@pytest.mark.parametrize("sampler", ["ddpm", "picard-ddim"])
def test_cli_device_auto_runs_on_the_gpu_and_equals_cpu(tmp_path, sampler):
    spec = os.path.join(EXAMPLES, "inpaint4x4.json")
    out = {}
    for device in ("cpu", "auto"):
        out[device] = tmp_path / f"{device}.npz"
        rc = cli_main(["sample", "--problem", spec, "--sampler", sampler, "--steps", "50", "--window", "16",
                       "--tol", "1e-6", "--num-samples", "32", "--seed", "2", "--device", device,
                       "--out", str(out[device])])
        assert rc == 0
    assert json.loads(str(np.load(out["auto"])["stats"]))["device"] == "cuda"
    np.testing.assert_allclose(np.load(out["auto"])["samples"], np.load(out["cpu"])["samples"], rtol=1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("coupling", ["naive", "weighted", "jacobian"])
def test_mlmc_level_sums_on_cuda_equal_the_cpu(coupling):
    spec = inpaint4x4()
    sums = {}
    for device in ("cpu", "cuda"):
        samp = CoupledLevelSampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None].to(device), spec.shape,
                                   lmin=1, coupling=coupling, grid=TimeGrid("logsnr"), seed=11, device=device)
        sums[device] = [samp(level, 50) for level in range(1, 6)]
    for cpu, gpu in zip(sums["cpu"], sums["cuda"]):
        assert (cpu.n, cpu.calls) == (gpu.n, gpu.calls)
        for k in SUM_NAMES:
            torch.testing.assert_close(gpu.sums[k].cpu(), cpu.sums[k], rtol=1e-9, atol=1e-12)


def test_mlmc_driver_on_cuda_gives_the_cpu_estimate():
    spec = inpaint4x4()
    results = {}
    for device in ("cpu", "cuda"):
        samp = CoupledLevelSampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None].to(device), spec.shape,
                                   grid=TimeGrid("logsnr"), seed=3, device=device)
        results[device] = mlmc_auto(samp, 0.05, lmax=12, n0=50)
    cpu, gpu = results["cpu"], results["cuda"]
    assert [s.n_samples for s in gpu.levels] == [s.n_samples for s in cpu.levels]
    np.testing.assert_allclose(np.asarray(gpu.estimate), np.asarray(cpu.estimate), rtol=1e-8, atol=1e-12)


def _fit_on_gpu(tmp_path, steps=6):
    pl.seed_everything(0)
    dm = DigitsDataModule({"name": "superres", "factor": 2, "noise_std": 0.05}, batch_size=32)
    module = ScoreModule(operator=dm.operator_config(), channels=[8, 16], attention=False, warmup_steps=2)
    mlmc_cb = MLMCCallback(eps=0.2, observations=1, mlmc=MLMCConfig(M=2, lmin=1, lmax=3, n0=8, seed=3, clip=2.0))
    picard_cb = PicardCallback(steps=10, window=4, tol=0.1, observations=1, samples_per_observation=2)
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=1, val_check_interval=steps, num_sanity_val_steps=0,
                         logger=CSVLogger(str(tmp_path)), default_root_dir=str(tmp_path),
                         enable_progress_bar=False, callbacks=[FusedEMA(decay=0.5), mlmc_cb, picard_cb],
                         accelerator="gpu", devices=1)
    trainer.fit(module, dm)
    return trainer, dm, module


def test_training_and_uq_callbacks_on_the_gpu(tmp_path, no_tf32):
    trainer, dm, module = _fit_on_gpu(tmp_path)
    assert trainer.strategy.root_device.type == "cuda"  # (Lightning moves the module back to the CPU at teardown)
    latest = json.loads((tmp_path / "uq_summary.json").read_text())["latest"]
    for key in ("mlmc/alpha", "mlmc/savings", "mlmc/rmse_bound", "picard/rounds", "picard/max_abs_diff"):
        assert key in latest and math.isfinite(latest[key]), key
    # The trained weights give the same eps-prediction on the GPU and, reloaded, on the CPU.
    path = tmp_path / "gpu.ckpt"
    trainer.save_checkpoint(str(path))
    cpu_model = load_score_module(str(path)).model
    gpu_model = module.model.to(CUDA).eval()
    x, y = next(iter(dm.val_dataloader()))
    x_t, t = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), torch.linspace(0.05, 1.0, len(x))
    with torch.no_grad():
        e_cpu = cpu_model(x_t, y, t)
        e_gpu = gpu_model(x_t.to(CUDA), y.to(CUDA), t.to(CUDA)).cpu()
    torch.testing.assert_close(e_gpu, e_cpu, rtol=1e-4, atol=1e-4)
    # The CLI on that checkpoint: --device cuda and --device cpu give the same samples up to float32 rounding.
    np.save(tmp_path / "y.npy", y[0].numpy())
    samples = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.npz"
        assert cli_main(["sample", "--checkpoint", str(path), "--observation", str(tmp_path / "y.npy"), "--sampler",
                         "ddim", "--steps", "20", "--num-samples", "8", "--device", device, "--out", str(out)]) == 0
        samples[device] = np.load(out)["samples"]
    np.testing.assert_allclose(samples["cuda"], samples["cpu"], rtol=1e-3, atol=1e-3)


def test_mlmc_reduces_on_the_gpu_under_nccl(monkeypatch):
    """A one-process NCCL group (NCCL has no CPU backend): the per-level sums are all-reduced as CUDA tensors
    and the run equals the run outside torch.distributed."""
    import socket

    import torch.distributed as dist

    from lightning_mlmc.mlmc import MLMCConfig, run_mlmc

    spec = inpaint4x4()
    config = MLMCConfig(seed=3)

    def run():
        levels = config.level_sampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], spec.shape,
                                      device=CUDA)
        return run_mlmc(config, levels, 0.1)

    alone = run()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        grouped = run()
    finally:
        dist.destroy_process_group()
    assert grouped.world_size == 1 and [lv.n_samples for lv in grouped.levels] == [lv.n_samples for lv in alone.levels]
    np.testing.assert_allclose(grouped.estimate, alone.estimate, rtol=1e-12, atol=1e-14)
