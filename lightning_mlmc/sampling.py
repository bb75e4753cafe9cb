"""Sequential reverse-diffusion samplers (every sampler of the registry: DDPM, DDIM, DPM-Solver++(2M)), noise
and starts.

Samplers are plain functions: ``sample(model, y, noise, steps=..., sampler=...)``, the sampler looked up in
``lightning_mlmc.samplers``. The model is any eps-predictor called as ``model(x_t, y, t)`` (a trained network or
``ExactPosteriorEps``). Randomness is injected through a ``NoiseSource``: every random tensor (the start draw and
each step's xi) comes from its own generator keyed by (seed, stream, index), so Picard and MLMC can ask for the
same noise in any order and get identical values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from lightning_mlmc.errors import InputError, NumericalError
from lightning_mlmc.samplers import DEFAULT_SAMPLER, SamplerName, get_sampler
from lightning_mlmc.schedule import TimeGrid, VPSchedule

Tensor = torch.Tensor
Model = Callable[[Tensor, Tensor, Tensor], Tensor]


class Streams:
    """Reserved noise-stream keys and draw indices, so no two uses of a seed ever share draws.

    A ``NoiseSource`` stream is a tuple of integers; draw 0 is the start and draw k + 1 is step k.
    """

    PROBE_BATCH = 2**31  # MLMC: a batch index no estimate uses (probing a level function's payoff size)
    PLAIN_MC = 10_000  # plain Monte Carlo on the MLMC engine: stream (PLAIN_MC + batch,)
    CORRECTOR_DRAW = 10_000_000  # PIADM: the corrector of block b draws from the substream (CORRECTOR_DRAW, b)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


class NoiseSource:
    """Counter-based Gaussian noise: ``start()`` and ``step(k)`` are pure functions of the seed.

    Args:
        seed: base seed.
        shape: (B, *event_shape) of every draw.
        stream: extra integers that select an independent stream (e.g. MLMC level, batch, rank).
        dtype, device: of the returned tensors (drawn on the CPU, so results do not depend on device).
        antithetic: rows come in pairs (i, i + B/2) driven by noise z and -z (``draw``); B must be even.
    """

    def __init__(self, seed: int, shape, stream: tuple[int, ...] = (), dtype=torch.float64, device="cpu",
                 antithetic: bool = False):
        if int(seed) < 0:
            raise InputError(f"seed: expected a non-negative integer, got {seed}")
        self.seed, self.shape, self.stream = int(seed), tuple(shape), tuple(int(s) for s in stream)
        self.dtype, self.device, self.antithetic = dtype, torch.device(device), bool(antithetic)
        if self.antithetic and (not self.shape or self.shape[0] % 2):
            raise InputError(f"antithetic: the rows come in pairs, so their number must be even, got shape {self.shape}")

    @classmethod
    def from_generator(cls, generator: torch.Generator, shape, **kw) -> "NoiseSource":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return cls(seed, shape, **kw)

    def draw(self, index: int) -> Tensor:
        """The standard normal draw number ``index`` of this stream (0 is the start, k + 1 is step k).

        Antithetic: rows B/2.. are the negation of rows ..B/2 (every draw: the start, each step's, and whatever
        Picard or PIADM draw from it), so row i and row i + B/2 are the two paths of an antithetic pair."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, *self.stream, index))
        if self.antithetic:
            z = torch.randn((self.shape[0] // 2, *self.shape[1:]), generator=g, dtype=self.dtype)
            return torch.cat([z, -z]).to(self.device)
        return torch.randn(self.shape, generator=g, dtype=self.dtype).to(self.device)

    def substream(self, *keys: int) -> "NoiseSource":
        """An independent source on the stream extended by ``keys`` (e.g. PIADM's corrector of one block),
        paired as this one is."""
        return NoiseSource(self.seed, self.shape, stream=(*self.stream, *keys), dtype=self.dtype, device=self.device,
                           antithetic=self.antithetic)

    def start(self) -> Tensor:
        """The standard normal draw behind x_T."""
        return self.draw(0)

    def step(self, k: int) -> Tensor:
        """xi_k, the standard normal noise of step k (0-based)."""
        return self.draw(k + 1)


@dataclass(frozen=True)
class StartDistribution:
    """p_T(x | y) = N(mean, diag(std^2)) at time t (the seed's three choices).

    ``gaussian``: t = 1, N(0, I). ``observation`` (denoising): point mass at m(T_y) y with
    sigma(T_y)/m(T_y) = noise_std. ``masked`` (inpainting): y on observed pixels, N(0, I) on missing ones.
    """

    t: float = 1.0
    mean: Tensor | float = 0.0
    std: Tensor | float = 1.0
    name: str = "gaussian"

    def sample(self, z: Tensor) -> Tensor:
        mean = torch.as_tensor(self.mean, dtype=z.dtype, device=z.device)
        std = torch.as_tensor(self.std, dtype=z.dtype, device=z.device)
        return mean + std * z


def gaussian_start() -> StartDistribution:
    return StartDistribution(1.0, 0.0, 1.0, "gaussian")


def observation_start(y_image: Tensor, noise_std: float, schedule: VPSchedule | None = None) -> StartDistribution:
    """Start at T_y where sigma/m = noise_std, from the point mass m(T_y) y (y in image shape)."""
    if not noise_std > 0:
        raise InputError(f"noise_std: the observation start needs noise_std > 0, got {noise_std}")
    schedule = schedule or VPSchedule()
    t_y = float(schedule.t_from_noise_ratio(noise_std))
    if t_y > 1.0:
        raise InputError(f"noise_std: {noise_std} is too large for the observation start (T_y = {t_y:.3f} > 1)")
    return StartDistribution(t_y, float(schedule.mean(t_y)) * y_image, 0.0, "observation")


def masked_start(y_image: Tensor, observed: Tensor) -> StartDistribution:
    """y on the observed pixels (``observed`` is a 0/1 mask in image shape), N(0, 1) on the missing ones."""
    observed = observed.to(y_image.dtype)
    return StartDistribution(1.0, y_image * observed, 1.0 - observed, "masked")


def pair_means(values: Tensor) -> Tensor:
    """The antithetic pair means of rows (i, i + B/2) of ``values`` (shape (B, ...), B even): (B/2, ...)."""
    half = values.shape[0] // 2
    return 0.5 * (values[:half] + values[half:])


def batch_obs(y: Tensor | None, batch: int) -> Tensor | None:
    """Broadcast an observation (leading dim 1 or ``batch``) to ``batch`` rows."""
    if y is None:
        return None
    if y.shape[0] == batch:
        return y
    if y.shape[0] != 1:
        raise InputError(f"y: expected a leading batch dimension of 1 or {batch}, got {y.shape[0]}")
    return y.expand(batch, *y.shape[1:])


def call_model(model: Model, x: Tensor, y: Tensor | None, t) -> Tensor:
    """eps_hat = model(x, y, t) for every row of x: ``t`` is one time (a float or 0-d tensor) or one per row.

    The time vector is float64 on x's device and y is broadcast to the rows (DESIGN.md: every model is
    called as ``model(x_t, y, t)``).
    """
    rows = x.shape[0]
    if torch.is_tensor(t) and t.dim() == 1:
        t_vec = t.to(device=x.device, dtype=torch.float64)
    else:
        t_vec = torch.full((rows,), float(t), dtype=torch.float64, device=x.device)
    return model(x, batch_obs(y, rows), t_vec)


def check_finite(x: Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise NumericalError(f"non-finite values (NaN or Inf) in the sample at {where}; the network may have diverged")


def grid_times(steps: int | None, grid: TimeGrid | None, times: Tensor | None, t_start: float,
               schedule: VPSchedule) -> Tensor:
    """A sampler's grid: ``times`` as given (checked), or ``steps`` steps of the ``grid`` family from t_start."""
    if times is None:
        if steps is None:
            raise InputError("steps: give the number of steps (or the grid itself as times)")
        return (grid or TimeGrid()).times(steps, t_start, schedule)
    if steps is not None and steps != len(times) - 1:
        raise InputError(f"steps: {steps} given with a grid of {len(times) - 1} steps; give one of them")
    times = torch.as_tensor(times, dtype=torch.float64)
    if times.dim() != 1 or len(times) < 2 or not torch.all(times[1:] < times[:-1]) or times[-1] != 0:
        raise InputError("times: expected a decreasing 1-d grid t_0 > ... > t_n = 0 with n >= 1")
    return times


@dataclass
class SampleOutput:
    """Samples and their cost.

    Attributes:
        samples: (B, *event_shape).
        nfe: network evaluations per sample (sequential rounds for the sequential sampler).
        rounds: sequential batched network calls.
        steps: number of grid steps.
        wall_seconds: wall time of the sampling loop.
        stats: sampler-specific extras (Picard residual history etc.).
    """

    samples: Tensor
    nfe: int
    rounds: int
    steps: int
    wall_seconds: float
    stats: dict = field(default_factory=dict)


@torch.no_grad()
def sample(
    model: Model,
    y: Tensor | None,
    noise: NoiseSource | torch.Generator,
    *,
    steps: int | None = None,
    sampler: SamplerName = DEFAULT_SAMPLER,
    shape=None,
    start: StartDistribution | None = None,
    grid: TimeGrid | None = None,
    times: Tensor | None = None,
    schedule: VPSchedule | None = None,
    callback: Callable[[dict], None] | None = None,
) -> SampleOutput:
    """Sequential reverse-diffusion sampler: any sampler of the registry (``lightning_mlmc.samplers``).

    Args:
        model: eps-predictor ``model(x_t, y, t)``.
        y: observation with a leading batch dim of 1 or B (None for an unconditional model).
        noise: a ``NoiseSource`` of shape (B, *event_shape), or a ``torch.Generator`` (then ``shape``).
        steps: number of steps n of the grid (the last one is Tweedie's step to t = 0).
        sampler: ``"ddpm"`` (stochastic, the default), ``"ddim"`` (deterministic) or ``"dpm2m"``
            (DPM-Solver++(2M), deterministic, second order).
        start: start distribution (default N(0, I) at t = 1).
        grid: time-grid family (default uniform).
        times: the grid as data instead of ``steps`` and ``grid``: a decreasing float64 tensor
            t_0 > ... > t_n = 0 (for example PIADM's block grid).
        callback: called after every step with ``{"k", "t", "s", "x"}``.

    Returns:
        ``SampleOutput`` with samples of shape (B, *event_shape), nfe = steps times the sampler's network calls
        per step.
    """
    spec = get_sampler(sampler)
    if isinstance(noise, torch.Generator):
        if shape is None:
            raise InputError("shape: needed when the noise is given as a torch.Generator")
        noise = NoiseSource.from_generator(noise, shape)
    schedule = schedule or VPSchedule()
    start = start or gaussian_start()
    times = grid_times(steps, grid, times, start.t, schedule)
    steps = len(times) - 1
    grid_steps = spec.steps(times, schedule)
    coef = grid_steps.coef
    tic = time.perf_counter()

    # Start draw.
    x = start.sample(noise.start())
    y_b = batch_obs(y, x.shape[0])
    x0_prev = None  # a multistep sampler's x0_hat at the previous point
    # Reverse steps t_k -> t_{k+1}; the last lands on t = 0 (Tweedie, no noise).
    for k in range(steps):
        eps = call_model(model, x, y_b, coef.t[k])
        x, x0_prev = grid_steps.advance(x, eps, k, noise.step(k) if coef.noise[k] > 0 else None, x0_prev)
        check_finite(x, f"step {k} (t = {float(coef.t[k]):.6g} -> {float(coef.s[k]):.6g})")
        if callback is not None:
            callback({"k": k, "t": float(coef.t[k]), "s": float(coef.s[k]), "x": x})
    calls = steps * spec.calls_per_step
    return SampleOutput(x, nfe=calls, rounds=calls, steps=steps, wall_seconds=time.perf_counter() - tic)


def sample_ddpm(model: Model, y, noise, *, steps: int, **kw) -> SampleOutput:
    """DDPM ancestral sampler = the stochastic exponential integrator of the VP SDE (Ho et al. 2020)."""
    return sample(model, y, noise, steps=steps, sampler="ddpm", **kw)


def sample_ddim(model: Model, y, noise, *, steps: int, **kw) -> SampleOutput:
    """DDIM with eta = 0 = the exponential integrator of the probability-flow ODE (Song et al. 2021)."""
    return sample(model, y, noise, steps=steps, sampler="ddim", **kw)


def sample_dpm2m(model: Model, y, noise, *, steps: int | None = None, **kw) -> SampleOutput:
    """DPM-Solver++(2M) (Lu et al. 2022): the second-order multistep solver of the probability-flow ODE
    (``lightning_mlmc.solvers``); x_T is the noise's start draw, as for DDIM."""
    return sample(model, y, noise, steps=steps, sampler="dpm2m", **kw)
