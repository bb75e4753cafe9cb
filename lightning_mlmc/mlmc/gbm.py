"""Giles' classic MLMC test problems, level functions that are not diffusion models: options on geometric
Brownian motion, dS = r S dt + sigma S dW, discretised by Euler-Maruyama with M^l steps (Giles, "Multilevel
Monte Carlo path simulation", Oper. Res. 2008, section 5), with their exact Black-Scholes prices: the European
call (``GBMCall``, a Lipschitz payoff: V_l ~ M^-l) and the digital call (``GBMDigital``, the payoff 1{S_T > K}:
a discontinuous payoff whose level differences are exactly zero on most paths, V_l ~ M^(-l/2), and whose
kurtosis grows like M^(l/2); Giles treats it in the same paper).

The coarse path of a level takes the sum of each M fine Brownian increments, so it has exactly the law of
the previous level's fine path; the cost of a sample is its fine time steps, M^l (Giles' convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lightning_mlmc.mlmc.protocol import LevelFunction
from lightning_mlmc.mlmc.sums import LevelSums
from lightning_mlmc.sampling import derive_seed, pair_means


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def black_scholes_call(S0: float, K: float, r: float, sigma: float, T: float) -> float:
    """The exact price exp(-rT) E[max(S_T - K, 0)] of a European call on geometric Brownian motion."""
    d1 = (math.log(S0 / K) + (r + 0.5 * sigma**2) * T) / (sigma * math.sqrt(T))
    d2 = d1 - sigma * math.sqrt(T)
    return S0 * _normal_cdf(d1) - K * math.exp(-r * T) * _normal_cdf(d2)


def black_scholes_digital(S0: float, K: float, r: float, sigma: float, T: float) -> float:
    """The exact price exp(-rT) P(S_T > K) = exp(-rT) N(d2) of a digital (cash-or-nothing) call."""
    d2 = (math.log(S0 / K) + (r - 0.5 * sigma**2) * T) / (sigma * math.sqrt(T))
    return math.exp(-r * T) * _normal_cdf(d2)


@dataclass(frozen=True)
class GBMCall(LevelFunction):
    """MLMC levels of the discounted call payoff (a ``LevelFunction``: M, lmin, pixels, cost, call); the
    payoff is ``payoff``, the exact price ``exact``."""

    M: int = 4
    lmin: int = 0
    S0: float = 100.0
    K: float = 100.0
    r: float = 0.05
    sigma: float = 0.2
    T: float = 1.0
    seed: int = 0
    pixels: int = 1
    antithetic: bool = False  # a sample is the mean of the paths driven by dW and -dW (Giles' antithetic variates)

    @property
    def exact(self) -> float:
        return black_scholes_call(self.S0, self.K, self.r, self.sigma, self.T)

    def payoff(self, s: torch.Tensor) -> torch.Tensor:
        """The undiscounted payoff of terminal values ``s``."""
        return (s - self.K).clamp_min(0.0)

    def cost(self, level: int) -> float:
        return float(self.paths * self.M**level)

    def plain_cost(self, level: int) -> float:
        return float(self.paths * self.M**level)

    can_change_lmin = True

    def with_lmin(self, lmin: int) -> "GBMCall":
        return replace(self, lmin=int(lmin))

    def __call__(self, level: int, n: int, batch_index: int = 0, rank: int = 0) -> LevelSums:
        g = torch.Generator().manual_seed(derive_seed(self.seed, level, batch_index, rank))
        M, nf, rows = self.M, self.M**level, n * self.paths
        hf = self.T / nf
        xf = torch.full((rows,), self.S0, dtype=torch.float64)
        xc = xf.clone()
        for _ in range(nf // M if level > 0 else 1):
            dw = torch.randn(n, M if level > 0 else 1, generator=g, dtype=torch.float64) * math.sqrt(hf)
            dw = torch.cat([dw, -dw]) if self.antithetic else dw
            for i in range(dw.shape[1]):
                xf = xf + self.r * xf * hf + self.sigma * xf * dw[:, i]
            if level > 0:
                xc = xc + self.r * xc * M * hf + self.sigma * xc * dw.sum(1)
        discount = math.exp(-self.r * self.T)
        pf = discount * self.payoff(xf)
        pc = discount * self.payoff(xc)[:, None] if level > self.lmin else None  # plain at Lmin
        if self.antithetic:
            return LevelSums.from_payoffs(pair_means(pf[:, None]), None if pc is None else pair_means(pc),
                                          rows * nf, single=pf[:, None])
        return LevelSums.from_payoffs(pf[:, None], pc, n * nf)


@dataclass(frozen=True)
class GBMDigital(GBMCall):
    """MLMC levels of the discounted digital call exp(-rT) 1{S_T > K}, Euler-Maruyama as ``GBMCall``: a
    discontinuous payoff (the fine and coarse paths' payoffs differ only where they straddle K, on a fraction
    of order M^(-l/2) of the paths), with the exact price ``black_scholes_digital``."""

    @property
    def exact(self) -> float:
        return black_scholes_digital(self.S0, self.K, self.r, self.sigma, self.T)

    def payoff(self, s: torch.Tensor) -> torch.Tensor:
        return (s > self.K).to(s.dtype)
