"""Shared analytic test problems (exact posteriors known)."""

import os

import numpy as np

from lightning_mlmc.problems import AnalyticSpec

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def bimodal2d() -> AnalyticSpec:
    return AnalyticSpec.load(os.path.join(EXAMPLES, "bimodal2d.json"))


def inpaint4x4() -> AnalyticSpec:
    return AnalyticSpec.load(os.path.join(EXAMPLES, "inpaint4x4.json"))


def gaussian3d() -> AnalyticSpec:
    """A single-Gaussian 3-D problem with a correlated prior and two observations."""
    return AnalyticSpec.from_dict({
        "prior": {"weights": [1.0], "means": [[0.5, -0.3, 0.2]],
                  "covs": [[[1.0, 0.3, 0.0], [0.3, 0.8, 0.1], [0.0, 0.1, 0.5]]]},
        "operator": {"matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]},
        "noise_std": 0.2,
        "y": [0.4, 0.1],
    })


def gaussian_inpaint(h: int = 3, w: int = 3) -> AnalyticSpec:
    """A single-Gaussian h x w image with a smooth prior; every other pixel observed."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    cov = 0.5 * np.exp(-((pts[:, None] - pts[None]) ** 2).sum(-1) / 2.0) + 0.05 * np.eye(h * w)
    obs = np.arange(0, h * w, 2)
    a = np.zeros((len(obs), h * w))
    a[np.arange(len(obs)), obs] = 1.0
    mean = np.linspace(-0.5, 0.5, h * w)
    y = a @ (mean + 0.3) + 0.05
    return AnalyticSpec.from_dict({
        "prior": {"weights": [1.0], "means": [mean.tolist()], "covs": [cov.tolist()]},
        "operator": {"matrix": a.tolist()}, "noise_std": 0.1, "y": y.tolist(), "shape": [1, h, w],
    })
