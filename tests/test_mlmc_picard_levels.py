"""Picard-parallel MLMC levels (issue 18, part 3) on examples/inpaint4x4.json with its exact score: the fixed point
is the sequential coupled pair (window 1 is the sequential sampler to float rounding, a tiny tolerance gives the
sequential estimate), the default tolerance keeps every level's law, a long level needs far fewer sequential
calls, and bad options are one-line errors."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lightning_mlmc import ExactPosteriorEps
from lightning_mlmc.errors import InputError
from lightning_mlmc.mlmc import MLMCConfig, PicardLevelSampler, engine, level_stats, run_mlmc
from lightning_mlmc.mlmc.rounds import sample_levels
from tests.analytic_cases import EXAMPLES, Counting, inpaint4x4

SPEC = os.path.join(EXAMPLES, "inpaint4x4.json")


def _pair(spec, seed=7, lmin=1, picard_seed=None, **picard):
    """(sequential levels, Picard levels, the Picard levels' counting model) of one scheme (the Picard levels on
    ``picard_seed`` when given)."""
    y = torch.as_tensor(spec.y)[None]
    config = MLMCConfig(lmin=lmin, seed=seed)
    sequential = config.level_sampler(ExactPosteriorEps(spec), y, spec.shape)
    model = Counting(spec)
    kw = dict(M=config.M, lmin=lmin, grid=config.time_grid(), coupling=config.coupling, antithetic=config.antithetic,
              seed=seed if picard_seed is None else picard_seed)
    return sequential, PicardLevelSampler(model, y, spec.shape, **kw, **picard), model


def _run(levels, *batch):
    stepper = levels.steppers(*batch)
    stats = engine.run([stepper], levels.model, levels.y, budget=10**9)
    return stepper, stats


@pytest.mark.parametrize("batch", [(1, 5, 0, 0, False), (3, 4, 2, 0, False), (5, 3, 1, 1, False), (4, 3, 0, 0, True)],
                         ids=["lmin", "level3", "level5-rank1", "plain4"])
def test_window_one_is_the_sequential_coupled_pair(batch):
    """Window 1 accepts one step a round from a final left end: the sequential paths, noise included (a coarse
    noise from other weights, another stream or other draws moves x_c far beyond rounding)."""
    sequential, picard, _ = _pair(inpaint4x4(), window=1, tol=0.01)
    a, _ = _run(sequential, *batch)
    b, stats = _run(picard, *batch)
    torch.testing.assert_close(b.x_f, a.x_f, rtol=1e-12, atol=1e-12)
    if a.x_c is None:
        assert b.x_c is None
    else:
        torch.testing.assert_close(b.x_c, a.x_c, rtol=1e-12, atol=1e-12)
    assert stats.calls == sequential.M ** batch[0] and b.calls == a.calls == stats.rows


def test_a_long_level_needs_far_fewer_sequential_calls_and_levels_share_them():
    """Level 9 (512 fine steps), window 64, the default tolerance: at most 64 sequential calls (an eighth), the
    paths within the tolerance of the sequential pair; levels 5, 7 and 9 together take the calls of level 9
    alone, and every row evaluated is counted."""
    sequential, picard, model = _pair(inpaint4x4(), window=64)
    alone = {}
    for level in (5, 7, 9):
        b, stats = _run(picard, level, 4)
        alone[level] = stats.calls
        assert b.calls == stats.rows
    a, _ = _run(sequential, 9, 4)
    assert alone[9] <= 512 // 8
    assert float((b.x_f - a.x_f).abs().max()) < 1e-2 and float((b.x_c - a.x_c).abs().max()) < 1e-2
    before = model.calls, model.rows
    steppers = [picard.steppers(level, 4) for level in (5, 7, 9)]
    stats = engine.run(steppers, picard.model, picard.y, budget=10**9)
    assert stats.calls == max(alone.values()) == model.calls - before[0]
    assert stats.rows == sum(s.calls for s in steppers) == model.rows - before[1]


def _moments(sums):
    n = sums.n
    y1 = sums.sums["y1"] / n
    return y1, (sums.sums["y2"] / n - y1**2).clamp_min(0)


def test_levels_keep_their_law_at_the_default_tolerance():
    """Per-level mean (every pixel) and V_l of Picard levels, from other seeds, agree with the sequential levels
    within 5 standard errors (the SE of V_l from the kurtosis); a coarse path that loses its coupling, or a
    tolerance loose enough to move the paths, shows up in V_l."""
    counts = {level: 500 for level in range(2, 7)}
    sequential, picard, _ = _pair(inpaint4x4(), seed=11, picard_seed=12, window=8)
    seq, _ = sample_levels(sequential, counts, 250, budget=10**9)
    pic, _ = sample_levels(picard, counts, 250, budget=10**9)
    for level in counts:
        (m_a, v_a), (m_b, v_b) = _moments(seq[level]), _moments(pic[level])
        n = counts[level]
        z = (m_a - m_b).abs() / ((v_a + v_b) / n).sqrt()
        assert float(z.max()) < 5, (level, z)
        sa, sb = level_stats(level, seq[level], 0), level_stats(level, pic[level], 0)
        se = math.hypot(*(s.var * math.sqrt(max(s.kurtosis - 1, 0) / n) for s in (sa, sb)))
        assert abs(sa.var - sb.var) < 5 * se, (level, sa.var, sb.var, se)


def test_a_tiny_tolerance_gives_the_sequential_estimate():
    """float64, tolerance 1e-12: the driver's estimate (same seed, same decisions) equals the sequential levels'
    to 1e-8; nfe is the formula's, nfe_counted the rows evaluated, sequential_calls the calls made."""
    spec = inpaint4x4()
    y = torch.as_tensor(spec.y)[None]
    out = {}
    for name, picard in [("sequential", {}), ("picard", dict(picard_window=16, picard_tol=1e-12))]:
        config = MLMCConfig(lmin=2, lmax=7, seed=5, batch_size=200, row_budget=50_000, **picard)
        model = Counting(spec)
        out[name] = run_mlmc(config, config.level_sampler(model, y, spec.shape), 0.1), model
    (a, _), (b, model) = out["sequential"], out["picard"]
    assert b.scheme["picard_window"] == 16 and b.scheme["picard_tol"] == 1e-12 and "picard_window" not in a.scheme
    assert [x.n_samples for x in b.levels] == [x.n_samples for x in a.levels]
    assert float((torch.tensor(b.estimate) - torch.tensor(a.estimate)).abs().max()) < 1e-8
    assert b.nfe == a.nfe and b.nfe_counted == model.rows > a.nfe_counted
    assert b.sequential_calls == model.calls


def test_bad_options_are_one_line_errors(tmp_path):
    for kw, needle in [(dict(picard_window=0), "picard_window"), (dict(picard_window=2.5), "picard_window"),
                       (dict(picard_tol=0.0), "picard_tol"), (dict(picard_tol=math.nan), "picard_tol")]:
        with pytest.raises(InputError, match=needle):
            MLMCConfig(**kw)
    exe = shutil.which("lightning-mlmc", path=os.path.dirname(sys.executable))
    cases = [("mlmc", ["--eps", "0.1"], ["--picard-window", "0"], "picard-window"),
             ("mlmc", ["--eps", "0.1"], ["--picard-window", "four"], "picard-window"),
             ("mlmc", ["--eps", "0.1"], ["--picard-window", "8", "--picard-tol", "-1"], "picard-tol"),
             ("mlmc-test", ["--levels", "3", "--samples", "4"], ["--picard-window", "8", "--picard-tol", "nan"],
              "picard-tol")]
    for command, extra, bad, needle in cases:
        out = tmp_path / "r.json"
        p = subprocess.run([exe, command, "--problem", SPEC, *extra, *bad, "--out", str(out)],
                           capture_output=True, text=True)
        assert p.returncode == 2, (command, bad, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr and "Traceback" not in p.stderr
        assert not out.exists()


def test_cli_records_the_picard_options(tmp_path):
    exe = shutil.which("lightning-mlmc", path=os.path.dirname(sys.executable))
    out = tmp_path / "r.json"
    p = subprocess.run([exe, "mlmc", "--problem", SPEC, "--eps", "0.1", "--lmin", "2", "--lmax", "8", "--seed", "5",
                        "--picard-window", "8", "--picard-tol", "0.05", "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert (r["picard_window"], r["picard_tol"]) == (8, 0.05) and r["nfe_counted"] > r["nfe"]
