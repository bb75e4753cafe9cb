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

Rows may run on different networks (levels over networks: a distilled student on the coarse levels): each
stepper names the network of each block of its rows (``networks``), and the engine evaluates each network's
rows of a step in one call, so a step makes one call per network it needs. It times each network's calls, so
a result can state the measured seconds per row of every network at the engine's batch sizes.

The count of calls is what an accelerator waits on (``sequential_calls``); ``rows`` what it computes (NFEs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import time
from dataclasses import field

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

    def networks(self) -> list[tuple[str, int]]:
        """The network of each block of the next evaluation's rows, (name, rows) in row order."""


@dataclass
class EngineStats:
    calls: int = 0  # sequential network calls
    rows: int = 0  # network evaluations (sample rows)
    network_rows: dict = field(default_factory=dict)  # network -> rows it evaluated
    network_seconds: dict = field(default_factory=dict)  # network -> wall seconds of its calls

    @property
    def rows_per_call(self) -> float:
        return self.rows / self.calls if self.calls else 0.0

    def add(self, other: "EngineStats") -> None:
        self.calls += other.calls
        self.rows += other.rows
        for name, rows in other.network_rows.items():
            self.network_rows[name] = self.network_rows.get(name, 0) + rows
            self.network_seconds[name] = self.network_seconds.get(name, 0.0) + other.network_seconds.get(name, 0.0)

    def count(self, name: str, rows: int, seconds: float) -> None:
        self.calls += 1
        self.rows += rows
        self.network_rows[name] = self.network_rows.get(name, 0) + rows
        self.network_seconds[name] = self.network_seconds.get(name, 0.0) + seconds


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


def evaluate(networks: dict, blocks: list[tuple[str, int]], x: Tensor, y: Tensor | None, t: Tensor,
             stats: EngineStats) -> Tensor:
    """The eps of every row of ``x``, each block of rows by its network: one call per network (the rows of
    a network gathered in order), timed into ``stats``."""
    names = list(dict.fromkeys(name for name, _ in blocks))
    if len(names) == 1:
        tic = time.perf_counter()
        eps = call_model(networks[names[0]], x, batch_obs(y, x.shape[0]), t)
        stats.count(names[0], x.shape[0], time.perf_counter() - tic)
        return eps
    owner, start = [], 0
    for name, rows in blocks:
        owner.append((name, start, start + rows))
        start += rows
    eps = None
    for name in names:
        index = torch.cat([torch.arange(a, b, device=x.device) for n, a, b in owner if n == name])
        tic = time.perf_counter()
        out = call_model(networks[name], x[index], batch_obs(y, index.numel()), t[index])
        stats.count(name, index.numel(), time.perf_counter() - tic)
        eps = torch.empty((x.shape[0], *out.shape[1:]), dtype=out.dtype, device=out.device) if eps is None else eps
        eps[index] = out
    return eps


@torch.no_grad()
def run(steppers: list, model, y: Tensor | None, budget: int = DEFAULT_ROW_BUDGET,
        on_call: Callable[[int], None] | None = None, on_done: Callable[[int], None] | None = None) -> EngineStats:
    """Advance every stepper to its end; returns the calls and rows made.

    Args:
        steppers: the batches (``Stepper``), in the canonical order the caller folds their sums in.
        model: eps-predictor ``model(x_t, y, t)``, or {name: eps-predictor} for steppers whose rows name their
            network (``Stepper.networks``); y: the observation every row shares.
        budget: the most rows a call takes (a single stepper larger than it still goes alone).
        on_call: called with the rows of each call (progress); on_done: with a stepper's index when it ends.
    """
    networks = model if isinstance(model, dict) else {"model": model}
    stats = EngineStats()
    while True:
        remaining = [s.remaining for s in steppers]
        chosen = schedule(remaining, [s.rows() if r > 0 else 0 for s, r in zip(steppers, remaining)], budget)
        if not chosen:
            return stats
        parts = [steppers[i].inputs() for i in chosen]
        x = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        t = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        blocks = [b for i in chosen for b in steppers[i].networks()]
        eps = evaluate(networks, blocks, x, y, t, stats)
        start = 0
        for i, p in zip(chosen, parts):
            n = p[0].shape[0]
            steppers[i].consume(eps[start:start + n])
            start += n
            if on_done is not None and steppers[i].remaining == 0:
                on_done(i)
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
