"""Picard-parallel sampling reproduces the sequential sampler for the same seed."""

import numpy as np
import pytest
import torch
from tests.analytic_cases import bimodal2d, inpaint4x4

from lightning_mlmc import ExactPosteriorEps, InputError, NoiseSource, TimeGrid, sample
from lightning_mlmc.picard import piadm_sample, piadm_times, picard_sample


def _setup(spec, batch=32):
    return ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], (batch, *spec.shape)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_window_one_is_the_sequential_sampler_exactly(sampler):
    model, y, shape = _setup(bimodal2d())
    ref = sample(model, y, NoiseSource(4, shape), steps=50, sampler=sampler).samples
    out = picard_sample(model, y, NoiseSource(4, shape), steps=50, sampler=sampler, window=1)
    assert torch.equal(out.samples, ref)
    assert out.rounds == 50 and out.nfe == 50


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("anderson", [0, 2])
@pytest.mark.parametrize("make", [bimodal2d, inpaint4x4])
def test_converged_picard_matches_sequential(sampler, anderson, make):
    model, y, shape = _setup(make())
    ref = sample(model, y, NoiseSource(8, shape), steps=100, sampler=sampler).samples
    out = picard_sample(model, y, NoiseSource(8, shape), steps=100, sampler=sampler, window=32, tol=1e-6,
                        anderson=anderson)
    assert out.stats["converged"]
    rel = float((out.samples - ref).abs().max() / ref.abs().max())
    assert rel < 1e-5
    assert out.rounds < 100  # fewer sequential rounds than steps


def test_picard_uses_the_warped_grid_and_start():
    spec = inpaint4x4()
    model, y, shape = _setup(spec)
    grid = TimeGrid("edm")
    ref = sample(model, y, NoiseSource(1, shape), steps=40, grid=grid).samples
    out = picard_sample(model, y, NoiseSource(1, shape), steps=40, grid=grid, window=40, tol=1e-7)
    assert float((out.samples - ref).abs().max()) < 1e-5


def test_rounds_cap_and_residual_history():
    model, y, shape = _setup(bimodal2d())
    out = picard_sample(model, y, NoiseSource(1, shape), steps=100, window=100, tol=1e-8, max_rounds=3)
    assert out.rounds == 3 and not out.stats["converged"] and len(out.stats["residuals"]) == 3


def test_piadm_error_shrinks_with_sweeps_and_is_exact_at_k_equal_points():
    spec = bimodal2d()
    model, y, shape = _setup(spec)
    blocks, points = 4, 8
    times = piadm_times(blocks, points)
    assert torch.all(times[1:] < times[:-1]) and times[-1] == 0

    ref = sample(model, y, NoiseSource(2, shape), times=times).samples  # the sequential sampler on PIADM's grid
    errs = []
    for k in (1, 2, 4, points):
        out = piadm_sample(model, y, NoiseSource(2, shape), blocks=blocks, points=points, sweeps=k)
        errs.append(float((out.samples - ref).abs().max()))
    assert errs[-1] < 1e-10
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    out = piadm_sample(model, y, NoiseSource(2, shape), blocks=blocks, points=points, sweeps=points,
                       sampler="ddim", corrector=True)
    assert torch.isfinite(out.samples).all()


@pytest.mark.parametrize("kw, field", [({"window": 0}, "window"), ({"tol": 0.0}, "tol"), ({"tol": -1.0}, "tol"),
                                       ({"sampler": "heun"}, "sampler")])
def test_bad_arguments(kw, field):
    model, y, shape = _setup(bimodal2d())
    args = {"window": 4, "tol": 1e-3, "sampler": "ddpm", **kw}
    with pytest.raises(InputError, match=field):
        picard_sample(model, y, NoiseSource(1, shape), steps=10, **args)


def test_diffusers_parallel_scheduler_drift_parity():
    """diffusers' DDPMParallelScheduler with our betas on a discrete grid gives our drift."""
    from diffusers import DDPMParallelScheduler

    from lightning_mlmc import VPSchedule, step_coefficients
    from lightning_mlmc.diffusion import step_increment

    n = 50
    sched = VPSchedule()
    # Discrete grid t_k = k/n; alphas_cumprod[k-1] = gamma(t_k), so beta_k = 1 - gamma(t_k)/gamma(t_{k-1}).
    t = torch.arange(0, n + 1, dtype=torch.float64) / n
    g = sched.gamma(t)
    betas = (1 - g[1:] / g[:-1]).numpy()
    ds = DDPMParallelScheduler(num_train_timesteps=n, trained_betas=betas, prediction_type="epsilon",
                               clip_sample=False, variance_type="fixed_small")
    ds.set_timesteps(n)
    gen = torch.Generator().manual_seed(0)
    steps = torch.tensor([n - 1, 30, 7, 1])
    x = torch.randn(len(steps), 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(len(steps), 3, generator=gen, dtype=torch.float64)
    theirs = ds.batch_step_no_noise(eps, steps, x)
    for i, s in enumerate(steps.tolist()):
        # diffusers index s is time t_{s+1}; its step goes to t_s.
        c = step_coefficients(torch.stack([t[s + 1], t[s]]), stochastic=True)
        ours = x[i] + step_increment(x[i], eps[i], c.a_minus_1[0], c.eps[0])
        np.testing.assert_allclose(theirs[i].numpy(), ours.numpy(), rtol=1e-6, atol=1e-6)


def test_anderson_survives_a_singular_least_squares_system():
    """float32 windows whose residual differences vanish made torch.linalg.solve raise (found on the trained
    UNet); the safeguard now falls back to the plain Picard value for those steps."""
    from lightning_mlmc.picard import _Anderson

    acc = _Anderson(2)
    x = torch.zeros(4, 3, dtype=torch.float32)
    out = None
    for _ in range(3):  # identical iterates: every difference is exactly zero
        out = acc(0, x.clone(), x.clone() + 1.0)
    torch.testing.assert_close(out, x + 1.0)
