"""The command line on a diffusers DDPM folder: ``sample``, ``mlmc`` and ``mlmc-test`` with
``--operator denoise --noise-std S`` (observation start by default), PNG observations, ``--save-images``, the
bare ``UNet2DModel`` layouts, and one-line exit-2 errors for folders and schedulers that cannot be used."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tests.pretrained_cases import digits, trained_pipeline

from lightning_mlmc.cli import main
from lightning_mlmc.module import load_score_model
from lightning_mlmc.pretrained import PretrainedEps, load_pretrained
from lightning_mlmc.schedule import TimeGrid
from lightning_mlmc.sampling import NoiseSource, observation_start, sample

NOISE = 0.2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    """(pipeline folder, y.npy, y.png): a noisy validation-like digit, saved both ways (the PNG holds the same
    values after 8-bit rounding: y is first quantised to [0, 255] steps)."""
    folder, _ = trained_pipeline(tmp_path_factory)
    g = torch.Generator().manual_seed(11)
    y = (digits()[1500] + NOISE * torch.randn((1, 8, 8), generator=g)).clamp(-1, 1)
    y = torch.round((y + 1) * 127.5) / 127.5 - 1  # representable in a PNG
    work = tmp_path_factory.mktemp("obs")
    np.save(work / "y.npy", y.numpy().astype(np.float32))
    Image.fromarray(np.round((y[0].numpy() + 1) * 127.5).astype(np.uint8), "L").save(work / "y.png")
    return folder, work / "y.npy", work / "y.png"


def _sample_args(folder, obs, out, *extra):
    return ["sample", "--checkpoint", str(folder), "--operator", "denoise", "--noise-std", str(NOISE),
            "--observation", str(obs), "--sampler", "ddpm", "--steps", "20", "--num-samples", "4",
            "--out", str(out), *extra]


def test_sample_on_a_saved_pipeline_is_the_library_sampler_from_the_observation_start(ddpm, tmp_path):
    """The README's command: samples of the image's shape, equal to ``sample`` on ``load_pretrained`` with the
    observation start (so the CLI wires the start, the seed and the operator as documented)."""
    folder, obs, _ = ddpm
    out = tmp_path / "s.npz"
    assert main(_sample_args(folder, obs, out)) == 0
    z = np.load(out)
    assert z["samples"].shape == (4, 64) and np.isfinite(z["samples"]).all()
    stats = json.loads(str(z["stats"]))
    assert stats["nfe"] == 20 and stats["steps"] == 20
    model = load_pretrained(str(folder), "denoise", NOISE)
    y = torch.as_tensor(np.load(obs))
    start = observation_start(y, NOISE)
    ref = sample(model, y[None], NoiseSource(0, (4, 1, 8, 8), dtype=torch.float32), steps=20, start=start,
                 grid=TimeGrid("logsnr"))  # the command line's default grid
    np.testing.assert_allclose(z["samples"], ref.samples.reshape(4, -1).double().numpy(), rtol=0, atol=1e-6)
    # The posterior samples stay near y (noise 0.2): the model denoises rather than drawing arbitrary digits.
    assert float(np.abs(z["samples"].mean(0) - y.reshape(-1).numpy()).mean()) < 0.3


def test_mlmc_and_mlmc_test_on_a_saved_pipeline(ddpm, tmp_path):
    folder, obs, _ = ddpm
    base = ["--checkpoint", str(folder), "--operator", "denoise", "--noise-std", str(NOISE), "--observation", str(obs)]
    out = tmp_path / "r.json"
    assert main(["mlmc", *base, "--eps", "0.2", "--out", str(out)]) == 0
    r = json.load(open(out))
    assert len(r["estimate"]) == 64 and np.isfinite(r["estimate"]).all() and r["nfe"] > 0
    out = tmp_path / "t.json"
    assert main(["mlmc-test", *base, "--levels", "2", "--samples", "16", "--lmin", "0", "--out", str(out)]) == 0
    assert len(json.load(open(out))["rows"]) == 3


def test_png_observation_and_save_images(ddpm, tmp_path):
    """A PNG gives the same y as its .npy (so the same samples); --save-images writes mean, std and 4 samples
    as 8x8 grayscale PNGs whose mean image is the samples' mean mapped [-1, 1] -> [0, 255]."""
    folder, obs, png = ddpm
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert main(_sample_args(folder, obs, a)) == 0
    assert main(_sample_args(folder, png, b, "--save-images", str(tmp_path / "img"))) == 0
    np.testing.assert_allclose(np.load(a)["samples"], np.load(b)["samples"], rtol=0, atol=1e-5)
    names = sorted(os.listdir(tmp_path / "img"))
    assert names == ["images.json", "mean.png", "sample_0.png", "sample_1.png", "sample_2.png", "sample_3.png",
                     "std.png"]
    mean_png = np.asarray(Image.open(tmp_path / "img" / "mean.png"))
    assert mean_png.shape == (8, 8) and mean_png.dtype == np.uint8
    expect = np.clip((np.load(b)["samples"].mean(0).reshape(8, 8) + 1) / 2, 0, 1) * 255
    assert np.abs(mean_png - expect).max() <= 0.5 + 1e-6
    std_png = np.asarray(Image.open(tmp_path / "img" / "std.png"))
    assert std_png.max() == 255  # scaled to the largest std, recorded in images.json
    scale = json.load(open(tmp_path / "img" / "images.json"))["scale"]
    assert scale["mean.png"] == {"black": -1.0, "white": 1.0} and scale["std.png"]["white"] > 0


def test_mlmc_moments_save_mean_and_std_images(ddpm, tmp_path):
    folder, obs, _ = ddpm
    out = tmp_path / "r.json"
    assert main(["mlmc", "--checkpoint", str(folder), "--operator", "denoise", "--noise-std", str(NOISE),
                 "--observation", str(obs), "--eps", "0.2", "--payoff", "moments", "--out", str(out),
                 "--save-images", str(tmp_path / "img")]) == 0
    assert sorted(os.listdir(tmp_path / "img")) == ["images.json", "mean.png", "std.png"]
    assert len(json.load(open(out))["estimate"]) == 128


def test_bare_unet_folders_load_like_the_pipeline(ddpm, tmp_path):
    """A UNet2DModel folder with scheduler_config.json inside it, or the pipeline's unet/ (scheduler in
    ../scheduler/), give the pipeline's samples; the library loader takes the folder too."""
    folder, obs, _ = ddpm
    bare = tmp_path / "bare"
    shutil.copytree(folder / "unet", bare)
    shutil.copy(folder / "scheduler" / "scheduler_config.json", bare / "scheduler_config.json")
    outs = []
    for ckpt in (folder, bare, folder / "unet"):
        outs.append(tmp_path / f"{len(outs)}.npz")
        assert main(_sample_args(ckpt, obs, outs[-1])) == 0
    ref = np.load(outs[0])["samples"]
    for o in outs[1:]:
        assert np.array_equal(np.load(o)["samples"], ref)
    model = load_score_model(str(bare), noise_std=NOISE)
    assert isinstance(model, PretrainedEps) and model.operator.name == "denoise" and model.shape == (1, 8, 8)


def _variant(folder, tmp_path, scheduler=None, unet=None, index=None, drop=None):
    """A copy of the pipeline with edited JSON (scheduler / unet config / model_index) or a file removed."""
    dst = tmp_path / "variant"
    shutil.copytree(folder, dst)
    for rel, edit in (("scheduler/scheduler_config.json", scheduler), ("unet/config.json", unet),
                      ("model_index.json", index)):
        if edit:
            cfg = json.load(open(dst / rel))
            cfg.update(edit)
            json.dump(cfg, open(dst / rel, "w"))
    if drop:
        os.remove(dst / drop)
    return dst


BAD = [
    ("not a model folder", lambda f, t: ["--checkpoint", str(_plain(t))], "checkpoint:"),
    ("variance-exploding scheduler", lambda f, t: ["--checkpoint", str(_variant(
        f, t, scheduler={"_class_name": "ScoreSdeVeScheduler"}))], "scheduler._class_name"),
    ("unknown beta schedule", lambda f, t: ["--checkpoint", str(_variant(
        f, t, scheduler={"beta_schedule": "cubic"}))], "scheduler.beta_schedule"),
    ("unknown prediction type", lambda f, t: ["--checkpoint", str(_variant(
        f, t, scheduler={"prediction_type": "score"}))], "scheduler.prediction_type"),
    ("class-conditional unet", lambda f, t: ["--checkpoint", str(_variant(
        f, t, unet={"num_class_embeds": 10}))], "unet.num_class_embeds"),
    ("fourier time embedding", lambda f, t: ["--checkpoint", str(_variant(
        f, t, unet={"time_embedding_type": "fourier"}))], "unet.time_embedding_type"),
    ("latent pipeline", lambda f, t: ["--checkpoint", str(_variant(
        f, t, index={"vqvae": ["diffusers", "VQModel"]}))], "checkpoint:"),
    ("weights missing", lambda f, t: ["--checkpoint", str(_variant(
        f, t, drop="unet/diffusion_pytorch_model.safetensors"))], "checkpoint: cannot load the UNet"),
    ("no operator", lambda f, t: ["--checkpoint", str(f), "--operator", None], "operator:"),
    ("unconditional inpainting", lambda f, t: ["--checkpoint", str(f), "--operator", "inpaint"], "operator:"),
    ("no noise std", lambda f, t: ["--checkpoint", str(f), "--noise-std", None], "noise-std"),
    ("gaussian start", lambda f, t: ["--checkpoint", str(f), "--start", "gaussian"], "start:"),
    ("noise beyond the model", lambda f, t: ["--checkpoint", str(_variant(
        f, t, scheduler={"num_train_timesteps": 500})), "--noise-std", "150"], "beyond the model's largest noise level"),
    ("noise beyond t = 1", lambda f, t: ["--checkpoint", str(f), "--noise-std", "200"], "noise_std:"),
    ("png of another size", lambda f, t: ["--checkpoint", str(f), "--observation", str(_png(t, 16))], "observation:"),
    ("resize a .npy", lambda f, t: ["--checkpoint", str(f), "--resize", True], "resize:"),
    ("operator with a spec", lambda f, t: ["--problem", os.path.join(os.path.dirname(__file__), "..", "examples",
                                                                     "bimodal2d.json"), "--observation", None],
     "operator:"),
]


def _plain(tmp):
    (tmp / "plain").mkdir()
    (tmp / "plain" / "notes.txt").write_text("not a model")
    return tmp / "plain"


def _png(tmp, size):
    Image.fromarray(np.zeros((size, size), np.uint8), "L").save(tmp / "big.png")
    return tmp / "big.png"


def _bad_argv(folder, obs, tmp_path, extra):
    base = {"--checkpoint": None, "--operator": "denoise", "--noise-std": str(NOISE), "--observation": str(obs),
            "--sampler": "ddpm", "--steps": "4", "--num-samples": "2", "--out": str(tmp_path / "out.npz")}
    merged = {**base, **dict(zip(extra[::2], extra[1::2]))}
    if "--problem" in merged:
        merged.pop("--checkpoint")
    # None drops an option, True gives a flag without a value.
    return ["sample", *[x for k, v in merged.items() if v is not None for x in ((k,) if v is True else (k, v))]]


@pytest.mark.parametrize("name, args, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_folders_and_options_are_one_line_exit_2(ddpm, tmp_path, capsys, name, args, needle):
    """In this process (main() returns the exit status and prints the line; any traceback fails the test)."""
    folder, obs, _ = ddpm
    capsys.readouterr()
    rc = main(_bad_argv(folder, obs, tmp_path, args(folder, tmp_path)))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert needle in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "out.npz")


def test_an_unmappable_scheduler_through_the_console_script(ddpm, tmp_path):
    folder, obs, _ = ddpm
    bad = _variant(folder, tmp_path, scheduler={"_class_name": "KarrasVeScheduler"})
    exe = shutil.which("lightning-mlmc", path=os.path.dirname(sys.executable))
    p = subprocess.run([exe, *_bad_argv(folder, obs, tmp_path, ["--checkpoint", str(bad)])], capture_output=True,
                       text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "scheduler._class_name" in p.stderr
    assert not os.path.exists(tmp_path / "out.npz")


def test_mlmc_save_images_needs_an_image_payoff(ddpm, tmp_path, capsys):
    folder, obs, _ = ddpm
    out = tmp_path / "r.json"
    rc = main(["mlmc", "--checkpoint", str(folder), "--operator", "denoise", "--noise-std", str(NOISE),
               "--observation", str(obs), "--eps", "0.2", "--out", str(out), "--save-images", str(tmp_path / "i")])
    assert rc == 2 and "save-images" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "i").exists()


def test_a_resumed_mlmc_state_is_keyed_on_the_noise_std(ddpm, tmp_path, capsys):
    """``--state`` from a run at one --noise-std is not continued by a run at another (different likelihood)."""
    folder, obs, _ = ddpm
    base = ["mlmc", "--checkpoint", str(folder), "--operator", "denoise", "--observation", str(obs), "--eps", "0.3",
            "--n0", "8", "--state", str(tmp_path / "state.json")]
    assert main([*base, "--noise-std", "0.2", "--out", str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    rc = main([*base, "--noise-std", "0.3", "--out", str(tmp_path / "b.json")])
    assert rc == 2 and "state" in capsys.readouterr().err
