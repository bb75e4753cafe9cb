"""One MLMC configuration object for the command line, the validation callback, the driver and the benchmarks.

``MLMCConfig`` holds everything that defines an MLMC run besides the model, the observation and eps; it is
validated once, here, and its defaults are the only ones: the driver, automatic Lmin, the complexity
prediction and the CLI read theirs from it. Running it lives in ``run.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch

from lightning_mlmc.errors import InputError
from lightning_mlmc.mlmc.coupling import Coupling, check_coupling, check_data_std
from lightning_mlmc.mlmc.engine import DEFAULT_ROW_BUDGET
from lightning_mlmc.mlmc.levels import CoupledLevelSampler, check_M
from lightning_mlmc.mlmc.payoffs import PAYOFFS, PayoffName, make_payoff
from lightning_mlmc.mlmc.picard_levels import PICARD_TOL, PicardLevelSampler
from lightning_mlmc.mlmc.state import fingerprint
from lightning_mlmc.samplers import SamplerName, check_picard_args, get_sampler
from lightning_mlmc.sampling import StartDistribution
from lightning_mlmc.schedule import GRID_KINDS, GridKind, TimeGrid

Tensor = torch.Tensor


SCHEMES = {"default": {}, "seed": {"grid": "uniform", "coupling": "weighted", "lmin": 3}}


@dataclass(frozen=True)
class MLMCConfig:
    """An MLMC scheme and the driver's settings (DESIGN.md sections 4 and 6; the CLI's option names).

    Attributes:
        grid, rho: the time-grid family and its warp exponent (None: the family's default).
        coupling, data_std: how the coarse noise is built from the fine noises (``data_std``: the
            ``jacobian`` coupling's data scale).
        sampler: a sampler of the registry (``lightning_mlmc.samplers``): ``ddpm`` (stochastic), ``ddim`` or
            ``dpm2m`` (deterministic; they couple through x_T alone).
        M: refinement factor; lmin: coarsest level or ``"auto"`` (chosen from a coupled pilot run);
        lmax: finest level allowed; n0: pilot samples per level; theta: the bias share of eps^2.
        payoff, clip: f (``second_moment``, ``mean``, ``moments``, or ``mean_std``: the mean and pixel-std maps
        to RMSE eps over both, ``maps.mean_std_maps``) and the clamp of samples before it.
        batch_size: samples per batch (each batch is one noise stream); row_budget: the most rows one network
        call takes (a round advances every batch of every level together); seed: base seed of every stream.
        picard_window, picard_tol: Picard-parallel levels (``picard_levels``): each batch's fine and coarse paths
        solved by sliding-window Picard iteration with this window (None, the default: sequential paths) and
        per-step tolerance (in units of each step's DDPM noise std).
        antithetic: a sample is the mean of an antithetic pair of paths (noise z and -z), N_l counts pairs
        and the cost both paths (the default: on the demo model it cuts the variance per network evaluation
        of every level and of plain MC several-fold; README "Antithetic pairs").
        coarse_checkpoint: a cheaper network (a distilled student, ``lightning-mlmc distill``) for the levels
            below ``switch`` (None: one network); switch: the level between the two networks (teacher minus
            student on one grid; None: just above Lmin, the student taking the plain level).
    """

    grid: GridKind = "logsnr"
    rho: float | None = None
    coupling: Coupling = "naive"
    data_std: float = 0.5
    sampler: SamplerName = "ddpm"
    M: int = 2
    lmin: int | Literal["auto"] = "auto"
    lmax: int = 12
    n0: int = 100
    theta: float = 0.25
    payoff: PayoffName = "second_moment"
    clip: float | None = None
    batch_size: int = 1000
    row_budget: int = DEFAULT_ROW_BUDGET
    seed: int = 0
    picard_window: int | None = None
    picard_tol: float = PICARD_TOL
    antithetic: bool = True
    coarse_checkpoint: str | None = None
    switch: int | None = None

    def __post_init__(self):
        if self.grid not in GRID_KINDS:
            raise InputError(f"grid: expected one of {', '.join(GRID_KINDS)}, got {self.grid!r}")
        self.time_grid()  # checks rho
        check_coupling(self.coupling)
        check_data_std(self.data_std)
        get_sampler(self.sampler)
        check_M(self.M)
        if self.lmin == "auto":
            if self.lmax < 1:
                raise InputError(f"lmax: expected at least 1 with lmin auto, got {self.lmax}")
        elif not (isinstance(self.lmin, int) and 0 <= self.lmin < self.lmax):
            raise InputError(f"lmin: expected 0 <= lmin < lmax (or 'auto'), got lmin={self.lmin}, lmax={self.lmax}")
        if self.n0 < 2:
            raise InputError(f"n0: expected at least 2 pilot samples, got {self.n0}")
        if not 0 < self.theta < 1:
            raise InputError(f"theta: expected 0 < theta < 1, got {self.theta}")
        if self.payoff not in PAYOFFS:
            raise InputError(f"payoff: expected one of {', '.join(PAYOFFS)}, got {self.payoff!r}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise InputError(f"clip: expected a positive number, got {self.clip}")
        if self.batch_size < 1:
            raise InputError(f"batch_size: expected an integer >= 1, got {self.batch_size}")
        if self.row_budget < 1:
            raise InputError(f"row_budget: expected an integer >= 1, got {self.row_budget}")
        if self.seed < 0:
            raise InputError(f"seed: expected a non-negative integer, got {self.seed}")
        check_picard_args(window=self.picard_window, tol=self.picard_tol, prefix="picard_")
        if self.switch is not None and (isinstance(self.switch, bool) or not isinstance(self.switch, int)
                                        or self.switch < 1):
            raise InputError(f"switch: expected an integer >= 1 (the level between the two networks), got {self.switch!r}")
        if self.switch is not None and self.coarse_checkpoint is None:
            raise InputError("switch: given without a coarse network (coarse_checkpoint, --coarse-checkpoint)")
        if not isinstance(self.antithetic, bool):
            raise InputError(f"antithetic: expected true or false, got {self.antithetic!r}")

    @classmethod
    def from_scheme(cls, scheme: Literal["default", "seed"] = "default", **overrides) -> "MLMCConfig":
        """The defaults (what measures best: log-SNR grid, naive coupling, automatic Lmin) or the seed's
        scheme (uniform grid as in the seed's code, its variance-coefficient coupling, Lmin 3), with
        ``overrides`` on top (None values are ignored)."""
        if scheme not in SCHEMES:
            raise InputError(f"scheme: expected one of {', '.join(SCHEMES)}, got {scheme!r}")
        return cls(**{**SCHEMES[scheme], **{k: v for k, v in overrides.items() if v is not None}})

    def time_grid(self) -> TimeGrid:
        return TimeGrid(self.grid, rho=self.rho)

    def to_json(self) -> dict:
        return asdict(self)

    def to_cli_args(self) -> list[str]:
        """The ``lightning-mlmc mlmc`` / ``mlmc-test`` options that rebuild exactly this configuration: every
        field as ``--<name>`` (underscores as dashes; None fields left out, which the CLI reads as None)."""
        args = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                args.append(f"--{'' if value else 'no-'}{f.name.replace('_', '-')}")
            elif value is not None:
                args += [f"--{f.name.replace('_', '-')}", repr(value) if isinstance(value, float) else str(value)]
        return args

    def level_sampler(self, model, y: Tensor | None, shape, *, start: StartDistribution | None = None,
                      dtype=torch.float64, device="cpu", seed: int | None = None, coarse_model=None,
                      switch: int | None = None, coarse_cost: float | None = None) -> CoupledLevelSampler:
        """The coupled level sampler of this scheme (at Lmin 0 when Lmin is automatic: ``run_mlmc`` picks it);
        Picard-parallel (``PicardLevelSampler``) when ``picard_window`` is set; over two networks with
        ``coarse_model`` (the loaded ``coarse_checkpoint``) below ``switch`` (default: this config's, else
        Lmin + 1; ``run_mlmc`` sets it after choosing Lmin)."""
        kw = dict(M=self.M, lmin=0 if self.lmin == "auto" else self.lmin, sampler=self.sampler, coupling=self.coupling,
                  data_std=self.data_std, payoff=make_payoff(self.payoff, self.clip), start=start,
                  grid=self.time_grid(), seed=self.seed if seed is None else seed, dtype=dtype, device=device,
                  antithetic=self.antithetic)
        if coarse_model is not None:
            lmin = kw["lmin"]
            kw.update(coarse_model=coarse_model, switch=switch or self.switch or lmin + 1, coarse_cost=coarse_cost)
        if self.picard_window is not None:
            return PicardLevelSampler(model, y, shape, window=self.picard_window, tol=self.picard_tol,
                                      row_budget=self.row_budget, **kw)
        return CoupledLevelSampler(model, y, shape, **kw)

    def state_key(self, **extra) -> str:
        """What identifies the run in a ``--state`` file besides the driver's own settings (``extra``: the
        problem, the start distribution)."""
        key = {**extra, "grid": self.grid, "rho": self.rho, "seed": self.seed, "payoff": self.payoff,
               "clip": self.clip, "sampler": self.sampler, "coupling": self.coupling, "lmin": self.lmin,
               "antithetic": self.antithetic}
        if self.coupling == "jacobian":
            key["data_std"] = self.data_std
        if self.coarse_checkpoint is not None:
            key["coarse_checkpoint"], key["switch"] = self.coarse_checkpoint, self.switch
        if self.picard_window is not None:  # a Picard level is the sequential one within its tolerance
            key["picard_window"], key["picard_tol"] = self.picard_window, self.picard_tol
        return fingerprint(**key)
