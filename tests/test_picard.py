"""Picard-parallel sampling: the sliding window (ParaDiGMS slide rule), triangular Anderson acceleration
(ParaTAA) and their fixed point, the sequential sample for the same seed."""

import numpy as np
import pytest
import torch
from tests.analytic_cases import bimodal2d, inpaint4x4

from lightning_mlmc import ExactPosteriorEps, InputError, NoiseSource, TimeGrid, sample
from lightning_mlmc.picard import TriangularAnderson, picard_sample, slide_stride


def _setup(spec, batch=32):
    return ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], (batch, *spec.shape)


@pytest.mark.parametrize("slide", ["paradigms", "prefix"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_window_one_is_the_sequential_sampler_exactly(sampler, slide):
    model, y, shape = _setup(bimodal2d())
    ref = sample(model, y, NoiseSource(4, shape), steps=50, sampler=sampler).samples
    for anderson in (0, 2):
        out = picard_sample(model, y, NoiseSource(4, shape), steps=50, sampler=sampler, window=1, slide=slide,
                            anderson=anderson)
        assert torch.equal(out.samples, ref)
        assert out.rounds == 50 and out.nfe == 50


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("anderson, slide", [(0, "prefix"), (0, "paradigms"), (1, "paradigms"), (2, "paradigms"),
                                             (3, "paradigms"), (2, "prefix")])
@pytest.mark.parametrize("make", [bimodal2d, inpaint4x4])
def test_converged_picard_matches_sequential(sampler, anderson, slide, make):
    """Every variant has the sequential sample as its fixed point."""
    model, y, shape = _setup(make())
    ref = sample(model, y, NoiseSource(8, shape), steps=100, sampler=sampler).samples
    out = picard_sample(model, y, NoiseSource(8, shape), steps=100, sampler=sampler, window=32, tol=1e-6,
                        anderson=anderson, slide=slide)
    assert out.stats["converged"]
    rel = float((out.samples - ref).abs().max() / ref.abs().max())
    assert rel < 1e-5
    assert out.rounds < 100  # fewer sequential rounds than steps


@pytest.mark.parametrize("anderson", [0, 2])
def test_picard_dpm2m_fixed_point_is_the_sequential_solver(anderson):
    """Picard over DPM-Solver++(2M): window 1 is the sequential solver bit for bit, and the converged window
    reproduces it (each step's x0_hat at the previous point comes from the round that last evaluated it)."""
    from lightning_mlmc.sampling import sample_dpm2m

    model, y, shape = _setup(inpaint4x4())
    grid = TimeGrid("logsnr")
    ref = sample_dpm2m(model, y, NoiseSource(6, shape), steps=50, grid=grid).samples
    one = picard_sample(model, y, NoiseSource(6, shape), steps=50, grid=grid, sampler="dpm2m", window=1,
                        anderson=anderson)
    assert torch.equal(one.samples, ref)
    out = picard_sample(model, y, NoiseSource(6, shape), steps=50, grid=grid, sampler="dpm2m", window=16, tol=1e-7,
                        anderson=anderson)
    assert out.stats["converged"] and out.rounds < 50
    assert float((out.samples - ref).abs().max() / ref.abs().max()) < 1e-6


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


# ----------------------------------------------------------------------------------------------
# Slide rules.


@pytest.mark.parametrize("err, paradigms, prefix", [
    ([0.5, 0.5, 0.5, 0.5], 4, 4),  # all converged: the whole window
    ([2.0, 0.5, 0.5, 0.5], 1, 1),  # the first step is unconverged: it is exact all the same
    ([0.5, 2.0, 0.5, 0.5], 2, 1),  # ParaDiGMS also accepts the first unconverged step
    ([0.5, 0.5, 0.5, 2.0], 4, 3),
    ([0.5], 1, 1),
    ([2.0], 1, 1),
])
def test_slide_stride(err, paradigms, prefix):
    """ParaDiGMS slides by min(f + 1, p), the prefix rule by max(1, f), f the first unconverged step."""
    e = torch.tensor(err)
    assert slide_stride(e, 1.0, "paradigms") == paradigms
    assert slide_stride(e, 1.0, "prefix") == prefix


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_paradigms_slide_never_costs_more_rounds(sampler):
    for make in (bimodal2d, inpaint4x4):
        model, y, shape = _setup(make())
        rounds = {}
        for slide in ("paradigms", "prefix"):
            out = picard_sample(model, y, NoiseSource(3, shape), steps=100, sampler=sampler, window=16, tol=0.1,
                                anderson=0, slide=slide)
            rounds[slide] = (out.rounds, out.nfe)
        assert rounds["paradigms"][0] <= rounds["prefix"][0] and rounds["paradigms"][1] <= rounds["prefix"][1]


# ----------------------------------------------------------------------------------------------
# Triangular Anderson acceleration.


@pytest.mark.parametrize("sampler, window", [("ddpm", 32), ("ddim", 64)])
@pytest.mark.parametrize("make", [bimodal2d, inpaint4x4])
def test_anderson_takes_fewer_rounds_than_plain_picard(sampler, window, make):
    """At the same tolerance, memory 2 and 3 need fewer rounds than plain Picard (summed over four seeds: a
    single DDIM seed can tie), and memory 2 differs from memory 1 (the old history aliased the trajectory, so
    every memory behaved like 1 and cost more rounds than plain Picard)."""
    model, y, shape = _setup(make())
    rounds = {m: 0 for m in (0, 1, 2, 3)}
    for seed in range(4):
        runs = {m: picard_sample(model, y, NoiseSource(seed, shape), steps=100, sampler=sampler, window=window,
                                 tol=0.1, anderson=m) for m in (0, 1, 2, 3)}
        for m, out in runs.items():
            rounds[m] += out.rounds
        for m in (2, 3):
            assert float((runs[m].samples - runs[1].samples).abs().max()) > 1e-8
            assert runs[m].stats["residuals"] != runs[1].stats["residuals"]
    for m in (1, 2, 3):
        assert rounds[m] < rounds[0], rounds


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_anderson_deviation_is_within_the_tolerance_bound(sampler):
    """The tolerance bound: the RMS deviation from the sequential samples (over samples and pixels) is at most
    tol times the posterior's RMS pixel std: Picard's error is a fraction tol of the sampling spread. (Single
    DDIM samples near a mode boundary can move further: the deterministic flow amplifies their error.)"""
    model, y, shape = _setup(inpaint4x4(), batch=64)
    ref = sample(model, y, NoiseSource(5, shape), steps=100, sampler=sampler).samples
    spread = float(ref.reshape(64, -1).std(0).pow(2).mean().sqrt())
    for tol in (0.1, 0.01):
        for anderson in (0, 2):
            out = picard_sample(model, y, NoiseSource(5, shape), steps=100, sampler=sampler, window=32, tol=tol,
                                anderson=anderson)
            dev = (out.samples - ref).pow(2).mean().sqrt()
            assert float(dev) <= tol * spread, (tol, anderson, float(dev), spread)


def test_anderson_history_keeps_copies():
    """The history must not alias the caller's tensors (the trajectory is overwritten in place after a call)."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 2, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    gs = [torch.randn(6, 2, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    fresh, aliased = TriangularAnderson(2), TriangularAnderson(2)
    buf = torch.zeros(6, 2, 3, dtype=torch.float64)
    for x, g in zip(xs, gs):
        want = fresh(1, x.clone(), g.clone())
        buf.copy_(x)
        got = aliased(1, buf, g.clone())
        buf.copy_(want)  # the caller writes the update into the trajectory, as picard_sample does
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_anderson_history_survives_a_window_slide():
    """Pairs of iterates from before a slide still contribute on the steps both windows cover (the old
    history was used only while the window start had not moved)."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(9, 2, 3, generator=gen, dtype=torch.float64)  # residuals shrink: no restart
    acc = TriangularAnderson(2)
    for k, first in enumerate((1, 1)):
        x = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64)
        acc(first, x, x + 0.3**k * base[first - 1 : first + 5])
    x = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64)
    g = x + 0.3**2 * base[2:8]
    out = acc(3, x, g)  # the window slid by 2: its rows are steps 3..8, the history covers 1..6
    assert float((out[1:4] - g[1:4]).abs().max()) > 1e-6  # accelerated on the overlap (steps 4..6)
    torch.testing.assert_close(out[0], g[0])  # the window's first step stays exact
    torch.testing.assert_close(out[4:], g[4:])  # steps 7, 8: no pair covers them


def test_anderson_restarts_a_sample_whose_residual_grows():
    gen = torch.Generator().manual_seed(3)
    acc = TriangularAnderson(2)
    base = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64)
    for k in range(3):
        x = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64)
        scale = torch.tensor([0.3**k, 2.0**k], dtype=torch.float64).reshape(1, 2, 1)  # sample 1 diverges
        out = acc(1, x, x + scale * base)
    g = x + scale * base
    torch.testing.assert_close(out[:, 1], g[:, 1])  # restarted: plain Picard
    assert float((out[1:, 0] - g[1:, 0]).abs().max()) > 1e-6  # sample 0 keeps its acceleration


def test_anderson_survives_a_singular_least_squares_system():
    """float32 windows whose residual differences vanish made torch.linalg.solve raise (found on the trained
    UNet); the safeguard now falls back to the plain Picard value for those steps."""
    acc = TriangularAnderson(2)
    x = torch.zeros(4, 3, dtype=torch.float32)
    out = None
    for _ in range(3):  # identical iterates: every difference is exactly zero
        out = acc(1, x.clone(), x.clone() + 1.0)
    torch.testing.assert_close(out, x + 1.0)


@pytest.mark.parametrize("kw, field", [({"window": 0}, "window"), ({"tol": 0.0}, "tol"), ({"tol": -1.0}, "tol"),
                                       ({"sampler": "heun"}, "sampler"), ({"anderson": -1}, "anderson"),
                                       ({"slide": "greedy"}, "slide")])
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
