"""Bring your own model: a diffusers DDPM through ``--checkpoint`` (``lightning_mlmc/pretrained.py``).

A tiny ``UNet2DModel`` is trained here on the digits and saved with ``DDPMPipeline.save_pretrained`` (module
fixture, ~15 s). Checked against diffusers itself: one step (and a 20-step chain) of our DDPM sampler is
``DDPMScheduler.step`` with the same noise, for every prediction type. Checked against exact answers: an exact
Gaussian prior score written as a diffusers-style UNet, denoised from the observation start, gives the exact
posterior moments; a wrong timestep mapping (off by one either way, 1000 t, 999 t) fails that test.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from tests.pretrained_cases import (
    ANALYTIC_SHAPE,
    NOISE_STD,
    PRIOR_COV,
    PRIOR_MEAN,
    Y,
    analytic_denoiser,
    digits,
    exact_denoising_posterior,
    mixture_eps,
    prior_spec,
    trained_pipeline,
)

from lightning_mlmc.errors import InputError
from lightning_mlmc.gaussian_oracle import GaussianOracle
from lightning_mlmc.pretrained import PREDICTION_TYPES, PretrainedEps, TimestepMap, scheduler_alphas_cumprod
from lightning_mlmc.problems import GaussianMixture
from lightning_mlmc.sampling import NoiseSource, StartDistribution, observation_start, sample

SHAPE = (1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    folder, losses = trained_pipeline(tmp_path_factory)
    assert losses["last"] < 0.4 * losses["first"], losses  # it learned something (0.42 -> 0.11 when written)
    return folder


def _scheduler(ddpm_dir, **overrides) -> tuple[DDPMScheduler, dict]:
    cfg = {**json.load(open(ddpm_dir / "scheduler" / "scheduler_config.json")), **overrides}
    scheduler = DDPMScheduler.from_config({**cfg, "clip_sample": False})
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()  # the same values, stepped in float64
    return scheduler, cfg


class GivenNoise(NoiseSource):
    """A noise source that returns the draws it is given (start: draws[0], step k: draws[k + 1])."""

    def __init__(self, draws):
        super().__init__(0, tuple(draws[0].shape))
        self.draws = draws

    def draw(self, index: int):
        return self.draws[index]


# ----------------------------------------------------------------------------------------------
# Parity with diffusers' DDPMScheduler.


@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_one_step_of_our_ddpm_sampler_is_diffusers_ddpm_step(ddpm_dir, prediction):
    """The same UNet output read as eps, v or x0: our step t_i -> t_j equals ``DDPMScheduler.step`` i -> j.
    Fails if t_i were (i + 1)/1000 or i/1000, if the network got timestep i +- 1, or with a wrong conversion."""
    unet = UNet2DModel.from_pretrained(ddpm_dir / "unet", low_cpu_mem_usage=False).eval()
    scheduler, cfg = _scheduler(ddpm_dir, prediction_type=prediction)
    table, pred = scheduler_alphas_cumprod(cfg)
    model = PretrainedEps(unet, table, pred, SHAPE)
    knots = model.timesteps.knot_times()
    g = torch.Generator().manual_seed(3)
    x = (digits(4).double() * 0.8 + 0.6 * torch.randn((4, *SHAPE), generator=g, dtype=torch.float64))
    for i, j, inference_steps in [(999, 998, None), (500, 499, None), (37, 36, None), (1, 0, None), (0, -1, None),
                                  (950, 900, 20)]:
        if inference_steps:
            scheduler.set_timesteps(inference_steps)
        else:
            scheduler.num_inference_steps = None
        with torch.no_grad():
            out = unet(x.float(), torch.full((4,), i)).sample.double()
        theirs = scheduler.step(out, i, x, generator=torch.Generator().manual_seed(i)).prev_sample
        xi = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        times = torch.tensor([float(knots[i]), 0.0] if j < 0 else [float(knots[i]), float(knots[j]), 0.0],
                             dtype=torch.float64)
        seen = []
        sample(model, None, GivenNoise([torch.zeros_like(x), xi, xi]), times=times,
               start=StartDistribution(float(knots[i]), x, 0.0), callback=lambda d: seen.append(d["x"].clone()))
        torch.testing.assert_close(seen[0], theirs, rtol=0, atol=1e-10, msg=f"step {i} -> {j} ({prediction})")


def test_twenty_steps_of_our_ddpm_sampler_are_a_diffusers_ddpm_loop(ddpm_dir):
    """``DDPMPipeline``'s loop (20 inference steps, 950 -> ... -> 0 -> x0) and our sampler on the grid
    t_950 > ... > t_0 > 0 with the same start and step noises give the same samples."""
    unet = UNet2DModel.from_pretrained(ddpm_dir / "unet", low_cpu_mem_usage=False).eval()
    scheduler, cfg = _scheduler(ddpm_dir)
    scheduler.set_timesteps(20)
    model = PretrainedEps(unet, *scheduler_alphas_cumprod(cfg), SHAPE)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((6, *SHAPE), generator=g, dtype=torch.float64)
    draws = [x.clone()]
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = unet(x.float(), t).sample.double()
        x = scheduler.step(out, t, x, generator=g).prev_sample
    g2 = torch.Generator().manual_seed(5)
    draws = [torch.randn((6, *SHAPE), generator=g2, dtype=torch.float64) for _ in range(20)]  # start + 19 steps
    knots = model.timesteps.knot_times()
    times = torch.cat([knots[scheduler.timesteps], torch.zeros(1, dtype=torch.float64)])
    ours = sample(model, None, GivenNoise(draws), times=times, start=StartDistribution(float(times[0]), 0.0, 1.0))
    assert scheduler.timesteps.tolist() == list(range(950, -1, -50))
    torch.testing.assert_close(ours.samples, x, rtol=0, atol=1e-5)


def test_time_mapping_knots_and_ends():
    """gamma(t_i) = alpha-bar_i; tau(t_i) = i; t_i is near (i + 1)/1000 for the linear schedule; below the first
    level tau runs into (-1, 0) (alpha-bar(-1) = 1); beyond the last it is a named error."""
    table, _ = scheduler_alphas_cumprod({"_class_name": "DDPMScheduler"})
    tm = TimestepMap(table)
    knots = tm.knot_times()
    gamma = tm.schedule.gamma(knots)
    assert torch.allclose(gamma, table, rtol=1e-12, atol=0)
    assert torch.allclose(tm.timestep(knots), torch.arange(1000, dtype=torch.float64), rtol=0, atol=1e-8)
    i = torch.arange(1000, dtype=torch.float64)
    assert float((knots - (i + 1) / 1000).abs().max()) < 0.0034  # the O(beta^2) terms (module docstring)
    below = tm.timestep(torch.tensor([0.0, 1e-4, 5e-4]))
    assert float(below[0]) == -1.0 and bool(torch.all((below[1:] > -1) & (below[1:] < 0)))
    assert torch.all(torch.diff(tm.timestep(torch.linspace(0, 1, 1001, dtype=torch.float64))) > 0)
    short = TimestepMap(table[:500])  # a model whose largest noise level is timestep 499
    with pytest.raises(InputError, match="t: .* beyond the model's largest noise level"):
        short.timestep(torch.tensor([0.9]))


# ----------------------------------------------------------------------------------------------
# Exact posterior: an exact prior score as a diffusers-style UNet, denoising from the observation start.

def test_the_analytic_unet_is_the_exact_prior_score():
    """The mixture eps of ``pretrained_cases`` equals -sigma grad log p_t by autograd of the diffused density."""
    prior = GaussianMixture(torch.tensor([0.4, 0.6], dtype=torch.float64),
                            torch.tensor(np.stack([PRIOR_MEAN, -PRIOR_MEAN]), dtype=torch.float64),
                            torch.tensor(np.stack([PRIOR_COV, 2 * PRIOR_COV]), dtype=torch.float64))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    for ab in (0.999, 0.5, 0.01):
        diffused = prior.diffused(ab**0.5, 1 - ab)
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(diffused.log_prob(xr).sum(), xr)
        eps = mixture_eps(x, prior.weights, prior.means, prior.covs, torch.full((5,), ab, dtype=torch.float64))
        torch.testing.assert_close(eps, -(1 - ab) ** 0.5 * grad, rtol=1e-10, atol=1e-12)


WRONG_MAPS = {
    "plus_one": lambda tau, t: tau + 1,
    "minus_one": lambda tau, t: tau - 1,
    "t_times_1000": lambda tau, t: 1000 * t,
    "t_times_999": lambda tau, t: 999 * t,
}


@pytest.mark.parametrize("mapping", ["ours", *WRONG_MAPS])
def test_denoising_from_the_observation_start_gives_the_exact_posterior(tmp_path, mapping):
    """20,000 DDPM samples (100 steps) from the observation start with the exact prior score behind a diffusers
    scheduler: the mean and E[x^2] are the exact posterior's within 5 SE plus the discretisation bias of this
    grid (exact, from the Gaussian oracle of the same chain). With a wrong timestep mapping the same check
    fails (by 10-40 SE when written)."""
    model, net = analytic_denoiser(tmp_path)
    if mapping != "ours":
        right = model.timesteps.timestep
        model.timesteps.timestep = lambda t: WRONG_MAPS[mapping](right(t), t)
    n, steps = 20_000, 100
    y_img = torch.tensor(Y, dtype=torch.float64).reshape(ANALYTIC_SHAPE)
    start = observation_start(y_img, NOISE_STD)
    out = sample(model, y_img[None], NoiseSource(7, (n, *ANALYTIC_SHAPE)), steps=steps, start=start)
    x = out.samples.reshape(n, -1).numpy()
    assert net.calls == steps
    mean, cov = exact_denoising_posterior()
    second = mean**2 + np.diag(cov)
    # Discretisation allowance: the exact law of this 100-step chain with the exact prior score.
    law = GaussianOracle(prior_spec()).law(steps, "ddpm", start=start)
    bias_mean = np.abs(law.mean.numpy() - mean)
    bias_second = np.abs(law.second_moment.numpy() - second)
    se_mean, se_second = x.std(0) / np.sqrt(n), (x**2).std(0) / np.sqrt(n)
    assert (bias_mean / se_mean).max() < 2 and (bias_second / se_second).max() < 2  # the allowance stays small
    z_mean = (np.abs(x.mean(0) - mean) - bias_mean) / se_mean
    z_second = (np.abs((x**2).mean(0) - second) - bias_second) / se_second
    worst = float(max(z_mean.max(), z_second.max()))
    print(mapping, "largest z:", round(worst, 1))
    if mapping == "ours":
        assert worst <= 5.0, (z_mean, z_second)
    else:
        assert worst > 5.0, f"the wrong mapping {mapping} passed: {z_mean}, {z_second}"


def test_a_learned_variance_unet_gives_its_first_half_as_the_prediction():
    """A UNet with 2C outputs (variance_type learned / learned_range): the eps-type output is the first C channels."""
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, add_attention=False).eval()
    table, _ = scheduler_alphas_cumprod({"_class_name": "DDPMScheduler", "variance_type": "learned_range"})
    model = PretrainedEps(unet, table, "epsilon", SHAPE)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    t = model.timesteps.knot_times()[[10, 400, 900]]
    with torch.no_grad():
        full = unet(x, torch.tensor([10, 400, 900])).sample
        torch.testing.assert_close(model(x, None, t), full[:, :1], rtol=1e-6, atol=1e-6)
