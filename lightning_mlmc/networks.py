"""Score networks: eps-predictors eps_theta(x_t, cond, t) for images (diffusers UNet2DModel) and vectors (MLP).

Both take the noisy sample x_t, the operator's conditioning (``Operator.condition(y)``) and the
continuous diffusion time t in [0, 1] (shape (B,)), and return eps_hat with the shape of x_t.

Time embedding: the UNet is the standard diffusers ``UNet2DModel`` with its sinusoidal positional
time embedding (``flip_sin_to_cos=True, freq_shift=0``); we feed it 1000 t, the DDPM timestep
scale, as a *float*, so the embedding is continuous in t and matches the familiar discrete-time
range. The MLP embeds t with the same sinusoidal features of 1000 t.

Both are diffusers ``ModelMixin``/``ConfigMixin`` models, so ``save_pretrained`` /
``from_pretrained`` (safetensors) work for either.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from lightning_mlmc.errors import InputError

TIME_SCALE = 1000.0


def unet_for(shape: Sequence[int], cond_channels: int, channels: Sequence[int] = (32, 64),
             layers_per_block: int = 1, attention: bool = True, norm_groups: int = 8) -> UNet2DModel:
    """A diffusers UNet2DModel for images of ``shape`` = (C, H, W) with ``cond_channels`` extra inputs.

    ``channels`` are the per-resolution widths; every block but the last halves the resolution, so
    H and W must be divisible by 2^(len(channels) - 1). ``attention`` puts self-attention in the
    lowest-resolution block (down and up).
    """
    c, h, w = (int(s) for s in shape)
    channels = [int(ch) for ch in channels]
    if not channels or any(ch <= 0 or ch % norm_groups for ch in channels):
        raise InputError(f"channels: expected positive multiples of norm_groups={norm_groups}, got {channels}")
    down = 2 ** (len(channels) - 1)
    if h % down or w % down:
        raise InputError(f"channels: {len(channels)} resolutions need H and W divisible by {down}, got {h}x{w}")
    down_types = ["DownBlock2D"] * len(channels)
    up_types = ["UpBlock2D"] * len(channels)
    if attention:
        down_types[-1], up_types[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=(h, w),
        in_channels=c + int(cond_channels),
        out_channels=c,
        block_out_channels=tuple(channels),
        down_block_types=tuple(down_types),
        up_block_types=tuple(up_types),
        layers_per_block=int(layers_per_block),
        norm_num_groups=norm_groups,
        attention_head_dim=min(channels[-1], 32),
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def unet_eps(unet: UNet2DModel, x_t: Tensor, cond: Tensor, t: Tensor) -> Tensor:
    """eps_hat = UNet(concat(x_t, cond), 1000 t)."""
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1).expand(x_t.shape[0])
    return unet(torch.cat([x_t, cond], dim=1), TIME_SCALE * t).sample


class MLPEps(ModelMixin, ConfigMixin):
    """An MLP eps-predictor for vector problems: eps_hat = MLP([x_t, cond, emb(1000 t)]).

    Residual blocks of width ``hidden`` with SiLU and LayerNorm; the time features enter every block.
    """

    @register_to_config
    def __init__(self, dim: int, cond_dim: int, hidden: int = 256, layers: int = 3, time_features: int = 32):
        super().__init__()
        if dim <= 0 or cond_dim < 0 or hidden <= 0 or layers <= 0 or time_features <= 0 or time_features % 2:
            raise InputError(f"mlp: bad sizes dim={dim} cond_dim={cond_dim} hidden={hidden} layers={layers} "
                             f"time_features={time_features} (time_features must be even)")
        self.inp = nn.Linear(dim + cond_dim, hidden)
        self.time = nn.Sequential(nn.Linear(time_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(layers)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_t: Tensor, cond: Tensor, t: Tensor) -> Tensor:
        batch = x_t.shape[0]
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1).expand(batch)
        emb = get_timestep_embedding(TIME_SCALE * t, self.config.time_features, flip_sin_to_cos=True,
                                     downscale_freq_shift=0).to(x_t.dtype)
        h = self.inp(torch.cat([x_t.reshape(batch, -1), cond.reshape(batch, -1)], dim=1))
        temb = self.time(emb)
        for block in self.blocks:
            h = h + block(h + temb)
        return self.out(h).reshape(x_t.shape)
