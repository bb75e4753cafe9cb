"""Reliability (issue 7): bad input everywhere, fail-fast numerics, interrupted fits resume, safe loading,
logging that cannot kill a run. Property-based tests (hypothesis) for the spec loader and the operators."""

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.analytic_cases import EXAMPLES, bimodal2d

from lightning_mlmc import ExactPosteriorEps
from lightning_mlmc.cli import main as cli_main
from lightning_mlmc.mlmc import MLMCConfig
from lightning_mlmc.errors import InputError, NumericalError
from lightning_mlmc.mlmc import CoupledLevelSampler, mlmc
from lightning_mlmc.module import ScoreModule, load_score_module
from lightning_mlmc.operators import operator_from_config
from lightning_mlmc.problems import AnalyticSpec
from lightning_mlmc.sampling import NoiseSource, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SPEC = os.path.join(EXAMPLES, "bimodal2d.json")
EXE = shutil.which("lightning-mlmc", path=os.path.dirname(sys.executable))


# ------------------------------------------------------------------------------------------------
# The CLI's bad-input matrix: one line naming the field, exit 2, no traceback, no output file.


def _spec(tmp, mutate=None, text=None):
    f = tmp / "spec.json"
    if text is not None:
        f.write_text(text)
    else:
        d = json.load(open(SPEC))
        mutate(d)
        f.write_text(json.dumps(d))
    return str(f)


def _cov_nan(d):
    d["prior"]["covs"][0][0][0] = float("nan")


def _cov_not_pd(d):
    d["prior"]["covs"][0] = [[1.0, 2.0], [2.0, 1.0]]


MLMC_BAD = [
    ("malformed spec", lambda t: ["--problem", _spec(t, text='{"prior": {"weights": [1')], "not valid JSON"),
    ("truncated spec", lambda t: ["--problem", _spec(t, text=open(SPEC).read()[:60])], "not valid JSON"),
    ("nan in covariance", lambda t: ["--problem", _spec(t, _cov_nan)], "prior.covs"),
    ("not positive definite", lambda t: ["--problem", _spec(t, _cov_not_pd)], "positive-definite"),
    ("inf in y", lambda t: ["--problem", _spec(t, lambda d: d.__setitem__("y", [float("inf")]))], "y:"),
    ("y of the wrong shape", lambda t: ["--problem", _spec(t, lambda d: d.__setitem__("y", [1.0, 2.0]))], "y:"),
    ("eps zero", lambda t: ["--problem", SPEC, "--eps", "0"], "eps"),
    ("M one", lambda t: ["--problem", SPEC, "--M", "1"], "M"),
    ("lmin above lmax", lambda t: ["--problem", SPEC, "--lmin", "6", "--lmax", "4"], "lmin"),
    ("unknown payoff", lambda t: ["--problem", SPEC, "--payoff", "cube"], "--payoff"),
    ("unknown grid", lambda t: ["--problem", SPEC, "--grid", "cosine"], "--grid"),
    ("missing checkpoint", lambda t: ["--checkpoint", str(t / "none.ckpt"), "--observation", SPEC], "checkpoint"),
    ("corrupt checkpoint", lambda t: ["--checkpoint", _corrupt(t), "--observation", SPEC], "checkpoint"),
    ("output folder missing", lambda t: ["--problem", SPEC, "--out", str(t / "no" / "r.json")], "out:"),
    ("output folder unwritable", lambda t: ["--problem", SPEC, "--out", _under_a_file(t)], "out:"),
]


def _corrupt(tmp):
    f = tmp / "corrupt.ckpt"
    f.write_bytes(b"PK\x03\x04 truncated zip archive")
    return str(f)


def _under_a_file(tmp):
    (tmp / "plain").write_text("a file, not a folder")
    return str(tmp / "plain" / "r.json")


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def _run(argv, capsys):
    """The console script's main() in this process (the subprocess path is tested in test_cli_sample)."""
    capsys.readouterr()
    try:
        rc = cli_main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    return _Result(rc, capsys.readouterr().err)


def _assert_one_line_exit_2(p, needle):
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", ["mlmc", "mlmc-test"])
@pytest.mark.parametrize("name, args, needle", MLMC_BAD, ids=[b[0] for b in MLMC_BAD])
def test_mlmc_commands_bad_input(tmp_path, capsys, command, name, args, needle):
    out = tmp_path / "r.json"
    extra = args(tmp_path)
    base = {"--out": str(out), **({"--eps": "0.1"} if command == "mlmc" else {"--levels": "3", "--samples": "10"})}
    base = {k: v for k, v in base.items() if k not in extra}
    if command == "mlmc-test" and name == "eps zero":
        extra = ["--problem", SPEC, "--eps-list", "0"]
        needle = "eps-list"
    p = _run([command, *extra, *[x for kv in base.items() for x in kv]], capsys)
    _assert_one_line_exit_2(p, needle)
    assert not out.exists() and not glob.glob(str(tmp_path / "**" / "r.json*"), recursive=True)


@pytest.mark.parametrize("args, needle", [
    (["--sampler", "picard-ddpm", "--window", "0"], "window"),
    (["--sampler", "picard-ddpm", "--window", "4", "--tol", "0"], "tol"),
    (["--sampler", "picard-ddpm", "--window", "4", "--tol", "-1"], "tol"),
    (["--sampler", "ddpm", "--num-samples", "0"], "num-samples"),
])
def test_sample_bad_picard_arguments(tmp_path, capsys, args, needle):
    out = tmp_path / "s.npz"
    base = {"--steps": "8", "--num-samples": "2"}
    base = {k: v for k, v in base.items() if k not in args}
    p = _run(["sample", "--problem", SPEC, *args, *[x for kv in base.items() for x in kv], "--out", str(out)], capsys)
    _assert_one_line_exit_2(p, needle)
    assert not out.exists()


def test_observation_with_nan_and_wrong_shape(tmp_path, capsys):
    module = ScoreModule(operator={"name": "superres", "shape": [1, 8, 8], "factor": 2, "noise_std": 0.05},
                         channels=[8, 16], attention=False)
    module.export(str(tmp_path / "model"))
    np.save(tmp_path / "nan.npy", np.full((1, 4, 4), np.nan, np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((1, 5, 4), np.float32))
    for obs, needle in (("nan.npy", "NaN"), ("shape.npy", "expected shape [1, 4, 4]")):
        for command in (["mlmc", "--eps", "0.1"], ["sample", "--sampler", "ddpm", "--steps", "4", "--num-samples", "2"]):
            out = tmp_path / "o.json"
            p = _run([*command, "--checkpoint", str(tmp_path / "model"), "--observation", str(tmp_path / obs),
                      "--out", str(out)], capsys)
            _assert_one_line_exit_2(p, needle)
            assert not out.exists()


# ------------------------------------------------------------------------------------------------
# Property-based: the spec loader and the operators either work or raise InputError.

_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.text(max_size=2),
                    st.none(), st.lists(st.floats(-2, 2), max_size=3))


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from([("noise_std",), ("y", 0), ("prior", "weights", 0), ("prior", "means", 0, 1),
                             ("prior", "covs", 0, 0, 1), ("operator", "matrix", 0, 0), ("shape",), ("y",),
                             ("prior", "covs", 1), ("operator", "matrix")]),
       value=_floats)
def test_spec_loader_accepts_or_names_the_field(path, value):
    d = json.loads(json.dumps(bimodal2d().to_dict()))
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        spec = AnalyticSpec.from_dict(d)
    except InputError as e:
        assert str(e).split(":")[0].split(".")[0].split("[")[0] in {"prior", "operator", "noise_std", "y", "shape"}, e
        return
    # Accepted: then it is a usable problem with finite, consistent fields.
    assert np.isfinite(spec.y).all() and spec.noise_std > 0
    assert math.prod(spec.shape) == spec.dim


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["superres", "denoise", "inpaint", "blur"]),
       shape=st.lists(st.integers(-1, 9), min_size=1, max_size=4),
       factor=st.integers(-1, 5), noise=st.one_of(st.floats(-1, 1), st.just(float("nan"))),
       box=st.lists(st.integers(-2, 9), min_size=3, max_size=5), mask=st.sampled_from(["box", "random", "stripe"]))
def test_operators_accept_or_name_the_field(name, shape, factor, noise, box, mask):
    config = {"name": name, "shape": shape, "noise_std": noise}
    if name == "superres":
        config["factor"] = factor
    if name == "inpaint":
        config.update(mask=mask, box=box)
    try:
        op = operator_from_config(config)
    except InputError:
        return
    x = torch.rand(2, *op.shape)
    y = op.observe(x, generator=torch.Generator().manual_seed(0))
    assert tuple(op.apply(x).shape[1:]) == tuple(op.observation_shape)
    assert tuple(y.shape[1:]) == tuple(op.observation_shape) and torch.isfinite(y).all()
    cond = op.condition(y)
    assert cond.shape[0] == 2 and cond.shape[1] == op.cond_channels and torch.isfinite(cond).all()
    assert operator_from_config(op.config()).config() == op.config()


# ------------------------------------------------------------------------------------------------
# Fail fast on numerical trouble.


class _Diverging(ExactPosteriorEps):
    """The exact score, then NaN below t = 0.3 (a diverged network)."""

    def forward(self, x, y, t):
        out = super().forward(x, y, t)
        return torch.where((t < 0.3).reshape(-1, *([1] * (x.dim() - 1))), torch.nan, out)


def test_nan_in_a_sampler_names_the_level_step_and_time():
    spec = bimodal2d()
    samp = CoupledLevelSampler(_Diverging(spec), torch.as_tensor(spec.y)[None], spec.shape, lmin=2)
    with pytest.raises(NumericalError, match=r"level 2, step \d+ \(t = 0\.2"):
        mlmc(samp, 0.1, n0=10)
    with pytest.raises(NumericalError, match=r"step \d+ \(t = 0\.2"):
        sample(_Diverging(spec), torch.as_tensor(spec.y)[None], NoiseSource(0, (4, *spec.shape)), steps=10)


# ------------------------------------------------------------------------------------------------
# Safe loading.


class _Opaque:
    """A Python object that weights_only loading refuses."""


def test_pickled_checkpoints_need_an_explicit_opt_in(tmp_path):
    module = ScoreModule(operator={"name": "superres", "shape": [1, 8, 8], "factor": 2, "noise_std": 0.05},
                         channels=[8, 16], attention=False)
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "extra": _Opaque()},
               path)
    with pytest.raises(InputError, match="allow-pickle"):
        load_score_module(str(path))
    with pytest.warns(UserWarning, match="weights_only=False"):
        loaded = load_score_module(str(path), allow_pickle=True)
    for a, b in zip(loaded.state_dict().values(), module.state_dict().values()):
        torch.testing.assert_close(a, b)
    # The CLI: refused without the flag (one line, exit 2), loaded with it.
    np.save(tmp_path / "y.npy", np.zeros((1, 4, 4), np.float32))
    common = ["--checkpoint", str(path), "--observation", str(tmp_path / "y.npy"), "--sampler", "ddpm", "--steps", "2",
              "--num-samples", "2", "--out", str(tmp_path / "s.npz")]
    env_path = f"{os.path.dirname(os.path.abspath(__file__))}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    p = subprocess.run([EXE, "sample", *common], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": env_path})
    _assert_one_line_exit_2(p, "--allow-pickle")
    p = subprocess.run([EXE, "sample", "--allow-pickle", *common], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": env_path})
    assert p.returncode == 0, p.stderr
    assert "weights_only=False" in p.stderr and (tmp_path / "s.npz").exists()


# ------------------------------------------------------------------------------------------------
# Logging never kills a run; interrupted fits resume.

QUIET = """
trainer:
  callbacks:
    - class_path: pytorch_lightning.callbacks.EMAWeightAveraging
      init_args: {decay: 0.9}
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {save_last: true}
"""


def _fit_args(tmp_path, *extra):
    (tmp_path / "quiet.yaml").write_text(QUIET)
    return ["fit", "--config", os.path.join(CONFIGS, "digits_superres.yaml"), "--config", str(tmp_path / "quiet.yaml"),
            "--model.channels", "[8, 16]", "--model.attention", "false", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), *extra]


def _csv_has_train_loss(root):
    metrics = glob.glob(str(root / "**" / "metrics.csv"), recursive=True)
    return bool(metrics) and "train/loss" in open(metrics[0]).read()


def test_failing_wandb_falls_back_to_csv(tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("the wandb service could not start")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning, match="W&B logging failed .*could not start.*CSV"):
        assert cli_main(_fit_args(tmp_path, "--trainer.max_steps", "3", "--trainer.max_epochs", "1")) == 0
    assert _csv_has_train_loss(tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_unwritable_wandb_dir_falls_back_to_csv(tmp_path, monkeypatch):
    (tmp_path / "plain").write_text("a file")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "plain" / "wandb"))
    with pytest.warns(UserWarning, match="W&B logging failed"):
        assert cli_main(_fit_args(tmp_path, "--trainer.max_steps", "3", "--trainer.max_epochs", "1")) == 0
    assert _csv_has_train_loss(tmp_path)


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_finishes_the_run(tmp_path):
    """SIGTERM right after the first epoch's checkpoint (so mid-epoch 2 of 8): exit 143 with checkpoints/interrupted.ckpt; resuming from it finishes
    with as many optimizer steps as an uninterrupted run."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    epochs = 8
    args = _fit_args(tmp_path, "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", "1")
    proc = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.exists(), proc.communicate()[1][-2000:]
    steps_per_epoch = torch.load(first, weights_only=True)["global_step"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    interrupted = tmp_path / "checkpoints" / "interrupted.ckpt"
    state = torch.load(interrupted, weights_only=True)
    assert steps_per_epoch <= state["global_step"] < epochs * steps_per_epoch
    p = subprocess.run([EXE, *args, "--ckpt_path", str(interrupted)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == epochs * steps_per_epoch and final["epoch"] == epochs - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_score_module(str(tmp_path / "checkpoints" / "last.ckpt"))


# ------------------------------------------------------------------------------------------------
# Public constructors and functions: InputError naming the field.


def _picard(**kw):
    from lightning_mlmc.picard import picard_sample

    spec = bimodal2d()
    return picard_sample(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], NoiseSource(0, (2, 2)), steps=8, **kw)


def _coupled(**kw):
    spec = bimodal2d()
    return CoupledLevelSampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], spec.shape, **kw)


def _callback(name, **kw):
    import callbacks

    return getattr(callbacks, name)(**kw)


CONSTRUCTORS = [
    ("picard window", lambda: _picard(window=0), "window"),
    ("picard tol", lambda: _picard(window=4, tol=0.0), "tol"),
    ("picard sampler", lambda: _picard(window=4, sampler="heun"), "sampler"),
    ("level sampler M", lambda: _coupled(M=1), "M"),
    ("level sampler coupling", lambda: _coupled(coupling="antithetic"), "coupling"),
    ("level sampler payoff", lambda: _coupled(payoff="cube"), "payoff"),
    ("mlmc eps", lambda: mlmc(_coupled(), float("nan")), "eps"),
    ("mlmc lmin", lambda: mlmc(_coupled(lmin=3), 0.1, lmax=2), "lmin"),
    ("mlmc config lmin", lambda: __import__("lightning_mlmc").MLMCConfig(lmin=5, lmax=3), "lmin"),
    ("mlmc config grid", lambda: __import__("lightning_mlmc").MLMCConfig(grid="cosine"), "grid"),
    ("mlmc theta", lambda: mlmc(_coupled(), 0.1, theta=1.0), "theta"),
    ("grid kind", lambda: __import__("lightning_mlmc").TimeGrid("cosine"), "grid"),
    ("noise seed", lambda: NoiseSource(-1, (2, 2)), "seed"),
    ("digits operator", lambda: __import__("datamodules").DigitsDataModule(operator={"name": "blur"}), "operator"),
    ("mlmc callback eps", lambda: _callback("MLMCCallback", eps=0), "eps"),
    ("mlmc callback coupling", lambda: _callback("MLMCCallback", mlmc=MLMCConfig(coupling="best")), "coupling"),
    ("mlmc callback lmin", lambda: _callback("MLMCCallback", mlmc=MLMCConfig(lmin="soon")), "lmin"),
    ("picard callback window", lambda: _callback("PicardCallback", window=0), "window"),
    ("picard callback tol", lambda: _callback("PicardCallback", tol=-1.0), "tol"),
]


@pytest.mark.parametrize("name, build, field", CONSTRUCTORS, ids=[c[0] for c in CONSTRUCTORS])
def test_public_constructors_name_the_bad_field(name, build, field):
    with pytest.raises(InputError) as err:
        build()
    message = str(err.value)
    assert field in message.split(":")[0] or message.startswith(field), message
    assert "\n" not in message
