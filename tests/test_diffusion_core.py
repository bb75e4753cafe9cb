"""The VP schedule, the time grids and the reverse step, against closed forms."""

from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch

from lightning_mlmc import (
    TimeGrid,
    VPSchedule,
    coarse_noise_weights,
    eps_to_score,
    eps_to_x0,
    score_to_eps,
    step_coefficients,
    step_increment,
    x0_to_eps,
)

SCHED = VPSchedule()


def _decimal_sigma2(t: float) -> float:
    """1 - exp(-(b0 t + (b1-b0) t^2/2)) at 50 digits: an independent reference for sigma^2."""
    getcontext().prec = 50
    t = Decimal(t)
    expo = Decimal("0.1") * t + Decimal("19.9") * t * t / 2
    return float(1 - (-expo).exp())


@pytest.mark.parametrize("t", [1e-9, 1e-6, 1e-3, 0.1, 0.5, 1.0])
def test_schedule_closed_forms(t):
    lm = -(0.1 * t + 0.5 * 19.9 * t * t) / 2
    assert float(SCHED.log_mean(t)) == pytest.approx(lm, rel=1e-15)
    assert float(SCHED.gamma(t)) == pytest.approx(np.exp(2 * lm), rel=1e-14)
    # sigma^2 keeps full relative precision as t -> 0 (expm1).
    assert float(SCHED.sigma2(t)) == pytest.approx(_decimal_sigma2(t), rel=1e-13)
    assert SCHED.sigma2(t).dtype == torch.float64


def test_time_inversions():
    t = torch.linspace(1e-4, 1.0, 50, dtype=torch.float64)
    torch.testing.assert_close(SCHED.t_from_log_gamma(2 * SCHED.log_mean(t)), t, rtol=1e-12, atol=0)
    torch.testing.assert_close(SCHED.t_from_log_snr(SCHED.log_snr(t)), t, rtol=1e-9, atol=0)
    ratio = SCHED.sigma(t) / SCHED.mean(t)
    torch.testing.assert_close(SCHED.t_from_noise_ratio(ratio), t, rtol=1e-10, atol=0)


def _random_pairs(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g, dtype=torch.float64) * 0.999 + 1e-3
    b = torch.rand(n, generator=g, dtype=torch.float64) * 0.999 + 1e-3
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    s[:10] = 0.0  # include Tweedie steps to t = 0
    return t, s[t > s], g


def test_step_equals_ddpm_posterior_step():
    """x_t + increment is the mean of q(x_s | x_t, x0_hat), and c_noise^2 its variance."""
    t, s, g = _random_pairs()
    t = t[: len(s)]
    times = torch.stack([t, s], 1)
    x = torch.randn(len(t), 5, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 5, generator=g, dtype=torch.float64)
    for i in range(len(t)):
        c = step_coefficients(times[i], stochastic=True)
        m_t, m_s = SCHED.mean(t[i]), SCHED.mean(s[i])
        v_t, v_s = SCHED.sigma2(t[i]), SCHED.sigma2(s[i])
        x0 = eps_to_x0(x[i], eps[i], m_t, v_t.sqrt())
        alpha_ts = m_t / m_s
        beta_ts = v_t - alpha_ts**2 * v_s
        mean = m_s * beta_ts / v_t * x0 + alpha_ts * v_s / v_t * x[i]
        var = beta_ts * v_s / v_t
        got = x[i] + step_increment(x[i], eps[i], c.a_minus_1[0], c.eps[0])
        torch.testing.assert_close(got, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c.noise[0] ** 2, var, rtol=1e-12, atol=1e-15)
        # The seed's form with gamma and the score.
        g_t, g_s = SCHED.gamma(t[i]), SCHED.gamma(s[i])
        score = eps_to_score(eps[i], v_t.sqrt())
        seed_mean = (g_s / g_t).sqrt() * x[i] + ((g_s / g_t).sqrt() - (g_t / g_s).sqrt()) * score
        torch.testing.assert_close(got, seed_mean, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(c.noise[0], ((1 - g_s) / (1 - g_t) * (1 - g_t / g_s)).sqrt(), rtol=1e-10, atol=1e-15)


def test_deterministic_step_is_ddim():
    t, s, g = _random_pairs(seed=1)
    t = t[: len(s)]
    x = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    for i in range(len(t)):
        c = step_coefficients(torch.stack([t[i], s[i]]), stochastic=False)
        x0 = eps_to_x0(x[i], eps[i], SCHED.mean(t[i]), SCHED.sigma(t[i]))
        want = SCHED.mean(s[i]) * x0 + SCHED.sigma(s[i]) * eps[i]
        got = x[i] + step_increment(x[i], eps[i], c.a_minus_1[0], c.eps[0])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert c.noise[0] == 0


def test_tweedie_last_step():
    c = step_coefficients(torch.tensor([0.3, 0.0], dtype=torch.float64), stochastic=True)
    x = torch.tensor([0.7, -1.2], dtype=torch.float64)
    eps = torch.tensor([0.1, 0.4], dtype=torch.float64)
    want = eps_to_x0(x, eps, SCHED.mean(0.3), SCHED.sigma(0.3))
    torch.testing.assert_close(x + step_increment(x, eps, c.a_minus_1[0], c.eps[0]), want, rtol=1e-14, atol=1e-14)
    assert c.noise[0] == 0


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(3)
    x, e = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    m, sig = SCHED.mean(0.4), SCHED.sigma(0.4)
    torch.testing.assert_close(score_to_eps(eps_to_score(e, sig), sig), e)
    torch.testing.assert_close(x0_to_eps(x, eps_to_x0(x, e, m, sig), m, sig), e)


@pytest.mark.parametrize("kind", ["uniform", "polynomial", "logsnr", "edm"])
@pytest.mark.parametrize("M", [2, 3, 4])
def test_grids_nest_exactly(kind, M):
    grid = TimeGrid(kind, rho=2.0 if kind == "polynomial" else 7.0)
    for t_start in (1.0, 0.37):
        for levels in range(1, 5):
            fine, coarse = grid.times(M**levels, t_start), grid.times(M ** (levels - 1), t_start)
            assert torch.equal(fine[::M], coarse)
            assert fine[0] == t_start and fine[-1] == 0
            assert torch.all(fine[1:] < fine[:-1])


def test_uniform_grid_values():
    torch.testing.assert_close(TimeGrid().times(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


def test_weighted_coarse_noise_has_the_coarse_variance():
    """sum_i (c_i prod_{r>i} kappa_r)^2 equals the coarse step's own noise variance, exactly."""
    for kind in ("uniform", "polynomial", "edm"):
        grid = TimeGrid(kind, rho=2.0 if kind == "polynomial" else 7.0)
        for M in (2, 4):
            fine = step_coefficients(grid.times(8 * M), True)
            coarse = step_coefficients(grid.times(8), True)
            for j in range(7):  # the last coarse step is Tweedie (no noise)
                idx = slice(j * M, (j + 1) * M)
                c, kappa = fine.noise[idx], fine.kappa[idx]
                later = torch.tensor([float(torch.prod(kappa[i + 1:])) for i in range(M)], dtype=torch.float64)
                torch.testing.assert_close(((c * later) ** 2).sum(), coarse.noise[j] ** 2, rtol=1e-10, atol=0)
                w = coarse_noise_weights(fine, j, M, "weighted")
                torch.testing.assert_close((w**2).sum(), torch.tensor(1.0, dtype=torch.float64))
