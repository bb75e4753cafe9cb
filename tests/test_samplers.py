"""Sequential samplers against exact posteriors and the exact linear-recursion oracle."""

import numpy as np
import pytest
import torch
from tests.analytic_cases import bimodal2d, gaussian3d, gaussian_inpaint

from lightning_mlmc import (
    ExactPosteriorEps,
    NoiseSource,
    TimeGrid,
    VPSchedule,
    exact_posterior,
    masked_start,
    observation_start,
    sample,
)
from lightning_mlmc.gaussian_oracle import GaussianOracle

# Stated discretization allowance for 1000 uniform steps. On single-Gaussian problems the exact
# oracle puts the per-pixel bias of E[x^2] at 1000 steps below 0.005, half the allowance (see test_oracle_bias_...).
ALLOWANCE_1000 = 0.01


def _y(spec):
    return torch.as_tensor(spec.y)[None]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_bimodal_moments_within_standard_error(sampler):
    """20,000 samples, 1000 steps: |mean - exact| and |E x^2 - exact| <= 5 SE + allowance."""
    spec = bimodal2d()
    post = exact_posterior(spec)
    out = sample(ExactPosteriorEps(spec), _y(spec), NoiseSource(11, (20_000, 2)), steps=1000, sampler=sampler)
    x = out.samples
    assert out.nfe == 1000 and x.shape == (20_000, 2)
    se1 = x.std(0) / np.sqrt(len(x))
    se2 = (x**2).std(0) / np.sqrt(len(x))
    assert torch.all((x.mean(0) - post.mean).abs() <= 5 * se1 + ALLOWANCE_1000)
    assert torch.all(((x**2).mean(0) - post.second_moment).abs() <= 5 * se2 + ALLOWANCE_1000)
    # The modes are populated in the right proportion: P(x_2 - x_1 < 0) is exact for a mixture.
    v = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)
    p = float(sum(w * normal.cdf(-(m @ v) / (v @ c @ v).sqrt()) for w, m, c in zip(post.weights, post.means, post.covs)))
    frac = float(((x @ v) < 0).double().mean())
    assert abs(frac - p) <= 5 * np.sqrt(p * (1 - p) / len(x)) + ALLOWANCE_1000


def test_oracle_bias_at_1000_steps_is_within_allowance():
    for spec in (gaussian3d(), gaussian_inpaint()):
        oracle = GaussianOracle(spec)
        exact = exact_posterior(spec).second_moment
        for sampler in ("ddpm", "ddim"):
            assert (oracle.law(1000, sampler).second_moment - exact).abs().max() < ALLOWANCE_1000 / 2


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("grid", [TimeGrid(), TimeGrid("edm")])
def test_sampler_matches_exact_oracle(sampler, grid):
    """At 8 steps the discretization bias is large; the empirical moments still match the oracle."""
    spec = gaussian3d()
    law = GaussianOracle(spec).law(8, sampler, grid)
    x = sample(ExactPosteriorEps(spec), _y(spec), NoiseSource(5, (40_000, 3)), steps=8, sampler=sampler, grid=grid).samples
    se_m = law.cov.diagonal().sqrt() / np.sqrt(len(x))
    assert torch.all((x.mean(0) - law.mean).abs() <= 5 * se_m)
    se_2 = (x**2).std(0) / np.sqrt(len(x))
    assert torch.all(((x**2).mean(0) - law.second_moment).abs() <= 5 * se_2)
    emp_cov = torch.cov(x.T)
    se_c = (law.cov.diagonal()[:, None] * law.cov.diagonal()[None, :]).sqrt() * np.sqrt(2 / len(x))
    assert torch.all((emp_cov - law.cov).abs() <= 5 * se_c)


def test_ddpm_bias_shrinks_like_one_over_n():
    """Exact bias |E_n[x^2] - E[x^2]| from the linear recursion, n = 4..1024 on a single Gaussian.

    The first-order rate appears once the large early steps are resolved: the local slope
    log2(bias(n)/bias(2n)) steepens monotonically towards -1 and is within 0.1 of it by n = 1024.
    (A least-squares fit over n = 4..256 gives about -0.67 and over 64..1024 about -0.88:
    pre-asymptotic, reported in the README, not hidden.)
    """
    spec = gaussian3d()
    oracle = GaussianOracle(spec)
    exact = exact_posterior(spec).second_moment
    ns = np.array([4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048])
    bias = np.array([float((oracle.law(int(n)).second_moment - exact).norm()) for n in ns])
    local = np.diff(np.log(bias)) / np.log(2)
    assert np.all(np.diff(local) < 0)  # steepening towards -1
    assert -1.05 < local[-1] < -0.9
    assert np.all(bias[1:] < bias[:-1])


def test_same_seed_same_samples_and_noise_source_is_order_free():
    spec = bimodal2d()
    model = ExactPosteriorEps(spec)
    a = sample(model, _y(spec), NoiseSource(7, (50, 2)), steps=20).samples
    b = sample(model, _y(spec), NoiseSource(7, (50, 2)), steps=20).samples
    c = sample(model, _y(spec), NoiseSource(8, (50, 2)), steps=20).samples
    assert torch.equal(a, b) and not torch.equal(a, c)
    src = NoiseSource(7, (3, 2))
    later = src.step(5)
    src.start()
    assert torch.equal(src.step(5), later)


def test_generator_is_accepted():
    spec = bimodal2d()
    model = ExactPosteriorEps(spec)
    a = sample(model, _y(spec), torch.Generator().manual_seed(1), steps=5, shape=(4, 2)).samples
    b = sample(model, _y(spec), torch.Generator().manual_seed(1), steps=5, shape=(4, 2)).samples
    assert torch.equal(a, b)


def test_observation_start():
    sched = VPSchedule()
    y = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    st = observation_start(y, 0.1)
    assert float(sched.sigma(st.t) / sched.mean(st.t)) == pytest.approx(0.1, rel=1e-12)
    x = st.sample(torch.randn(1, 2, dtype=torch.float64))
    torch.testing.assert_close(x, float(sched.mean(st.t)) * y)
    assert TimeGrid().times(4, st.t)[0] == st.t


def test_masked_start_keeps_observed_pixels():
    spec = gaussian_inpaint()
    mask = torch.as_tensor(spec.selection_mask(), dtype=torch.float64).reshape(spec.shape)
    y_img = torch.as_tensor(spec.matrix.T @ spec.y).reshape(spec.shape)
    st = masked_start(y_img, mask)
    z = torch.randn(5, *spec.shape, dtype=torch.float64)
    x = st.sample(z)
    torch.testing.assert_close(x * mask, (y_img * mask).expand_as(x))
    torch.testing.assert_close(x * (1 - mask), z * (1 - mask))
    out = sample(ExactPosteriorEps(spec), _y(spec), NoiseSource(0, (5, *spec.shape)), steps=10, start=st)
    assert torch.isfinite(out.samples).all()
    # The oracle covers non-Gaussian starts too.
    law = GaussianOracle(spec).law(10, start=st)
    assert law.mean.shape == (9,)
