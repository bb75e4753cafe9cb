"""``ScoreModule``: denoising score matching for a conditional eps-network (Ho et al. 2020; Song et al. 2021).

The module owns a ``ScoreModel`` (network + operator + schedule), which is the callable the samplers,
MLMC and Picard use: ``model(x_t, y, t) -> eps_hat``, the same call as the exact analytic
``ExactPosteriorEps``. Training draws t ~ U[t_min, 1], eps ~ N(0, I), x_t = m(t) x_0 + sigma(t) eps and
regresses eps (per-sample mean squared error, reduced here).

EMA weights come from an EMA callback (the configs use ``callbacks.FusedEMA``, Lightning's
``EMAWeightAveraging`` with one fused update per step): it
swaps the averaged weights in for validation, copies them into the module at the end of training, and
writes them as the checkpoint's ``state_dict`` (the raw weights and the averaging state ride along, so a
resume continues both). Sampling, export and ``load_score_module`` therefore all see the EMA weights.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from typing import Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_mlmc.errors import InputError
from lightning_mlmc.networks import MLPEps, unet_eps, unet_for
from lightning_mlmc.operators import Operator, operator_from_config
from lightning_mlmc.schedule import VPSchedule

EXPORT_CONFIG = "lightning_mlmc.json"


class ScoreModel(nn.Module):
    """eps_theta(x_t, y, t): a network fed with x_t, the operator's conditioning of y, and t.

    Call: ``model(x_t, y, t)`` with x_t (B, *shape), y (B or 1, *observation_shape), t (B,) in [0, 1];
    returns eps_hat of x_t's shape and dtype (the network runs in its own dtype).
    """

    def __init__(self, network: nn.Module, operator: Operator, schedule: VPSchedule | None = None):
        super().__init__()
        self.network = network
        self.operator = operator
        self.schedule = schedule or VPSchedule()
        self.kind = "mlp" if isinstance(network, MLPEps) else "unet"

    def forward(self, x_t: Tensor, y: Tensor, t: Tensor) -> Tensor:
        param = next(self.network.parameters())
        batch = x_t.shape[0]
        if y.shape[0] not in (1, batch):
            raise InputError(f"y: expected a leading batch dimension of 1 or {batch}, got {y.shape[0]}")
        y = y.to(device=param.device, dtype=param.dtype).expand(batch, *y.shape[1:])
        cond = self.operator.condition(y)
        x = x_t.to(device=param.device, dtype=param.dtype)
        t = torch.as_tensor(t, device=param.device, dtype=param.dtype).reshape(-1).expand(batch)
        if self.kind == "mlp":
            eps = self.network(x, cond, t)
        else:
            eps = unet_eps(self.network, x, cond, t)
        return eps.to(device=x_t.device, dtype=x_t.dtype)

    def export(self, folder: str, extra: dict | None = None) -> None:
        """Write a diffusers model folder (config.json + safetensors) plus the operator/schedule JSON
        (``extra``: more JSON keys for it, e.g. a distilled student's teacher)."""
        os.makedirs(folder, exist_ok=True)
        self.network.save_pretrained(folder, safe_serialization=True)
        meta = {
            "format": 1,
            "network": self.kind,
            "operator": self.operator.config(),
            "schedule": {"beta_min": self.schedule.beta_min, "beta_max": self.schedule.beta_max},
            **(extra or {}),
        }
        with open(os.path.join(folder, EXPORT_CONFIG), "w") as f:
            json.dump(meta, f, indent=1)


def load_exported(folder: str) -> ScoreModel:
    """Load a folder written by ``ScoreModel.export`` / ``ScoreModule.export``."""
    from diffusers import UNet2DModel

    meta_path = os.path.join(folder, EXPORT_CONFIG)
    if not os.path.isfile(meta_path):
        raise InputError(f"checkpoint: {folder!r} is not an exported lightning-mlmc model ({EXPORT_CONFIG} missing) "
                         "nor a diffusers DDPM folder (model_index.json, or a UNet2DModel config.json with a "
                         "scheduler_config.json beside it)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        cls = MLPEps if meta["network"] == "mlp" else UNet2DModel
        network = cls.from_pretrained(folder, low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"checkpoint: cannot load the exported model in {folder!r}: {e}") from None
    return ScoreModel(network.eval(), operator_from_config(meta["operator"]), VPSchedule(**meta["schedule"]))


def build_network(op: Operator, network: str = "unet", channels=(32, 64), layers_per_block: int = 1,
                  attention: bool = True, mlp_hidden: int = 256, mlp_layers: int = 3) -> nn.Module:
    """The eps-network of ``ScoreModule`` (and of a distilled student) for the operator's problem."""
    if network == "unet":
        if len(op.shape) != 3:
            raise InputError(f"model.network: the UNet needs image data (C, H, W), got shape {list(op.shape)}; "
                             "use network: mlp for vector problems")
        return unet_for(op.shape, op.cond_channels, channels, layers_per_block, attention)
    if network == "mlp":
        cond_dim = int(torch.Size(op.observation_shape).numel()) if len(op.shape) == 1 else \
            op.cond_channels * int(torch.Size(op.shape[1:]).numel())
        return MLPEps(int(torch.Size(op.shape).numel()), cond_dim, mlp_hidden, mlp_layers)
    raise InputError(f"model.network: expected unet or mlp, got {network!r}")


def diffuse(x0: Tensor, schedule: VPSchedule, t_min: float,
            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The training draw of denoising score matching: t ~ U[t_min, 1], eps ~ N(0, I),
    x_t = m(t) x0 + sigma(t) eps. Returns (x_t of x0's shape, t (B,) float64, eps)."""
    batch = x0.shape[0]
    kw = {"generator": generator, "device": x0.device if generator is None else generator.device}
    u = torch.rand(batch, dtype=torch.float64, **kw)
    t = t_min + (1.0 - t_min) * u
    eps = torch.randn(x0.shape, dtype=x0.dtype, **kw).to(x0.device)
    t = t.to(x0.device)
    view = (batch,) + (1,) * (x0.dim() - 1)
    m = schedule.mean(t).to(x0.dtype).reshape(view)
    s = schedule.sigma(t).to(x0.dtype).reshape(view)
    return m * x0 + s * eps, t, eps


class ScoreModule(pl.LightningModule):
    """Denoising score matching for s_theta(x_t, y, t) = -eps_theta / sigma(t).

    Args:
        operator: the inverse problem's operator config (``Operator.config()``); LightningCLI links it
            from the datamodule, so configs do not repeat it.
        network: ``"unet"`` (diffusers UNet2DModel, images) or ``"mlp"`` (vector problems).
        channels, layers_per_block, attention: UNet widths per resolution, ResNet layers per block,
            self-attention at the lowest resolution.
        mlp_hidden, mlp_layers: MLP width and residual blocks.
        lr, weight_decay, warmup_steps: AdamW with a linear warm-up to ``lr``, then constant.
        t_min: smallest training time (the sampler's smallest evaluated t is 1/steps).
        beta_min, beta_max: the VP schedule.
    """

    def __init__(
        self,
        operator: dict | None = None,
        network: Literal["unet", "mlp"] = "unet",
        channels: list[int] = [32, 64],  # noqa: B006 - jsonargparse-visible default
        layers_per_block: int = 1,
        attention: bool = True,
        mlp_hidden: int = 256,
        mlp_layers: int = 3,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        t_min: float = 1e-3,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
    ):
        super().__init__()
        if operator is None:
            raise InputError("model.operator: missing; pass the operator config (LightningCLI links it from data)")
        if not 0 < t_min < 1:
            raise InputError(f"model.t_min: expected a number in (0, 1), got {t_min}")
        if not lr > 0:
            raise InputError(f"model.lr: expected > 0, got {lr}")
        if warmup_steps < 0:
            raise InputError(f"model.warmup_steps: expected >= 0, got {warmup_steps}")
        self.save_hyperparameters()
        op = operator_from_config(operator)
        net = build_network(op, network, channels, layers_per_block, attention, mlp_hidden, mlp_layers)
        self.model = ScoreModel(net, op, VPSchedule(beta_min, beta_max))

    @property
    def operator(self) -> Operator:
        return self.model.operator

    @property
    def schedule(self) -> VPSchedule:
        return self.model.schedule

    @override
    def forward(self, x_t: Tensor, y: Tensor, t: Tensor) -> Tensor:
        return self.model(x_t, y, t)

    # -- training ----------------------------------------------------------------------------------
    def dsm_loss(self, x0: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample denoising score-matching loss E|eps_theta(x_t, y, t) - eps|^2, shape (B,)."""
        x_t, t, eps = diffuse(x0, self.schedule, self.hparams.t_min, generator)
        return (self.model(x_t, y, t) - eps).pow(2).flatten(1).mean(1)

    def losses(self, x0: Tensor, y: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-sample losses (B,) by name; ``"loss"`` is the one minimised (the others are logged)."""
        return {"loss": self.dsm_loss(x0, y, generator)}

    def _common_step(self, batch, batch_idx: int, stage: str) -> Tensor:
        x0, y = batch
        # Validation/test noise is fixed by the batch index, so the loss is comparable across epochs.
        generator = None if stage == "train" else torch.Generator().manual_seed(10_007 * batch_idx + 1)
        losses = {name: value.mean() for name, value in self.losses(x0, y, generator).items()}
        for name, value in losses.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", on_step=stage == "train", on_epoch=True,
                     sync_dist=stage != "train", batch_size=x0.shape[0])
        return losses["loss"]

    @override
    def training_step(self, batch, batch_idx):
        return self._common_step(batch, batch_idx, "train")

    @override
    def validation_step(self, batch, batch_idx):
        return self._common_step(batch, batch_idx, "val")

    @override
    def test_step(self, batch, batch_idx):
        return self._common_step(batch, batch_idx, "test")

    @override
    def predict_step(self, batch, batch_idx):
        """Posterior mean by one 100-step DDIM sample per observation (use the CLI for real UQ)."""
        from lightning_mlmc.sampling import NoiseSource, sample

        x0, y = batch
        noise = NoiseSource(batch_idx, tuple(x0.shape), dtype=x0.dtype, device=x0.device)
        return sample(self.model, y, noise, steps=100, sampler="ddim").samples

    @override
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- export ------------------------------------------------------------------------------------
    def export(self, folder: str) -> None:
        """Write the network as a diffusers folder (safetensors) plus operator/schedule JSON."""
        self.model.export(folder)


def load_score_module(path: str, map_location="cpu", allow_pickle: bool = False) -> ScoreModule:
    """Load a ``ScoreModule`` from a Lightning checkpoint (EMA weights), with ``weights_only=True``.

    A checkpoint that holds arbitrary Python objects (unpickling it can run code) is refused unless
    ``allow_pickle=True`` (CLI: ``--allow-pickle``), which loads it with a warning. Exported folders
    (safetensors) never need it.
    """
    if not os.path.isfile(path):
        raise InputError(f"checkpoint: no such file {path!r}")
    if not zipfile.is_zipfile(path):
        raise InputError(f"checkpoint: cannot read {path!r}: not a PyTorch checkpoint (torch.save zip archive)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "arbitrary Python objects"
            raise InputError(f"checkpoint: {path!r} holds Python objects that weights_only loading refuses "
                             f"({first[:120]}); pass --allow-pickle (allow_pickle=True) only if you trust "
                             "its source") from None
        warnings.warn(f"{path}: loading with weights_only=False (allow_pickle): unpickling can run code",
                      stacklevel=2)
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any failure means an unreadable file
            raise InputError(f"checkpoint: cannot read {path!r}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise InputError(f"checkpoint: cannot read {path!r} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise InputError(f"checkpoint: {path!r} is not a lightning-mlmc ScoreModule checkpoint")
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    module = ScoreModule(**hparams)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise InputError(f"checkpoint: {path!r} does not match its own hyper-parameters: "
                         f"{str(e).splitlines()[0]}") from None
    return module.eval()


def load_score_model(path: str, allow_pickle: bool = False, noise_std: float | None = None):
    """A ``ScoreModel`` from a Lightning checkpoint file or an exported diffusers folder; or, for a diffusers
    DDPM folder (``DDPMPipeline.save_pretrained``), a ``pretrained.PretrainedEps`` for denoising with
    observation noise ``noise_std``."""
    if os.path.isdir(path):
        from lightning_mlmc.pretrained import find_layout, load_pretrained

        if not os.path.isfile(os.path.join(path, EXPORT_CONFIG)) and find_layout(path) is not None:
            return load_pretrained(path, noise_std=noise_std)
        return load_exported(path)
    return load_score_module(path, allow_pickle=allow_pickle).model
