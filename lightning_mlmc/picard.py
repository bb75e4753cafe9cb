"""Picard-parallel sampling: sliding-window Picard (ParaDiGMS, Shih et al. 2023), triangular Anderson
acceleration (ParaTAA, Tang et al. 2024) and the block scheme PIADM (Chen, Ren, Ying, Rotskoff 2024).

All noise (x_T and every step's xi) comes from the same ``NoiseSource`` calls as the sequential sampler,
so the fixed point of the iteration is the sequential sample for the same seed. One round makes one
batched network call over the whole window (and all samples) and updates the window by the cumulative
sum of the step increments from its fixed left end:

    x_{j+i+1} <- x_j + sum_{r <= i} [ (a_r - 1) x_{j+r} + c_eps,r eps(x_{j+r}, t_{j+r}) + c_noise,r xi_{j+r} ].

Convergence of step i: the RMS change per dimension of x_{i+1} is at most ``tol`` times the step's
DDPM posterior noise std (for both samplers; for DDIM that std is the noise the stochastic sampler
would inject, a scale-aware normaliser that vanishes as the steps shrink). The final Tweedie step has no
noise and uses the previous step's std. The window slides past the converged prefix (at least one
step, which is exact since its left end is fixed).
"""

from __future__ import annotations

import math
import time

import torch

from lightning_mlmc.diffusion import step_coefficients, step_increment
from lightning_mlmc.errors import InputError
from lightning_mlmc.sampling import (
    Model,
    NoiseSource,
    SampleOutput,
    StartDistribution,
    Streams,
    batch_obs,
    call_model,
    check_finite,
    check_sampler,
    gaussian_start,
    grid_times,
)
from lightning_mlmc.schedule import TimeGrid, VPSchedule

Tensor = torch.Tensor


class _Window:
    """The trajectory, the noise and the shared round function of every Picard scheme."""

    def __init__(self, model, y, noise: NoiseSource, times: Tensor, stochastic: bool, start, schedule):
        self.model, self.coef = model, step_coefficients(times, stochastic, schedule)
        self.n = len(self.coef)
        x0 = start.sample(noise.start())
        self.batch = x0.shape[0]
        self.y = batch_obs(y, self.batch)
        # Trajectory x_0..x_n, initialised to x_T (ParaDiGMS).
        self.traj = x0.unsqueeze(0).repeat(self.n + 1, *([1] * x0.dim())).contiguous()
        # All noise first, from the same calls as the sequential sampler.
        if stochastic:
            self.noise = torch.stack([self.coef.noise[k].to(x0.dtype) * noise.step(k) for k in range(self.n)])
        else:
            self.noise = None
        std = self.coef.ddpm_std.clone()
        for k in range(1, self.n):
            if std[k] == 0:
                std[k] = std[k - 1]
        # Per-step coefficients on the trajectory's device once, not copied there every round.
        dev = x0.device
        self.t, self.a_minus_1, self.c_eps = (c.to(dev) for c in (self.coef.t, self.coef.a_minus_1, self.coef.eps))
        self.scale = std.clamp_min(1e-12).to(dev)
        self.nfe = 0
        self.rounds = 0

    def increments(self, j: int, end: int) -> Tensor:
        """One batched network call over steps j..end-1; returns their increments (end-j, B, ...)."""
        p = end - j
        xs = self.traj[j:end]
        flat = xs.reshape(p * self.batch, *xs.shape[2:])
        t = self.t[j:end].repeat_interleave(self.batch)
        y = None if self.y is None else self.y.repeat(p, *([1] * (self.y.dim() - 1)))
        eps = call_model(self.model, flat, y, t).reshape(xs.shape)
        inc = step_increment(xs, eps, self.a_minus_1[j:end], self.c_eps[j:end],
                             None if self.noise is None else self.noise[j:end])
        self.nfe += p
        self.rounds += 1
        return inc

    def errors(self, new: Tensor, j: int) -> Tensor:
        """Per-step max-over-samples RMS change of x_{j+1..}, in units of each step's noise std."""
        old = self.traj[j + 1 : j + 1 + new.shape[0]]
        rms = (new - old).reshape(new.shape[0], self.batch, -1).pow(2).mean(-1).sqrt().amax(1)
        return rms / self.scale[j : j + new.shape[0]].to(rms)


class _Anderson:
    """Triangular Anderson acceleration over the window (ParaTAA), memory m.

    For each step i of the window the mixing coefficients solve the least-squares problem restricted to
    the residuals of steps j..i (the lower-triangular dependency of the system), via cumulative Gram
    matrices; the first step of the window is left exact.
    """

    def __init__(self, memory: int, reg: float = 1e-8, max_coef: float = 5.0):
        self.m, self.reg, self.max_coef = memory, reg, max_coef
        self.hist: list[tuple[int, Tensor, Tensor]] = []  # (j, X, G(X)) over the window

    def __call__(self, j: int, x_old: Tensor, g_new: Tensor) -> Tensor:
        res = g_new - x_old
        self.hist.append((j, x_old, g_new))
        self.hist = self.hist[-(self.m + 1):]
        if len(self.hist) < 2:
            return g_new
        p = g_new.shape[0]
        d_res, d_g = [], []
        for (j0, x0, g0), (j1, x1, g1) in zip(self.hist[:-1], self.hist[1:]):
            # Align the older window to the current one; steps it did not cover contribute nothing.
            dr, dg = torch.zeros_like(g_new), torch.zeros_like(g_new)
            lo, hi = max(j0, j), min(j0 + g0.shape[0], j + p)
            if j1 == j and hi > lo:
                a, b = lo - j0, hi - j0
                c, e = lo - j, hi - j
                dr[c:e] = (g1[c:e] - x1[c:e]) - (g0[a:b] - x0[a:b])
                dg[c:e] = g1[c:e] - g0[a:b]
            d_res.append(dr)
            d_g.append(dg)
        if len(d_res) == 0:
            return g_new
        dR = torch.stack(d_res, -1).reshape(p, -1, len(d_res))  # (p, D, m)
        dG = torch.stack(d_g, -1).reshape(p, -1, len(d_g))
        # The small least-squares systems are solved in float64 whatever the sample dtype: in float32 a
        # window whose residual differences vanish gives an exactly singular (and underflowing) system.
        dR64, r = dR.double(), res.reshape(p, -1).double()
        gram = torch.cumsum(dR64.transpose(1, 2) @ dR64, 0)  # (p, m, m), steps j..i
        rhs = torch.cumsum(dR64.transpose(1, 2) @ r.unsqueeze(-1), 0)  # (p, m, 1)
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        scale = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-300)[:, None, None]
        gamma, info = torch.linalg.solve_ex(gram + self.reg * scale * eye, rhs)
        # Safeguard: steps whose system is singular or whose mixing coefficients blow up take the plain
        # Picard value.
        ok = (info == 0) & torch.isfinite(gamma).all(-1).all(-1)
        ok &= torch.nan_to_num(gamma, nan=float("inf")).abs().amax((1, 2)) <= self.max_coef
        gamma = torch.where(ok[:, None, None], gamma, torch.zeros_like(gamma)).to(dG.dtype)
        out = (g_new.reshape(p, -1) - (dG @ gamma).squeeze(-1)).reshape(g_new.shape)
        out[0] = g_new[0]
        return out


@torch.no_grad()
def picard_sample(
    model: Model,
    y: Tensor | None,
    noise: NoiseSource,
    *,
    steps: int | None = None,
    sampler: str = "ddpm",
    window: int = 16,
    tol: float = 1e-3,
    anderson: int = 0,
    max_rounds: int | None = None,
    start: StartDistribution | None = None,
    grid: TimeGrid | None = None,
    times: Tensor | None = None,
    schedule: VPSchedule | None = None,
) -> SampleOutput:
    """Sliding-window Picard iteration (ParaDiGMS) with optional triangular Anderson acceleration.

    Args:
        model: eps-predictor ``model(x_t, y, t)``.
        y: observation (leading batch dim 1 or B).
        noise: the same ``NoiseSource`` the sequential sampler would use.
        steps: grid steps n (or ``times``, the grid as data, as in ``sample``); sampler: ``"ddpm"`` or ``"ddim"``.
        window: window size p (1 reproduces the sequential sampler exactly).
        tol: convergence tolerance relative to each step's noise std.
        anderson: Anderson memory m (0 = plain Picard; ParaTAA uses 2).
        max_rounds: cap on rounds (default 2 n); the result then is the current iterate.

    Returns:
        ``SampleOutput`` with rounds (sequential batched calls), nfe (sum of window sizes) and
        ``stats["residuals"]``: the per-round max error of the window, in units of tol.
    """
    check_sampler(sampler)
    if int(window) != window or window < 1:
        raise InputError(f"window: expected an integer >= 1, got {window}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise InputError(f"tol: expected a positive number, got {tol}")
    if anderson < 0:
        raise InputError(f"anderson: expected a memory >= 0, got {anderson}")
    schedule = schedule or VPSchedule()
    start = start or gaussian_start()
    times = grid_times(steps, grid, times, start.t, schedule)
    steps = len(times) - 1
    max_rounds = max_rounds or 2 * steps
    tic = time.perf_counter()
    w = _Window(model, y, noise, times, sampler == "ddpm", start, schedule)
    acc = _Anderson(anderson) if anderson > 0 else None
    residuals = []
    j, filled = 0, 0  # x_0..x_j are final; x_0..x_filled hold iterates
    while j < w.n and w.rounds < max_rounds:
        end = min(j + window, w.n)
        if end > filled:  # new steps entering the window start from the latest iterate
            w.traj[filled + 1 : end + 1] = w.traj[filled]
            filled = end
        inc = w.increments(j, end)
        picard = w.traj[j] + torch.cumsum(inc, 0)  # G(X): the plain Picard update
        check_finite(picard, f"Picard round {w.rounds} (steps {j}..{end - 1}, t = {float(w.coef.t[j]):.6g})")
        err = w.errors(picard, j)  # the fixed-point residual |G(X) - X|, per step
        residuals.append(float(err.max()) / tol)
        bad = torch.nonzero(err > tol)
        stride = end - j if len(bad) == 0 else max(1, int(bad[0]))
        if acc is not None:
            w.traj[j + 1 : end + 1] = acc(j, w.traj[j + 1 : end + 1], picard)
            w.traj[j + 1 : j + 1 + stride] = picard[:stride]  # the accepted prefix takes G(X)
        else:
            w.traj[j + 1 : end + 1] = picard
        j += stride
    return SampleOutput(
        w.traj[-1].clone(), nfe=w.nfe, rounds=w.rounds, steps=steps, wall_seconds=time.perf_counter() - tic,
        stats={"residuals": residuals, "window": window, "tol": tol, "anderson": anderson,
               "converged": j >= w.n},
    )


def piadm_times(blocks: int, points: int, delta: float = 1e-3, t_start: float = 1.0) -> Tensor:
    """Grid of the PIADM block scheme: ``blocks`` blocks of O(1) length, ``points`` steps in each.

    The first blocks - 1 blocks split [t_start / blocks, t_start] evenly with equal steps inside; the last
    block runs from t_start / blocks to the early-stopping time ``delta`` with step sizes shrinking
    geometrically, then Tweedie's step from delta to 0 ends the grid.
    """
    if blocks < 1 or points < 1:
        raise InputError(f"block: expected blocks >= 1 and points >= 1, got {blocks}, {points}")
    if not (0 < delta < t_start / blocks):
        raise InputError(f"delta: expected 0 < delta < t_start / blocks = {t_start / blocks:.4g}, got {delta}")
    edges = torch.linspace(t_start, t_start / blocks, blocks, dtype=torch.float64)
    parts = []
    for b in range(blocks - 1):
        parts.append(torch.linspace(float(edges[b]), float(edges[b + 1]), points + 1, dtype=torch.float64)[:-1])
    b_last = float(edges[-1])
    geo = b_last * (delta / b_last) ** (torch.arange(points + 1, dtype=torch.float64) / points)
    parts.append(geo)
    parts.append(torch.zeros(1, dtype=torch.float64))
    return torch.cat(parts)


@torch.no_grad()
def piadm_sample(
    model: Model,
    y: Tensor | None,
    noise: NoiseSource,
    *,
    blocks: int,
    points: int,
    sweeps: int,
    sampler: str = "ddpm",
    delta: float = 1e-3,
    corrector: bool = False,
    corrector_step: float = 0.1,
    start: StartDistribution | None = None,
    schedule: VPSchedule | None = None,
) -> SampleOutput:
    """PIADM block scheme (Chen, Ren, Ying, Rotskoff 2024): blocks run one after another; inside a block,
    all ``points`` grid points are solved together by ``sweeps`` (K) Picard sweeps.

    With K >= points the block is solved exactly, so the result is the sequential sampler on
    ``piadm_times``. For the deterministic sampler, ``corrector=True`` adds the document's corrector after
    each block: one Langevin step x <- x + h sigma^2 score + sqrt(2 h) sigma xi at the block's end time
    (h = ``corrector_step``; the xi are drawn from the noise source's stream after the step noise).
    """
    check_sampler(sampler)
    if sweeps < 1:
        raise InputError(f"sweeps: expected K >= 1, got {sweeps}")
    schedule = schedule or VPSchedule()
    start = start or gaussian_start()
    times = piadm_times(blocks, points, delta, start.t)
    tic = time.perf_counter()
    w = _Window(model, y, noise, times, sampler == "ddpm", start, schedule)
    bounds = list(range(0, w.n - 1, points)) + [w.n - 1, w.n]  # block starts, then the Tweedie step
    residuals = []
    for b, (j, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        w.traj[j + 1 : end + 1] = w.traj[j]
        for _ in range(sweeps if end - j > 1 else 1):
            new = w.traj[j] + torch.cumsum(w.increments(j, end), 0)
            residuals.append(float(w.errors(new, j).max()))
            w.traj[j + 1 : end + 1] = new
        check_finite(w.traj[end], f"PIADM block {b} (t = {float(times[end]):.6g})")
        if corrector and sampler == "ddim" and end < w.n:
            t_end = times[end]
            sig = schedule.sigma(t_end)
            x = w.traj[end]
            eps = call_model(w.model, x, w.y, t_end)
            xi = noise.draw(Streams.CORRECTOR_DRAW + b).to(x.dtype)
            h = corrector_step
            w.traj[end] = x - h * sig * eps + math.sqrt(2 * h) * sig * xi
            w.nfe += 1
            w.rounds += 1
    return SampleOutput(
        w.traj[-1].clone(), nfe=w.nfe, rounds=w.rounds, steps=w.n, wall_seconds=time.perf_counter() - tic,
        stats={"residuals": residuals, "blocks": blocks, "points": points, "sweeps": sweeps, "times": times},
    )
