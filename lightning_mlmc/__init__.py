"""lightning-mlmc: Bayesian inverse problems with diffusion models, MLMC and Picard-parallel UQ."""

from lightning_mlmc.diffusion import (
    StepCoefficients,
    coarse_noise_weights,
    drift_increment,
    eps_to_score,
    eps_to_x0,
    score_to_eps,
    step_coefficients,
    x0_to_eps,
)
from lightning_mlmc.errors import InputError, NumericalError, WeakConvergenceFailure
from lightning_mlmc.problems import AnalyticSpec, ExactPosteriorEps, GaussianMixture, exact_posterior
from lightning_mlmc.sampling import (
    NoiseSource,
    SampleOutput,
    StartDistribution,
    gaussian_start,
    masked_start,
    observation_start,
    sample,
    sample_ddim,
    sample_ddpm,
)
from lightning_mlmc.schedule import TimeGrid, VPSchedule, uniform_grid

__all__ = [
    "AnalyticSpec",
    "ExactPosteriorEps",
    "GaussianMixture",
    "InputError",
    "NoiseSource",
    "NumericalError",
    "SampleOutput",
    "StartDistribution",
    "StepCoefficients",
    "TimeGrid",
    "VPSchedule",
    "WeakConvergenceFailure",
    "coarse_noise_weights",
    "drift_increment",
    "eps_to_score",
    "eps_to_x0",
    "exact_posterior",
    "gaussian_start",
    "masked_start",
    "observation_start",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "score_to_eps",
    "step_coefficients",
    "uniform_grid",
    "x0_to_eps",
]
