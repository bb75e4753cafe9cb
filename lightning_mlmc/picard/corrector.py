"""The underdamped Langevin corrector of PIADM-ODE (Chen, Ren, Ying, Rotskoff 2024), after Chen, Chewi, Lee,
Li, Lu, Salim, "The probability flow ODE is provably fast" (NeurIPS 2023), solved by parallel Picard sweeps.

At a block's end time t the corrector runs the underdamped Langevin diffusion whose invariant law is
p_t(x | y) x N(0, I):

    dx = v ds,    dv = (-gamma v + grad log p_t(x)) ds + sqrt(2 gamma) dB,    v(0) ~ N(0, I),

with the score frozen at the start of each step of size h (the exponential integrator of the linear part,
the discretisation of underdamped Langevin Monte Carlo): with e = exp(-gamma h), phi = (1 - e) / gamma,

    v' = e v + phi g + w_v,    x' = x + phi v + (h - phi) / gamma g + w_x,    g = grad log p_t(x),

where (w_x, w_v) is the exact Gaussian increment of the Brownian part (covariance below). The run of M
steps is solved like a PIADM block: every sweep evaluates the score at all M points of the current
iterate in one batched call, then propagates the linear recurrence; K >= M sweeps give the sequential run.

Step count and step size (the source's rule, with unit constants): the score of p_t is Lipschitz with
L = 1 / sigma(t)^2 on the side that matters (-Hessian log p_t <= I / sigma^2 for any data law), and the
corrector runs for time T = 1 / sqrt(L) with friction gamma = 2 sqrt(L) (critical damping of the stiffest
direction), in M = ceil(sqrt(d) / accuracy) steps of size h = T / M: the sqrt(d) steps that give PIADM-ODE
its d^(3/2) space complexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_mlmc.errors import InputError
from lightning_mlmc.sampling import NoiseSource, Streams, batch_obs, call_model

Tensor = torch.Tensor


@dataclass(frozen=True)
class CorrectorPlan:
    """Parameters of one corrector run: friction ``gamma``, step ``h``, ``steps`` M split into ``blocks``
    blocks of Picard iteration with ``sweeps`` sweeps each (``sweeps >= steps / blocks`` is the sequential run)."""

    gamma: float
    h: float
    steps: int
    sweeps: int
    blocks: int = 1

    @property
    def rounds(self) -> int:
        """Sequential batched network calls of one run."""
        per_block = [min(self.sweeps, n) for n in self.block_sizes()]
        return sum(per_block)

    def block_sizes(self) -> list[int]:
        base, extra = divmod(self.steps, self.blocks)
        return [base + (b < extra) for b in range(self.blocks) if base + (b < extra) > 0]


def corrector_rule(sigma: float, dim: int, accuracy: float = 1.0, sweeps: int | None = None,
                   blocks: int = 1) -> CorrectorPlan:
    """The corrector's friction, step size and step count at noise level ``sigma`` for dimension ``dim``.

    L = 1 / sigma^2, T = 1 / sqrt(L), gamma = 2 sqrt(L), M = ceil(sqrt(dim) / accuracy), h = T / M;
    ``sweeps`` defaults to M (each block solved exactly).
    """
    if not (accuracy > 0 and math.isfinite(accuracy)):
        raise InputError(f"corrector_accuracy: expected a positive number, got {accuracy}")
    if int(blocks) != blocks or blocks < 1:
        raise InputError(f"corrector_blocks: expected an integer >= 1, got {blocks}")
    lip = 1.0 / sigma**2
    steps = max(1, math.ceil(math.sqrt(dim) / accuracy))
    if sweeps is not None and (int(sweeps) != sweeps or sweeps < 1):
        raise InputError(f"corrector_sweeps: expected an integer >= 1, got {sweeps}")
    return CorrectorPlan(gamma=2.0 * math.sqrt(lip), h=1.0 / math.sqrt(lip) / steps, steps=steps,
                         sweeps=int(sweeps) if sweeps is not None else steps, blocks=min(int(blocks), steps))


def uld_coefficients(gamma: float, h: float) -> dict[str, float]:
    """float64 coefficients of one underdamped Langevin step with the score frozen (see the module docstring).

    Returns ``e`` (velocity decay), ``phi`` (v and g into v, v into x), ``psi`` (g into x), and the
    Cholesky factor of the Brownian increment's covariance: w_v = ``l11`` z1, w_x = ``l21`` z1 + ``l22`` z2.
    """
    gh = gamma * h
    e = math.exp(-gh)
    one_m_e = -math.expm1(-gh)  # 1 - e
    phi = one_m_e / gamma
    psi = (h - phi) / gamma
    var_v = -math.expm1(-2.0 * gh)  # 1 - e^2
    # var_x = (2 / gamma) (h - 2 (1 - e) / gamma + (1 - e^2) / (2 gamma)), cov = (1 - e)^2 / gamma.
    var_x = (2.0 / gamma) * (h - 2.0 * one_m_e / gamma + var_v / (2.0 * gamma))
    cov = one_m_e**2 / gamma
    l11 = math.sqrt(var_v)
    l21 = cov / l11
    l22 = math.sqrt(max(var_x - l21 * l21, 0.0))
    return {"e": e, "phi": phi, "psi": psi, "l11": l11, "l21": l21, "l22": l22}


def uld_step(x: Tensor, v: Tensor, g: Tensor, c: dict[str, float], z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
    """One underdamped Langevin step from (x, v) with the frozen score ``g`` and standard normal z1, z2."""
    v_new = c["e"] * v + c["phi"] * g + c["l11"] * z1
    x_new = x + c["phi"] * v + c["psi"] * g + c["l21"] * z1 + c["l22"] * z2
    return x_new, v_new


def corrector_noise(noise: NoiseSource, block: int) -> NoiseSource:
    """The corrector's own stream for PIADM block ``block``: draw 0 is v(0), draws 2k+1, 2k+2 are step k's z1, z2."""
    return noise.substream(Streams.CORRECTOR_DRAW, block)


def run_corrector(model, y, x: Tensor, t: float, sigma: float, plan: CorrectorPlan, noise: NoiseSource,
                  counter) -> Tensor:
    """The underdamped Langevin corrector at time t from x (shape (B, ...)), solved by Picard sweeps.

    ``counter`` (the PIADM trajectory) has ``nfe`` and ``rounds`` attributes, incremented per batched call.
    Returns the corrected x.
    """
    c = uld_coefficients(plan.gamma, plan.h)
    v = noise.draw(0).to(x.dtype)
    batch = x.shape[0]
    y = batch_obs(y, batch)
    k0 = 0
    for size in plan.block_sizes():
        z1 = torch.stack([noise.draw(2 * (k0 + i) + 1) for i in range(size)]).to(x.dtype)
        z2 = torch.stack([noise.draw(2 * (k0 + i) + 2) for i in range(size)]).to(x.dtype)
        xs = x.unsqueeze(0).repeat(size, *([1] * x.dim()))  # iterate x_0..x_{size-1}, initialised to x_0
        for _ in range(min(plan.sweeps, size)):
            flat = xs.reshape(size * batch, *x.shape[1:])
            y_rep = None if y is None else y.repeat(size, *([1] * (y.dim() - 1)))
            g = -call_model(model, flat, y_rep, t).reshape(xs.shape) / sigma
            counter.nfe += size
            counter.rounds += 1
            # Linear recurrence with the scores of the previous iterate (PIADM's Picard form).
            xi, vi, new = x, v, []
            for i in range(size):
                new.append(xi)
                xi, vi = uld_step(xi, vi, g[i], c, z1[i], z2[i])
            xs = torch.stack(new)
        x, v = xi, vi
        k0 += size
    return x
