"""Picard-parallel MLMC levels: each batch's coupled fine and coarse paths solved by sliding-window Picard
iteration (ParaDiGMS, Shih et al. 2023; seed 004) on the batched engine.

A batch of level l draws x_T and every fine step's noise before iterating, from the same stream (seed, level,
batch, rank) and the same draws as the sequential ``CoupledPaths``, and builds each coarse step's noise from
the fine noises with the same coupling weights, summed in the same order. The fixed point of the iteration is
therefore the sequential coupled pair, to float rounding; at a finite tolerance the paths differ from it by
what the per-step criterion allows (a step is accepted when its RMS change per dimension is at most ``tol``
times its DDPM noise std, as in ``picard_sample``).

The fine path (M^l steps) and the coarse path (M^(l-1) steps) each slide their own window
(``picard.window.SlidingWindow``, the one implementation ``picard_sample`` runs too; plain Picard unless
``anderson`` is set; the coarse window 1/M of the fine one, so both cover about the same time); one engine call
evaluates both windows' rows, so a round of every batch of every level is one batched network call when the row
budget allows. A batch's window is the largest at most ``window`` whose rows fit the budget, so a large batch at a
short level iterates over fewer steps at once rather than exceeding the budget.

Cost: a Picard round evaluates the whole window, so a level costs more network rows than M^l + M^(l-1) per
sample; the driver still plans with that formula (``nfe``), and the rows really evaluated are counted
(``nfe_counted``, ``rows_per_call``).
"""

from __future__ import annotations

import math

import torch

from lightning_mlmc.errors import InputError
from lightning_mlmc.mlmc.levels import CoupledLevelSampler
from lightning_mlmc.mlmc.sums import LevelSums
from lightning_mlmc.picard.window import SlidingWindow, Trajectory
from lightning_mlmc.samplers import SlideRule, check_picard_args
from lightning_mlmc.sampling import NoiseSource

Tensor = torch.Tensor
# The default tolerance: on examples/inpaint4x4.json (window 64) 0.01 keeps E[(Y_picard - Y_sequential)^2] below
# 2e-4 V_l at every level up to 512 steps for about 15% more calls than 0.1, which lets it reach 5% of V_l.
PICARD_TOL = 0.01


class PicardLevelSampler(CoupledLevelSampler):
    """The coupled level sampler whose batches run as Picard-parallel steppers (``PicardCoupledPaths``).

    Args (besides ``CoupledLevelSampler``'s):
        window: the fine path's Picard window p (the coarse path's is ceil(p / M)); a batch uses the largest
            window up to p whose rows fit ``row_budget``.
        tol: per-step tolerance in units of each step's DDPM noise std.
        slide: ``paradigms`` (ParaDiGMS, the default) or ``prefix`` (see ``slide_stride``).
        anderson: triangular Anderson memory of both paths' windows (0, the default: plain Picard, what the level
            tolerance was measured with).
        row_budget: the engine's row budget (the most rows one network call takes).
    """

    def __init__(self, *args, window: int, tol: float = PICARD_TOL, slide: SlideRule = "paradigms",
                 anderson: int = 0, row_budget: int = 4096, **kw):
        super().__init__(*args, **kw)
        if self.coarse_model is not None:
            raise InputError("picard_window: Picard-parallel levels run on one network; leave out the coarse model "
                             "(--coarse-checkpoint) or picard_window")
        if window is None:
            raise InputError("picard_window: expected an integer >= 1, got None")
        check_picard_args(window, tol, anderson, slide, prefix="picard_")
        if int(row_budget) != row_budget or row_budget < 1:
            raise InputError(f"row_budget: expected an integer >= 1, got {row_budget}")
        self.window, self.tol, self.slide, self.anderson = int(window), float(tol), slide, int(anderson)
        self.row_budget = int(row_budget)

    @property
    def scheme(self) -> dict:
        return {**super().scheme, "picard_window": self.window, "picard_tol": self.tol, "picard_slide": self.slide,
                **({"picard_anderson": self.anderson} if self.anderson else {})}

    def steppers(self, level: int, n: int, batch_index: int = 0, rank: int = 0,
                 plain: bool = False) -> "PicardCoupledPaths":
        return PicardCoupledPaths(self, level, n, batch_index, rank, plain)


class _FineDraws:
    """The standard normal draws of one batch's stream, each drawn once: the start and the fine steps' xi
    (only where the fine step injects noise, as ``CoupledPaths`` draws them; zeros elsewhere)."""

    def __init__(self, noise: NoiseSource, noisy: Tensor):
        self.x_start = noise.start()
        self.xi = [noise.step(k) if noisy[k] else None for k in range(len(noisy))]

    def start(self) -> Tensor:
        return self.x_start

    def step(self, k: int) -> Tensor:
        return self.xi[k] if self.xi[k] is not None else torch.zeros_like(self.x_start)


class _CoarseDraws:
    """The coarse path's draws: the fine path's start, and for coarse step j the weighted sum of its M fine
    sub-steps' draws, term by term in ``CoupledPaths``' order (so the values are the same to the bit)."""

    def __init__(self, fine: _FineDraws, weights: list[list[float]], M: int):
        self.fine, self.weights, self.M = fine, weights, M

    def start(self) -> Tensor:
        return self.fine.start()

    def step(self, j: int) -> Tensor:
        xi_c = None
        for i, w in enumerate(self.weights[j]):
            xi = self.fine.xi[j * self.M + i]
            if xi is not None:
                xi_c = w * xi if xi_c is None else xi_c + w * xi
        return xi_c if xi_c is not None else torch.zeros_like(self.fine.start())


class PicardCoupledPaths:
    """One batch of a level (fine and coarse paths, or plain paths at Lmin or when ``plain``) solved by
    sliding-window Picard iteration; an engine stepper whose every evaluation is one Picard round of both
    windows.

    ``remaining`` is a lower bound on the rounds left (the windows' steps left over their widths), used by the
    engine only to run the longest first; it is 0 exactly when both paths are final. ``calls`` counts the
    network rows evaluated. The trajectories are allocated at the first round and freed at the end."""

    def __init__(self, sampler: PicardLevelSampler, level: int, n: int, batch_index: int, rank: int, plain: bool):
        self.sampler, self.level, self.n = sampler, level, n * sampler.paths  # rows: both paths of every pair
        self.stream = (level, batch_index, rank)
        self.M, self.steps = sampler.M, sampler.M**level
        self.coupled = level > sampler.lmin and not plain
        self.n_coarse = self.steps // self.M if self.coupled else 0
        self.width_f, self.width_c = self._widths(sampler.window, sampler.row_budget)
        self.fine: SlidingWindow | None = None  # allocated at the first round, dropped at the end
        self.coarse: SlidingWindow | None = None
        self.x_f = self.x_c = None  # the final paths
        self.started = self.finished = False
        self.calls = 0

    def _widths(self, window: int, budget: int) -> tuple[int, int]:
        """(fine, coarse) window widths: the fine one the largest up to ``window`` (and the path) whose rows,
        with the coarse window's ceil(p / M), fit ``budget`` (at least 1)."""
        coarse = (lambda p: min(math.ceil(p / self.M), self.n_coarse)) if self.coupled else (lambda p: 0)
        p = min(window, self.steps)
        while p > 1 and self.n * (p + coarse(p)) > budget:
            p -= 1
        return p, coarse(p)

    @property
    def remaining(self) -> int:
        if self.finished:
            return 0
        if not self.started:
            return math.ceil(self.steps / self.width_f)
        return max(math.ceil((w.traj.n - w.j) / w.width) for w in self._active())

    def _start(self) -> None:
        """x_T and every step's noise, drawn before iterating (the sequential paths' draws)."""
        s = self.sampler
        noise = NoiseSource(s.seed, (self.n, *s.shape), stream=self.stream, dtype=s.dtype, device=s.device,
                            antithetic=s.antithetic)
        cf = s.coefficients(self.steps)
        draws = _FineDraws(noise, cf.noise > 0)
        times = s.grid.times(self.steps, s.start.t, s.schedule)
        self.started = True
        self.fine = SlidingWindow(Trajectory(None, None, draws, times, s.spec, s.start, s.schedule),
                                  self.width_f, s.tol, s.slide, s.anderson, what=f"fine path at level {self.level}")
        if self.coupled:
            # The coarse grid is every M-th fine time (the grid families nest exactly), as CoupledPaths evaluates it.
            coarse = Trajectory(None, None, _CoarseDraws(draws, s.coarse_weights(self.steps), self.M),
                                times[:: self.M], s.spec, s.start, s.schedule)
            self.coarse = SlidingWindow(coarse, self.width_c, s.tol, s.slide, s.anderson,
                                        what=f"coarse path at level {self.level}")

    def _active(self) -> list[SlidingWindow]:
        return [w for w in (self.fine, self.coarse) if w is not None and not w.done]

    def rows(self) -> int:
        if not self.started:
            return self.n * (self.width_f + self.width_c)
        return sum(w.rows() for w in self._active())

    def networks(self) -> list[tuple[str, int]]:
        """Every row on the one network (Picard levels do not run over networks)."""
        return [("model", sum(w.rows() for w in self._active()))]

    def inputs(self) -> tuple[Tensor, Tensor]:
        if not self.started:
            self._start()
        parts = [w.inputs() for w in self._active()]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def consume(self, eps: Tensor) -> None:
        self.calls += eps.shape[0]
        start = 0
        for w in self._active():
            rows = w.rows()
            w.consume(eps[start : start + rows])
            start += rows
        if not self._active():
            self.x_f = self.fine.traj.traj[-1].clone()
            self.x_c = None if self.coarse is None else self.coarse.traj.traj[-1].clone()
            self.fine = self.coarse = None
            self.finished = True

    def sums(self) -> LevelSums:
        """The level sums of the finished paths (``CoupledLevelSampler.level_sums``)."""
        return self.sampler.level_sums(self.x_f, self.x_c, self.calls)
