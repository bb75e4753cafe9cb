"""Antithetic pairs against exact answers that do not come from the sampler's code.

On a single-Gaussian problem with its exact score the DDPM and DDIM chains are affine in their noise:
x = b + A z, z every draw of the path (start and steps). So the pair mean of x, (x(z) + x(-z)) / 2 = b, is the
same for every pair (a property of affinity, checked to rounding without any oracle), and equals the chain's
mean; and the pair mean of x^2 is b^2 + (A z)^2, whose variance per pixel is 2 Sigma_ii^2 (Sigma = A A^T, the
chain's covariance), against 2 Sigma_ii^2 + 4 b_i^2 Sigma_ii for one path. The chain's mean and covariance come
from ``GaussianOracle`` (the affine maps multiplied out), the sample variances' tolerances from their
standard errors (the kurtosis of a chi-square with one degree of freedom is 15).

A pair that negates only the start draw, or only the step draws, is not antithetic: its pair means spread
(tested below as a control: the affinity check catches either half-mutation)."""

import math

import pytest
import torch

from lightning_mlmc import ExactPosteriorEps, exact_posterior
from lightning_mlmc.gaussian_oracle import GaussianOracle
from lightning_mlmc.mlmc import MLMCConfig, run_mlmc
from lightning_mlmc.sampling import NoiseSource, sample
from lightning_mlmc.schedule import TimeGrid
from tests.analytic_cases import gaussian3d, gaussian_inpaint
from tests.test_mlmc_truth import rmse_bound_factor

STEPS = 20


class HalfAntithetic(NoiseSource):
    """A wrong pairing, for the control: only the start draw (``what='start'``) or only the step draws negated."""

    def __init__(self, *args, what: str, **kw):
        super().__init__(*args, antithetic=True, **kw)
        self.what = what

    def draw(self, index: int) -> torch.Tensor:
        z = super().draw(index)
        half = z.shape[0] // 2
        if (self.what == "start") != (index == 0):  # undo the negation of the draws the mutation leaves alone
            z = torch.cat([z[:half], z[:half]])
        return z


def _pairs(spec, sampler: str, pairs: int, noise_cls=NoiseSource, seed: int = 3, **kw) -> torch.Tensor:
    noise = noise_cls(seed, (2 * pairs, *spec.shape), **({"antithetic": True} if noise_cls is NoiseSource else {}), **kw)
    x = sample(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], noise, steps=STEPS, sampler=sampler,
               grid=TimeGrid("logsnr")).samples.reshape(2 * pairs, -1)
    return x


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_pair_means_of_an_affine_chain_are_its_mean(sampler):
    spec = gaussian3d()
    x = _pairs(spec, sampler, 200)
    means = 0.5 * (x[:200] + x[200:])
    assert (means - means[0]).abs().max() <= 1e-12 * means.abs().max()  # every pair the same: affinity
    law = GaussianOracle(spec).law(STEPS, sampler, grid=TimeGrid("logsnr"))
    torch.testing.assert_close(means[0], law.mean, rtol=1e-10, atol=1e-12)
    if sampler == "ddpm":  # the control: half a pairing leaves the pair means spread like the noise
        for what in ("start", "steps"):
            bad = _pairs(spec, sampler, 200, HalfAntithetic, what=what)
            assert (0.5 * (bad[:200] + bad[200:])).std(0).max() > 1e-3, what


def test_pair_mean_variance_of_x2_has_the_gaussian_closed_form():
    spec, n = gaussian3d(), 20000
    x = _pairs(spec, "ddpm", n, seed=11)
    law = GaussianOracle(spec).law(STEPS, "ddpm", grid=TimeGrid("logsnr"))
    sigma = torch.diagonal(law.cov)
    pair = 0.5 * (x[:n] ** 2 + x[n:] ** 2)
    expected = 2 * sigma**2  # Var((A z)_i^2) = 2 Sigma_ii^2
    se = expected * math.sqrt(14 / n)  # the sample variance of Sigma_ii chi^2_1 values: kurtosis 15
    assert ((pair.var(0) - expected).abs() <= 5 * se).all(), (pair.var(0), expected)
    single = x[:n] ** 2  # one path: 2 Sigma^2 + 4 b^2 Sigma, larger wherever the mean is not zero
    expected_single = 2 * sigma**2 + 4 * law.mean**2 * sigma
    assert ((single.var(0) - expected_single).abs() <= 6 * expected_single * math.sqrt(14 / n)).all()


@pytest.mark.parametrize("antithetic", [True, False])
def test_mlmc_with_and_without_pairs_meets_eps(antithetic):
    """20 seeds on the 3x3 Gaussian inpainting problem at eps 0.05: the RMSE against the exact second moment
    within the chi-square bound of eps, pairs or not (a pairing that broke the law of either path, or a sum of
    pair means counted as two samples, would miss)."""
    spec = gaussian_inpaint()
    exact = exact_posterior(spec).second_moment
    sq = []
    for seed in range(20):
        config = MLMCConfig(seed=seed, antithetic=antithetic)
        levels = config.level_sampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], spec.shape)
        r = run_mlmc(config, levels, 0.05)
        assert r.scheme["antithetic"] is antithetic and r.to_json()["antithetic"] is antithetic
        sq.append(float((torch.tensor(r.estimate) - exact).pow(2).mean()))
    assert math.sqrt(sum(sq) / len(sq)) <= rmse_bound_factor(20) * 0.05


def test_the_variance_map_against_the_exact_posterior_variance():
    """Payoff moments ([x, x^2]) with pairs: Var = E[x^2] - E[x]^2 per pixel against the exact posterior
    variance over 12 seeds at eps 0.02; its error is dVar = dm2 - 2 m1 dm1 - dm1^2, so its RMSE is at most
    (1 + 2 max|m1|) eps to first order (the moments' errors share the eps^2 budget), times the chi-square
    factor for 12 runs, plus the finest level's bias of the variance (sampler bias, inside eps)."""
    spec = gaussian_inpaint()
    post = exact_posterior(spec)
    mean, var = post.means[0], torch.diagonal(post.covs[0])
    sq = []
    for seed in range(12):
        config = MLMCConfig(seed=seed, payoff="moments")
        levels = config.level_sampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], spec.shape)
        est = torch.tensor(run_mlmc(config, levels, 0.02).estimate)
        m1, m2 = est[: mean.numel()], est[mean.numel():]
        sq.append(float((m2 - m1**2 - var).pow(2).mean()))
    bound = (1 + 2 * float(mean.abs().max())) * 0.02 * rmse_bound_factor(12)
    assert math.sqrt(sum(sq) / len(sq)) <= bound


def test_the_mean_and_std_maps_meet_eps_against_the_exact_posterior():
    """Payoff mean_std (the delta-method target): 12 seeds at eps 0.02 on the 3x3 Gaussian inpainting problem,
    the RMS over both maps of the error against the exact posterior mean and standard deviation within the
    chi-square bound of eps (a std map recovered with the wrong linearization weights, or the moments' eps
    used for the std map, would miss); each map's RMSE estimate is reported and the first run is counted."""
    spec = gaussian_inpaint()
    post = exact_posterior(spec)
    exact = torch.cat([post.means[0], torch.diagonal(post.covs[0]).sqrt()])
    sq = []
    for seed in range(12):
        config = MLMCConfig(seed=seed, payoff="mean_std")
        levels = config.level_sampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], spec.shape)
        r = run_mlmc(config, levels, 0.02)
        assert set(r.maps) >= {"mean_rmse", "std_rmse"} and r.pilot_nfe >= r.maps["linearized_at"]["nfe"] > 0
        sq.append(float((torch.tensor(r.estimate) - exact).pow(2).mean()))
    assert math.sqrt(sum(sq) / len(sq)) <= rmse_bound_factor(12) * 0.02
