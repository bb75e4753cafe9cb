"""Shared analytic test problems (exact posteriors known)."""

import os


from lightning_mlmc.problems import AnalyticSpec, ExactPosteriorEps, gaussian_inpaint_spec

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
    return gaussian_inpaint_spec(h, w)


class Counting(ExactPosteriorEps):
    """The exact score, counting the calls and rows it is asked for."""

    def __init__(self, spec):
        super().__init__(spec)
        self.calls, self.rows = 0, 0

    def forward(self, x, y, t):
        self.calls += 1
        self.rows += x.shape[0]
        return super().forward(x, y, t)
