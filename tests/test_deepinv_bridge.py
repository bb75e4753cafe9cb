"""deepinv interoperability (``lightning_mlmc/deepinv_bridge.py``): our operators from deepinv physics, checked
against deepinv's own forward operators; the MLMC posterior as a deepinv-style sampler, checked against the
exact posterior; and the package without deepinv installed."""

import os
import subprocess
import sys

import deepinv as dinv  # in the test extra, like hypothesis: a missing extra fails loudly rather than skipping
import numpy as np
import pytest
import torch
from tests.pretrained_cases import (
    ANALYTIC_SHAPE,
    NOISE_STD,
    Y,
    analytic_denoiser,
    exact_denoising_posterior,
    prior_spec,
)

from lightning_mlmc.deepinv_bridge import MLMCPosterior, operator_from_physics
from lightning_mlmc.errors import InputError
from lightning_mlmc.gaussian_oracle import GaussianOracle
from lightning_mlmc.mlmc import MLMCConfig
from lightning_mlmc.module import ScoreModel
from lightning_mlmc.networks import MLPEps
from lightning_mlmc.operators import Inpainting, operator_from_config
from lightning_mlmc.sampling import observation_start
from lightning_mlmc.schedule import TimeGrid

SIZE = (3, 8, 8)
BOX2, BOX4 = torch.ones(1, 1, 2, 2) / 4, torch.ones(1, 1, 4, 4) / 16


def _mask(seed=1):
    return (torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(seed)) > 0.4).float()


REPRESENTABLE = [
    ("denoising", lambda: dinv.physics.Denoising(dinv.physics.GaussianNoise(0.1)), "denoise", 0.1),
    ("inpainting, given mask", lambda: dinv.physics.Inpainting(img_size=SIZE, mask=_mask(),
                                                               noise_model=dinv.physics.GaussianNoise(0.05)),
     "inpaint", 0.05),
    ("inpainting, random pixel mask", lambda: dinv.physics.Inpainting(
        img_size=SIZE, mask=0.6, rng=torch.Generator().manual_seed(0)), "inpaint", 0.0),
    ("box 2, valid", lambda: dinv.physics.Downsampling(img_size=SIZE, filter=BOX2, factor=2, padding="valid",
                                                        noise_model=dinv.physics.GaussianNoise(0.02)), "superres", 0.02),
    ("box 4, valid", lambda: dinv.physics.Downsampling(img_size=SIZE, filter=BOX4, factor=4, padding="valid"),
     "superres", 0.0),
    ("box 2, circular", lambda: dinv.physics.Downsampling(img_size=SIZE, filter=BOX2, factor=2, padding="circular"),
     "superres", 0.0),
]


@pytest.mark.parametrize("name, build, kind, std", REPRESENTABLE, ids=[r[0] for r in REPRESENTABLE])
def test_our_operator_is_deepinvs_forward_operator(name, build, kind, std):
    """``apply`` equals ``physics.A`` on fresh random images (not the probes the converter checked), the noise
    std is the physics', and an inpainting mask is deepinv's mask."""
    physics = build()
    op = operator_from_physics(physics, SIZE)
    assert op.name == kind and op.shape == SIZE and op.noise_std == pytest.approx(std, abs=1e-7)
    x = torch.randn(5, *SIZE, generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(op.apply(x), physics.A(x), rtol=1e-6, atol=1e-6)
    if kind == "inpaint":
        assert torch.equal(op.observed, physics.mask.reshape(-1, 8, 8)[0].float())


UNREPRESENTABLE = [
    ("bicubic filter", lambda: dinv.physics.Downsampling(img_size=SIZE, filter="bicubic", factor=2), "physics.filter"),
    ("bilinear filter", lambda: dinv.physics.Downsampling(img_size=SIZE, filter="bilinear", factor=2), "physics.filter"),
    ("gaussian filter", lambda: dinv.physics.Downsampling(img_size=SIZE, filter="gaussian", factor=2), "physics.filter"),
    ("bare decimation", lambda: dinv.physics.Downsampling(img_size=SIZE, filter=None, factor=2), "physics.filter"),
    ("box 4, circular (shifted)", lambda: dinv.physics.Downsampling(img_size=SIZE, filter=BOX4, factor=4),
     "physics.filter"),
    ("poisson noise", lambda: dinv.physics.Denoising(dinv.physics.PoissonNoise(gain=0.1)), "physics.noise_model"),
    ("noise-free denoising", lambda: dinv.physics.Denoising(dinv.physics.ZeroNoise()), "physics.noise_model"),
    ("per-channel mask", lambda: dinv.physics.Inpainting(img_size=SIZE, mask=0.5, pixelwise=False,
                                                         rng=torch.Generator().manual_seed(0)), "physics.mask"),
    ("blur", lambda: dinv.physics.Blur(filter=BOX2), "physics:"),
]


@pytest.mark.parametrize("name, build, field", UNREPRESENTABLE, ids=[u[0] for u in UNREPRESENTABLE])
def test_physics_we_cannot_represent_are_named_errors(name, build, field):
    with pytest.raises(InputError, match=field.replace(".", r"\.")) as err:
        operator_from_physics(build(), SIZE)
    assert "\n" not in str(err.value)


def test_a_given_inpainting_mask_round_trips_through_the_config():
    """``Inpainting(mask="given")`` (what an arbitrary deepinv mask becomes) survives ``config()`` and checks its mask."""
    mask = _mask(3)[0]
    op = Inpainting(SIZE, mask="given", observed_mask=mask.numpy(), noise_std=0.1)
    again = operator_from_config(op.config())
    assert torch.equal(again.observed, mask) and again.noise_std == 0.1 and "observed_mask" not in repr(op)
    for bad in (mask[:4], mask * 0.5, None):
        with pytest.raises(InputError, match="observed_mask"):
            Inpainting(SIZE, mask="given", observed_mask=bad)


def test_denoising_needs_an_image_size():
    with pytest.raises(InputError, match="img_size"):
        operator_from_physics(dinv.physics.Denoising(dinv.physics.GaussianNoise(0.1)))


def test_mlmc_posterior_of_deepinv_denoising_is_the_exact_posterior(tmp_path):
    """An exact prior score behind a diffusers scheduler, deepinv's Denoising physics: MLMCPosterior's mean and
    variance are the exact posterior's within 5 standard errors (per pixel, from the exact per-level variances
    of the Gaussian oracle and the run's N_l) plus the finest level's exact discretisation bias."""
    model, net = analytic_denoiser(tmp_path)
    physics = dinv.physics.Denoising(dinv.physics.GaussianNoise(NOISE_STD))
    config = MLMCConfig(payoff="moments", grid="uniform", coupling="naive", lmin=2, n0=200, lmax=8, seed=3)
    sampler = MLMCPosterior(model, physics, eps=2e-3, config=config)
    y = torch.tensor(Y, dtype=torch.float64).reshape(1, *ANALYTIC_SHAPE)
    mean, var = sampler(y)
    assert mean.shape == var.shape == y.shape and mean.dtype == y.dtype
    result = sampler.last_result
    assert sampler.nfe == result.nfe > 0 and net.calls > 0 and result.converged
    # Exact reference and the exact per-level moments of this very scheme.
    mu, cov = exact_denoising_posterior()
    exact = {"mean": mu, "second_moment": mu**2 + np.diag(cov)}
    oracle = GaussianOracle(prior_spec())
    start = observation_start(y[0], NOISE_STD)
    finest = max(s.level for s in result.levels)
    law = oracle.law(2**finest, "ddpm", TimeGrid("uniform"), start)
    expected = {"mean": law.mean.numpy(), "second_moment": law.second_moment.numpy()}
    estimate = {"mean": mean.reshape(-1).numpy(), "second_moment": (var + mean**2).reshape(-1).numpy()}
    for payoff in ("mean", "second_moment"):
        se2 = sum(oracle.level_moments(s.level, 2, "ddpm", "naive", payoff, TimeGrid("uniform"), start=start,
                                       single=s.level == config.lmin)[1].numpy() / s.n_samples
                  for s in result.levels)
        bias = np.abs(expected[payoff] - exact[payoff])
        z = (np.abs(estimate[payoff] - exact[payoff]) - bias) / np.sqrt(se2)
        assert z.max() <= 5.0, (payoff, z, bias)
        assert (bias <= 3 * np.sqrt(se2) + 2e-3).all()  # the allowance is no larger than the target


def test_mlmc_posterior_checks_the_physics_against_the_model():
    """A conditional model trained for one mask refuses a physics with another; with the same mask the model's
    own operator (its conditioning) is used; an unconditional model refuses anything but denoising."""
    shape = (1, 4, 4)
    own = Inpainting(shape, mask="box", box=[1, 1, 2, 2], noise_std=0.1)
    model = ScoreModel(MLPEps(16, 2 * 16, hidden=8, layers=1), own)
    same = dinv.physics.Inpainting(img_size=shape, mask=own.observed[None].clone(),
                                   noise_model=dinv.physics.GaussianNoise(0.1))
    y = torch.zeros(1, *shape)
    assert MLMCPosterior(model, same, eps=0.1).operator(same, y) is own
    other = dinv.physics.Inpainting(img_size=shape, mask=1 - own.observed[None],
                                    noise_model=dinv.physics.GaussianNoise(0.1))
    with pytest.raises(InputError, match="physics: .* does not match the model's operator"):
        MLMCPosterior(model, other, eps=0.1).operator(other, y)
    with pytest.raises(InputError, match="config.payoff"):
        MLMCPosterior(model, same, eps=0.1, config=MLMCConfig(payoff="mean"))


def test_an_unconditional_model_refuses_inpainting(tmp_path):
    model, _ = analytic_denoiser(tmp_path)
    physics = dinv.physics.Inpainting(img_size=ANALYTIC_SHAPE, mask=torch.ones(1, 2, 2))
    with pytest.raises(InputError, match="unconditional model solves denoising"):
        MLMCPosterior(model, physics, eps=0.1)(torch.zeros(1, *ANALYTIC_SHAPE))


def test_the_package_and_cli_work_without_deepinv(tmp_path):
    """With deepinv unimportable: ``import lightning_mlmc`` and the CLI work, the bridge says which extra to install."""
    code = (
        "import sys; sys.modules['deepinv'] = None\n"
        "import lightning_mlmc, lightning_mlmc.deepinv_bridge as b\n"
        "from lightning_mlmc.cli import main\n"
        f"assert main(['sample', '--problem', {os.path.join(os.path.dirname(__file__), '..', 'examples', 'bimodal2d.json')!r},"
        f" '--sampler', 'ddim', '--steps', '4', '--num-samples', '2', '--out', {str(tmp_path / 's.npz')!r}]) == 0\n"
        "try:\n    b.operator_from_physics(object(), (1, 2, 2))\n"
        "except lightning_mlmc.InputError as e:\n    print(e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "pip install 'lightning-mlmc[deepinv]'" in p.stdout and (tmp_path / "s.npz").exists()
