"""One round: the pending samples of every level as batches (each its own noise stream), run together on the
batched engine (``engine.run``; a plain level function runs them one after another), then folded into the
per-level sums in a fixed order, so the sums do not depend on how the round was executed.

The driver writes a round into its state before it runs and saves every batch as it finishes (one process),
so an interrupted round resumes where it stopped. ``sample_levels`` runs a round outside the driver (the
automatic-Lmin pilot, ``mlmc_test``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import lightning_mlmc.mlmc.engine as engine
from lightning_mlmc.mlmc.state import DriverState
from lightning_mlmc.mlmc.sums import LevelSums, all_reduce, rank_share, world_size


@dataclass(frozen=True)
class Batch:
    """``share`` of ``n`` samples of a level for this rank, from stream (level, batch_index, rank); ``plain``:
    plain paths of P_level (a plain-MC finish) rather than the level's coupled pairs."""

    level: int
    batch_index: int
    n: int
    share: int
    rank: int
    plain: bool = False


def plan_batches(counts: dict[int, int], next_batch: dict[int, int], batch_size: int, plain: bool = False) -> list[Batch]:
    """``counts[level]`` samples of each level as batches of at most ``batch_size``, each with the next stream
    index of its level (``next_batch`` is advanced)."""
    out = []
    for level in sorted(counts):
        left = counts[level]
        while left > 0:
            nb = min(batch_size, left)
            share, rank = rank_share(nb)
            out.append(Batch(level, next_batch.get(level, 0), nb, share, rank, plain))
            next_batch[level] = next_batch.get(level, 0) + 1
            left -= nb
    return out


def execute(levels, batches: list[Batch], budget: int, done: dict[int, LevelSums],
            on_done: Callable[[int, LevelSums], None] | None = None, on_call=None) -> engine.EngineStats:
    """Run the batches not yet ``done`` (this rank's shares) and put their sums into ``done``."""
    todo = [i for i, b in enumerate(batches) if b.share > 0 and i not in done]

    def finished(i: int, sums: LevelSums) -> None:
        done[i] = sums
        if on_done is not None:
            on_done(i, sums)

    if levels.batched:
        steppers = [levels.steppers(batches[i].level, batches[i].share, batches[i].batch_index, batches[i].rank,
                                    batches[i].plain) for i in todo]
        return engine.run(steppers, levels.networks, levels.y, budget, on_call=on_call,
                          on_done=lambda k: finished(todo[k], steppers[k].sums()))
    stats = engine.EngineStats()  # a plain level function: one batch after another
    for i in todo:
        b = batches[i]
        part = (levels.with_lmin(b.level) if b.plain else levels)(b.level, b.share, b.batch_index, b.rank)
        stats.calls += 1
        stats.rows += part.calls
        finished(i, part)
    return stats


def fold(batches: list[Batch], done: dict[int, LevelSums], sums: dict[int, LevelSums], plain_sums: dict[int, LevelSums],
         pixels: int) -> None:
    """Add every batch's sums (reduced over ranks) to its level, in the planned order, on every rank."""
    for i, b in enumerate(batches):
        target = plain_sums if b.plain else sums
        if b.level not in target:
            target[b.level] = LevelSums.zeros(pixels)
        target[b.level].add(all_reduce(done.get(i, LevelSums.zeros(pixels))))


def batch_rows(levels, b: Batch) -> int:
    """Network rows a batch takes to its end (its samples times the level's cost per sample)."""
    cost = levels.plain_cost(b.level) if b.plain else levels.cost(b.level)
    return int(b.share * cost)


def run_round(levels, st: DriverState, batch_size: int, budget: int, progress=None) -> engine.EngineStats:
    """The driver's round: plan (or resume) it from the state's pending counts, run it, fold it in."""
    if not st.round:
        batches = plan_batches(st.pending, st.batches, batch_size) + plan_batches(st.pending_plain, st.batches,
                                                                                batch_size, plain=True)
        st.pending = {l: 0 for l in st.pending}
        st.pending_plain = {l: 0 for l in st.pending_plain}
        st.round, st.round_done = [asdict(b) for b in batches], {}
        st.save()
    batches = [Batch(**b) for b in st.round]
    save = (lambda i, s: st.save()) if world_size() == 1 else None  # a rank's partial sums are not worth saving
    on_call = None
    if progress is not None:
        counts = {}
        for b in batches:
            counts[b.level] = counts.get(b.level, 0) + b.n
        planned = {l: counts.get(l, 0) + (st.sums[l].n if l in st.sums else 0) for l in counts}
        progress.start(f"round {st.rounds + 1}: levels {min(counts)}..{max(counts)}, samples "
                       + " ".join(f"{l}:{planned[l]}" for l in sorted(planned)),
                       sum(batch_rows(levels, b) for i, b in enumerate(batches) if i not in st.round_done))
        on_call = progress.advance
    stats = execute(levels, batches, budget, st.round_done, on_done=save, on_call=on_call)
    fold(batches, st.round_done, st.sums, st.plain, st.pixels)
    st.round, st.round_done = [], {}
    st.rounds += 1
    st.sequential_calls += stats.calls
    st.save()
    return stats


def sample_levels(levels, counts: dict[int, int], batch_size: int, budget: int = engine.DEFAULT_ROW_BUDGET,
                  next_batch: dict[int, int] | None = None, progress=None,
                  what: str = "samples") -> tuple[dict[int, LevelSums], engine.EngineStats]:
    """``counts[level]`` samples of each level in one round (outside the driver), shared across ranks; the
    streams start at ``next_batch`` (default 0) and it is advanced."""
    next_batch = {} if next_batch is None else next_batch
    batches = plan_batches(counts, next_batch, batch_size)
    done: dict[int, LevelSums] = {}
    if progress is not None:
        progress.start(f"{what}: levels {min(counts)}..{max(counts)}, {max(counts.values())} samples each",
                       sum(batch_rows(levels, b) for b in batches))
    stats = execute(levels, batches, budget, done, on_call=None if progress is None else progress.advance)
    sums: dict[int, LevelSums] = {}
    fold(batches, done, sums, {}, levels.pixels)
    return sums, stats
