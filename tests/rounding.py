"""Agreement to float rounding, for results whose computation was grouped differently.

The same command on the same machine repeats every floating-point operation in the same order, so its results
are compared bit for bit (``==``). A resumed run, another row budget, or a run over several ranks evaluates the
network on other batch shapes: the engine groups the rows of many batches into one call, and BLAS / oneDNN
kernels (MKL's on Intel CPUs, for one) block and vectorise a reduction differently by shape and CPU, so the
last bit of an output can differ. Those comparisons use ``assert_agree_to_rounding`` with a tolerance derived
here, not tuned.

The tolerance (first-order forward error bounds, Higham ch. 3; float64 unit roundoff u = 2^-53). Each run is
within a bound B of exact arithmetic, so two groupings differ by at most 2 B:

* One network evaluation and reverse step, per output coordinate, relative to the row's scale. The exact score
  (``ExactPosteriorEps``) of an n-dimensional mixture of K Gaussians contracts with each component's orthogonal
  eigenbasis twice (into it and back out): a length-n reduction is within n u of the sum of its |terms|, at most
  sqrt(n) times the largest, so n^(3/2) u each. The quadratic form sums n nonnegative terms (n u); the softmax
  and the mixture sum over the K components take 3 K; the elementwise operations of the score and of the step
  update are rounded once each (``ELEMENTWISE`` = 20: x - m mu (2), m^2 lam + s^2 (3), z^2 / var (2),
  log var (1), log r (3), z / var (1), -sigma score (2), the step a x + b eps + c xi (5), the dtype round
  trip (1)). ``exact_score_ops(spec)`` = 2 n^(3/2) + n + 3 K + 20 is that count c.
* A path of S sequential steps: the errors of its steps add (the reverse chain of these well-posed problems
  does not amplify a perturbation of x: its end-to-end Jacobian scales by the posterior-to-prior standard
  deviation ratio, at most about 1), so a final sample is within S c u |x| and two groupings within 2 S c u.
* A payoff of degree p (x^2: p = 2) multiplies the relative error by p. A level of an MLMC estimate is the mean
  of P_fine - P_coarse, the fine path of M^l steps and the coarse of M^(l-1): their steps add to the level's
  cost per sample, C_l. The estimate, a sum of level means, is within p c u sum_l C_l E|P|.
* The sums over samples: each run's sum of N_l payoffs is within N_l u E|P| of the exact sum (the sequential
  bound; torch's pairwise sums do better).

So |a - b| <= 2 u (p c sum_l C_l + sum_l N_l) scale, with scale the largest |component| of the two estimates
(for the second-moment payoff every component is E|P| itself). Measured against it: one exact-score
evaluation on other batch shapes differs by at most 49 u (inpaint4x4 on this AMD CPU; 2 c = 334 u); the
resumed estimate of tests/test_mlmc.py on MKL's Intel path by 2 ulps (6e-17), 18,000 times below its
tolerance (1e-12), while a batch drawn from another noise stream moves it by 7e-3.
"""

from __future__ import annotations

import numpy as np
import torch

ELEMENTWISE = 20  # elementwise operations of one exact-score evaluation and reverse step (see above)


def unit_roundoff(dtype=torch.float64) -> float:
    """u: half the distance from 1 to the next float (2^-53 for float64, 2^-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def exact_score_ops(spec) -> float:
    """c: the roundings per output coordinate of one ``ExactPosteriorEps`` evaluation and reverse step of the
    analytic problem ``spec`` (n dimensions, K mixture components), relative to the row's scale."""
    k, n = spec.means.shape
    return 2 * n**1.5 + n + 3 * k + ELEMENTWISE


def _field(level, name):
    return level[name] if isinstance(level, dict) else getattr(level, name)


def mlmc_relative_tolerance(levels, ops_per_step: float, degree: int = 2, dtype=torch.float64) -> float:
    """2 u (p c sum_l C_l + sum_l N_l): the relative tolerance of an MLMC estimate of ``levels`` (``LevelStats``
    or their JSON dicts: ``cost`` per sample and ``n_samples``) whose network evaluations were grouped otherwise.
    """
    steps = sum(float(_field(lv, "cost")) for lv in levels)
    samples = sum(int(_field(lv, "n_samples")) for lv in levels)
    return 2 * unit_roundoff(dtype) * (degree * ops_per_step * steps + samples)


def path_relative_tolerance(steps: int, ops_per_step: float, dtype=torch.float64) -> float:
    """2 u S c: the relative tolerance of sampled paths of ``steps`` sequential steps."""
    return 2 * unit_roundoff(dtype) * steps * ops_per_step


def _array(values) -> np.ndarray:
    if torch.is_tensor(values):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def assert_agree_to_rounding(actual, expected, rel: float, *, scale: float | None = None, what: str = "values"):
    """``actual`` and ``expected`` (lists, arrays or tensors of one shape) differ by at most ``rel * scale`` in
    every component; ``scale`` defaults to the largest |component| of the two. Says by how much otherwise, and
    returns (largest difference, tolerance)."""
    a, b = _array(actual), _array(expected)
    assert a.shape == b.shape, f"{what}: shapes differ, {a.shape} vs {b.shape}"
    assert np.isfinite(a).all() and np.isfinite(b).all(), f"{what}: non-finite values"
    if scale is None:
        scale = float(max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0)))
    tol = rel * scale
    diff = np.abs(a - b)
    if diff.size and diff.max() > tol:
        i = int(diff.argmax())
        raise AssertionError(
            f"{what} differ by more than float rounding: |{float(a.flat[i])!r} - {float(b.flat[i])!r}| = "
            f"{diff.max():.3g} at component {i} > tolerance {tol:.3g} (relative {rel:.3g} x scale {scale:.3g}; "
            f"{int((diff > tol).sum())} of {diff.size} components out)")
    return float(diff.max(initial=0.0)), tol


def assert_estimates_agree(actual, expected, levels, ops_per_step: float, degree: int = 2, what: str = "estimates"):
    """Two MLMC estimates (of the same levels and sample counts) agree to the float rounding of a different
    grouping of their network evaluations (module docstring)."""
    return assert_agree_to_rounding(actual, expected, mlmc_relative_tolerance(levels, ops_per_step, degree),
                                    what=what)
