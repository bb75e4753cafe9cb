"""MLMC over ranks (torch.distributed): each rank draws its share of every batch from its own stream and the
sums are all-reduced, so a 2-process run equals one process that draws both ranks' shares: the same sample
counts, method and NFEs (the cost formula over the counts), and the estimate to float rounding
(tests/rounding.py): each rank runs its shares of a round together in engine calls, the emulation runs every
share alone, and the batched linear algebra of the exact score may round the last bit differently by batch
shape (MKL on Intel CPUs does); the torchrun processes also run on one thread each.

Mutation this catches (tried): skipping the all-reduce (each rank then estimates from its own half: the
sample counts and the estimate differ from the emulation)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from lightning_mlmc import ExactPosteriorEps, WeakConvergenceFailure
from lightning_mlmc.mlmc import LevelFunction, LevelSums, MLMCConfig, run_mlmc
from tests.analytic_cases import EXAMPLES, bimodal2d
from tests.rounding import assert_estimates_agree, exact_score_ops

EPS = 0.1


class TwoRanks(LevelFunction):
    """The level function as two ranks see it, in one process: rank r's share of n from stream (..., r)."""

    def __init__(self, levels):
        self.levels, self.M, self.lmin, self.pixels = levels, levels.M, levels.lmin, levels.pixels

    def cost(self, level):
        return self.levels.cost(level)

    def plain_cost(self, level):
        return self.levels.plain_cost(level)

    can_change_lmin = True

    @property
    def antithetic(self):
        return self.levels.antithetic

    def steps(self, level):
        return self.levels.steps(level)

    def with_lmin(self, lmin):
        return TwoRanks(self.levels.with_lmin(lmin))

    @property
    def scheme(self):
        return self.levels.scheme

    def __call__(self, level, n, batch_index=0, rank=0):
        total = LevelSums.zeros(self.pixels)
        for r in range(2):
            share = n // 2 + (1 if r < n % 2 else 0)
            if share:
                total.add(self.levels(level, share, batch_index, r))
        return total


def _levels(seed=5):
    spec = bimodal2d()
    config = MLMCConfig(seed=seed, batch_size=64)
    return config, config.level_sampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], spec.shape)


def _run(config, levels):
    try:
        return run_mlmc(config, levels, EPS)
    except WeakConvergenceFailure as e:
        return e.result


def _worker(rank, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    r = _run(*_levels())
    if rank == 0:
        with open(out, "w") as f:
            json.dump(r.to_json(), f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_drawing_both_shares(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "two.json"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    config, levels = _levels()
    one = _run(config, TwoRanks(levels))
    assert two["world_size"] == 2
    assert [lv["n_samples"] for lv in two["levels"]] == [lv.n_samples for lv in one.levels]
    assert two["nfe"] == one.nfe and two["method"] == one.method
    assert_estimates_agree(two["estimate"], one.estimate, one.levels, exact_score_ops(bimodal2d()),
                           what="2 processes vs 1 process drawing both shares")


@pytest.mark.slow
def test_torchrun_runs_the_cli_over_two_processes_and_rank_zero_writes(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "r.json"
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "lightning_mlmc", "mlmc",
                        "--problem", os.path.join(EXAMPLES, "bimodal2d.json"), "--eps", str(EPS), "--seed", "5",
                        "--batch-size", "64", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("estimate written to") == 1  # rank 0 only
    r = json.loads(out.read_text())
    config, levels = _levels()
    one = _run(config, TwoRanks(levels))
    assert r["world_size"] == 2 and [lv["n_samples"] for lv in r["levels"]] == [lv.n_samples for lv in one.levels]
    assert_estimates_agree(r["estimate"], one.estimate, one.levels, exact_score_ops(bimodal2d()),
                           what="torchrun (2 processes, 1 thread each) vs 1 process drawing both shares")
