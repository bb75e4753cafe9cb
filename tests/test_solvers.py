"""DPM-Solver++(2M) against exact answers: an independent recursion for its law on a Gaussian problem, DDIM
where it is first order, and its weak order 2 against the exact probability-flow map."""

import math

import numpy as np
import pytest
import torch
from tests.analytic_cases import bimodal2d, gaussian_inpaint

from lightning_mlmc import ExactPosteriorEps, NoiseSource, TimeGrid, VPSchedule, exact_posterior, sample
from lightning_mlmc.gaussian_oracle import GaussianLaw, GaussianOracle, affine_law
from lightning_mlmc.sampling import sample_dpm2m


def _dpm2m_law(spec, times) -> GaussianLaw:
    """The DPM-Solver++ paper's 2M recursion on the exact (affine) data prediction of a Gaussian posterior,
    propagated as a joint Gaussian law of (x_k, x_{k-1}) from x_T ~ N(0, I)."""
    post = exact_posterior(spec)
    mu, cov0 = post.means[0], post.covs[0]
    n = mu.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    sched = VPSchedule()
    alpha = lambda t: float(sched.mean(t))  # noqa: E731
    sig = lambda t: math.sqrt(float(sched.sigma2(t)))  # noqa: E731

    def x0_map(t):  # x0_hat(x) = P x + q
        s2 = sig(t) ** 2
        inv = torch.linalg.inv(alpha(t) ** 2 * cov0 + s2 * eye)
        return (eye - s2 * inv) / alpha(t), s2 * inv @ mu

    ts = [float(t) for t in times]
    mean = torch.zeros(2 * n, dtype=torch.float64)
    cov = torch.block_diag(eye, torch.zeros(n, n, dtype=torch.float64))
    p_prev = q_prev = h_prev = None
    for k in range(len(ts) - 1):
        t, s = ts[k], ts[k + 1]
        p, q = x0_map(t)
        if s == 0:  # Tweedie
            f_cur, f_prev, const = p, torch.zeros_like(p), q
        else:
            h = math.log(alpha(s) / sig(s)) - math.log(alpha(t) / sig(t))
            b = -alpha(s) * (math.exp(-h) - 1)
            w = 0.0 if k == 0 else 1 / (2 * h_prev / h)
            f_cur = sig(s) / sig(t) * eye + b * (1 + w) * p
            f_prev = -b * w * p_prev if k > 0 else torch.zeros_like(p)
            const = b * (1 + w) * q - (b * w * q_prev if k > 0 else 0)
            h_prev = h
        trans = torch.cat([torch.cat([f_cur, f_prev], 1), torch.cat([eye, torch.zeros_like(eye)], 1)], 0)
        mean = trans @ mean + torch.cat([const, torch.zeros(n, dtype=torch.float64)])
        cov = trans @ cov @ trans.T
        p_prev, q_prev = p, q
    return GaussianLaw(mean[:n], cov[:n, :n])


@pytest.mark.parametrize("grid", [TimeGrid("logsnr"), TimeGrid("uniform")])
def test_law_matches_an_independent_recursion(grid):
    spec = gaussian_inpaint(3, 3)
    model, y = ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None]
    times = grid.times(20)
    law = affine_law(lambda nz: sample_dpm2m(model, y, nz, times=times).samples, spec.shape)
    ref = _dpm2m_law(spec, times)
    torch.testing.assert_close(law.mean, ref.mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(law.cov, ref.cov, rtol=0, atol=1e-10)


def test_two_steps_are_ddim():
    """The first step has no history and the last is Tweedie's: with two steps 2M is DDIM."""
    spec = bimodal2d()
    model, y, shape = ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], (16, *spec.shape)
    ref = sample(model, y, NoiseSource(3, shape), steps=2, sampler="ddim").samples
    out = sample_dpm2m(model, y, NoiseSource(3, shape), steps=2)
    torch.testing.assert_close(out.samples, ref, rtol=0, atol=1e-12)
    assert out.nfe == out.rounds == 2


def test_flow_law_is_the_limit_of_the_deterministic_solvers():
    """The oracle's exact flow map (closed form) against DDIM with many steps, and N(0, I) pushed to a law
    that differs from the posterior by the start's error only."""
    spec = gaussian_inpaint(3, 3)
    model, y = ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None]
    flow = GaussianOracle(spec).flow_law()
    law = affine_law(lambda nz: sample_dpm2m(model, y, nz, steps=2000, grid=TimeGrid("polynomial")).samples,
                     spec.shape)
    torch.testing.assert_close(law.mean, flow.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(law.cov, flow.cov, rtol=0, atol=1e-5)


def test_weak_order_two_against_the_exact_flow():
    """Error in E[x^2] against the exact flow map's law (the same start, so only the discretisation is measured):
    slope about -2 for 2M and -1 for DDIM on the log-SNR grid (polyfit over 32..256 steps)."""
    spec = gaussian_inpaint(4, 4)
    model, y = ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None]
    target = GaussianOracle(spec).flow_law().second_moment
    steps = [32, 64, 128, 256]
    errs = {"ddim": [], "dpm2m": []}
    for n in steps:
        times = TimeGrid("logsnr").times(n)
        for name, run in (("ddim", lambda nz: sample(model, y, nz, times=times, sampler="ddim").samples),
                          ("dpm2m", lambda nz: sample_dpm2m(model, y, nz, times=times).samples)):
            law = affine_law(run, spec.shape)
            errs[name].append(float((law.second_moment - target).pow(2).mean().sqrt()))
    slope = {k: np.polyfit(np.log(steps), np.log(v), 1)[0] for k, v in errs.items()}
    assert -2.4 < slope["dpm2m"] < -1.8 and -1.1 < slope["ddim"] < -0.85, slope
    assert errs["dpm2m"][1] < errs["ddim"][-1] / 4  # 64 steps of 2M beat 256 of DDIM
