"""Analytic problems: a Gaussian-mixture prior with a linear Gaussian observation (DESIGN.md section 3).

The posterior is again a Gaussian mixture, and so is the diffused posterior
p_t(x_t | y) = sum_k r_k N(x_t; m(t) mu_k, m(t)^2 C_k + sigma(t)^2 I); its score is closed form. The
exact score is exposed as an eps-predicting model with the same call as the trained network,
``model(x_t, y, t) -> eps_hat``, so every sampler, MLMC and Picard accept either.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from lightning_mlmc.errors import InputError
from lightning_mlmc.schedule import VPSchedule

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Spec loading and validation.


def _array(value, field: str, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{field}: expected a {ndim}-d array of numbers") from None
    if arr.ndim != ndim:
        raise InputError(f"{field}: expected a {ndim}-d array of numbers, got {arr.ndim}-d")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{field}: contains NaN or Inf; expected finite numbers")
    return arr


@dataclass(frozen=True)
class AnalyticSpec:
    """A validated analytic problem: prior mixture, operator matrix (m x n), noise_std, y, shape."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, n)
    covs: np.ndarray  # (K, n, n)
    matrix: np.ndarray  # (m, n)
    noise_std: float
    y: np.ndarray  # (m,)
    shape: tuple[int, ...]

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @classmethod
    def from_dict(cls, spec) -> "AnalyticSpec":
        if not isinstance(spec, dict):
            raise InputError("spec: expected a JSON object with prior, operator, noise_std and y")
        for key in ("prior", "operator", "noise_std", "y"):
            if key not in spec:
                raise InputError(f"{key}: missing from the spec")
        prior, op = spec["prior"], spec["operator"]
        if not isinstance(prior, dict) or not all(k in prior for k in ("weights", "means", "covs")):
            raise InputError("prior: expected an object with weights, means and covs")
        if not isinstance(op, dict) or "matrix" not in op:
            raise InputError("operator: expected an object with a matrix")
        weights = _array(prior["weights"], "prior.weights", 1)
        means = _array(prior["means"], "prior.means", 2)
        covs = _array(prior["covs"], "prior.covs", 3)
        matrix = _array(op["matrix"], "operator.matrix", 2)
        y = _array(spec["y"], "y", 1)
        k, n = means.shape
        if len(weights) != k or k == 0:
            raise InputError(f"prior.weights: expected {k} weights (one per mean), got {len(weights)}")
        if np.any(weights < 0) or not weights.sum() > 0:
            raise InputError("prior.weights: expected non-negative weights with a positive sum")
        if covs.shape != (k, n, n):
            raise InputError(f"prior.covs: expected shape [{k}, {n}, {n}], got {list(covs.shape)}")
        for i, c in enumerate(covs):
            if not np.allclose(c, c.T, rtol=1e-10, atol=1e-12):
                raise InputError(f"prior.covs[{i}]: expected a symmetric matrix")
            if np.linalg.eigvalsh(c).min() <= 0:
                raise InputError(f"prior.covs[{i}]: expected a positive-definite covariance")
        if matrix.shape[1] != n:
            raise InputError(f"operator.matrix: expected {n} columns (the prior dimension), got {matrix.shape[1]}")
        if y.shape != (matrix.shape[0],):
            raise InputError(f"y: expected {matrix.shape[0]} values (one per operator row), got {y.shape[0]}")
        try:
            noise_std = float(spec["noise_std"])
        except (TypeError, ValueError):
            raise InputError("noise_std: expected a positive number") from None
        if not (math.isfinite(noise_std) and noise_std > 0):
            raise InputError(f"noise_std: expected a positive finite number, got {spec['noise_std']}")
        shape = spec.get("shape", [n])
        if (
            not isinstance(shape, list)
            or not shape
            or not all(isinstance(s, int) and s > 0 for s in shape)
            or int(np.prod(shape)) != n
        ):
            raise InputError(f"shape: expected a list of positive integers with product {n}, got {shape}")
        return cls(weights / weights.sum(), means, covs, matrix, noise_std, y, tuple(shape))

    @classmethod
    def load(cls, path) -> "AnalyticSpec":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"problem: spec file {path} does not exist")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"problem: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"problem: cannot read {path} ({e})") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return {
            "prior": {
                "weights": self.weights.tolist(),
                "means": self.means.tolist(),
                "covs": self.covs.tolist(),
            },
            "operator": {"matrix": self.matrix.tolist()},
            "noise_std": self.noise_std,
            "y": self.y.tolist(),
            "shape": list(self.shape),
        }

    def with_observation(self, y) -> "AnalyticSpec":
        d = self.to_dict()
        d["y"] = np.asarray(y, dtype=np.float64).reshape(-1).tolist()
        return AnalyticSpec.from_dict(d)

    def selection_mask(self) -> np.ndarray | None:
        """If every operator row picks one coordinate (an inpainting operator), the observed mask (n,)."""
        a = self.matrix
        ones = np.isclose(a, 1.0)
        zeros = np.isclose(a, 0.0)
        if not np.all(ones | zeros) or not np.all(ones.sum(1) == 1) or np.any(ones.sum(0) > 1):
            return None
        return ones.any(0)


# ----------------------------------------------------------------------------------------------
# Exact posterior.


@dataclass(frozen=True)
class GaussianMixture:
    """A Gaussian mixture in R^n with its per-component eigendecompositions (float64 tensors)."""

    weights: Tensor  # (K,)
    means: Tensor  # (K, n)
    covs: Tensor  # (K, n, n)

    @property
    def mean(self) -> Tensor:
        """E[x], shape (n,)."""
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def second_moment(self) -> Tensor:
        """Per-pixel E[x^2], shape (n,)."""
        diag = torch.diagonal(self.covs, dim1=-2, dim2=-1)
        return (self.weights[:, None] * (self.means**2 + diag)).sum(0)

    @property
    def variance(self) -> Tensor:
        return self.second_moment - self.mean**2

    def log_prob(self, x: Tensor) -> Tensor:
        """log density at x (shape (B, n)), differentiable in x."""
        dist = torch.distributions.MultivariateNormal(self.means, covariance_matrix=self.covs)
        lp = dist.log_prob(x[:, None, :]) + torch.log(self.weights)
        return torch.logsumexp(lp, dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n independent draws, shape (n, dim), float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[comp] + torch.einsum("bij,bj->bi", chol[comp], z)

    def diffused(self, m: float, sigma2: float) -> "GaussianMixture":
        """The law of m X + sigma Z, X from this mixture."""
        eye = torch.eye(self.means.shape[1], dtype=torch.float64)
        return GaussianMixture(self.weights, m * self.means, m * m * self.covs + sigma2 * eye)


def prior_mixture(spec: AnalyticSpec) -> GaussianMixture:
    """The spec's prior as a ``GaussianMixture`` (float64 tensors)."""
    t = lambda v: torch.as_tensor(np.asarray(v), dtype=torch.float64)  # noqa: E731
    return GaussianMixture(t(spec.weights), t(spec.means), t(spec.covs))


def eps_relative_error(model, spec: AnalyticSpec, t: float, n: int = 2048, seed: int = 0) -> float:
    """Relative L2 error ||eps_model - eps_exact|| / ||eps_exact|| of a network against the exact score.

    x_t is drawn from the diffused posterior p_t(x_t | y) at the spec's y (where samplers evaluate the
    network; use ``spec.with_observation(y)`` for another y); the norms are over all n draws and
    coordinates. Equal to the score's relative error, since score = -eps / sigma(t).
    """
    schedule = VPSchedule()
    g = torch.Generator().manual_seed(seed)
    x0 = exact_posterior(spec).sample(n, g)
    t_vec = torch.full((n,), float(t), dtype=torch.float64)
    x_t = schedule.mean(t_vec)[:, None] * x0 + schedule.sigma(t_vec)[:, None] * torch.randn(x0.shape, generator=g,
                                                                                            dtype=torch.float64)
    x_t = x_t.reshape(n, *spec.shape)
    y = torch.as_tensor(spec.y)[None]
    with torch.no_grad():
        exact = ExactPosteriorEps(spec)(x_t, y, t_vec)
        approx = model(x_t, y, t_vec).to(torch.float64)
    return float((approx - exact).norm() / exact.norm())


def exact_posterior(spec: AnalyticSpec) -> GaussianMixture:
    """The posterior mixture p(x | y): Kalman update of every component, weights by evidence."""
    a, y, s2 = spec.matrix, spec.y, spec.noise_std**2
    log_w, means, covs = [], [], []
    for w, mu, c in zip(spec.weights, spec.means, spec.covs):
        s_y = a @ c @ a.T + s2 * np.eye(len(y))
        resid = y - a @ mu
        chol = np.linalg.cholesky(s_y)
        z = np.linalg.solve(chol, resid)
        log_w.append(np.log(w) - 0.5 * z @ z - np.log(np.diag(chol)).sum())
        gain = np.linalg.solve(s_y, a @ c).T  # C A^T S_y^{-1}
        means.append(mu + gain @ resid)
        cov = c - gain @ a @ c
        covs.append(0.5 * (cov + cov.T))
    log_w = np.array(log_w)
    w = np.exp(log_w - log_w.max())
    t = lambda v: torch.as_tensor(np.asarray(v), dtype=torch.float64)  # noqa: E731
    return GaussianMixture(t(w / w.sum()), t(means), t(covs))


class ExactPosteriorEps(torch.nn.Module):
    """The exact eps-prediction of the diffused posterior p_t(x_t | y) of an analytic problem.

    eps_hat(x_t, y, t) = -sigma(t) grad log p_t(x_t | y), with the posterior recomputed for the
    observation ``y`` passed in (one observation shared by the batch, or the spec's own y when None).
    Each component's covariance is diagonalised once (C = U diag(lam) U^T), so the diffused
    covariance m^2 C + sigma^2 I is inverted per sample in O(n^2) for any per-sample t.

    Call: ``model(x_t, y, t)`` with x_t of shape (B, *shape), t of shape (B,); returns (B, *shape).
    """

    def __init__(self, spec: AnalyticSpec, schedule: VPSchedule | None = None):
        super().__init__()
        self.spec = spec
        self.schedule = schedule or VPSchedule()
        # (observation bytes, device) -> posterior tensors on that device (no host copies per call on a GPU)
        self._cache: dict[tuple[bytes, str], tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._posterior_for(torch.as_tensor(spec.y), torch.device("cpu"))

    def _posterior_for(self, y: Tensor, device: torch.device):
        key = (y.detach().to(torch.float64).cpu().numpy().tobytes(), str(device))
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            post = exact_posterior(self.spec.with_observation(y.detach().cpu().numpy()))
            lam, u = torch.linalg.eigh(post.covs)
            self._cache[key] = tuple(v.to(device) for v in (torch.log(post.weights), post.means,
                                                              lam.clamp_min(0.0), u))
        return self._cache[key]

    def score(self, x_t: Tensor, y: Tensor | None, t: Tensor) -> Tensor:
        """grad_x log p_t(x | y), same shape as x_t."""
        batch = x_t.shape[0]
        y = torch.as_tensor(self.spec.y) if y is None else torch.as_tensor(y)
        y = y.reshape(-1, self.spec.y.shape[0])
        if y.shape[0] > 1 and not torch.all(y == y[:1]):
            raise InputError("y: ExactPosteriorEps takes one observation shared by the batch")
        dev, dtype = x_t.device, torch.float64
        log_w, mus, lam, u = self._posterior_for(y[0], dev)
        x = x_t.reshape(batch, -1).to(dtype)
        t = torch.as_tensor(t, dtype=dtype, device=dev).reshape(-1).expand(batch)
        m = self.schedule.mean(t)[:, None]  # (B, 1)
        s2 = self.schedule.sigma2(t)[:, None]
        # Coordinates of x - m mu_k in each component's eigenbasis: z[b, k, :] = U_k^T (x_b - m_b mu_k).
        diff = x[:, None, :] - m[:, :, None] * mus[None]  # (B, K, n)
        z = torch.einsum("kji,bkj->bki", u, diff)
        var = m[:, :, None] ** 2 * lam[None] + s2[:, :, None]  # (B, K, n)
        log_r = log_w[None] - 0.5 * (z**2 / var).sum(-1) - 0.5 * torch.log(var).sum(-1)
        r = torch.softmax(log_r, dim=1)  # responsibilities (B, K)
        comp_score = -torch.einsum("kij,bkj->bki", u, z / var)  # (B, K, n)
        score = (r[:, :, None] * comp_score).sum(1)
        return score.reshape(x_t.shape).to(x_t.dtype)

    def forward(self, x_t: Tensor, y: Tensor | None, t: Tensor) -> Tensor:
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).reshape(-1)
        sigma = self.schedule.sigma(t64).reshape((-1,) + (1,) * (x_t.dim() - 1))
        return (-sigma * self.score(x_t, y, t).to(torch.float64)).to(x_t.dtype)


def gaussian_inpaint_spec(h: int = 3, w: int = 3) -> AnalyticSpec:
    """A single-Gaussian h x w image with a smooth prior; every other pixel observed with noise 0.1."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    cov = 0.5 * np.exp(-((pts[:, None] - pts[None]) ** 2).sum(-1) / 2.0) + 0.05 * np.eye(h * w)
    obs = np.arange(0, h * w, 2)
    a = np.zeros((len(obs), h * w))
    a[np.arange(len(obs)), obs] = 1.0
    mean = np.linspace(-0.5, 0.5, h * w)
    return AnalyticSpec.from_dict({"prior": {"weights": [1.0], "means": [mean.tolist()], "covs": [cov.tolist()]},
                                   "operator": {"matrix": a.tolist()}, "noise_std": 0.1,
                                   "y": (a @ (mean + 0.3) + 0.05).tolist(), "shape": [1, h, w]})
