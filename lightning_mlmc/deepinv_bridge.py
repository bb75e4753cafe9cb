"""deepinv interoperability: this project's operator from a deepinv ``Physics``, and MLMC as a deepinv-style
posterior sampler returning (mean, var) with the NFEs it used.

deepinv is optional (``pip install lightning-mlmc[deepinv]``) and imported on first use; without it these
functions raise a one-line ``InputError`` naming the extra.

Physics this project represents (each checked: our ``apply`` must equal deepinv's ``physics.A`` on random
probe images, so a mapping that is not exact is refused rather than approximated):

=====================================================  ============================================
deepinv                                                lightning-mlmc
=====================================================  ============================================
``Denoising(GaussianNoise(sigma))``                    ``Denoising(shape, sigma)``
``Inpainting(img_size, mask, noise_model=...)``        ``Inpainting(shape, mask="given")`` (one 0/1 mask
                                                       shared by all channels)
``Downsampling(img_size, filter=box, factor=k, ...)``  ``SuperResolution(shape, k)`` (average pooling: a
                                                       k x k box filter with ``padding="valid"``, or
                                                       ``"circular"`` for k = 2)
=====================================================  ============================================

Gaussian (or zero) noise only; deepinv's named filters (bilinear, bicubic, gaussian, sinc) and bare
decimation (``filter=None``) are not average pooling and are refused.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from lightning_mlmc.errors import InputError
from lightning_mlmc.operators import Denoising, Inpainting, Operator, SuperResolution
from lightning_mlmc.sampling import gaussian_start, masked_start, observation_start

Tensor = torch.Tensor
PROBES = 3  # random images on which our operator must reproduce physics.A


def _deepinv():
    try:
        import deepinv
    except ImportError:
        raise InputError("deepinv: not installed; install the extra: pip install 'lightning-mlmc[deepinv]'") from None
    return deepinv


def noise_std_of(physics) -> float:
    """The standard deviation of a deepinv physics' Gaussian noise model (0 for ``ZeroNoise``)."""
    noise = _deepinv().physics.noise
    model = getattr(physics, "noise_model", None)
    if model is None or isinstance(model, noise.ZeroNoise):
        return 0.0
    if type(model) is not noise.GaussianNoise:
        raise InputError(f"physics.noise_model: {type(model).__name__} is not supported; expected GaussianNoise "
                         "(or ZeroNoise)")
    sigma = torch.as_tensor(model.sigma, dtype=torch.float64).reshape(-1)
    if sigma.numel() == 0 or not torch.all(sigma == sigma[0]) or not math.isfinite(float(sigma[0])):
        raise InputError(f"physics.noise_model.sigma: expected one finite std for the whole batch, "
                         f"got {sigma.tolist()}")
    return float(sigma[0])


def _image_size(physics, img_size, attr: str):
    size = img_size if img_size is not None else getattr(physics, attr, None)
    if size is None:
        raise InputError(f"img_size: the {type(physics).__name__} physics does not know its image size; pass "
                         "img_size=(C, H, W)")
    size = tuple(int(s) for s in size)
    if len(size) != 3:
        raise InputError(f"img_size: expected (C, H, W), got {list(size)}")
    return size


def operator_from_physics(physics, img_size=None) -> Operator:
    """This project's operator for a deepinv ``Physics`` (table in the module docstring).

    Args:
        physics: ``deepinv.physics.Denoising``, ``Inpainting`` or ``Downsampling``.
        img_size: (C, H, W) of the images x; needed when the physics does not fix it (``Denoising``).

    Returns:
        A ``Denoising``, ``Inpainting`` (``mask="given"``) or ``SuperResolution`` whose ``apply`` equals
        ``physics.A`` (checked on random images) and whose ``noise_std`` is the physics' Gaussian std.
    """
    dphys = _deepinv().physics
    std = noise_std_of(physics)
    if isinstance(physics, dphys.Inpainting):
        shape = _image_size(physics, img_size, "img_size")
        mask = getattr(physics, "mask", None)
        if not isinstance(mask, Tensor):
            raise InputError("physics.mask: the Inpainting physics has no mask tensor (set it before converting)")
        mask = mask.detach().to("cpu", torch.float32)
        mask = mask.reshape(-1, *mask.shape[-2:]) if mask.dim() >= 2 else mask
        if mask.shape[-2:] != shape[1:] or not bool(torch.all(mask == mask[:1])):
            raise InputError(f"physics.mask: expected one {shape[1]}x{shape[2]} mask shared by every channel and "
                             f"batch row, got shape {list(physics.mask.shape)}")
        op = Inpainting(shape, mask="given", observed_mask=mask[0].numpy(), noise_std=std)
    elif isinstance(physics, dphys.Denoising):
        shape = _image_size(physics, img_size, "img_size")
        if std == 0:
            raise InputError("physics.noise_model: denoising needs Gaussian noise with sigma > 0")
        op = Denoising(shape, std)
    elif isinstance(physics, dphys.Downsampling) and type(physics) is dphys.Downsampling:
        shape = _image_size(physics, img_size, "imsize")
        if getattr(physics, "filter", None) is None:
            raise InputError("physics.filter: bare decimation (filter=None) is not average pooling; use a k x k box "
                             "filter (torch.ones(1, 1, k, k) / k**2)")
        op = SuperResolution(shape, factor=int(physics.factor), noise_std=std)
    else:
        raise InputError(f"physics: {type(physics).__name__} is not supported; expected deepinv Denoising, "
                         "Inpainting or Downsampling (with Gaussian noise)")
    check_same_forward(op, physics)
    return op


def check_same_forward(op: Operator, physics, probes: int = PROBES, seed: int = 0) -> None:
    """Raise unless ``op.apply(x)`` equals deepinv's ``physics.A(x)`` on random images (float32, to 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((probes, *op.shape), generator=g)
    param = next((b for b in physics.buffers() if b.is_floating_point()), None)
    with torch.no_grad():
        theirs = physics.A(x.to(param.device) if param is not None else x).to("cpu", torch.float32)
    ours = op.apply(x)
    if theirs.shape != ours.shape or not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5):
        detail = (f"shape {list(theirs.shape[1:])} against {list(ours.shape[1:])}" if theirs.shape != ours.shape
                  else f"max difference {float((ours - theirs).abs().max()):.3g}")
        what = "filter" if op.name == "superres" else "A"
        raise InputError(f"physics.{what}: {type(physics).__name__} is not this project's {op.name} operator on "
                         f"random images ({detail}); see lightning_mlmc.deepinv_bridge for what maps")


def same_operator(a: Operator, b: Operator) -> bool:
    """Whether two operators define the same likelihood (kind, shape, noise, factor or observed mask)."""
    if a.name != b.name or a.shape != b.shape or not math.isclose(a.noise_std, b.noise_std, rel_tol=1e-6, abs_tol=1e-9):
        return False
    if a.name == "superres":
        return a.factor == b.factor
    if a.name == "inpaint":
        return bool(torch.equal(a.observed, b.observed))
    return True


class MLMCPosterior:
    """Posterior mean and pixel variance by multilevel Monte Carlo, called like a deepinv diffusion sampler.

    ``mean, var = sampler(y)`` (or ``sampler(y, physics)``) runs Giles' adaptive MLMC (this project's
    ``run_mlmc``) with the ``moments`` payoff [x, x^2] to RMSE ``eps`` and returns E[x | y] and
    Var[x | y] = E[x^2 | y] - E[x | y]^2 (floored at 0), each of y's batch size and the image shape.
    ``.nfe`` holds the network evaluations the last call used (MLMC's NFE count: fine plus coarse steps per
    sample, summed over levels and batch rows) and ``.last_results`` the ``MLMCResult`` of every row.

    Args:
        model: an eps-model ``model(x_t, y, t)``: a ``ScoreModel`` whose operator matches the physics, a
            ``PretrainedEps`` (unconditional: denoising only, from the observation start), or any model that
            takes this project's y for the physics (e.g. ``ExactPosteriorEps`` of a denoising spec).
        physics: the deepinv physics (also accepted per call).
        eps: target RMSE of the estimate (pixel-averaged, of [x, x^2]).
        config: the MLMC scheme and driver settings (``MLMCConfig``; its payoff must be ``moments``).
        start: ``auto`` (observation for an unconditional model, else gaussian), or a start distribution.
        img_size: (C, H, W) of x when the physics does not fix it (default: from y for denoising and
            inpainting, y's size times the factor for downsampling).
        device, dtype: where and in what precision samples are drawn (default: the model's parameters',
            float64 for a model without parameters).
    """

    def __init__(self, model, physics=None, eps: float = 0.05, config=None,
                 start: Literal["auto", "gaussian", "observation", "masked"] = "auto", img_size=None,
                 device=None, dtype=None):
        from lightning_mlmc.mlmc import MLMCConfig

        config = config if config is not None else MLMCConfig(payoff="moments")
        if config.payoff != "moments":
            raise InputError(f"config.payoff: MLMCPosterior estimates mean and variance with payoff 'moments', "
                             f"got {config.payoff!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise InputError(f"eps: expected a positive number, got {eps!r}")
        if start not in ("auto", "gaussian", "observation", "masked"):
            raise InputError(f"start: expected auto, gaussian, observation or masked, got {start!r}")
        self.model, self.physics, self.eps, self.config, self.start = model, physics, float(eps), config, start
        self.img_size = img_size
        param = next((p for p in model.parameters() if p.is_floating_point()), None) \
            if hasattr(model, "parameters") else None
        self.device = torch.device(device) if device is not None else (param.device if param is not None else
                                                                      torch.device("cpu"))
        self.dtype = dtype or (param.dtype if param is not None else torch.float64)
        self.nfe = 0.0
        self.last_results: list = []

    def operator(self, physics, y: Tensor) -> Operator:
        """Our operator for ``physics`` and observations like ``y`` (checked against the model's own)."""
        size = self.img_size
        if size is None:
            factor = getattr(physics, "factor", 1) if isinstance(physics, _deepinv().physics.Downsampling) else 1
            size = (y.shape[1], y.shape[2] * int(factor), y.shape[3] * int(factor)) if y.dim() == 4 else None
        op = operator_from_physics(physics, size)
        own = getattr(self.model, "operator", None)
        if getattr(self.model, "conditional", True) is False:
            if op.name != "denoise":
                raise InputError(f"physics: an unconditional model solves denoising from the observation start, "
                                 f"not {op.name}")
            if tuple(getattr(self.model, "shape", op.shape)) != op.shape:
                raise InputError(f"img_size: the model's images are {list(self.model.shape)}, the physics' "
                                 f"{list(op.shape)}")
        elif isinstance(own, Operator):
            if not same_operator(op, own):
                raise InputError(f"physics: {op!r} does not match the model's operator {own!r}")
            return own  # the model's own conditioning (e.g. its upsampling mode)
        return op

    def _start(self, op: Operator, y_img: Tensor):
        name = self.start
        if name == "auto":
            name = "observation" if getattr(self.model, "conditional", True) is False else "gaussian"
        if name == "gaussian":
            return gaussian_start()
        if name == "observation":
            if op.name != "denoise":
                raise InputError(f"start: 'observation' needs a denoising physics, not {op.name}")
            return observation_start(y_img, op.noise_std)
        if op.name != "inpaint":
            raise InputError(f"start: 'masked' needs an inpainting physics, not {op.name}")
        return masked_start(y_img, op.mask_like(y_img[None])[0].expand(op.shape))

    def __call__(self, y: Tensor, physics=None, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """(posterior mean, posterior variance) for every row of y (B, *observation_shape); row i uses seed + i."""
        from lightning_mlmc.mlmc import run_mlmc

        physics = physics if physics is not None else self.physics
        if physics is None:
            raise InputError("physics: give the deepinv physics to MLMCPosterior or to the call")
        y = torch.as_tensor(y)
        op = self.operator(physics, y)
        if tuple(y.shape[1:]) != tuple(op.observation_shape):
            raise InputError(f"y: expected observations of shape (B, {', '.join(map(str, op.observation_shape))}), "
                             f"got {list(y.shape)}")
        base = self.config.seed if seed is None else int(seed)
        n = int(math.prod(op.shape))
        means, variances, self.last_results, self.nfe = [], [], [], 0.0
        for i in range(y.shape[0]):
            y_i = y[i:i + 1].detach().to("cpu", self.dtype)
            if op.name == "inpaint":  # deepinv keeps noise off the missing pixels too; make sure y is 0 there
                y_i = op.apply(y_i)
            levels = self.config.level_sampler(self.model, y_i.to(self.device), op.shape,
                                               start=self._start(op, y_i[0]), dtype=self.dtype, device=self.device,
                                               seed=base + i)
            result = run_mlmc(self.config, levels, self.eps)
            est = torch.as_tensor(result.estimate, dtype=torch.float64)
            mean, second = est[:n], est[n:]
            means.append(mean.reshape(op.shape))
            variances.append((second - mean**2).clamp_min(0.0).reshape(op.shape))
            self.last_results.append(result)
            self.nfe += float(result.nfe)
        dtype = y.dtype if y.is_floating_point() else None
        return torch.stack(means).to(y.device, dtype), torch.stack(variances).to(y.device, dtype)

    forward = __call__

    @property
    def last_result(self):
        """The ``MLMCResult`` of the last call's last row."""
        return self.last_results[-1] if self.last_results else None
