"""The level protocol of the MLMC driver: what a level function is, does and costs (pymlmc's ``mlmc_fn``).

A level function draws ``levels(l, n, batch_index, rank) -> LevelSums`` and declares everything the driver,
automatic Lmin and the plain-MC finish use; nothing is probed with ``hasattr``. The defaults describe the
diffusion levels of one network: level l runs M^l steps, a coupled sample costs M^l + M^(l-1) network rows
(M^l at Lmin), a plain sample M^l, and twice that with antithetic pairs. A level function with a cheaper
network on its coarse levels overrides ``cost``/``plain_cost`` (in its ``cost_unit``) and says which of its
levels are not step refinements (``refines``: a level between two networks on one grid, whose mean is the
networks' difference and does not decay with the weak rate).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from lightning_mlmc.errors import InputError
from lightning_mlmc.mlmc.sums import LevelSums
from lightning_mlmc.sampling import Streams

NFE = "NFE"  # the cost unit of one-network levels: network rows (evaluations of one sample at one step)


def check_M(M) -> int:
    if int(M) != M or M < 2:
        raise InputError(f"M: expected an integer >= 2, got {M}")
    return int(M)


def level_cost(M: int, level: int, lmin: int) -> float:
    """NFEs per sample of a level: M^l fine plus M^(l-1) coarse steps, M^lmin at the plain level Lmin."""
    return float(M**level + (M ** (level - 1) if level > lmin else 0))


class LevelFunction(ABC):
    """What the MLMC driver calls: ``levels(l, n, batch_index, rank) -> LevelSums`` of n samples of level l
    from the noise stream (batch_index, rank), and what it declares about itself.

    Attributes:
        M: refinement factor; lmin: the coarsest level (a plain, uncoupled estimator); pixels: payoff components.
        antithetic: a sample is the mean of an antithetic pair (the plain MC the driver names may then be
            either; ``LevelSums`` carry the single paths too).
        cost_unit: the unit of ``cost`` and ``plain_cost`` (and of the result's NFE figures).
        batched: the level function runs its batches as engine steppers (``steppers``) on its ``networks``
            (one network call per step of all pending batches); otherwise the driver calls it batch by batch.
        can_change_lmin: ``with_lmin`` works (automatic Lmin, raising Lmin, the plain-MC finish need it).
    """

    M: int
    lmin: int
    pixels: int
    antithetic: bool = False
    cost_unit: str = NFE
    batched: bool = False
    can_change_lmin: bool = False

    @abstractmethod
    def __call__(self, level: int, n: int, batch_index: int = 0, rank: int = 0) -> LevelSums:
        """Sums over ``n`` samples of level ``level`` from stream (level, batch_index, rank)."""

    @property
    def paths(self) -> int:
        """Paths per sample: 2 with antithetic pairs, else 1."""
        return 2 if self.antithetic else 1

    def cost(self, level: int) -> float:
        """Cost per sample of a level (default: the one-network diffusion levels' NFEs)."""
        return self.paths * level_cost(self.M, level, self.lmin)

    def plain_cost(self, level: int) -> float:
        """Cost of one plain sample of P_level (the finest path of that level alone)."""
        return float(self.paths * self.M**level)

    def steps(self, level: int) -> int:
        """Time steps of the fine path of a level (what a plain MC at that level runs)."""
        return self.M**level

    def refines(self, level: int) -> bool:
        """Whether level ``level`` refines the grid of the level below by M (its mean decays at the weak rate
        and enters the fit of alpha and the extrapolated bias); False for a level between two networks."""
        return True

    def with_lmin(self, lmin: int) -> "LevelFunction":
        """The same levels from another coarsest level."""
        raise InputError(f"lmin: {type(self).__name__} cannot change its Lmin (automatic Lmin, raising Lmin and "
                         "the plain-MC finish need a level function that can)")

    def steppers(self, level: int, n: int, batch_index: int = 0, rank: int = 0, plain: bool = False):
        """One batch as an engine stepper (``batched`` level functions only)."""
        raise InputError(f"{type(self).__name__} does not run on the batched engine")

    @property
    def networks(self) -> dict:
        """The networks the steppers' rows name (``batched`` level functions)."""
        return {}

    @property
    def y(self):
        """The observation every row of a call shares (``batched`` level functions)."""
        return None

    @property
    def scheme(self) -> dict:
        """The scheme these levels run (recorded in MLMC results)."""
        return {}

    def network_costs(self) -> dict:
        """Per network: its cost per row in ``cost_unit`` and what that rests on (FLOPs per row)."""
        return {}


@dataclass(frozen=True)
class UserLevels(LevelFunction):
    """A plain level function (pymlmc style) with what the driver needs to know about it.

    Args:
        fn: ``fn(level, n, batch_index, rank) -> LevelSums`` (``LevelSums.from_payoffs(pf, pc, cost)``
            builds the sums from n fine and coarse payoffs; ``pc`` is None at Lmin). Use ``batch_index``
            and ``rank`` to pick independent random streams.
        M: refinement factor; lmin: coarsest level.
        cost: cost per sample of a level (default M^l + M^(l-1), M^lmin at Lmin).
        pixels: payoff components (probed with 2 samples on a stream no estimate uses when omitted).
    """

    fn: Callable[..., LevelSums]
    M: int = 2
    lmin: int = 0
    cost_fn: Callable[[int], float] | None = None
    pixels: int = 0

    def __post_init__(self):
        check_M(self.M)
        if self.pixels <= 0:
            object.__setattr__(self, "pixels", self.fn(self.lmin, 2, Streams.PROBE_BATCH, 0).pixels)

    def cost(self, level: int) -> float:
        return self.cost_fn(level) if self.cost_fn is not None else level_cost(self.M, level, self.lmin)

    def plain_cost(self, level: int) -> float:
        return self.cost(self.lmin) * self.M ** (level - self.lmin) if self.cost_fn is not None else float(self.M**level)

    def __call__(self, level: int, n: int, batch_index: int = 0, rank: int = 0) -> LevelSums:
        return self.fn(level, n, batch_index, rank)
