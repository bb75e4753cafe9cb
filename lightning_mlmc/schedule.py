"""The VP (variance-preserving) noise schedule and the nested time-grid families.

Conventions (DESIGN.md section 2): beta(t) = beta_min + t (beta_max - beta_min) on t in [0, 1],
log m(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2) / 2, gamma(t) = m(t)^2 and
sigma(t)^2 = 1 - gamma(t). Every coefficient is computed in float64; sigma uses ``expm1`` so that it
keeps full relative precision as t -> 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from lightning_mlmc.errors import InputError

Tensor = torch.Tensor
GridKind = Literal["uniform", "polynomial", "logsnr", "edm"]
GRID_KINDS = ("uniform", "polynomial", "logsnr", "edm")
DEFAULT_RHO = {"polynomial": 2.0, "edm": 7.0}  # rho when none is given (unused by uniform and logsnr)


def _f64(t) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


@dataclass(frozen=True)
class VPSchedule:
    """Linear-beta VP schedule of Song et al. (2021), as used by the seed's code."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def log_mean(self, t) -> Tensor:
        """log m(t), float64."""
        t = _f64(t)
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def mean(self, t) -> Tensor:
        """m(t) = sqrt(gamma(t)): the signal coefficient of x_t = m x_0 + sigma eps."""
        return torch.exp(self.log_mean(t))

    def gamma(self, t) -> Tensor:
        """gamma(t) = m(t)^2 (the seed's gamma_t)."""
        return torch.exp(2.0 * self.log_mean(t))

    def sigma2(self, t) -> Tensor:
        """sigma(t)^2 = 1 - gamma(t), computed as -expm1(2 log m)."""
        return -torch.expm1(2.0 * self.log_mean(t))

    def sigma(self, t) -> Tensor:
        return torch.sqrt(self.sigma2(t))

    def log_snr(self, t) -> Tensor:
        """lambda(t) = log(m^2 / sigma^2)."""
        return 2.0 * self.log_mean(t) - torch.log(self.sigma2(t))

    def t_from_log_gamma(self, log_gamma) -> Tensor:
        """Inverse of t -> log gamma(t) (a quadratic in t), float64."""
        c = -_f64(log_gamma)  # = beta_min t + (beta_max - beta_min) t^2 / 2 >= 0
        a = 0.5 * (self.beta_max - self.beta_min)
        b = self.beta_min
        if a == 0:
            return c / b
        # Numerically stable root of a t^2 + b t - c = 0 (t >= 0).
        return 2.0 * c / (b + torch.sqrt(b * b + 4.0 * a * c))

    def t_from_log_snr(self, lam) -> Tensor:
        """Inverse of the log-SNR: gamma = sigmoid(lambda)."""
        return self.t_from_log_gamma(torch.nn.functional.logsigmoid(_f64(lam)))

    def t_from_noise_ratio(self, ratio) -> Tensor:
        """Time at which sigma(t) / m(t) equals ``ratio`` (the VE noise level of EDM)."""
        return self.t_from_log_gamma(-torch.log1p(_f64(ratio) ** 2))


@dataclass(frozen=True)
class TimeGrid:
    """A nested family of decreasing time grids t_k = phi(1 - k/n), k = 0..n, ending at t_n = 0.

    Because the warp phi does not depend on n, the grid with n/M steps is exactly every M-th point of
    the grid with n steps, which MLMC's coupled levels need. Families:

    - ``uniform``: t = t_start u (the default, as in the seed's code);
    - ``polynomial``: t = t_start u^rho (rho > 1 concentrates steps near the data; rho 2 by default);
    - ``logsnr``: uniform in log-SNR between t_start (u = 1) and ``t_min`` (u -> 0); u = 0 maps to t = 0,
      so the last step is Tweedie's jump from about t_min;
    - ``edm``: the EDM rho-spacing in the noise ratio s = sigma/m,
      s = (s_min^(1/rho) + u (s_max^(1/rho) - s_min^(1/rho)))^rho with s_min = s(t_min) (0 by default),
      rho 7 by default.
    """

    kind: GridKind = "uniform"
    rho: float | None = None
    t_min: float = 0.0

    def __post_init__(self):
        if self.kind not in GRID_KINDS:
            raise InputError(f"grid: unknown kind {self.kind!r}; expected uniform, polynomial, logsnr or edm")
        if self.rho is None:  # the family's own default warp exponent
            object.__setattr__(self, "rho", DEFAULT_RHO.get(self.kind, 7.0))
        if not (self.rho > 0 and math.isfinite(self.rho)):
            raise InputError(f"grid rho: expected a positive number, got {self.rho}")
        if not (0.0 <= self.t_min < 1.0):
            raise InputError(f"grid t_min: expected 0 <= t_min < 1, got {self.t_min}")
        if self.kind == "logsnr" and self.t_min <= 0.0:
            object.__setattr__(self, "t_min", 1e-4)

    def warp(self, u, t_start: float, schedule: VPSchedule) -> Tensor:
        """phi(u) for u in [0, 1]; phi(0) = 0 and phi(1) = t_start."""
        u = _f64(u)
        if self.kind == "uniform":
            t = t_start * u
        elif self.kind == "polynomial":
            t = t_start * u**self.rho
        elif self.kind == "logsnr":
            lam_hi = schedule.log_snr(min(self.t_min, t_start))
            lam_lo = schedule.log_snr(t_start)
            t = schedule.t_from_log_snr(lam_lo + (1.0 - u) * (lam_hi - lam_lo))
            t = torch.where(u > 0, t, torch.zeros_like(t))
        else:  # edm
            ratio = lambda tt: schedule.sigma(tt) / schedule.mean(tt)  # noqa: E731
            s_max = ratio(t_start) ** (1.0 / self.rho)
            s_min = ratio(self.t_min) ** (1.0 / self.rho) if self.t_min > 0 else _f64(0.0)
            t = schedule.t_from_noise_ratio((s_min + u * (s_max - s_min)) ** self.rho)
            t = torch.where(u > 0, t, torch.zeros_like(t))
        # Pin the end points exactly.
        t = torch.where(u >= 1, _f64(t_start), t)
        return torch.where(u <= 0, torch.zeros_like(t), t)

    def times(self, n: int, t_start: float = 1.0, schedule: VPSchedule | None = None) -> Tensor:
        """The n + 1 grid times t_0 = t_start > ... > t_n = 0, float64."""
        if int(n) != n or n < 1:
            raise InputError(f"steps: expected an integer >= 1, got {n}")
        schedule = schedule or VPSchedule()
        u = 1.0 - torch.arange(n + 1, dtype=torch.float64) / n
        return self.warp(u, float(t_start), schedule)


def uniform_grid(n: int, t_start: float = 1.0) -> Tensor:
    """The default grid t_k = t_start (1 - k/n), k = 0..n."""
    return TimeGrid("uniform").times(n, t_start)
