"""The sampler registry: every reverse-diffusion sampler described once (STYLE.md 16).

A ``SamplerSpec`` says what a sampler is (stochastic or not, network calls per step), builds its steps on a
time grid, and carries the sliding-window Picard defaults measured for it. The sequential sampler
(``sampling.sample``), Picard (``picard_sample``, PIADM), the MLMC levels (sequential and Picard), the Gaussian
oracle, the command line and the callbacks look a sampler up here by name and use its attributes; none of them
compares sampler names.

    ddpm   the exponential integrator of the VP SDE: DDPM's posterior step with Tweedie's x0_hat (Ho et al. 2020)
    ddim   DDIM with eta = 0: the exponential integrator of the probability-flow ODE (Song et al. 2021)
    dpm2m  DPM-Solver++(2M): the second-order multistep solver of the probability-flow ODE (Lu et al. 2022)

The Picard options (window, tolerance, Anderson memory, slide rule) are validated here, once, by
``check_picard_args``: for ``picard_sample``, the MLMC Picard levels and ``MLMCConfig``, the command line and
``PicardCallback``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Literal

import torch

from lightning_mlmc.diffusion import StepCoefficients, advance, step_coefficients
from lightning_mlmc.errors import InputError
from lightning_mlmc.schedule import VPSchedule
from lightning_mlmc.solvers import MultistepCoefficients, dpm2m_coefficients, multistep_advance

Tensor = torch.Tensor
SamplerName = Literal["ddpm", "ddim", "dpm2m"]  # the registry's keys, for typed configs (LightningCLI)
SlideRule = Literal["paradigms", "prefix"]
SLIDE_RULES = ("paradigms", "prefix")
PICARD_PREFIX = "picard-"  # the command line's name of a sampler's Picard form: picard-ddpm, ...


def check_picard_args(window=None, tol=None, anderson=None, slide=None, *, prefix: str = "") -> None:
    """One-line errors for the sliding-window Picard options, each named ``prefix`` + its name (``picard_`` for
    ``MLMCConfig``'s fields). A None is not checked: that option is unset (its default applies, or Picard is off).

    window: an integer p >= 1; tol: a positive number (in units of each step's DDPM noise std); anderson: the
    triangular Anderson memory, an integer >= 0 (0: plain Picard); slide: ``paradigms`` or ``prefix``.
    """
    if window is not None and (isinstance(window, bool) or not isinstance(window, Integral) or window < 1):
        raise InputError(f"{prefix}window: expected an integer >= 1, got {window!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, Real) or not (math.isfinite(tol) and tol > 0)):
        raise InputError(f"{prefix}tol: expected a positive number, got {tol!r}")
    if anderson is not None and (isinstance(anderson, bool) or not isinstance(anderson, Integral) or anderson < 0):
        raise InputError(f"{prefix}anderson: expected a memory >= 0 (0: plain Picard), got {anderson!r}")
    if slide is not None and slide not in SLIDE_RULES:
        raise InputError(f"{prefix}slide: expected one of {', '.join(SLIDE_RULES)}, got {slide!r}")


@dataclass(frozen=True)
class PicardOptions:
    """Sliding-window Picard options (validated): window p, tolerance (a step is accepted when its RMS change is at
    most tol times its DDPM noise std), triangular Anderson memory (0: plain Picard) and slide rule."""

    window: int
    tol: float
    anderson: int
    slide: SlideRule = "paradigms"

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value is None:
                raise InputError(f"{name}: expected a value, got None")
        check_picard_args(self.window, self.tol, self.anderson, self.slide)

    def with_overrides(self, window=None, tol=None, anderson=None, slide=None) -> "PicardOptions":
        """These options with the given ones instead (None keeps this one), validated."""
        given = dict(window=window, tol=tol, anderson=anderson, slide=slide)
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class GridSteps:
    """A sampler's n steps on one grid: what every loop over them needs (sequential, Picard, PIADM, MLMC paths).

    Attributes:
        coef: the exponential integrator's coefficients (``diffusion.StepCoefficients``): each step's times, its
            noise, the DDPM posterior std (Picard's tolerance scale, MLMC's coupling weights); a one-step
            sampler's steps themselves.
        multistep: a multistep sampler's coefficients (its step k also takes x0_hat at x_(k-1)); None otherwise.
    """

    coef: StepCoefficients
    multistep: MultistepCoefficients | None

    def __len__(self) -> int:
        return len(self.coef)

    def advance(self, x: Tensor, eps: Tensor, k: int, xi: Tensor | None = None,
                x0_prev: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x_(k+1) from x_k, the network output ``eps`` at (x_k, t_k) and the step's standard normal draw ``xi``
        (None where the step injects no noise); and x0_hat at x_k, the next step's ``x0_prev`` for a multistep
        sampler (None for a one-step sampler; ``x0_prev`` None at k = 0 is zeros, unused there)."""
        if self.multistep is None:
            return advance(x, eps, self.coef, k, xi), None
        return multistep_advance(x, eps, self.multistep, k, torch.zeros_like(x) if x0_prev is None else x0_prev)


@dataclass(frozen=True)
class SamplerSpec:
    """One reverse-diffusion sampler, described once.

    Attributes:
        name: its registry key (``--sampler NAME``; ``picard-NAME`` is its Picard form on the command line).
        stochastic: whether a step injects noise: MLMC then builds the coarse path's noise from the fine path's,
            otherwise the paths couple through x_T alone; PIADM's corrector is for deterministic samplers.
        calls_per_step: network evaluations per step (n steps cost n times this).
        coefficients: ``(times, schedule) -> StepCoefficients`` on a decreasing grid (see ``GridSteps.coef``).
        multistep_coefficients: ``(times, schedule) -> MultistepCoefficients`` of a multistep sampler, else None.
        picard: the sliding-window Picard defaults measured for it (``picard_sample``, ``sample --sampler
            picard-NAME``, ``PicardCallback``).
        summary: one line for the command line's help.
    """

    name: str
    stochastic: bool
    calls_per_step: int
    coefficients: Callable[[Tensor, VPSchedule | None], StepCoefficients]
    multistep_coefficients: Callable[[Tensor, VPSchedule | None], MultistepCoefficients] | None
    picard: PicardOptions
    summary: str

    @property
    def multistep(self) -> bool:
        return self.multistep_coefficients is not None

    def steps(self, times: Tensor, schedule: VPSchedule | None = None) -> GridSteps:
        """The sampler's steps on the decreasing grid ``times`` (shape (n+1,), last entry 0)."""
        schedule = schedule or VPSchedule()
        multistep = None if self.multistep_coefficients is None else self.multistep_coefficients(times, schedule)
        return GridSteps(self.coefficients(times, schedule), multistep)


def _sde_coefficients(times: Tensor, schedule: VPSchedule | None = None) -> StepCoefficients:
    return step_coefficients(times, True, schedule)


def _ode_coefficients(times: Tensor, schedule: VPSchedule | None = None) -> StepCoefficients:
    return step_coefficients(times, False, schedule)


# Picard defaults: window 16 and tolerance 1e-3, as before the registry. The triangular Anderson memory of each
# sampler is the one with the fewest rounds over benchmarks/picard_anderson.py's configurations (100 and 1000 steps,
# windows 16-256, tol 1e-3-0.1, log-SNR and uniform grids; the two example problems it was first tuned on, five
# held-out exact-score problems and the demo UNet; benchmarks/results/picard_anderson.json, README "Picard"):
# rounds(m) / rounds(plain Picard), geometric mean over configurations, memory 1 / 2 / 3:
#   ddpm  0.82 / 0.80 / 0.80   (held out 0.82 / 0.79 / 0.79; demo UNet 0.69 / 0.60 / 0.57; memory 3 twice beyond the
#                               tolerance bound on the deviation from the sequential sample, memory 2 within it)
#   ddim  0.91 / 0.92 / 0.94   (held out 0.90 / 0.91 / 0.93; memory 1 or 2 costs more rounds than plain Picard in
#                               1 of 170 configurations, memory 3 in 10)
#   dpm2m 0.92 / 0.93 / 0.97   (held out 0.92 / 0.93 / 0.96)
SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("ddpm", stochastic=True, calls_per_step=1, coefficients=_sde_coefficients,
                multistep_coefficients=None, picard=PicardOptions(window=16, tol=1e-3, anderson=2),
                summary="the stochastic exponential integrator (DDPM's posterior step)"),
    SamplerSpec("ddim", stochastic=False, calls_per_step=1, coefficients=_ode_coefficients,
                multistep_coefficients=None, picard=PicardOptions(window=16, tol=1e-3, anderson=1),
                summary="DDIM (eta = 0), the exponential integrator of the probability-flow ODE"),
    SamplerSpec("dpm2m", stochastic=False, calls_per_step=1, coefficients=_ode_coefficients,
                multistep_coefficients=dpm2m_coefficients, picard=PicardOptions(window=16, tol=1e-3, anderson=1),
                summary="DPM-Solver++(2M), the second-order multistep solver of the probability-flow ODE"),
)}
DEFAULT_SAMPLER: SamplerName = "ddpm"


def get_sampler(name) -> SamplerSpec:
    """The registered sampler ``name``; a one-line ``InputError`` naming the registered ones otherwise."""
    spec = SAMPLERS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise InputError(f"sampler: unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return spec


def command_line_samplers() -> list[str]:
    """``lightning-mlmc sample --sampler`` choices: every sampler, then its Picard form (``picard-NAME``)."""
    return [*SAMPLERS, *(PICARD_PREFIX + name for name in SAMPLERS)]
