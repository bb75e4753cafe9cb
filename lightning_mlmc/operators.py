"""Forward operators of the inverse problems: y = A(x) + noise_std * eta (DESIGN.md section 3).

Every operator knows the shape of its images, draws observations with an injected generator, and maps
an observation to *conditioning channels* of the image's size, which the score network takes next to
x_t. Observations and conditioning are batched: x has shape (B, *shape).

=================  ==========================  =====================================================
operator           A(x)                        conditioning channels (per image channel)
=================  ==========================  =====================================================
SuperResolution    average pooling by factor   y upsampled to the image size (nearest or bicubic)
Denoising          identity                    y
Inpainting         x on the observed pixels    y (zero where missing) and the 0/1 observed mask
DenseMatrix        x_flat @ matrix.T           y itself for vector problems, A^T y for images
=================  ==========================  =====================================================

An operator round-trips through ``config()`` / ``operator_from_config`` (plain JSON types), which is how
checkpoints and exported model folders store it.
"""

from __future__ import annotations

import abc
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mlmc.errors import InputError


def _shape(shape: Sequence[int], field: str = "shape") -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"{field}: expected a list of positive integers, got {shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"{field}: expected a list of positive integers, got {list(shape)}")
    return shape


def _noise_std(value: float) -> float:
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise InputError(f"noise_std: expected a finite number >= 0, got {value}")
    return value


class Operator(abc.ABC):
    """Base class: a linear operator with Gaussian observation noise on images of ``shape``."""

    name: str = ""

    def __init__(self, shape: Sequence[int], noise_std: float):
        self.shape = _shape(shape)
        self.noise_std = _noise_std(noise_std)

    # -- each operator defines ---------------------------------------------------------------------
    @abc.abstractmethod
    def apply(self, x: Tensor) -> Tensor:
        """A(x) for x of shape (B, *shape); returns (B, *observation_shape)."""

    @abc.abstractmethod
    def condition(self, y: Tensor) -> Tensor:
        """Conditioning channels (B, cond_channels, H, W) (or (B, m) for vector problems)."""

    @property
    @abc.abstractmethod
    def observation_shape(self) -> tuple[int, ...]:
        """Shape of one observation y."""

    @property
    @abc.abstractmethod
    def cond_channels(self) -> int:
        """Number of conditioning channels (entries for vector problems)."""

    def _params(self) -> dict:
        return {}

    # -- shared ----------------------------------------------------------------------------------
    def observe(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """y = A(x) + noise_std * eta with eta ~ N(0, I) from ``generator`` (global RNG if None)."""
        self.check_input(x)
        ax = self.apply(x)
        if self.noise_std == 0:
            return ax
        eta = torch.randn(ax.shape, generator=generator, dtype=ax.dtype, device="cpu" if generator is None
                          else generator.device).to(ax.device)
        return ax + self.noise_std * eta * self.observed_mask_of(ax)

    def observed_mask_of(self, ax: Tensor) -> Tensor | float:
        """Where observation noise applies (all of y except for inpainting's missing pixels)."""
        return 1.0

    def check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise InputError(
                f"shape: the {self.name} operator is configured for images of shape {list(self.shape)}, "
                f"got data of shape {list(x.shape[1:])}"
            )

    def check_observation(self, y: Tensor) -> None:
        if tuple(y.shape[1:]) != self.observation_shape:
            raise InputError(
                f"y: the {self.name} operator expects observations of shape {list(self.observation_shape)}, "
                f"got {list(y.shape[1:])}"
            )

    def config(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "noise_std": self.noise_std, **self._params()}

    def __repr__(self) -> str:
        hidden = ("name", "matrix", "mask", "observed_mask")
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k not in hidden)
        return f"{type(self).__name__}({args})"


class SuperResolution(Operator):
    """A = average pooling by ``factor``; conditioning = y upsampled back to the image size."""

    name = "superres"

    def __init__(self, shape: Sequence[int], factor: int = 2, noise_std: float = 0.0,
                 upsample: Literal["nearest", "bicubic"] = "nearest"):
        super().__init__(shape, noise_std)
        if int(factor) < 1:
            raise InputError(f"factor: expected an integer >= 1, got {factor}")
        self.factor = int(factor)
        if len(self.shape) != 3:
            raise InputError(f"shape: super-resolution needs images (C, H, W), got {list(self.shape)}")
        _, h, w = self.shape
        if h % self.factor or w % self.factor:
            raise InputError(f"factor: {self.factor} does not divide the image size {h}x{w}")
        if upsample not in ("nearest", "bicubic"):
            raise InputError(f"upsample: expected nearest or bicubic, got {upsample!r}")
        self.upsample = upsample

    def apply(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.factor)

    @property
    def observation_shape(self):
        c, h, w = self.shape
        return (c, h // self.factor, w // self.factor)

    @property
    def cond_channels(self) -> int:
        return self.shape[0]

    def condition(self, y: Tensor) -> Tensor:
        self.check_observation(y)
        return upsample(y, self.factor, self.upsample)

    def _params(self):
        return {"factor": self.factor, "upsample": self.upsample}


def upsample(y: Tensor, factor: int, mode: Literal["nearest", "bicubic"] = "bicubic") -> Tensor:
    """Upsample (B, C, h, w) by ``factor`` (bicubic: align_corners=False, as in PIL/torchvision)."""
    if mode == "nearest":
        return F.interpolate(y, scale_factor=factor, mode="nearest")
    return F.interpolate(y, scale_factor=factor, mode="bicubic", align_corners=False)


class Denoising(Operator):
    """A = identity; conditioning = y."""

    name = "denoise"

    def __init__(self, shape: Sequence[int], noise_std: float = 0.2):
        super().__init__(shape, noise_std)
        if self.noise_std == 0:
            raise InputError("noise_std: denoising needs noise_std > 0")

    def apply(self, x: Tensor) -> Tensor:
        return x

    @property
    def observation_shape(self):
        return self.shape

    @property
    def cond_channels(self) -> int:
        return self.shape[0]

    def condition(self, y: Tensor) -> Tensor:
        self.check_observation(y)
        return y


class Inpainting(Operator):
    """A = restriction to the observed pixels, kept in image shape (zeros where missing).

    The mask is either a box of missing pixels (``box = [top, left, height, width]``), a fixed random
    set of missing pixels (``missing_fraction`` of them, drawn once from ``mask_seed``), or ``given`` as an
    H x W array of 0 (missing) and 1 (observed) in ``observed_mask``; shared by all channels.
    Conditioning = [y, mask] (C + 1 channels).
    """

    name = "inpaint"

    def __init__(self, shape: Sequence[int], mask: Literal["box", "random", "given"] = "box",
                 box: Sequence[int] | None = None, missing_fraction: float = 0.5, mask_seed: int = 0,
                 noise_std: float = 0.0, observed_mask=None):
        super().__init__(shape, noise_std)
        if len(self.shape) != 3:
            raise InputError(f"shape: inpainting needs images (C, H, W), got {list(self.shape)}")
        _, h, w = self.shape
        observed = torch.ones(h, w, dtype=torch.float32)
        if mask == "box":
            box = list(box) if box is not None else [h // 4, w // 4, h // 2, w // 2]
            if len(box) != 4 or min(box) < 0 or box[2] < 1 or box[3] < 1 or box[0] + box[2] > h or box[1] + box[3] > w:
                raise InputError(f"box: expected [top, left, height, width] inside a {h}x{w} image, got {box}")
            top, left, bh, bw = (int(v) for v in box)
            observed[top:top + bh, left:left + bw] = 0.0
            self.box = [top, left, bh, bw]
        elif mask == "random":
            if not 0.0 < float(missing_fraction) < 1.0:
                raise InputError(f"missing_fraction: expected a number in (0, 1), got {missing_fraction}")
            g = torch.Generator().manual_seed(int(mask_seed))
            missing = torch.randperm(h * w, generator=g)[: max(1, round(float(missing_fraction) * h * w))]
            observed.view(-1)[missing] = 0.0
            self.box = None
        elif mask == "given":
            given = torch.as_tensor(np.asarray(observed_mask if observed_mask is not None else [], dtype=np.float32))
            if tuple(given.shape) != (h, w) or not bool(((given == 0) | (given == 1)).all()):
                raise InputError(f"observed_mask: expected a {h}x{w} array of 0 (missing) and 1 (observed), "
                                 f"got shape {list(given.shape)}")
            observed, self.box = given.clone(), None
        else:
            raise InputError(f"mask: expected box, random or given, got {mask!r}")
        self.mask_kind, self.missing_fraction, self.mask_seed = mask, float(missing_fraction), int(mask_seed)
        self.observed = observed  # (H, W), 1 = observed

    def mask_like(self, x: Tensor) -> Tensor:
        return self.observed.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 1, *self.shape[1:])

    def apply(self, x: Tensor) -> Tensor:
        return x * self.mask_like(x)

    def observed_mask_of(self, ax: Tensor) -> Tensor:
        return self.mask_like(ax)

    @property
    def observation_shape(self):
        return self.shape

    @property
    def cond_channels(self) -> int:
        return self.shape[0] + 1

    def condition(self, y: Tensor) -> Tensor:
        self.check_observation(y)
        return torch.cat([y, self.mask_like(y)], dim=1)

    def _params(self):
        params = {"mask": self.mask_kind, "box": self.box, "missing_fraction": self.missing_fraction,
                  "mask_seed": self.mask_seed}
        if self.mask_kind == "given":
            params["observed_mask"] = self.observed.tolist()
        return params


class DenseMatrix(Operator):
    """A = a dense (m x n) matrix on the flattened image (the analytic problems' operator)."""

    name = "matrix"

    def __init__(self, shape: Sequence[int], matrix, noise_std: float = 0.1):
        super().__init__(shape, noise_std)
        self.matrix = torch.as_tensor(np.asarray(matrix, dtype=np.float64))
        n = int(np.prod(self.shape))
        if self.matrix.ndim != 2 or self.matrix.shape[1] != n:
            raise InputError(f"matrix: expected shape (m, {n}) for images of shape {list(self.shape)}, "
                             f"got {list(self.matrix.shape)}")

    def apply(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1) @ self.matrix.to(x).T

    @property
    def observation_shape(self):
        return (self.matrix.shape[0],)

    @property
    def cond_channels(self) -> int:
        return self.matrix.shape[0] if len(self.shape) == 1 else self.shape[0]

    def condition(self, y: Tensor) -> Tensor:
        self.check_observation(y)
        if len(self.shape) == 1:
            return y
        return (y @ self.matrix.to(y)).reshape(y.shape[0], *self.shape)

    def _params(self):
        return {"matrix": self.matrix.tolist()}


OPERATORS = {cls.name: cls for cls in (SuperResolution, Denoising, Inpainting, DenseMatrix)}


def operator_from_config(config: dict) -> Operator:
    """Rebuild an operator from ``Operator.config()``."""
    if not isinstance(config, dict) or "name" not in config:
        raise InputError(f"operator: expected a dict with a 'name' ({', '.join(OPERATORS)}), got {config!r}")
    params = dict(config)
    name = params.pop("name")
    if name not in OPERATORS:
        raise InputError(f"operator: unknown operator {name!r}; expected one of {', '.join(OPERATORS)}")
    if name == "inpaint" and params.get("mask") in ("random", "given"):
        params.pop("box", None)
    try:
        return OPERATORS[name](**params)
    except TypeError as e:
        raise InputError(f"operator: bad parameters for {name!r}: {e}") from None
