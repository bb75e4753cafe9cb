"""The coupled level sampler against an oracle that shares none of its code (tests/joint_chain.py), and the
invariant every coupling must keep: the coarse path of level l has exactly the law of level l - 1.

Mutations these catch (tried): the naive coarse noise summed with weight 1/M instead of 1/sqrt(M) (the
coarse path's variance shrinks: both tests fail); the coarse network call made at the next fine time instead
of the coarse step's start (both fail); the seed's weights without the later sub-steps' factors (the joint
test fails for ``weighted``).
"""

import math

import numpy as np
import pytest
import torch

from lightning_mlmc import ExactPosteriorEps, TimeGrid
from lightning_mlmc.mlmc import CoupledLevelSampler, level_stats
from tests.analytic_cases import gaussian3d, gaussian_inpaint
from tests.joint_chain import JointChain

N = 6000
GRIDS = [TimeGrid("uniform"), TimeGrid("logsnr"), TimeGrid("edm")]


def _sampler(spec, **kw):
    return CoupledLevelSampler(ExactPosteriorEps(spec), torch.as_tensor(spec.y)[None], spec.shape, lmin=0, **kw)


def _times(grid, steps):
    return grid.times(steps).numpy()


def _close_means(sample_mean, exact_mean, exact_var, n):
    """Every pixel's sample mean within 5 standard errors of the exact one."""
    se = np.sqrt(exact_var / n)
    return np.all(np.abs(sample_mean - exact_mean) <= 5 * se + 1e-12), float(np.max(np.abs(sample_mean - exact_mean) / (se + 1e-300)))


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.kind)
@pytest.mark.parametrize("sampler, coupling", [("ddpm", "naive"), ("ddpm", "weighted"), ("ddim", "naive")])
def test_levels_match_the_independent_joint_chain(grid, sampler, coupling):
    """Per-pixel E[P_l - P_(l-1)] and V_l of the sampler within 5 SE of the exact joint chain; V_l's SE from
    the sample kurtosis (V sqrt((kurtosis - 1) / N))."""
    spec = gaussian3d()
    chain = JointChain(spec)
    samp = _sampler(spec, coupling=coupling, sampler=sampler, seed=3, grid=grid)
    for level in (1, 3, 5):
        s = samp(level, N)
        mean, var, _, _ = chain.level(_times(grid, 2**level), 2, coupling, sampler == "ddpm")
        y1 = (s.sums["y1"] / N).numpy()
        ok, worst = _close_means(y1, mean, var, N)
        assert ok, (level, worst)
        var_hat = (s.sums["y2"] / N).numpy() - y1**2
        kurt = level_stats(level, s, 1.0).kurtosis
        se_var = var * math.sqrt(max(kurt - 1.0, 2.0) / N)
        assert np.all(np.abs(var_hat - var) <= 5 * se_var + 1e-12), (level, var_hat, var)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.kind)
@pytest.mark.parametrize("coupling", ["naive", "weighted", "jacobian"])
@pytest.mark.parametrize("M", [2, 3])
def test_the_coarse_path_has_the_previous_levels_law(grid, coupling, M):
    """For every coupling, grid and M, the coarse paths of level l are samples of P_(l-1): their per-pixel
    E[x^2] and V[x^2] within 5 SE of the exact law of the (l-1)-level chain, and the fine paths' of P_l's."""
    spec = gaussian_inpaint()
    chain = JointChain(spec)
    samp = _sampler(spec, coupling=coupling, M=M, seed=11, grid=grid)
    for level in (2, 3):
        s = samp(level, N)
        for which, steps in (("c", M ** (level - 1)), ("f", M**level)):
            m, S = chain.law(_times(grid, steps))
            v = np.diag(S)
            exact_mean, exact_var = m**2 + v, 2 * v**2 + 4 * m**2 * v
            sample = (s.sums[f"{which}1"] / N).numpy()
            ok, worst = _close_means(sample, exact_mean, exact_var, N)
            assert ok, (which, level, worst)
            sample_var = (s.sums[f"{which}2"] / N).numpy() - sample**2
            # V[x^2] of a Gaussian x has fourth-moment-based SE; a 5-SE band from its exact kurtosis (x^2 is
            # a scaled noncentral chi-square with kurtosis below 15)
            assert np.all(np.abs(sample_var - exact_var) <= 5 * exact_var * math.sqrt(14.0 / N)), (which, level)
