"""Multilevel Monte Carlo for diffusion posteriors (Haji-Ali, Pereyra, Shaw, Zygalakis 2025) with Giles'
adaptive algorithm (Giles 2008, 2015), split as pymlmc splits it:

- levels (``levels.py``): the level-function protocol and the coupled diffusion level sampler
  (``coupling.py`` builds the coarse noise, ``payoffs.py`` the payoff, ``sums.py`` the per-level sums);
- the driver (``driver.py``): Giles' algorithm, its resumable state (``state.py``) and the reduction
  across ranks; automatic Lmin (``lmin.py``) is chosen before it runs;
- diagnostics (``diagnostics.py``): ``mlmc_test`` with its convergence and complexity tables;
- ``picard_levels.py``: Picard-parallel levels (each batch's coupled paths by sliding-window Picard iteration);
- ``config.py``: one ``MLMCConfig`` for the command line, the callback and the benchmarks.
"""

from lightning_mlmc.mlmc.config import MLMCConfig
from lightning_mlmc.mlmc.run import mlmc_auto, run_mlmc, run_mlmc_test
from lightning_mlmc.mlmc.coupling import COUPLINGS, coarse_noise_weights
from lightning_mlmc.mlmc.diagnostics import ComplexityRow, ConvergenceRow, MLMCTestResult, mlmc_test
from lightning_mlmc.mlmc.driver import mlmc
from lightning_mlmc.mlmc.plan import fit_growth, fit_rate, optimal_samples
from lightning_mlmc.mlmc.result import MLMCResult
from lightning_mlmc.mlmc.levels import CoupledLevelSampler
from lightning_mlmc.mlmc.protocol import LevelFunction, UserLevels, level_cost
from lightning_mlmc.mlmc.lmin import LminChoice, choose_lmin
from lightning_mlmc.mlmc.payoffs import apply_payoff, make_payoff
from lightning_mlmc.mlmc.picard_levels import PicardLevelSampler
from lightning_mlmc.mlmc.state import DriverState, fingerprint
from lightning_mlmc.mlmc.sums import SUM_NAMES, LevelStats, LevelSums, level_stats

__all__ = [
    "COUPLINGS", "SUM_NAMES", "ComplexityRow", "ConvergenceRow", "CoupledLevelSampler", "DriverState",
    "LevelFunction", "LevelStats", "LevelSums", "LminChoice", "MLMCConfig", "MLMCResult", "MLMCTestResult",
    "PicardLevelSampler", "UserLevels", "apply_payoff", "choose_lmin", "coarse_noise_weights", "fingerprint",
    "fit_growth", "fit_rate", "level_cost", "level_stats", "make_payoff", "mlmc", "mlmc_auto", "mlmc_test",
    "optimal_samples", "run_mlmc", "run_mlmc_test",
]
