"""Reverse-step coefficients of the VP exponential integrator and the eps / score / x0 conversions.

One reverse step t -> s < t (DESIGN.md section 2), written as an increment so that the sequential
sampler, MLMC's coupled paths and Picard's cumulative sums all use the same arithmetic:

    x_s = x_t + (a - 1) x_t + c_eps eps_hat(x_t, y, t) + c_noise xi,        a = m_s / m_t.

Stochastic (DDPM posterior step with Tweedie's x0_hat plugged in, i.e. the exponential integrator):
    c_eps = -(m_s/m_t) (1 - g_t/g_s) / sigma_t,   c_noise = sqrt((1-g_s)/(1-g_t) (1 - g_t/g_s)).
Deterministic (DDIM, eta = 0): x_s = m_s x0_hat + sigma_s eps_hat, i.e.
    c_eps = sigma_s - m_s sigma_t / m_t,          c_noise = 0.
At s = 0 both are Tweedie's formula x0_hat = (x_t - sigma_t eps_hat) / m_t.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from lightning_mlmc.errors import InputError
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
    stochastic: bool

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
        stochastic=stochastic,
    )


def drift_increment(x: Tensor, eps: Tensor, a_minus_1: Tensor, c_eps: Tensor) -> Tensor:
    """The deterministic part of one step's increment, (a - 1) x + c_eps eps.

    ``a_minus_1`` and ``c_eps`` are scalars or tensors broadcastable against ``x`` (a Picard window
    passes one coefficient per row). The single step function that every sampler shares.
    """
    return a_minus_1.to(x.dtype) * x + c_eps.to(x.dtype) * eps


def _bcast(c: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-row coefficient (shape (B,)) to broadcast against x (shape (B, ...))."""
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


COUPLINGS = ("naive", "weighted", "jacobian")


def coarse_noise_weights(fine, j: int, M: int, coupling: str, data_std: float = 0.5) -> Tensor:
    """Weights w (shape (M,), sum w_i^2 = 1) with xi_coarse = sum_i w_i xi_fine_i for coarse step j.

    Fine noise i enters the fine path at sub-step i and is carried to the end of the coarse step by the
    later sub-steps; the coupling that correlates the coarse noise best with what the fine path
    accumulated weights it by c_i times the later sub-steps' Jacobians d x_(r+1) / d x_r.

    - ``weighted`` (the seed's): Jacobians kappa_r, the DDPM posterior mean's x_t-coefficient with x0_hat
      held fixed; then the coarse noise term c_coarse xi_coarse has exactly the variance the fine noises
      contribute, which telescopes to the coarse step's own.
    - ``jacobian``: the full step's Jacobian a_r + c_eps,r d eps_hat / d x when the data are Gaussian with
      per-pixel standard deviation ``data_std`` (eps_hat = sigma_t x / (m_t^2 data_std^2 + sigma_t^2));
      data_std -> 0 gives ``weighted``, and a large data_std nearly equal weights.
    - ``naive``: w_i = 1/sqrt(M).
    """
    if coupling == "naive":
        return torch.full((M,), M**-0.5, dtype=torch.float64)
    if coupling not in COUPLINGS:
        raise InputError(f"coupling: expected one of {', '.join(COUPLINGS)}, got {coupling!r}")
    idx = slice(j * M, (j + 1) * M)
    c = fine.noise[idx]
    if coupling == "weighted":
        jac = fine.kappa[idx]
    else:
        if not (math.isfinite(data_std) and data_std >= 0):
            raise InputError(f"data_std: expected a finite number >= 0, got {data_std}")
        m, sig = fine.mean_t[idx], fine.sigma_t[idx]
        jac = 1.0 + fine.a_minus_1[idx] + fine.eps[idx] * sig / (m**2 * data_std**2 + sig**2)
    later = torch.ones(M, dtype=torch.float64)
    for i in range(M - 2, -1, -1):
        later[i] = later[i + 1] * jac[i + 1]
    w = c * later
    norm = torch.sqrt((w**2).sum())
    if norm == 0:
        return torch.full((M,), M**-0.5, dtype=torch.float64)
    return w / norm
