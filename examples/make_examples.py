"""Regenerate the example analytic specs in this folder: python examples/make_examples.py"""

import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def bimodal2d() -> dict:
    """A 2-D prior with two well-separated modes observed through their sum: a bimodal posterior."""
    return {
        "prior": {
            "weights": [0.5, 0.5],
            "means": [[-1.0, 0.5], [1.0, -0.5]],
            "covs": [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.3]]],
        },
        "operator": {"matrix": [[1.0, 1.0]]},
        "noise_std": 0.3,
        "y": [0.2],
    }


def _posterior_weights(means, cov, a, noise_std, y):
    s_y = a @ cov @ a.T + noise_std**2 * np.eye(len(y))
    logw = np.array([-0.5 * (y - a @ m) @ np.linalg.solve(s_y, y - a @ m) for m in means])
    w = np.exp(logw - logw.max())
    return w / w.sum()


def inpaint4x4() -> dict:
    """A 4x4 'image' with a two-component smooth Gaussian-mixture prior; 8 of 16 pixels observed."""
    h = w = 4
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    dist2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    cov = 0.25 * np.exp(-dist2 / (2 * 1.2**2)) + 0.02 * np.eye(h * w)
    bar = np.where(xx.ravel() == 1, 0.8, -0.6)  # a vertical stroke
    ring = np.where((yy.ravel() % 3 == 0) | (xx.ravel() % 3 == 0), 0.7, -0.5)  # a square outline
    observed = [0, 3, 5, 6, 9, 10, 12, 15]
    a = np.zeros((len(observed), h * w))
    a[np.arange(len(observed)), observed] = 1.0
    noise_std = 0.2
    for seed in range(1000):  # the first draw whose posterior keeps both modes (weights >= 0.2)
        rng = np.random.default_rng(seed)
        truth = rng.multivariate_normal(0.5 * (bar + ring), cov)  # between the modes
        y = a @ truth + noise_std * rng.standard_normal(len(observed))
        if _posterior_weights([bar, ring], cov, a, noise_std, y).min() >= 0.2:
            break
    return {
        "prior": {"weights": [0.5, 0.5], "means": [bar.tolist(), ring.tolist()], "covs": [cov.tolist()] * 2},
        "operator": {"matrix": a.tolist()},
        "noise_std": noise_std,
        "y": np.round(y, 6).tolist(),
        "shape": [1, h, w],
    }


if __name__ == "__main__":
    for name, spec in [("bimodal2d", bimodal2d()), ("inpaint4x4", inpaint4x4())]:
        with open(os.path.join(HERE, f"{name}.json"), "w") as f:
            json.dump(spec, f, indent=1)
            f.write("\n")
