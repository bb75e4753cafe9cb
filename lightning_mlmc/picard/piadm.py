"""PIADM (Chen, Ren, Ying, Rotskoff, "Accelerating diffusion models with parallel sampling: inference at
sub-linear time complexity", NeurIPS 2024): blocks of O(1) length in OU time, run one after another, each
solved by K Picard sweeps with all its grid points in one batched network call; for the probability-flow
ODE an underdamped Langevin corrector at each block's end (``lightning_mlmc.picard.corrector``).

OU time: the VP forward process in the clock s(t) = -2 log m(t) = int_0^t beta is the OU process
dx = -x/2 ds + dW, the clock of the source. ``piadm_times`` splits [s(delta), s(t_start)] into ``blocks``
blocks of equal OU length h = s(t_start) / blocks. The first blocks - 1 have ``points`` equal steps of
kappa = h / points; the last (from s = h down to the early-stopping time delta) has steps shrinking
geometrically, each at most kappa times the OU time left (the condition t_{k+1} - t_k <= kappa (T - t_{k+1})
of the error analysis the source builds on), so it holds about log(h / s(delta)) / kappa points. A Tweedie
step from delta to 0 ends the grid.

A sweep takes the network outputs at the current iterate of the block and propagates the step exactly in
its linear part (the exponential integrator, as in the source):

    x^{k+1}_{i+1} = x^{k+1}_i + (a_i - 1) x^{k+1}_i + c_eps,i eps(x^k_i, t_i) + c_noise,i xi_i,

so after k sweeps the first k points of the block are exact, and K >= points reproduces the sequential
sampler on ``piadm_times`` with the same noise.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Literal

import torch

from lightning_mlmc.errors import InputError
from lightning_mlmc.picard.corrector import CorrectorPlan, corrector_noise, corrector_rule, run_corrector
from lightning_mlmc.picard.window import Trajectory
from lightning_mlmc.samplers import DEFAULT_SAMPLER, SamplerName, get_sampler
from lightning_mlmc.sampling import Model, NoiseSource, SampleOutput, StartDistribution, check_finite, gaussian_start
from lightning_mlmc.schedule import VPSchedule

Tensor = torch.Tensor
BlockClock = Literal["logsnr", "ou"]
BLOCK_CLOCKS = ("logsnr", "ou")


def ou_time(t, schedule: VPSchedule | None = None) -> Tensor:
    """s(t) = -2 log m(t): VP time t in the OU clock of the source."""
    return -2.0 * (schedule or VPSchedule()).log_mean(t)


def piadm_times(blocks: int, points: int, delta: float = 1e-3, t_start: float = 1.0,
                schedule: VPSchedule | None = None, clock: BlockClock = "logsnr") -> Tensor:
    """The PIADM grid: ``blocks`` blocks of ``points`` steps each (the last may hold more) toward ``delta``,
    then Tweedie's step to 0.

    ``clock="ou"`` (the source's): blocks of equal OU length h = s(t_start) / blocks; ``points`` equal steps
    of kappa = h / points in all but the last, whose steps shrink geometrically toward delta, each at most
    kappa times the OU time left (about log(h / s(delta)) / kappa points). ``clock="logsnr"``: blocks of
    equal log-SNR length with ``points`` equal log-SNR steps each; at high noise the log-SNR is minus the OU
    time, so these are the same O(1) OU blocks with equal steps, and near the data equal log-SNR steps are
    geometric in OU time, but the stiff stretch near delta is split over several blocks instead of one.

    Returns:
        float64 times t_0 = t_start > ... > t_{n-1} = delta > t_n = 0.
    """
    schedule = schedule or VPSchedule()
    if int(blocks) != blocks or int(points) != points or blocks < 1 or points < 1:
        raise InputError(f"blocks/points: expected integers >= 1, got {blocks}, {points}")
    if clock not in BLOCK_CLOCKS:
        raise InputError(f"clock: unknown block clock {clock!r}; expected logsnr or ou")
    if not (0 < delta < t_start):
        raise InputError(f"delta: expected 0 < delta < t_start = {t_start:.4g}, got {delta}")
    if clock == "logsnr":
        lam = torch.linspace(float(schedule.log_snr(t_start)), float(schedule.log_snr(delta)), blocks * points + 1,
                             dtype=torch.float64)
        t = schedule.t_from_log_snr(lam)
    else:
        s_end = float(ou_time(t_start, schedule))
        h = s_end / blocks
        s_delta = float(ou_time(delta, schedule))
        if not s_delta < h:
            t_h = float(schedule.t_from_log_gamma(torch.tensor(-h, dtype=torch.float64)))
            raise InputError(f"delta: expected 0 < delta < {t_h:.4g} (the last block's start), got {delta}")
        kappa = h / points
        parts = [torch.linspace(s_end - b * h, s_end - (b + 1) * h, points + 1, dtype=torch.float64)[:-1]
                 for b in range(blocks - 1)]
        last = math.ceil(math.log(h / s_delta) / math.log1p(kappa) - 1e-9)
        parts.append(h * (s_delta / h) ** (torch.arange(last + 1, dtype=torch.float64) / last))
        t = schedule.t_from_log_gamma(-torch.cat(parts))
    t[0], t[-1] = t_start, delta  # pin the ends exactly
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def block_bounds(blocks: int, points: int, steps: int) -> list[tuple[int, int]]:
    """(first step, end step) of every block of a PIADM grid with ``steps`` steps (the Tweedie step excluded)."""
    ends = [b * points for b in range(blocks)] + [steps - 1]
    return list(zip(ends[:-1], ends[1:]))


def _sweep(w: Trajectory, j: int, end: int) -> Tensor:
    """One PIADM sweep over steps j..end-1: the network at the current iterate (one batched call), then the
    exact linear propagation from the block's start; returns the new x_{j+1..end}."""
    eps = w.eps(j, end)
    x, new = w.traj[j], []
    for i in range(end - j):
        x = x + w.increments(j + i, j + i + 1, x.unsqueeze(0), eps[i : i + 1])[0]
        new.append(x)
    return torch.stack(new)


@torch.no_grad()
def piadm_sample(
    model: Model,
    y: Tensor | None,
    noise: NoiseSource,
    *,
    blocks: int,
    points: int,
    sweeps: int,
    sampler: SamplerName = DEFAULT_SAMPLER,
    delta: float = 1e-3,
    clock: BlockClock = "logsnr",
    corrector: bool = False,
    corrector_accuracy: float = 1.0,
    corrector_steps: int | None = None,
    corrector_sweeps: int | None = None,
    corrector_blocks: int = 1,
    start: StartDistribution | None = None,
    schedule: VPSchedule | None = None,
) -> SampleOutput:
    """PIADM-SDE / PIADM-ODE (Chen, Ren, Ying, Rotskoff, NeurIPS 2024): OU-time blocks run one after another,
    each solved by ``sweeps`` (K) Picard sweeps; for the ODE an optional parallel underdamped-Langevin corrector.

    Args:
        model: eps-predictor ``model(x_t, y, t)``; y: observation (leading dim 1 or B); noise: the
            ``NoiseSource`` of the sequential sampler (draws of shape (B, ...)).
        blocks, points, delta: the grid (``piadm_times``); sweeps: K >= 1 sweeps per block (K >= points is
            the sequential sampler on that grid).
        sampler: any sampler of the registry: ``"ddpm"`` (PIADM-SDE), ``"ddim"`` (PIADM-ODE, the probability-flow
            exponential integrator) or ``"dpm2m"`` (the ODE by DPM-Solver++(2M) inside the blocks).
        corrector: PIADM-ODE's corrector (deterministic samplers) after every block, at the block's end time; its
            friction, step size and step count follow ``corrector_rule`` (``corrector_accuracy``; ``corrector_steps`` overrides M),
            solved in ``corrector_blocks`` blocks of ``corrector_sweeps`` Picard sweeps (default: exact).

    Returns:
        ``SampleOutput`` with samples (B, ...), rounds (sequential batched calls: predictor sweeps, corrector
        sweeps and the Tweedie step), nfe (network evaluations per sample), ``stats["times"]`` and the
        per-sweep residuals (RMS change in units of each step's DDPM std).
    """
    spec = get_sampler(sampler)
    if int(sweeps) != sweeps or sweeps < 1:
        raise InputError(f"sweeps: expected K >= 1, got {sweeps}")
    if corrector and spec.stochastic:
        raise InputError(f"corrector: only for PIADM-ODE (a deterministic sampler); PIADM-SDE ({sampler}) has no "
                         "corrector")
    if corrector_steps is not None and (int(corrector_steps) != corrector_steps or corrector_steps < 1):
        raise InputError(f"corrector_steps: expected an integer >= 1, got {corrector_steps}")
    schedule = schedule or VPSchedule()
    start = start or gaussian_start()
    times = piadm_times(blocks, points, delta, start.t, schedule, clock)
    tic = time.perf_counter()
    w = Trajectory(model, y, noise, times, spec, start, schedule)
    dim = math.prod(w.traj.shape[2:])
    residuals, plans = [], []
    for b, (j, end) in enumerate(block_bounds(blocks, points, w.n)):
        w.traj[j + 1 : end + 1] = w.traj[j]
        for _ in range(int(sweeps)):
            new = _sweep(w, j, end)
            residuals.append(float(w.errors(new, j).max()))
            w.traj[j + 1 : end + 1] = new
        check_finite(w.traj[end], f"PIADM block {b} (t = {float(times[end]):.6g})")
        if corrector:
            sigma = float(schedule.sigma(times[end]))
            plan = corrector_rule(sigma, dim, corrector_accuracy, corrector_sweeps, corrector_blocks)
            if corrector_steps is not None:
                plan = CorrectorPlan(plan.gamma, plan.h * plan.steps / corrector_steps, int(corrector_steps),
                                     int(corrector_sweeps or corrector_steps), min(corrector_blocks, corrector_steps))
            plans.append(plan)
            w.traj[end] = run_corrector(w.model, w.y, w.traj[end], float(times[end]), sigma, plan,
                                        corrector_noise(noise, b), w)
            check_finite(w.traj[end], f"PIADM corrector after block {b} (t = {float(times[end]):.6g})")
    # Tweedie's step from delta to 0.
    w.traj[w.n] = _sweep(w, w.n - 1, w.n)[0]
    return SampleOutput(
        w.traj[-1].clone(), nfe=w.nfe, rounds=w.rounds, steps=w.n, wall_seconds=time.perf_counter() - tic,
        stats={"residuals": residuals, "blocks": blocks, "points": points, "sweeps": sweeps, "times": times,
               "corrector": [asdict(p) for p in plans] if corrector else None},
    )
