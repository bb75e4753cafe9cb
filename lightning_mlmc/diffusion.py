"""Reverse-step coefficients of the VP exponential integrator and the eps / score / x0 conversions.

One reverse step t -> s < t (DESIGN.md section 2), written once as an increment (``step_increment``) so
that the sequential sampler, MLMC's coupled paths, PIADM and Picard's cumulative sums share its arithmetic:

    x_s = x_t + (a - 1) x_t + c_eps eps_hat(x_t, y, t) + c_noise xi,        a = m_s / m_t.

Stochastic (DDPM posterior step with Tweedie's x0_hat plugged in, i.e. the exponential integrator):
    c_eps = -(m_s/m_t) (1 - g_t/g_s) / sigma_t,   c_noise = sqrt((1-g_s)/(1-g_t) (1 - g_t/g_s)).
Deterministic (DDIM, eta = 0): x_s = m_s x0_hat + sigma_s eps_hat, i.e.
    c_eps = sigma_s - m_s sigma_t / m_t,          c_noise = 0.
At s = 0 both are Tweedie's formula x0_hat = (x_t - sigma_t eps_hat) / m_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_mlmc.schedule import VPSchedule

Tensor = torch.Tensor


def eps_to_score(eps: Tensor, sigma) -> Tensor:
    """score = -eps / sigma(t)."""
    return -eps / sigma


def score_to_eps(score: Tensor, sigma) -> Tensor:
    """eps = -sigma(t) score."""
    return -sigma * score


def eps_to_x0(x_t: Tensor, eps: Tensor, m, sigma) -> Tensor:
    """Tweedie's x0_hat = (x_t - sigma eps) / m."""
    return (x_t - sigma * eps) / m


def x0_to_eps(x_t: Tensor, x0: Tensor, m, sigma) -> Tensor:
    """eps = (x_t - m x0) / sigma."""
    return (x_t - m * x0) / sigma


@dataclass(frozen=True)
class StepCoefficients:
    """float64 coefficients of the n steps t_k -> t_{k+1} of one grid; every field has shape (n,).

    Attributes:
        t: step start times t_k (where the network is evaluated).
        s: step end times t_{k+1}.
        a_minus_1: m_s/m_t - 1 (expm1 of the log ratio).
        eps: c_eps, the coefficient of eps_hat.
        noise: c_noise, the standard deviation of the injected noise (0 for the deterministic sampler).
        ddpm_std: the DDPM posterior standard deviation of the step, whatever the sampler (Picard's
            tolerance scale; 0 on the final Tweedie step).
        kappa: (m_t/m_s)(1-g_s)/(1-g_t), the x_t-coefficient of the DDPM posterior mean with x0 held
            fixed; it weights the fine noises in MLMC's coarse-noise construction.
        mean_t, sigma_t: m(t_k) and sigma(t_k), the marginal's scale and noise level at the step start.
    """

    t: Tensor
    s: Tensor
    a_minus_1: Tensor
    eps: Tensor
    noise: Tensor
    ddpm_std: Tensor
    kappa: Tensor
    mean_t: Tensor
    sigma_t: Tensor

    def __len__(self) -> int:
        return int(self.t.shape[0])


def step_coefficients(times: Tensor, stochastic: bool, schedule: VPSchedule | None = None) -> StepCoefficients:
    """Coefficients of every step of the decreasing grid ``times`` (shape (n+1,), last entry 0)."""
    schedule = schedule or VPSchedule()
    times = times.to(torch.float64)
    t, s = times[:-1], times[1:]
    lm_t, lm_s = schedule.log_mean(t), schedule.log_mean(s)
    sig2_t, sig2_s = schedule.sigma2(t), schedule.sigma2(s)
    sig_t, sig_s = sig2_t.sqrt(), sig2_s.sqrt()
    ratio = torch.exp(lm_s - lm_t)  # m_s / m_t >= 1
    one_minus_gt_over_gs = -torch.expm1(2.0 * (lm_t - lm_s))  # 1 - g_t/g_s, sigma_{t|s}^2
    ddpm_var = sig2_s / sig2_t * one_minus_gt_over_gs
    ddpm_std = ddpm_var.clamp_min(0.0).sqrt()
    if stochastic:
        c_eps = -ratio * one_minus_gt_over_gs / sig_t
        c_noise = ddpm_std
    else:
        c_eps = sig_s - ratio * sig_t
        c_noise = torch.zeros_like(t)
    kappa = sig2_s / sig2_t / ratio
    return StepCoefficients(
        t=t,
        s=s,
        a_minus_1=torch.expm1(lm_s - lm_t),
        eps=c_eps,
        noise=c_noise,
        ddpm_std=ddpm_std,
        kappa=kappa,
        mean_t=torch.exp(lm_t),
        sigma_t=sig_t,
    )


def per_row(c: Tensor, x: Tensor) -> Tensor:
    """A coefficient (a 0-d scalar or one value per row, shape (B,)) in x's dtype, shaped to broadcast
    against x (shape (B, ...))."""
    c = c.to(x.dtype)
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


def step_increment(x: Tensor, eps: Tensor, a_minus_1: Tensor, c_eps: Tensor, noise: Tensor | None = None) -> Tensor:
    """The increment of one reverse step, (a - 1) x + c_eps eps_hat + noise (DESIGN.md section 2).

    The single step function every sampler shares: the sequential sampler, MLMC's coupled paths and PIADM
    add it to x one step at a time (``advance``), Picard sums it over a window. ``a_minus_1`` and ``c_eps``
    are scalars (0-d tensors) or one value per row (shape (B,)); ``noise`` is the step's noise term
    c_noise xi, already scaled (None for a deterministic step).
    """
    inc = per_row(a_minus_1, x) * x + per_row(c_eps, x) * eps
    return inc if noise is None else inc + noise


def advance(x: Tensor, eps: Tensor, coef: StepCoefficients, k: int, xi: Tensor | None = None) -> Tensor:
    """x_(k+1) = x_k + the increment of step k of ``coef``, given the network output ``eps`` at (x_k, t_k)
    and the step's standard normal draw ``xi`` (None, or ignored, where the step injects no noise)."""
    noise = coef.noise[k].to(x.dtype) * xi if xi is not None and coef.noise[k] > 0 else None
    return x + step_increment(x, eps, coef.a_minus_1[k], coef.eps[k], noise)
