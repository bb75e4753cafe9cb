"""One batched execution engine for MLMC's levels: every pending batch of every level advances together.

A *stepper* is one batch of paths (a coupled fine/coarse pair of level l, or plain paths) from its own noise
stream; it asks for one network evaluation per step (fine and coarse rows together at a coarse step's start)
and applies the reverse step to the output. The engine fills each network call with the next step of as many
steppers as fit in a row budget, longest remaining path first, so short levels fill the tail of the long
ones; a call's rows carry their own times. The noise of a path does not depend on what it was batched with,
so the per-level sums are those of running each batch alone, up to the floating-point effect of the network
seeing other rows in the same call (none for row-wise networks such as the exact scores).

A stepper may also be iterative (``picard_levels.PicardCoupledPaths``: one Picard round of a window per
evaluation, its number of rounds unknown in advance); the engine runs every stepper until it reports nothing
remaining, and uses ``remaining`` only to order them.

The count of calls is what an accelerator waits on (``sequential_calls``); ``rows`` what it computes (NFEs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from lightning_mlmc.sampling import batch_obs, call_model

Tensor = torch.Tensor
DEFAULT_ROW_BUDGET = 4096


class Stepper(Protocol):
    """One batch of paths advancing one reverse step per network evaluation."""

    remaining: int  # network evaluations still to make: exact for sequential paths, an estimate (> 0 until done)
    # for iterative ones; 0 exactly when the stepper is done. The schedule runs the largest first.

    def rows(self) -> int:
        """Rows of the next evaluation."""

    def inputs(self) -> tuple[Tensor, Tensor]:
        """(x, t per row) of the next evaluation."""

    def consume(self, eps: Tensor) -> None:
        """Apply the step to the network's output for ``inputs()``."""


@dataclass
class EngineStats:
    calls: int = 0  # sequential network calls
    rows: int = 0  # network evaluations (sample rows)

    @property
    def rows_per_call(self) -> float:
        return self.rows / self.calls if self.calls else 0.0

    def add(self, other: "EngineStats") -> None:
        self.calls += other.calls
        self.rows += other.rows


def schedule(remaining: list[int], rows: list[int], budget: int) -> list[int]:
    """Indices of the steppers a call advances: longest remaining first while their rows fit ``budget`` (the
    first always goes, however many rows it has)."""
    order = sorted((i for i, r in enumerate(remaining) if r > 0), key=lambda i: (-remaining[i], i))
    chosen, used = [], 0
    for i in order:
        if chosen and used + rows[i] > budget:
            continue
        chosen.append(i)
        used += rows[i]
    return chosen


@torch.no_grad()
def run(steppers: list, model, y: Tensor | None, budget: int = DEFAULT_ROW_BUDGET,
        on_call: Callable[[int], None] | None = None, on_done: Callable[[int], None] | None = None) -> EngineStats:
    """Advance every stepper to its end; returns the calls and rows made.

    Args:
        steppers: the batches (``Stepper``), in the canonical order the caller folds their sums in.
        model: eps-predictor ``model(x_t, y, t)``; y: the observation every row shares.
        budget: the most rows a call takes (a single stepper larger than it still goes alone).
        on_call: called with the rows of each call (progress); on_done: with a stepper's index when it ends.
    """
    stats = EngineStats()
    while True:
        remaining = [s.remaining for s in steppers]
        chosen = schedule(remaining, [s.rows() if r > 0 else 0 for s, r in zip(steppers, remaining)], budget)
        if not chosen:
            return stats
        parts = [steppers[i].inputs() for i in chosen]
        x = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        t = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        eps = call_model(model, x, batch_obs(y, x.shape[0]), t)
        start = 0
        for i, p in zip(chosen, parts):
            n = p[0].shape[0]
            steppers[i].consume(eps[start:start + n])
            start += n
            if on_done is not None and steppers[i].remaining == 0:
                on_done(i)
        stats.calls += 1
        stats.rows += x.shape[0]
        if on_call is not None:
            on_call(x.shape[0])


def count_calls(paths: list[tuple[int, int]], budget: int = DEFAULT_ROW_BUDGET) -> int:
    """The calls ``run`` makes for steppers of (steps, rows per step) that each need one evaluation per step
    (plain paths: a plain MC of N samples in batches), by the same schedule, without a network."""
    remaining = [steps for steps, _ in paths]
    rows = [r for _, r in paths]
    calls = 0
    while True:
        chosen = schedule(remaining, [r if n > 0 else 0 for r, n in zip(rows, remaining)], budget)
        if not chosen:
            return calls
        for i in chosen:
            remaining[i] -= 1
        calls += 1


def plain_mc_calls(steps: int, samples: int, batch_size: int, budget: int = DEFAULT_ROW_BUDGET) -> int:
    """Sequential calls of a plain MC of ``samples`` paths of ``steps`` steps in batches of ``batch_size``."""
    full, rest = divmod(samples, batch_size)
    return count_calls([(steps, batch_size)] * full + ([(steps, rest)] if rest else []), budget)
