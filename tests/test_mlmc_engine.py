"""The batched execution engine: every batch of every level advances together, the same paths as running each
batch alone (its own noise stream), and the sequential calls it reports are the calls the network got."""

import io

import pytest
import torch

from lightning_mlmc.mlmc import MLMCConfig, run_mlmc
from lightning_mlmc.mlmc import engine
from lightning_mlmc.progress import QUIET, TerminalProgress, for_terminal
from tests.analytic_cases import Counting, gaussian_inpaint, inpaint4x4
from tests.rounding import (assert_agree_to_rounding, exact_score_ops, mlmc_relative_tolerance,
                            path_relative_tolerance)


def _levels(spec, **kw):
    config = MLMCConfig(lmin=1, seed=7, **kw)
    model = Counting(spec)
    return config, config.level_sampler(model, torch.as_tensor(spec.y)[None], spec.shape), model


def test_batches_of_every_level_together_give_each_batchs_own_sums():
    """Six batches of four levels (coupled and plain, different sizes and streams) in one engine run equal the
    batches run alone, to float rounding (tests/rounding.py: the exact score sees other rows in the same call,
    and its batched linear algebra may round the last bit differently by batch shape): the paths within
    2 S c u of their scale, the payoff sums f1 and c1 (x^2 >= 0) within the tolerance of a one-level estimate;
    the calls fall from the sum of the paths' steps to the longest path's."""
    spec = inpaint4x4()
    _, levels, model = _levels(spec)
    plan = [(1, 7, 0, 0, False), (3, 5, 0, 0, False), (3, 9, 1, 0, False), (5, 4, 0, 1, False), (4, 6, 2, 0, True),
            (2, 3, 0, 0, False)]
    alone = []
    for level, n, b, r, plain in plan:
        stepper = levels.steppers(level, n, b, r, plain)
        engine.run([stepper], levels.model, levels.y)
        alone.append(stepper)
    calls_alone = model.calls
    steppers = [levels.steppers(*p) for p in plan]
    stats = engine.run(steppers, levels.model, levels.y, budget=10_000)
    assert stats.calls == model.calls - calls_alone == 2**5  # the longest path's steps, every call full
    assert stats.rows == sum(s.calls for s in alone)
    c = exact_score_ops(spec)
    for a, s in zip(alone, steppers):
        what = f"batch (level {s.level}, n {s.n})"
        assert_agree_to_rounding(s.x_f, a.x_f, path_relative_tolerance(s.steps, c), what=what + " fine paths")
        assert (s.x_c is None) == (a.x_c is None)
        if s.x_c is not None:
            assert_agree_to_rounding(s.x_c, a.x_c, path_relative_tolerance(s.steps, c), what=what + " coarse paths")
        sa, sb = a.sums(), s.sums()
        assert (sa.n, sa.calls) == (sb.n, sb.calls)
        rel = mlmc_relative_tolerance([{"cost": s.calls / s.n, "n_samples": s.n}], c)
        for k in ("f1", "c1"):
            assert_agree_to_rounding(sb.sums[k], sa.sums[k], rel, what=f"{what} sum {k}")


def test_the_schedule_keeps_the_row_budget_and_runs_the_longest_paths_first():
    remaining, rows = [3, 10, 10, 1, 0], [4, 6, 6, 2, 8]
    assert engine.schedule(remaining, rows, budget=12) == [1, 2]
    assert engine.schedule(remaining, rows, budget=14) == [1, 2, 3]  # the short one fills the tail
    assert engine.schedule(remaining, rows, budget=3) == [1]  # the first always goes
    assert engine.schedule([0, 0], [1, 1], budget=5) == []


@pytest.mark.parametrize("samples, batch_size, budget", [(10, 4, 8), (1000, 1000, 4096), (9000, 1000, 4096), (5, 7, 3)])
def test_plain_mc_call_count_is_what_the_engine_does(samples, batch_size, budget):
    """``plain_mc_calls`` (the plain-MC alternative's sequential calls in a result) is the count of a real
    engine run of that many plain paths in batches."""
    spec = gaussian_inpaint()
    _, levels, model = _levels(spec)
    steps_level = 3
    steppers, left, b = [], samples, 0
    while left > 0:
        steppers.append(levels.steppers(steps_level, min(batch_size, left), b, 0, True))
        left, b = left - batch_size, b + 1
    stats = engine.run(steppers, levels.model, levels.y, budget)
    paths = levels.paths  # a sample is an antithetic pair of paths (the default): twice the rows
    assert engine.plain_mc_calls(2**steps_level, samples * paths, batch_size * paths, budget) == stats.calls


def test_a_run_reports_the_calls_the_network_got():
    spec = gaussian_inpaint()
    config, levels, model = _levels(spec, row_budget=256)
    r = run_mlmc(config, levels, 0.05)
    assert r.sequential_calls == model.calls and r.nfe_counted == model.rows
    assert r.rows_per_call == pytest.approx(model.rows / model.calls)
    assert r.mc_sequential_calls == engine.plain_mc_calls(r.mc_steps, r.mc_samples, config.batch_size, 256)


def test_progress_only_on_a_terminal():
    assert for_terminal(io.StringIO()) is QUIET

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    progress = for_terminal(stream)
    assert isinstance(progress, TerminalProgress)
    progress.start("round 1: levels 2..5", 100)
    progress.advance(40)
    progress.close()
    assert "round 1: levels 2..5" in stream.getvalue() and progress.rows == 40
