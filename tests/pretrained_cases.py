"""Bring-your-own-model test cases: a small unconditional diffusers DDPM trained on the digits, and an exact
analytic prior written as a diffusers-style UNet (``forward(sample, timestep) -> .sample``).

Nothing here uses ``lightning_mlmc.pretrained``: the analytic model computes its own alpha-bar at fractional
timesteps (numpy interpolation of log alpha-bar, alpha-bar(-1) = 1) and its own Gaussian-mixture score, so the
tests that compare the wrapper against it do not check the wrapper against itself.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

TRAIN_STEPS = 300


def digits(n: int | None = None) -> torch.Tensor:
    """scikit-learn's 8x8 digits in [-1, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x if n is None else x[:n]


def tiny_unet() -> UNet2DModel:
    """A 160 K-parameter UNet2DModel for 8x8 grayscale images (two resolutions, no attention: fast on a CPU)."""
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, add_attention=False)


def train_digits_ddpm(folder: str, steps: int = TRAIN_STEPS, seed: int = 0) -> dict:
    """Train a tiny UNet2DModel unconditionally on the digits (DDPM eps loss, diffusers' own ``add_noise``) and
    save it with ``DDPMPipeline.save_pretrained``; returns the first and last 20-step mean losses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (and shares a busy CPU best)
    try:
        return _train(folder, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(folder: str, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    data = digits()
    unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x0 = data[torch.randint(0, len(data), (64,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (64,), generator=g)
        loss = (unet(scheduler.add_noise(x0, noise, t), t).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(folder)
    return {"first": float(np.mean(losses[:20])), "last": float(np.mean(losses[-20:]))}


_TRAINED: dict[str, object] = {}


def trained_pipeline(tmp_path_factory):
    """The digits DDPM pipeline folder, trained once per test session (shared by the test modules)."""
    if "folder" not in _TRAINED:
        folder = tmp_path_factory.mktemp("ddpm") / "pipeline"
        _TRAINED["losses"] = train_digits_ddpm(str(folder))
        _TRAINED["folder"] = folder
    return _TRAINED["folder"], _TRAINED["losses"]


def alpha_bar_at(timestep: np.ndarray, alphas_cumprod: np.ndarray) -> np.ndarray:
    """alpha-bar at fractional timesteps: log alpha-bar linear between integer timesteps, alpha-bar(-1) = 1."""
    knots = np.arange(-1, len(alphas_cumprod), dtype=np.float64)
    log_ab = np.concatenate([[0.0], np.log(np.asarray(alphas_cumprod, dtype=np.float64))])
    return np.exp(np.interp(np.asarray(timestep, dtype=np.float64), knots, log_ab))


def mixture_eps(x: torch.Tensor, weights, means, covs, ab: torch.Tensor) -> torch.Tensor:
    """eps = -sigma grad log p(x) of the prior mixture diffused to alpha-bar ``ab`` (one value per row).

    x: (B, n) float64; weights (K,), means (K, n), covs (K, n, n); ab (B,).
    """
    m, s2 = ab.sqrt()[:, None, None, None], (1.0 - ab)[:, None, None, None]
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    cov = m**2 * covs[None] + s2 * eye  # (B, K, n, n)
    diff = x[:, None, :] - m[:, :, :, 0] * means[None]  # (B, K, n)
    sol = torch.linalg.solve(cov, diff[..., None])[..., 0]  # Sigma^-1 (x - m mu)
    log_r = torch.log(weights)[None] - 0.5 * (diff * sol).sum(-1) - 0.5 * torch.logdet(cov)
    r = torch.softmax(log_r, dim=1)
    score = -(r[..., None] * sol).sum(1)
    return -s2[:, 0, 0, 0, None].sqrt() * score


class AnalyticPriorUNet(nn.Module):
    """The exact eps of a Gaussian-mixture prior, called like a diffusers ``UNet2DModel``.

    ``forward(sample, timestep)`` with sample (B, *shape) and a (fractional) DDPM timestep per row returns a
    ``UNet2DOutput`` whose ``.sample`` is the exact eps at alpha-bar(timestep) of ``alphas_cumprod``.
    """

    def __init__(self, weights, means, covs, alphas_cumprod):
        super().__init__()
        self.weights = torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        self.means = torch.as_tensor(np.asarray(means), dtype=torch.float64)
        self.covs = torch.as_tensor(np.asarray(covs), dtype=torch.float64)
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.calls = 0

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        self.calls += 1
        batch = sample.shape[0]
        tau = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(batch).cpu().numpy()
        ab = torch.as_tensor(alpha_bar_at(tau, self.alphas_cumprod))
        eps = mixture_eps(sample.reshape(batch, -1).to(torch.float64).cpu(), self.weights, self.means, self.covs, ab)
        eps = eps.reshape(sample.shape).to(sample)
        return UNet2DOutput(sample=eps) if return_dict else (eps,)

