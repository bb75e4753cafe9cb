"""Monte Carlo posterior summaries for a batch of observations: samples, pixel-wise mean and std, metrics.

Used by the demo, the benchmarks and the validation callbacks. Every observation gets
``num_samples`` samples from the sequential sampler; all (observation, sample) pairs run in one batch
of ``batch_size`` rows at a time, with a counter-based ``NoiseSource`` per chunk so the result depends
only on ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_mlmc.errors import InputError
from lightning_mlmc.samplers import DEFAULT_SAMPLER, SamplerName
from lightning_mlmc.sampling import NoiseSource, derive_seed, sample
from lightning_mlmc.schedule import TimeGrid


@dataclass
class PosteriorSummary:
    """Posterior samples and pixel-wise moments for N observations.

    Attributes:
        samples: (N, S, *shape).
        mean: (N, *shape) sample mean.
        std: (N, *shape) sample standard deviation (unbiased).
        nfe: network evaluations (per sample path: ``steps``; total = nfe * N * S).
        wall_seconds: wall time.
    """

    samples: Tensor
    mean: Tensor
    std: Tensor
    nfe: int
    wall_seconds: float


@torch.no_grad()
def posterior_summary(model, y: Tensor, shape, *, num_samples: int = 16, steps: int = 100,
                      sampler: SamplerName = DEFAULT_SAMPLER, seed: int = 0, batch_size: int = 1024,
                      grid: TimeGrid | None = None, dtype=torch.float32) -> PosteriorSummary:
    """Draw ``num_samples`` posterior samples for every observation in ``y`` (N, *obs_shape)."""
    if num_samples < 2:
        raise InputError(f"num_samples: need at least 2 samples for a standard deviation, got {num_samples}")
    n_obs = y.shape[0]
    rows_y = y.repeat_interleave(num_samples, dim=0)  # (N * S, *obs_shape)
    out, wall = [], 0.0
    for chunk, start in enumerate(range(0, rows_y.shape[0], batch_size)):
        y_chunk = rows_y[start:start + batch_size]
        noise = NoiseSource(derive_seed(seed, chunk), (y_chunk.shape[0], *shape), dtype=dtype, device=y.device)
        res = sample(model, y_chunk.to(dtype), noise, steps=steps, sampler=sampler, grid=grid)
        out.append(res.samples)
        wall += res.wall_seconds
    samples = torch.cat(out).reshape(n_obs, num_samples, *shape)
    return PosteriorSummary(samples, samples.mean(1), samples.std(1), steps, wall)


def psnr(estimate: Tensor, truth: Tensor, data_range: float = 2.0) -> float:
    """Mean PSNR over images (torchmetrics, explicit data range; [-1, 1] images -> 2)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(estimate.float().clamp(-1, 1), truth.float(), data_range=data_range,
                                         reduction="elementwise_mean", dim=tuple(range(1, truth.dim()))))


def ssim(estimate: Tensor, truth: Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM over images (torchmetrics; a 3x3 window suits 8x8 digits, 7x7 otherwise)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    kernel = 3 if min(truth.shape[-2:]) < 16 else 7
    return float(structural_similarity_index_measure(estimate.float().clamp(-1, 1), truth.float(),
                                                     data_range=data_range, kernel_size=kernel, gaussian_kernel=False))


def coverage(mean: Tensor, std: Tensor, truth: Tensor, k: float) -> float:
    """Fraction of pixels whose truth lies within k posterior standard deviations of the mean."""
    return float(((truth - mean).abs() <= k * std).float().mean())
