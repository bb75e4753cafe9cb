"""Sliding-window Picard iteration (ParaDiGMS, Shih et al. 2023) with optional triangular Anderson
acceleration (ParaTAA, Tang et al. 2024).

All noise (x_T and every step's xi) comes from the same ``NoiseSource`` calls as the sequential sampler,
so the fixed point of the iteration is the sequential sample for the same seed. One round makes one
batched network call over the whole window (and all samples) and updates the window by the cumulative
sum of the step increments from its fixed left end:

    x_{j+i+1} <- x_j + sum_{r <= i} [ (a_r - 1) x_{j+r} + c_eps,r eps(x_{j+r}, t_{j+r}) + c_noise,r xi_{j+r} ].

Convergence of step i: the RMS change per dimension of x_{i+1} is at most ``tol`` times the step's
DDPM posterior noise std (for every sampler; for a deterministic one that std is the noise the stochastic
sampler would inject, a scale-aware normaliser that vanishes as the steps shrink). The final Tweedie step has no
noise and uses the previous step's std.

Slide rules, with f the window index of the first unconverged step (f = p when all converged):
``paradigms`` (ParaDiGMS) slides by min(f + 1, p): step f's new value was computed from converged inputs
only, so it is as good as theirs; ``prefix`` slides by max(1, f) (the converged prefix; the first step is
always exact since its left end is fixed).

``SlidingWindow`` is the one implementation of the window (sweep, acceptance test, slide, Anderson's update):
``picard_sample`` runs it on one path, ``mlmc.picard_levels`` on each MLMC level's fine and coarse paths.
"""

from __future__ import annotations

import time

import torch

from lightning_mlmc.diffusion import step_increment
from lightning_mlmc.errors import NumericalError
from lightning_mlmc.picard.anderson import TriangularAnderson
from lightning_mlmc.samplers import DEFAULT_SAMPLER, SamplerName, SamplerSpec, SlideRule, get_sampler
from lightning_mlmc.sampling import (
    Model,
    NoiseSource,
    SampleOutput,
    StartDistribution,
    batch_obs,
    call_model,
    gaussian_start,
    grid_times,
)
from lightning_mlmc.schedule import TimeGrid, VPSchedule
from lightning_mlmc.solvers import dpm2m_increment, x0_prediction

Tensor = torch.Tensor


class Trajectory:
    """The trajectory x_0..x_n of one grid, its pre-drawn noise and the batched network call that every
    Picard scheme (window, PIADM) shares.

    Attributes:
        traj: (n + 1, B, *event_shape), initialised to x_T everywhere (ParaDiGMS).
        noise: (n, B, *event_shape), c_noise,k xi_k of every step (None for the deterministic sampler).
        scale: (n,), each step's tolerance scale (its DDPM posterior std).
        nfe, rounds: network evaluations per sample and sequential batched calls so far.
    """

    def __init__(self, model, y, noise: NoiseSource, times: Tensor, spec: SamplerSpec, start, schedule):
        steps = spec.steps(times, schedule)
        self.model, self.coef, multistep = model, steps.coef, steps.multistep
        self.n = len(self.coef)
        x0 = start.sample(noise.start())
        self.batch = x0.shape[0]
        self.y = batch_obs(y, self.batch)
        self.traj = x0.unsqueeze(0).repeat(self.n + 1, *([1] * x0.dim())).contiguous()
        # All noise first, from the same calls as the sequential sampler.
        if spec.stochastic:
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
        # DPM-Solver++(2M): its coefficients, and x0_hat of every point at its latest evaluation (step j of a
        # window needs x0_hat at x_{j-1}, evaluated in an earlier round).
        self.ms = None if multistep is None else {k: getattr(multistep, k).to(dev) for k in
                                                  ("mean_t", "sigma_t", "a_minus_1", "c_cur", "c_prev")}
        self.x0 = None if multistep is None else torch.zeros_like(self.traj[:-1])
        self.nfe = 0
        self.rounds = 0

    def eps(self, j: int, end: int) -> Tensor:
        """eps_hat at the current iterates x_j..x_{end-1} in one batched network call; shape (end-j, B, ...)."""
        p = end - j
        xs = self.traj[j:end]
        flat = xs.reshape(p * self.batch, *xs.shape[2:])
        t = self.t[j:end].repeat_interleave(self.batch)
        y = None if self.y is None else self.y.repeat(p, *([1] * (self.y.dim() - 1)))
        out = call_model(self.model, flat, y, t).reshape(xs.shape)
        self.nfe += p
        self.rounds += 1
        return out

    def increments(self, j: int, end: int, xs: Tensor, eps: Tensor) -> Tensor:
        """The increments of steps j..end-1 at the states ``xs`` (end-j, B, ...) with network outputs ``eps``."""
        if self.ms is None:
            return step_increment(xs, eps, self.a_minus_1[j:end], self.c_eps[j:end],
                                  None if self.noise is None else self.noise[j:end])
        c = {k: v[j:end] for k, v in self.ms.items()}
        x0 = x0_prediction(xs, eps, c["mean_t"], c["sigma_t"])
        x0_prev = torch.cat([self.x0[j - 1 : j] if j > 0 else torch.zeros_like(x0[:1]), x0[:-1]])
        self.x0[j:end] = x0
        return dpm2m_increment(xs, x0, x0_prev, c["a_minus_1"], c["c_cur"], c["c_prev"])

    def errors(self, new: Tensor, j: int) -> Tensor:
        """Per-step max-over-samples RMS change of x_{j+1..}, in units of each step's noise std."""
        old = self.traj[j + 1 : j + 1 + new.shape[0]]
        rms = (new - old).reshape(new.shape[0], self.batch, -1).pow(2).mean(-1).sqrt().amax(1)
        return rms / self.scale[j : j + new.shape[0]].to(rms)


def slide_stride(err: Tensor, tol: float, rule: str) -> int:
    """How far the window slides after a round with per-step errors ``err`` (length p >= 1)."""
    bad = torch.nonzero(err > tol)
    first = len(err) if len(bad) == 0 else int(bad[0])
    if rule == "paradigms":
        return min(first + 1, len(err))
    return len(err) if first == len(err) else max(1, first)


class SlidingWindow:
    """Sliding-window Picard iteration over one ``Trajectory`` (ParaDiGMS) with optional triangular Anderson
    acceleration (ParaTAA): x_0..x_j are final, x_(j+1)..x_end iterated. The one implementation of the window:
    ``picard_sample`` runs it on one path, the MLMC Picard levels on a level's fine and coarse paths.

    A round: ``inputs()`` gives the window's rows for one batched network call, ``consume(eps)`` takes the network
    output there and updates the window by the cumulative sum of the step increments from its fixed left end
    (the plain Picard image G(X)); each step is accepted when its RMS change is at most ``tol`` times its noise
    std, the window slides (``slide_stride``) and steps entering it start from the latest iterate. With Anderson
    memory m > 0 the steps still iterated take the accelerated value, the accepted ones G(X).

    Args:
        traj: the path (its grid, noise and iterates); width: the window p; tol, slide, anderson: as in
        ``picard_sample``; what: the path's name in a non-finite error.
    """

    def __init__(self, traj: Trajectory, width: int, tol: float, slide: SlideRule = "paradigms", anderson: int = 0,
                 what: str = "sample"):
        self.traj, self.width, self.tol, self.slide, self.what = traj, int(width), float(tol), slide, what
        self.acc = TriangularAnderson(anderson) if anderson > 0 else None
        self.j, self.filled, self.rounds = 0, 0, 0
        self.residuals: list[float] = []  # per round: the window's largest error, in units of tol
        self._extend()

    @property
    def done(self) -> bool:
        return self.j >= self.traj.n

    def end(self) -> int:
        return min(self.j + self.width, self.traj.n)

    def rows(self) -> int:
        """Network rows of the next round (0 once the path is final)."""
        return 0 if self.done else (self.end() - self.j) * self.traj.batch

    def _extend(self) -> None:
        """Steps entering the window start from the latest iterate (ParaDiGMS)."""
        end = self.end()
        if end > self.filled:
            self.traj.traj[self.filled + 1 : end + 1] = self.traj.traj[self.filled]
            self.filled = end

    def inputs(self) -> tuple[Tensor, Tensor]:
        """(x, t) of the window's rows: x_j..x_(end-1) of every sample, flattened to ((end-j) B, ...)."""
        w, j, end = self.traj, self.j, self.end()
        xs = w.traj[j:end]
        return xs.reshape((end - j) * w.batch, *xs.shape[2:]), w.t[j:end].repeat_interleave(w.batch)

    def consume(self, eps: Tensor) -> None:
        """One Picard round given eps_hat at the window's rows (shape ((end-j) B, ...) or (end-j, B, ...))."""
        w, j, end = self.traj, self.j, self.end()
        xs = w.traj[j:end]
        picard = w.traj[j] + torch.cumsum(w.increments(j, end, xs, eps.reshape(xs.shape)), 0)  # G(X)
        if not torch.isfinite(picard).all():
            raise NumericalError(f"non-finite values (NaN or Inf) in the {self.what} at Picard round {self.rounds + 1} "
                                 f"(steps {j}..{end - 1}, t = {float(w.coef.t[j]):.6g}); the network may have "
                                 "diverged")
        err = w.errors(picard, j)  # the fixed-point residual |G(X) - X|, per step
        self.residuals.append(float(err.max()) / self.tol)
        stride = slide_stride(err, self.tol, self.slide)
        if self.acc is not None:
            w.traj[j + 1 : end + 1] = self.acc(j + 1, w.traj[j + 1 : end + 1], picard)
            w.traj[j + 1 : j + 1 + stride] = picard[:stride]  # the accepted steps take G(X)
        else:
            w.traj[j + 1 : end + 1] = picard
        self.j += stride
        self.rounds += 1
        if not self.done:
            self._extend()


@torch.no_grad()
def picard_sample(
    model: Model,
    y: Tensor | None,
    noise: NoiseSource,
    *,
    steps: int | None = None,
    sampler: SamplerName = DEFAULT_SAMPLER,
    window: int | None = None,
    tol: float | None = None,
    anderson: int | None = None,
    slide: SlideRule | None = None,
    max_rounds: int | None = None,
    start: StartDistribution | None = None,
    grid: TimeGrid | None = None,
    times: Tensor | None = None,
    schedule: VPSchedule | None = None,
) -> SampleOutput:
    """Sliding-window Picard iteration (ParaDiGMS, Shih et al. 2023) with triangular Anderson acceleration
    (ParaTAA, Tang et al. 2024).

    Args:
        model: eps-predictor ``model(x_t, y, t)``.
        y: observation (leading batch dim 1 or B).
        noise: the same ``NoiseSource`` the sequential sampler would use; its draws have shape (B, ...).
        steps: grid steps n (or ``times``, the grid as data, as in ``sample``); sampler: any sampler of the registry
            (``lightning_mlmc.samplers``: ``"ddpm"``, ``"ddim"``, ``"dpm2m"``; a multistep sampler's step j takes
            x0_hat at x_{j-1} from the round that last evaluated it).
        window, tol, anderson, slide: the Picard options; None takes the sampler's measured default
            (``SamplerSpec.picard``). window: p (1 reproduces the sequential sampler exactly); tol: convergence
            tolerance relative to each step's noise std; anderson: triangular Anderson memory m (0 = plain
            Picard); slide: ``"paradigms"`` (slide by min(f + 1, p), the default) or ``"prefix"`` (by max(1, f)),
            f the first unconverged step of the window.
        max_rounds: cap on rounds (default 2 n); the result then is the current iterate.

    Returns:
        ``SampleOutput`` with samples (B, ...), rounds (sequential batched calls), nfe (sum of window sizes)
        and ``stats``: the options used, ``converged`` and ``residuals`` (the per-round max error of the window,
        in units of tol).
    """
    spec = get_sampler(sampler)
    options = spec.picard.with_overrides(window, tol, anderson, slide)
    schedule = schedule or VPSchedule()
    start = start or gaussian_start()
    times = grid_times(steps, grid, times, start.t, schedule)
    steps = len(times) - 1
    max_rounds = max_rounds or 2 * steps
    tic = time.perf_counter()
    w = Trajectory(model, y, noise, times, spec, start, schedule)
    win = SlidingWindow(w, options.window, options.tol, options.slide, options.anderson)
    while not win.done and win.rounds < max_rounds:
        win.consume(w.eps(win.j, win.end()))
    return SampleOutput(
        w.traj[-1].clone(), nfe=w.nfe, rounds=w.rounds, steps=steps, wall_seconds=time.perf_counter() - tic,
        stats={"residuals": win.residuals, "window": options.window, "tol": options.tol, "anderson": options.anderson,
               "slide": options.slide, "converged": win.done},
    )
