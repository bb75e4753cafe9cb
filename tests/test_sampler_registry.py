"""The sampler registry (lightning_mlmc/samplers.py) drives every sampler user, and the one sliding-window Picard
implementation serves sampling and the MLMC levels: every registered sampler runs through ``sample``, Picard,
PIADM and the MLMC levels (sequential and Picard) with the sequential sampler as the fixed point; a sampler
registered under a new name behaves as the one it copies (no module compares names); the options are validated
once; ``sample`` needs no --sampler."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch
from tests.analytic_cases import EXAMPLES, bimodal2d, gaussian3d, inpaint4x4

import lightning_mlmc.samplers as registry
from lightning_mlmc import ExactPosteriorEps, InputError, NoiseSource, TimeGrid, sample
from lightning_mlmc.cli import build_parser, main
from lightning_mlmc.gaussian_oracle import GaussianOracle
from lightning_mlmc.mlmc import MLMCConfig, PicardLevelSampler, engine
from lightning_mlmc.picard import picard_sample, piadm_sample, piadm_times
from lightning_mlmc.samplers import SAMPLERS, check_picard_args, get_sampler

SPEC = os.path.join(EXAMPLES, "bimodal2d.json")
GRID = TimeGrid("logsnr")


def _setup(spec, batch=6):
    return ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], (batch, *spec.shape)


def _close(a, b, tol):
    assert float((a - b).abs().max() / b.abs().max()) < tol


# ----------------------------------------------------------------------------------------------
# The registry itself.


def test_the_registry_is_the_one_list_of_samplers():
    assert set(typing.get_args(registry.SamplerName)) == set(SAMPLERS)  # the typed configs' Literal
    assert registry.DEFAULT_SAMPLER == "ddpm" and all(name == spec.name for name, spec in SAMPLERS.items())
    assert [name for name, s in SAMPLERS.items() if s.stochastic] == ["ddpm"]
    assert [name for name, s in SAMPLERS.items() if s.multistep] == ["dpm2m"]
    for spec in SAMPLERS.values():
        assert spec.calls_per_step == 1 and spec.picard.anderson >= 0 and spec.picard.slide == "paradigms"
    # The command line's choices are the registry's.
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    choices = {cmd: next(a for a in sub[cmd]._actions if a.dest == "sampler").choices for cmd in ("sample", "mlmc")}
    assert choices["sample"] == [*SAMPLERS, *(f"picard-{name}" for name in SAMPLERS)]
    assert list(choices["mlmc"]) == list(SAMPLERS)


def test_an_unknown_sampler_is_a_one_line_error_naming_the_registered_ones():
    for bad in ("euler", "DDPM", "picard-ddpm", None, 3):
        with pytest.raises(InputError) as info:
            get_sampler(bad)
        message = str(info.value)
        assert "\n" not in message and message.startswith("sampler:") and all(n in message for n in SAMPLERS)
    model, y, shape = _setup(bimodal2d())
    for run in (lambda: sample(model, y, NoiseSource(0, shape), steps=4, sampler="euler"),
                lambda: picard_sample(model, y, NoiseSource(0, shape), steps=4, sampler="euler"),
                lambda: MLMCConfig(sampler="euler"), lambda: GaussianOracle(gaussian3d()).law(4, "euler")):
        with pytest.raises(InputError, match="sampler: unknown sampler 'euler'"):
            run()


@pytest.mark.parametrize("kw, needle", [
    (dict(window=0), "window"), (dict(window=2.5), "window"), (dict(window=True), "window"),
    (dict(tol=0.0), "tol"), (dict(tol=float("nan")), "tol"), (dict(tol="0.1"), "tol"),
    (dict(anderson=-1), "anderson"), (dict(anderson=1.5), "anderson"), (dict(slide="greedy"), "slide"),
])
def test_picard_options_are_checked_once_for_every_user(kw, needle):
    """The same bad option is the same one-line error from the checker, picard_sample, the Picard levels (named
    ``picard_...``), MLMCConfig (its fields) and PicardCallback."""
    from callbacks import PicardCallback

    model, y, shape = _setup(bimodal2d())
    runs = [lambda: check_picard_args(**kw), lambda: get_sampler("ddim").picard.with_overrides(**kw),
            lambda: picard_sample(model, y, NoiseSource(0, shape), steps=4, **kw),
            lambda: PicardCallback(**kw)]
    for run in runs:
        with pytest.raises(InputError, match=f"^{needle}: "):
            run()
    with pytest.raises(InputError, match=f"^picard_{needle}: "):
        PicardLevelSampler(model, y, bimodal2d().shape, **{"window": 4, **kw})
    if needle in ("window", "tol"):
        with pytest.raises(InputError, match=f"^picard_{needle}: "):
            MLMCConfig(**{f"picard_{needle}": kw[needle]})


def test_the_picard_defaults_come_from_the_registry():
    from callbacks import PicardCallback

    model, y, shape = _setup(bimodal2d())
    for name, spec in SAMPLERS.items():
        out = picard_sample(model, y, NoiseSource(0, shape), steps=8, sampler=name)
        assert {k: out.stats[k] for k in ("window", "tol", "anderson", "slide")} == dataclasses.asdict(spec.picard)
        cb = PicardCallback(sampler=name)
        assert (cb.window, cb.tol, cb.anderson, cb.slide) == dataclasses.astuple(spec.picard)
    assert PicardCallback(sampler="ddim", anderson=0, window=4).anderson == 0


# ----------------------------------------------------------------------------------------------
# Every registered sampler everywhere, with the sequential sampler as the fixed point.


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_sequentially_and_in_picard_and_piadm_to_the_same_fixed_point(name):
    model, y, shape = _setup(inpaint4x4())
    ref = sample(model, y, NoiseSource(3, shape), steps=40, sampler=name, grid=GRID)
    assert ref.nfe == ref.rounds == 40 * SAMPLERS[name].calls_per_step
    # Picard: window 1 is the sequential sampler bit for bit; a tiny tolerance converges to it in fewer rounds.
    one = picard_sample(model, y, NoiseSource(3, shape), steps=40, sampler=name, grid=GRID, window=1)
    assert torch.equal(one.samples, ref.samples)
    for anderson in (0, 2):
        out = picard_sample(model, y, NoiseSource(3, shape), steps=40, sampler=name, grid=GRID, window=16,
                            tol=1e-9, anderson=anderson)
        assert out.stats["converged"] and out.rounds < 40
        _close(out.samples, ref.samples, 1e-8)
    # PIADM: K = points sweeps per block reproduce the sequential sampler on its grid.
    times = piadm_times(3, 4)
    seq = sample(model, y, NoiseSource(5, shape), times=times, sampler=name)
    blocks = piadm_sample(model, y, NoiseSource(5, shape), blocks=3, points=4, sweeps=4, sampler=name)
    _close(blocks.samples, seq.samples, 1e-10)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_mlmc_levels_and_picard_levels_converge_to_them(name):
    """A level's fine path is the sequential sampler with the level's noise stream (and for a deterministic
    sampler so is its coarse path, x_T shared); the Picard levels at a tiny tolerance, with and without
    Anderson, give the sequential pair."""
    spec = inpaint4x4()
    model, y, _ = _setup(spec)
    config = MLMCConfig(lmin=1, seed=7, sampler=name, antithetic=False)
    sequential = config.level_sampler(model, y, spec.shape)
    level, n = 6, 5
    a = sequential.steppers(level, n, 2, 0)
    engine.run([a], model, y, budget=10**9)
    noise = NoiseSource(7, (n, *spec.shape), stream=(level, 2, 0))
    _close(a.x_f, sample(model, y, noise, steps=2**level, sampler=name, grid=config.time_grid()).samples, 1e-12)
    if not SAMPLERS[name].stochastic:
        _close(a.x_c, sample(model, y, noise, steps=2 ** (level - 1), sampler=name, grid=config.time_grid()).samples,
               1e-12)
    for anderson in (0, 2):
        picard = PicardLevelSampler(model, y, spec.shape, M=2, lmin=1, sampler=name, grid=config.time_grid(),
                                    coupling=config.coupling, seed=7, window=16, tol=1e-9, anderson=anderson)
        b = picard.steppers(level, n, 2, 0)
        stats = engine.run([b], model, y, budget=10**9)
        assert stats.calls < 2**level
        _close(b.x_f, a.x_f, 1e-8)
        _close(b.x_c, a.x_c, 1e-8)


@pytest.mark.parametrize("name, anderson", [("ddpm", 0), ("ddpm", 2), ("ddim", 3), ("dpm2m", 1)])
def test_the_picard_levels_run_the_same_window_as_picard_sample(name, anderson):
    """A plain Picard level (one path) and ``picard_sample`` on the same stream, window, tolerance and Anderson
    memory take the same rounds to the same samples: one window implementation, not two that agree only at
    convergence."""
    spec = bimodal2d()
    model, y, _ = _setup(spec)
    level, n, window, tol = 6, 8, 16, 0.05
    picard = PicardLevelSampler(model, y, spec.shape, M=2, lmin=level, sampler=name, grid=GRID, seed=4,
                                window=window, tol=tol, anderson=anderson)
    paths = picard.steppers(level, n, 1, 0)
    stats = engine.run([paths], model, y, budget=10**9)
    out = picard_sample(model, y, NoiseSource(4, (n, *spec.shape), stream=(level, 1, 0)), steps=2**level,
                        sampler=name, grid=GRID, window=window, tol=tol, anderson=anderson)
    assert stats.calls == out.rounds < 2**level and paths.calls == out.nfe * n
    _close(paths.x_f, out.samples, 1e-12)


def test_a_sampler_registered_under_another_name_behaves_as_the_one_it_copies(monkeypatch):
    """No module compares sampler names: copies of ddpm and dpm2m under new names give their samples, Picard
    samples, PIADM samples and MLMC level sums (a name comparison would treat 'sde' as deterministic)."""
    for new, old in (("sde", "ddpm"), ("multistep", "dpm2m")):
        monkeypatch.setitem(SAMPLERS, new, dataclasses.replace(SAMPLERS[old], name=new))
    spec = bimodal2d()
    model, y, shape = _setup(spec)
    for new, old in (("sde", "ddpm"), ("multistep", "dpm2m")):
        run = {}
        for name in (new, old):
            kw = dict(sampler=name, grid=GRID)
            config = MLMCConfig(lmin=1, seed=3, sampler=name)
            sums = {}
            for levels in (config.level_sampler(model, y, spec.shape),
                           PicardLevelSampler(model, y, spec.shape, M=2, lmin=1, seed=3, window=4, tol=0.1,
                                              anderson=2, sampler=name, grid=config.time_grid(), antithetic=True)):
                sums[type(levels).__name__] = levels(3, 4).sums["y2"]
            run[name] = (sample(model, y, NoiseSource(1, shape), steps=12, **kw).samples,
                         picard_sample(model, y, NoiseSource(1, shape), steps=12, window=4, tol=0.1, **kw).samples,
                         piadm_sample(model, y, NoiseSource(1, shape), blocks=2, points=3, sweeps=2,
                                      sampler=name).samples, *sums.values())
        for a, b in zip(run[new], run[old]):
            assert torch.equal(a, b)


def test_the_oracle_refuses_a_multistep_sampler():
    with pytest.raises(InputError, match="one-step samplers"):
        GaussianOracle(gaussian3d()).law(8, "dpm2m")


# ----------------------------------------------------------------------------------------------
# The command line.


def test_sample_needs_no_sampler_and_picard_needs_no_window(tmp_path):
    exe = shutil.which("lightning-mlmc", path=os.path.dirname(sys.executable))
    base = ["sample", "--problem", SPEC, "--steps", "12", "--num-samples", "6", "--seed", "2"]
    p = subprocess.run([exe, *base, "--out", str(tmp_path / "a.npz")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert main([*base, "--sampler", "ddpm", "--out", str(tmp_path / "b.npz")]) == 0
    a, b = (np.load(tmp_path / f"{k}.npz") for k in "ab")
    assert np.array_equal(a["samples"], b["samples"]) and json.loads(str(a["stats"]))["sampler"] == "ddpm"
    assert main([*base, "--sampler", "picard-ddim", "--out", str(tmp_path / "c.npz")]) == 0
    stats = json.loads(str(np.load(tmp_path / "c.npz")["stats"]))
    assert {k: stats[k] for k in ("window", "tol", "anderson", "slide")} == dataclasses.asdict(SAMPLERS["ddim"].picard)
    for bad, needle in ((["--sampler", "euler"], "--sampler"), (["--sampler", "picard-ddim", "--window", "0"],
                                                                "window")):
        p = subprocess.run([exe, *base, *bad, "--out", str(tmp_path / "d.npz")], capture_output=True, text=True)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert needle in p.stderr and "Traceback" not in p.stderr and not (tmp_path / "d.npz").exists()
