"""Higher-order deterministic solvers of the probability-flow ODE: DPM-Solver++(2M) (Lu et al., "DPM-Solver++:
Fast solver for guided sampling of diffusion probabilistic models", 2022), written once here for the
sequential sampler and Picard.

With lambda = log(m / sigma) (half the log-SNR) and the data prediction x0_hat = (x - sigma eps_hat) / m, one step
t_k -> t_{k+1} of step h_k = lambda_{k+1} - lambda_k is

    x_{k+1} = (sigma_{k+1} / sigma_k) x_k + m_{k+1} (1 - e^{-h_k}) D_k,
    D_k = (1 + 1 / (2 r_k)) x0_k - 1 / (2 r_k) x0_{k-1},    r_k = h_{k-1} / h_k,

the exponential integrator with x0_hat extrapolated linearly in lambda from the two latest steps. The first
step (no history) and the last (to t = 0, where h is infinite and the step is Tweedie's x0_hat) are first order,
i.e. DDIM. In increment form, as the other samplers: x_{k+1} = x_k + (a_k - 1) x_k + c_k x0_k + c'_k x0_{k-1}.
The sampler is registered as ``dpm2m`` (``lightning_mlmc.samplers``): ``sample(..., sampler="dpm2m")`` runs it
sequentially, ``picard_sample`` inside Picard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_mlmc.diffusion import eps_to_x0, per_row
from lightning_mlmc.schedule import VPSchedule

Tensor = torch.Tensor


@dataclass(frozen=True)
class MultistepCoefficients:
    """float64 coefficients of the n steps of DPM-Solver++(2M) on one grid; every field has shape (n,).

    Attributes:
        t: step start times; mean_t, sigma_t: m and sigma there (for x0_hat from eps_hat).
        a_minus_1: sigma_{k+1} / sigma_k - 1.
        c_cur, c_prev: the coefficients of x0_k and x0_{k-1} (c_prev = 0 on first-order steps).
    """

    t: Tensor
    mean_t: Tensor
    sigma_t: Tensor
    a_minus_1: Tensor
    c_cur: Tensor
    c_prev: Tensor

    def __len__(self) -> int:
        return int(self.t.shape[0])


def dpm2m_coefficients(times: Tensor, schedule: VPSchedule | None = None) -> MultistepCoefficients:
    """Coefficients of DPM-Solver++(2M) on the decreasing grid ``times`` (shape (n+1,), last entry 0)."""
    schedule = schedule or VPSchedule()
    times = times.to(torch.float64)
    t, s = times[:-1], times[1:]
    log_m_t, log_m_s = schedule.log_mean(t), schedule.log_mean(s)
    log_sig_t = 0.5 * torch.log(schedule.sigma2(t))
    final = s == 0
    log_sig_s = torch.where(final, torch.zeros_like(s), 0.5 * torch.log(schedule.sigma2(torch.where(final, t, s))))
    h = (log_m_s - log_sig_s) - (log_m_t - log_sig_t)
    a_minus_1 = torch.where(final, -torch.ones_like(t), torch.expm1(log_sig_s - log_sig_t))
    c = torch.where(final, torch.exp(log_m_s), torch.exp(log_m_s) * -torch.expm1(-h))
    r = torch.ones_like(h)
    r[1:] = h[:-1] / h[1:]
    second = torch.ones_like(h, dtype=torch.bool)
    second[0] = False
    second &= ~final
    c_cur = torch.where(second, c * (1 + 0.5 / r), c)
    c_prev = torch.where(second, -c * 0.5 / r, torch.zeros_like(c))
    return MultistepCoefficients(t=t, mean_t=torch.exp(log_m_t), sigma_t=torch.exp(log_sig_t), a_minus_1=a_minus_1,
                                 c_cur=c_cur, c_prev=c_prev)


def dpm2m_increment(x: Tensor, x0: Tensor, x0_prev: Tensor, a_minus_1: Tensor, c_cur: Tensor,
                    c_prev: Tensor) -> Tensor:
    """The increment (a - 1) x + c x0_hat + c' x0_hat_prev of one DPM-Solver++(2M) step (or of one per row).

    Coefficients are 0-d or one per row of x (shape (B,)), as ``diffusion.step_increment``.
    """
    return per_row(a_minus_1, x) * x + per_row(c_cur, x) * x0 + per_row(c_prev, x) * x0_prev


def x0_prediction(x: Tensor, eps: Tensor, mean_t: Tensor, sigma_t: Tensor) -> Tensor:
    """Tweedie's x0_hat from eps_hat with per-row (or 0-d) m and sigma."""
    return eps_to_x0(x, eps, per_row(mean_t, x), per_row(sigma_t, x))


def multistep_advance(x: Tensor, eps: Tensor, coef: MultistepCoefficients, k: int,
                      x0_prev: Tensor) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2M) step: (x_(k+1), x0_hat at x_k) from x_k, the network output ``eps`` at (x_k, t_k) and
    ``x0_prev``, x0_hat at x_(k-1) (unused at k = 0, where c_prev = 0: pass zeros)."""
    x0 = x0_prediction(x, eps, coef.mean_t[k], coef.sigma_t[k])
    return x + dpm2m_increment(x, x0, x0_prev, coef.a_minus_1[k], coef.c_cur[k], coef.c_prev[k]), x0
