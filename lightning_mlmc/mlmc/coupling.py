"""How a coupled level builds its coarse step's noise from the M fine noises (DESIGN.md section 4)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from lightning_mlmc.diffusion import StepCoefficients
from lightning_mlmc.errors import InputError

Tensor = torch.Tensor
Coupling = Literal["naive", "weighted", "jacobian"]


COUPLINGS = ("naive", "weighted", "jacobian")


def check_coupling(coupling: str) -> str:
    if coupling not in COUPLINGS:
        raise InputError(f"coupling: expected one of {', '.join(COUPLINGS)}, got {coupling!r}")
    return coupling


def check_data_std(data_std: float) -> float:
    if not (math.isfinite(data_std) and data_std >= 0):
        raise InputError(f"data_std: expected a finite number >= 0, got {data_std}")
    return float(data_std)


def coarse_noise_weights(fine: StepCoefficients, j: int, M: int, coupling: str, data_std: float = 0.5) -> Tensor:
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
    check_coupling(coupling)
    if coupling == "naive":
        return torch.full((M,), M**-0.5, dtype=torch.float64)
    idx = slice(j * M, (j + 1) * M)
    c = fine.noise[idx]
    if coupling == "weighted":
        jac = fine.kappa[idx]
    else:
        check_data_std(data_std)
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
