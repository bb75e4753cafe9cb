"""lightning-mlmc: Bayesian inverse problems with diffusion models, MLMC and Picard-parallel UQ."""

from lightning_mlmc.diffusion import (
    StepCoefficients,
    advance,
    eps_to_score,
    eps_to_x0,
    score_to_eps,
    step_coefficients,
    step_increment,
    x0_to_eps,
)
from lightning_mlmc.errors import InputError, NumericalError, WeakConvergenceFailure
from lightning_mlmc.problems import AnalyticSpec, ExactPosteriorEps, GaussianMixture, exact_posterior
from lightning_mlmc.samplers import SAMPLERS, PicardOptions, SamplerSpec, get_sampler
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
    sample_dpm2m,
)
from lightning_mlmc.schedule import TimeGrid, VPSchedule, uniform_grid

# Training pieces import Lightning and diffusers; load them (and MLMC, Picard) on first use so the
# sampling CLI starts fast.
_LAZY = {
    "MLMCConfig": "lightning_mlmc.mlmc",
    "CoupledLevelSampler": "lightning_mlmc.mlmc",
    "UserLevels": "lightning_mlmc.mlmc",
    "coarse_noise_weights": "lightning_mlmc.mlmc",
    "mlmc": "lightning_mlmc.mlmc",
    "mlmc_test": "lightning_mlmc.mlmc",
    "run_mlmc": "lightning_mlmc.mlmc",
    "picard_sample": "lightning_mlmc.picard",
    "ScoreModule": "lightning_mlmc.module",
    "ScoreModel": "lightning_mlmc.module",
    "load_score_module": "lightning_mlmc.module",
    "load_score_model": "lightning_mlmc.module",
    "load_exported": "lightning_mlmc.module",
    "DistillModule": "lightning_mlmc.distill",
    "flops_per_row": "lightning_mlmc.distill",
    "MLPEps": "lightning_mlmc.networks",
    "unet_for": "lightning_mlmc.networks",
    "Operator": "lightning_mlmc.operators",
    "SuperResolution": "lightning_mlmc.operators",
    "Denoising": "lightning_mlmc.operators",
    "Inpainting": "lightning_mlmc.operators",
    "DenseMatrix": "lightning_mlmc.operators",
    "operator_from_config": "lightning_mlmc.operators",
    "posterior_summary": "lightning_mlmc.posterior",
    "PretrainedEps": "lightning_mlmc.pretrained",
    "load_pretrained": "lightning_mlmc.pretrained",
    "MLMCPosterior": "lightning_mlmc.deepinv_bridge",
    "operator_from_physics": "lightning_mlmc.deepinv_bridge",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_mlmc' has no attribute {name!r}")

__all__ = [*_LAZY,
    "AnalyticSpec",
    "ExactPosteriorEps",
    "GaussianMixture",
    "InputError",
    "NoiseSource",
    "NumericalError",
    "PicardOptions",
    "SAMPLERS",
    "SampleOutput",
    "SamplerSpec",
    "StartDistribution",
    "StepCoefficients",
    "TimeGrid",
    "VPSchedule",
    "WeakConvergenceFailure",
    "advance",
    "eps_to_score",
    "eps_to_x0",
    "exact_posterior",
    "gaussian_start",
    "get_sampler",
    "masked_start",
    "observation_start",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm2m",
    "score_to_eps",
    "step_coefficients",
    "step_increment",
    "uniform_grid",
    "x0_to_eps",
]
