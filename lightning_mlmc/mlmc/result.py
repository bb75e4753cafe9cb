"""The MLMC result (DESIGN.md section 6: RESULT.json), typed; ``to_json`` gives the contract's keys."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from lightning_mlmc.mlmc.sums import LevelStats


@dataclass
class MLMCResult:
    """Result of the adaptive MLMC driver.

    Savings are honest by default: ``nfe_mc`` is the fewest NFEs of a plain Monte Carlo estimator that
    meets the same eps by this run's own estimates (``mc_steps`` x ``mc_samples``, each candidate level with
    its own bias/variance split); Giles' same-grid figure, V[P_L] C_L / ((1 - theta) eps^2) at the run's L,
    is ``nfe_mc_same_grid``. ``method`` is ``mc`` when the pilot predicted plain MC cheaper and the run
    finished as plain MC at level ``mc_level`` (then ``levels`` are the pilot's). ``moments`` are the levels'
    per-pixel moments (``estimates.LevelMoments``), what predictions at other eps start from
    (``complexity.predict_complexity``); they are not part of the JSON.
    """

    estimate: list
    levels: list[LevelStats]
    alpha: float
    beta: float
    gamma: float
    nfe: float  # by the cost formula, pilot included
    nfe_counted: int  # network evaluations counted from the calls made
    nfe_mc: float
    savings: float
    eps: float
    rmse_bound: float  # an upper confidence bound on the RMSE (variances and bias two standard errors up)
    bias_estimate: float  # upper-confidence RMS bias of the estimate
    wall_seconds: float
    M: int
    lmin: int
    theta: float
    converged: bool = True
    pilot_nfe: float = 0.0  # NFEs of the automatic-Lmin pilot not reused by the estimate (inside nfe)
    method: str = "mlmc"
    mc_level: int | None = None
    mc_reason: str | None = None  # when and why the run switched to plain MC
    lmin_reason: str | None = None  # when and why the run raised its Lmin (its coarse levels cost more than they saved)
    rmse_estimate: float = math.nan  # the RMSE the driver certifies: converged means rmse_estimate <= eps
    mc_steps: int = 0
    mc_samples: int = 0
    mc_meets_eps: bool = True
    mc_antithetic: bool = False  # the plain MC named draws antithetic pairs (mc_samples counts their paths)
    nfe_mc_same_grid: float = 0.0
    savings_same_grid: float = 0.0
    rounds: int = 0
    sequential_calls: int = 0  # batched network calls made one after another (what an accelerator waits on)
    rows_per_call: float = 0.0  # nfe_counted / sequential_calls
    mc_sequential_calls: int = 0  # the plain-MC alternative's, on the same engine with the same row budget
    world_size: int = 1
    scheme: dict = field(default_factory=dict)  # grid, coupling, sampler, ... of the level function
    warnings: list = field(default_factory=list)  # Giles' kurtosis and consistency warnings on the levels
    cost_unit: str = "NFE"  # the unit of nfe, nfe_mc and the level costs (teacher NFEs with a coarse network)
    network_costs: dict = field(default_factory=dict)  # per network: row_cost (in cost_unit), rows, seconds_per_row
    maps: dict = field(default_factory=dict)  # payoff mean_std: each map's RMSE estimate (``maps.mean_std_maps``)
    moments: list = field(default_factory=list, repr=False)  # per-pixel LevelMoments of ``levels``

    def to_json(self) -> dict:
        data = asdict(replace(self, moments=[]))
        del data["moments"]
        data.update(self.scheme)  # grid, coupling, ... as top-level keys (DESIGN.md section 6)
        return data
