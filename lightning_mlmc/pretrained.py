"""Bring your own model: a pretrained diffusers DDPM as this project's eps-model ``model(x_t, y, t)``.

Unconditional DDPMs are shared as diffusers folders: ``DDPMPipeline.save_pretrained`` writes ``unet/`` (a
``UNet2DModel``) and ``scheduler/`` (a ``DDPMScheduler`` config); a bare ``UNet2DModel`` folder with a
``scheduler_config.json`` next to its ``config.json`` works too. ``PretrainedEps`` wraps such a network so that
every sampler, MLMC and Picard call it like a trained network of this project, with continuous t in [0, 1].

Time mapping (discrete DDPM -> continuous VP time). The network at integer timestep i was trained on
x = sqrt(abar_i) x_0 + sqrt(1 - abar_i) eps, abar = the scheduler's ``alphas_cumprod``. We give timestep i the
continuous time t_i with gamma(t_i) = abar_i (``VPSchedule.t_from_log_gamma``), which makes one step of our
DDPM sampler between t_i and t_j exactly diffusers' ``DDPMScheduler.step`` from i to j. At any other t the
network gets the fractional timestep tau(t) with log abar(tau) = log gamma(t), log abar piecewise linear in
tau between the integer timesteps, and abar(-1) = 1 (the clean image, DDPM's ``alpha_prod_t_prev`` after its
last step): so t below the first level maps into (-1, 0) instead of being clamped, and the network is always
told the noise level x_t really has. For the linear schedule (beta 1e-4 to 0.02 over 1000 steps, the
discretisation of this project's VP SDE, beta_min 0.1, beta_max 20) t_i is close to (i + 1)/1000:
-log abar_i and -log gamma((i + 1)/1000) differ by the O(beta^2) terms of log(1 - beta) and the discrete
sum of the betas (t_0 = 0.00092, t_999 = 1.0034, |tau(t) - (1000 t - 1)| <= 3.36 timesteps on [0, 1], largest
at t = 1). Every other schedule diffusers defines (scaled_linear, squaredcos_cap_v2, sigmoid, trained_betas) is
mapped the same way; times beyond the model's largest noise level (t > t_{N-1}) are refused.

Prediction types: epsilon (as is); sample (eps = (x - m x0) / sigma); v_prediction, v = m eps - sigma x0,
so eps = sigma x + m v (m^2 + sigma^2 = 1). A learned-variance network's second half of channels is dropped.
The network is unconditional: it ignores y, and sees the observation only through the start distribution
(the observation start for denoising, DESIGN.md section 2).
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_mlmc.diffusion import x0_to_eps
from lightning_mlmc.errors import InputError
from lightning_mlmc.operators import Denoising, Operator
from lightning_mlmc.schedule import VPSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Schedulers that define the training noise by a discrete beta schedule (DDPMScheduler's fields).
BETA_SCHEDULERS = frozenset({
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "KDPM2DiscreteScheduler",
})
MIN_ALPHA_BAR = 1e-30  # a zero-terminal-SNR schedule's last alpha-bar is floored here (log stays finite)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"checkpoint: cannot read {what} {path!r} ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"checkpoint: {what} {path!r} is not a JSON object")
    return data


# ----------------------------------------------------------------------------------------------
# Folder layout.


@dataclass(frozen=True)
class DiffusersLayout:
    """Where a diffusers DDPM keeps its UNet folder and its scheduler config."""

    unet_dir: str
    scheduler_config: str


def find_layout(path: str) -> DiffusersLayout | None:
    """The layout of a diffusers DDPM folder: a pipeline (``model_index.json``) or a bare ``UNet2DModel``
    folder with ``scheduler_config.json`` beside its ``config.json`` (or in ``../scheduler/``); None if
    ``path`` is neither. A pipeline that is not a pixel-space UNet DDPM is a one-line error."""
    if not os.path.isdir(path):
        return None
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        meta = _read_json(index, "pipeline index")
        latent = [k for k in ("vqvae", "vae", "text_encoder") if k in meta]
        if latent:
            raise InputError(f"checkpoint: {path!r} is a {meta.get('_class_name', 'pipeline')} with {latent[0]}; "
                             "only pixel-space unconditional UNet pipelines (DDPMPipeline, DDIMPipeline) are supported")
        unet = meta.get("unet")
        if not (isinstance(unet, list) and len(unet) == 2 and unet[1] == "UNet2DModel"):
            raise InputError(f"checkpoint: model_index.json: unet is {unet!r}; expected a diffusers UNet2DModel")
        if "scheduler" not in meta:
            raise InputError(f"checkpoint: model_index.json in {path!r} names no scheduler")
        return DiffusersLayout(os.path.join(path, "unet"), os.path.join(path, "scheduler", "scheduler_config.json"))
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    for candidate in (os.path.join(path, "scheduler_config.json"),
                      os.path.join(os.path.dirname(os.path.abspath(path)), "scheduler", "scheduler_config.json")):
        if os.path.isfile(candidate):
            return DiffusersLayout(path, candidate)
    return None


# ----------------------------------------------------------------------------------------------
# The discrete schedule and the time mapping.


def scheduler_alphas_cumprod(config: dict) -> tuple[Tensor, str]:
    """(alphas_cumprod as float64, prediction_type) of a scheduler config, as the model was trained with.

    The table comes from diffusers' own ``DDPMScheduler`` (the same float32 values its ``add_noise`` used
    in training). A config that cannot be mapped onto the VP time is a one-line error naming the field.
    """
    from diffusers import DDPMScheduler

    name = config.get("_class_name", "DDPMScheduler")
    if name not in BETA_SCHEDULERS:
        raise InputError(f"scheduler._class_name: {name} does not define a discrete beta schedule, so its noise "
                         "cannot be mapped onto the VP time; expected a DDPM-family scheduler such as DDPMScheduler")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise InputError(f"scheduler.prediction_type: {prediction!r} is not supported; expected one of "
                         f"{', '.join(PREDICTION_TYPES)}")
    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in config.items() if k in accepted}
    try:
        scheduler = DDPMScheduler(**kwargs)
    except NotImplementedError:
        raise InputError(f"scheduler.beta_schedule: {config.get('beta_schedule')!r} is not a schedule diffusers "
                         "defines (linear, scaled_linear, squaredcos_cap_v2, sigmoid or trained_betas)") from None
    except (TypeError, ValueError) as e:
        raise InputError(f"scheduler: cannot build the training schedule from the config ({e})") from None
    table = scheduler.alphas_cumprod.to(torch.float64)
    return table, prediction


class TimestepMap:
    """The fractional DDPM timestep tau(t) whose alpha-bar equals gamma(t) (see the module docstring).

    Args:
        alphas_cumprod: (N,) float64, strictly decreasing in (0, 1].
        schedule: the continuous VP schedule the samplers use.
    """

    def __init__(self, alphas_cumprod: Tensor, schedule: VPSchedule | None = None):
        table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
        if table.numel() < 2 or not torch.isfinite(table).all() or table.max() > 1 or table.min() < 0:
            raise InputError("scheduler.beta_schedule: alpha-bar must be at least two finite values in [0, 1]")
        table = table.clamp_min(MIN_ALPHA_BAR)
        if not torch.all(table[1:] < table[:-1]):
            raise InputError("scheduler.beta_schedule: alpha-bar is not strictly decreasing in the timestep")
        self.schedule = schedule or VPSchedule()
        self.num_timesteps = int(table.numel())
        # Knots: -log alpha-bar at timesteps -1, 0, ..., N-1 (increasing), with alpha-bar(-1) = 1.
        self.neg_log = torch.cat([torch.zeros(1, dtype=torch.float64), -torch.log(table)])
        self._on: dict[str, Tensor] = {}

    def knot_times(self) -> Tensor:
        """t_i with gamma(t_i) = alphas_cumprod[i], i = 0..N-1 (float64)."""
        return self.schedule.t_from_log_gamma(-self.neg_log[1:])

    @property
    def t_max(self) -> float:
        """The continuous time of the largest noise level (timestep N - 1)."""
        return float(self.schedule.t_from_log_gamma(-self.neg_log[-1]))

    def timestep(self, t: Tensor) -> Tensor:
        """tau(t), float64 of t's shape; t beyond the largest noise level is a one-line error."""
        t = torch.as_tensor(t, dtype=torch.float64)
        knots = self._on.setdefault(str(t.device), self.neg_log.to(t.device))
        u = -2.0 * self.schedule.log_mean(t).to(t.device)  # -log gamma(t), increasing in t
        if bool((u > knots[-1] * (1 + 1e-12)).any()):
            raise InputError(f"t: {float(t.max()):.6g} lies beyond the model's largest noise level "
                             f"(timestep {self.num_timesteps - 1}, t = {self.t_max:.6g})")
        k = torch.searchsorted(knots, u.clamp(min=0.0).contiguous()).clamp(1, self.num_timesteps)
        lo, hi = knots[k - 1], knots[k]
        return (k - 2).to(torch.float64) + (u - lo) / (hi - lo)


# ----------------------------------------------------------------------------------------------
# The model.


def _network_place(network: nn.Module, x: Tensor) -> tuple[torch.dtype, torch.device]:
    """dtype and device of the network's first floating tensor (x's, for a network without any)."""
    for tensor in itertools.chain(network.parameters(), network.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return x.dtype, x.device


class PretrainedEps(nn.Module):
    """eps(x_t, y, t) of an unconditional diffusers-style network (``network(sample, timestep).sample``).

    Args:
        network: a diffusers ``UNet2DModel`` (or any module with its call: ``(sample, timestep)`` with a
            float timestep per row, returning an object with ``.sample`` or a tuple).
        alphas_cumprod: the training schedule's alpha-bar table (``scheduler_alphas_cumprod``).
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
        shape: (C, H, W) of the images.
        operator: the inverse problem (a ``Denoising`` operator for the CLI; None when used bare).
        schedule: the continuous VP schedule of the samplers.

    Call: ``model(x_t, y, t)`` with x_t (B, *shape), t (B,) in [0, 1]; y is ignored (unconditional).
    """

    conditional = False

    def __init__(self, network: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon",
                 shape=None, operator: Operator | None = None, schedule: VPSchedule | None = None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.network = network
        self.schedule = schedule or VPSchedule()
        self.timesteps = TimestepMap(alphas_cumprod, self.schedule)
        self.prediction_type = prediction_type
        self.shape = tuple(int(s) for s in (shape if shape is not None else operator.shape))
        self.operator = operator

    @property
    def t_max(self) -> float:
        return self.timesteps.t_max

    def forward(self, x_t: Tensor, y: Tensor | None, t: Tensor) -> Tensor:
        batch = x_t.shape[0]
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).reshape(-1).expand(batch)
        tau = self.timesteps.timestep(t64)
        dtype, device = _network_place(self.network, x_t)
        out = self.network(x_t.to(device=device, dtype=dtype), tau.to(device))
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        channels = x_t.shape[1]
        if out.shape[1] == 2 * channels:  # learned variance: [eps-type output, variance]
            out = out[:, :channels]
        out = out.to(device=x_t.device, dtype=torch.float64)
        x64 = x_t.to(torch.float64)
        view = (batch,) + (1,) * (x_t.dim() - 1)
        m, sigma = self.schedule.mean(t64).reshape(view), self.schedule.sigma(t64).reshape(view)
        if self.prediction_type == "epsilon":
            eps = out
        elif self.prediction_type == "sample":
            eps = x0_to_eps(x64, out, m, sigma)
        else:  # v = m eps - sigma x0 and x = m x0 + sigma eps give eps = sigma x + m v
            eps = sigma * x64 + m * out
        return eps.to(x_t.dtype)


def _check_unet_config(cfg: dict, where: str) -> tuple[int, int, int]:
    """(C, H, W) of a UNet2DModel config, or a one-line error naming the field it cannot take."""
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise InputError(f"checkpoint: {where} holds a {cfg['_class_name']}; expected a diffusers UNet2DModel")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise InputError(f"unet.time_embedding_type: {cfg['time_embedding_type']!r} is not supported; a DDPM UNet "
                         "takes fractional timesteps through the positional embedding")
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        raise InputError("unet.num_class_embeds: class-conditional UNets are not supported (the model must be "
                         "unconditional)")
    size = cfg.get("sample_size")
    size = [size, size] if isinstance(size, int) else size
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise InputError(f"unet.sample_size: expected an integer or [H, W], got {cfg.get('sample_size')!r}")
    c_in, c_out = int(cfg.get("in_channels", 3)), int(cfg.get("out_channels", 3))
    if c_out not in (c_in, 2 * c_in):
        raise InputError(f"unet.out_channels: {c_out} for {c_in} input channels; expected {c_in} "
                         f"(or {2 * c_in} with a learned variance)")
    return c_in, size[0], size[1]


UNCONDITIONAL_OPERATORS = ("denoise",)


def load_pretrained(path: str, operator: str | None = None, noise_std: float | None = None) -> PretrainedEps:
    """Load a diffusers DDPM folder (pipeline or bare UNet2DModel + scheduler config) as a ``PretrainedEps``.

    Args:
        path: the folder.
        operator: the inverse problem; ``denoise`` (with ``noise_std``) is the one an unconditional model
            solves exactly, from the observation start. None: ``denoise`` if ``noise_std`` is given, else no
            operator (the prior model alone, e.g. for ``deepinv_bridge.MLMCPosterior``, which takes the
            operator from the physics).
        noise_std: the observation noise std of ``denoise``.
    """
    from diffusers import UNet2DModel

    if operator is None and noise_std is not None:
        operator = "denoise"
    layout = find_layout(path)
    if layout is None:
        raise InputError(f"checkpoint: {path!r} is not a diffusers DDPM folder (no model_index.json, and no "
                         "UNet2DModel config.json with a scheduler_config.json beside it)")
    if operator is not None and operator not in UNCONDITIONAL_OPERATORS:
        raise InputError(f"operator: {operator!r} with an unconditional model is not supported; it sees y only "
                         "through the observation start, which is exact for denoise (--operator denoise --noise-std S)")
    for needed, what in ((layout.unet_dir, "UNet folder"), (layout.scheduler_config, "scheduler config")):
        if not os.path.exists(needed):
            raise InputError(f"checkpoint: the {what} {needed!r} is missing")
    shape = _check_unet_config(_read_json(os.path.join(layout.unet_dir, "config.json"), "UNet config"), layout.unet_dir)
    table, prediction = scheduler_alphas_cumprod(_read_json(layout.scheduler_config, "scheduler config"))
    op = None
    if operator == "denoise":
        if noise_std is None:
            raise InputError("noise-std: --operator denoise needs the observation noise std (--noise-std S)")
        op = Denoising(shape, noise_std)
    try:
        network = UNet2DModel.from_pretrained(layout.unet_dir, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"checkpoint: cannot load the UNet in {layout.unet_dir!r}: {first[:200]}") from None
    return PretrainedEps(network.eval(), table, prediction, shape, op)
