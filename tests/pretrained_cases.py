"""Bring-your-own-model test cases: a small unconditional diffusers DDPM trained on the digits, and an exact
analytic prior written as a diffusers-style UNet (``forward(sample, timestep) -> .sample``).

The analytic model and the exact posterior do not use ``lightning_mlmc.pretrained``: the model computes its own
alpha-bar at fractional timesteps (numpy interpolation of log alpha-bar, alpha-bar(-1) = 1) and its own
Gaussian-mixture score, so the tests that compare the wrapper against it do not check the wrapper against itself
(``analytic_denoiser`` only puts the wrapper around it).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from lightning_mlmc.operators import Denoising
from lightning_mlmc.pretrained import PretrainedEps, scheduler_alphas_cumprod
from lightning_mlmc.problems import AnalyticSpec

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


# The exact-posterior case: a sharp 4-pixel Gaussian prior (std about 0.055) denoised at noise std 0.05, where the
# posterior depends on the score at small t (so a timestep mapping off by one shows).
PRIOR_MEAN = np.array([0.3, -0.2, 0.1, 0.5])
_L = np.array([[1, .5, 0, 0], [0, 1, .3, 0], [.2, 0, 1, .4], [0, 0, .1, 1.]])
PRIOR_COV = 0.003 * (_L @ _L.T + 0.2 * np.eye(4)) / np.mean(np.diag(_L @ _L.T + 0.2 * np.eye(4)))
NOISE_STD = 0.05  # comparable to the prior std (0.055): the posterior depends on the score at small t
Y = PRIOR_MEAN + np.array([0.06, -0.04, 0.03, 0.01])
ANALYTIC_SHAPE = (1, 2, 2)


def prior_spec() -> AnalyticSpec:
    """The prior as an analytic spec with a zero operator (its "posterior" is the prior): the Gaussian oracle of
    this spec gives the exact law of a sampler chain driven by the exact *prior* score."""
    prior = {"weights": [1.0], "means": [PRIOR_MEAN.tolist()], "covs": [PRIOR_COV.tolist()]}
    return AnalyticSpec.from_dict({"prior": prior, "operator": {"matrix": [[0.0] * 4]}, "noise_std": 1.0, "y": [0.0],
                                   "shape": list(ANALYTIC_SHAPE)})


def exact_denoising_posterior(noise_std=NOISE_STD):
    """Mean and covariance of x | y for y = x + noise_std eta with the Gaussian prior (written out here)."""
    ci = np.linalg.inv(PRIOR_COV)
    cov = np.linalg.inv(ci + np.eye(4) / noise_std**2)
    return cov @ (ci @ PRIOR_MEAN + Y / noise_std**2), cov


def analytic_denoiser(tmp_path, noise_std=NOISE_STD):
    """(PretrainedEps around the exact prior UNet, its network) with a real DDPMScheduler config saved and read."""
    DDPMScheduler(num_train_timesteps=1000).save_config(str(tmp_path))
    cfg = json.load(open(tmp_path / "scheduler_config.json"))
    reference = DDPMScheduler.from_config(cfg).alphas_cumprod.double().numpy()
    net = AnalyticPriorUNet([1.0], [PRIOR_MEAN], [PRIOR_COV], reference)
    table, prediction = scheduler_alphas_cumprod(cfg)
    return PretrainedEps(net, table, prediction, ANALYTIC_SHAPE, Denoising(ANALYTIC_SHAPE, noise_std)), net
