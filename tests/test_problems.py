"""Exact posteriors and exact diffused scores of the analytic problems."""

import json

import numpy as np
import pytest
import torch
from tests.analytic_cases import bimodal2d, gaussian3d, inpaint4x4

from lightning_mlmc import AnalyticSpec, ExactPosteriorEps, InputError, VPSchedule, exact_posterior


def test_bimodal_posterior_matches_quadrature():
    """Trapezoid quadrature on a +-8 prior-std box, 1201^2 nodes: for these Gaussian integrands the
    truncation and grid errors are far below 1e-8, so the comparison tolerance is 1e-7."""
    spec = bimodal2d()
    lo, hi = -4.5, 4.5
    grid = np.linspace(lo, hi, 1201)
    xx, yy = np.meshgrid(grid, grid, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel()], 1)
    dens = np.zeros(len(pts))
    for w, mu, c in zip(spec.weights, spec.means, spec.covs):
        d = pts - mu
        q = np.einsum("bi,ij,bj->b", d, np.linalg.inv(c), d)
        dens += w * np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(c)))
    resid = spec.y[0] - pts @ spec.matrix[0]
    dens *= np.exp(-0.5 * resid**2 / spec.noise_std**2)
    wts = dens / dens.sum()
    post = exact_posterior(spec)
    np.testing.assert_allclose(post.mean.numpy(), wts @ pts, atol=1e-7)
    np.testing.assert_allclose(post.second_moment.numpy(), wts @ pts**2, atol=1e-7)
    cross = (wts * pts[:, 0] * pts[:, 1]).sum()
    exact_cross = float(sum(w * (m[0] * m[1] + c[0, 1]) for w, m, c in zip(post.weights, post.means, post.covs)))
    assert exact_cross == pytest.approx(cross, abs=1e-7)


@pytest.mark.parametrize("make", [bimodal2d, inpaint4x4, gaussian3d])
def test_exact_score_matches_autograd(make):
    spec = make()
    model = ExactPosteriorEps(spec)
    post = exact_posterior(spec)
    sched = VPSchedule()
    g = torch.Generator().manual_seed(0)
    for t in (1e-3, 0.05, 0.3, 0.9):
        diffused = post.diffused(float(sched.mean(t)), float(sched.sigma2(t)))
        x = (diffused.means[0] + torch.randn(16, spec.dim, generator=g, dtype=torch.float64)).requires_grad_(True)
        (grad,) = torch.autograd.grad(diffused.log_prob(x).sum(), x)
        tt = torch.full((16,), t, dtype=torch.float64)
        xs = x.detach().reshape(16, *spec.shape)
        score = model.score(xs, torch.as_tensor(spec.y)[None], tt).reshape(16, -1)
        torch.testing.assert_close(score, grad, rtol=1e-9, atol=1e-9)
        eps = model(xs, torch.as_tensor(spec.y)[None], tt).reshape(16, -1)
        torch.testing.assert_close(eps, -sched.sigma(t) * grad, rtol=1e-9, atol=1e-9)


def test_model_uses_the_observation_it_is_given():
    spec = gaussian3d()
    model = ExactPosteriorEps(spec)
    other = spec.with_observation([1.5, -0.7])
    x = torch.zeros(2, 3, dtype=torch.float64)
    t = torch.full((2,), 0.2, dtype=torch.float64)
    want = ExactPosteriorEps(other)(x, None, t)
    torch.testing.assert_close(model(x, torch.tensor([[1.5, -0.7]], dtype=torch.float64), t), want)


def _base():
    return json.loads(json.dumps(bimodal2d().to_dict()))


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("y"), "y"),
        (lambda d: d["prior"].pop("covs"), "prior"),
        (lambda d: d.__setitem__("y", [0.1, 0.2]), "y"),
        (lambda d: d.__setitem__("y", [float("nan")]), "y"),
        (lambda d: d["operator"].__setitem__("matrix", [[1.0, 1.0, 1.0]]), "operator.matrix"),
        (lambda d: d["prior"]["covs"][0].__setitem__(0, [-1.0, 0.1]), "prior.covs[0]"),
        (lambda d: d["prior"]["covs"][1].__setitem__(0, [0.2, 0.3]), "prior.covs[1]"),
        (lambda d: d["prior"].__setitem__("weights", [1.0]), "prior.weights"),
        (lambda d: d.__setitem__("noise_std", 0.0), "noise_std"),
        (lambda d: d.__setitem__("noise_std", "x"), "noise_std"),
        (lambda d: d.__setitem__("shape", [3]), "shape"),
        (lambda d: d["prior"]["means"].__setitem__(0, [float("inf"), 0.0]), "prior.means"),
    ],
)
def test_bad_specs_name_the_field(mutate, field):
    d = _base()
    mutate(d)
    with pytest.raises(InputError, match=field.replace("[", r"\[").replace("]", r"\]")):
        AnalyticSpec.from_dict(d)


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        AnalyticSpec.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"prior": {')
    with pytest.raises(InputError, match="not valid JSON"):
        AnalyticSpec.load(bad)


def test_selection_mask():
    mask = inpaint4x4().selection_mask()
    assert mask is not None and mask.sum() == 8
    assert bimodal2d().selection_mask() is None
