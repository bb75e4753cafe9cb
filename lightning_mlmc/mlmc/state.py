"""The MLMC driver's resumable state: per-level sums, sample counts and noise-stream counters.

Saved after every batch when a path is given (written to a temporary file and renamed), so an interrupted
run loses at most one batch; a rerun with the same arguments (same fingerprint) continues where it stopped
and reaches the bit-identical estimate.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from lightning_mlmc.errors import InputError
from lightning_mlmc.mlmc.sums import SUM_NAMES, LevelSums, is_rank_zero


def fingerprint(**args) -> str:
    """A short hash of the arguments that define a run (a state file resumes only the same run)."""
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sums(d: dict) -> LevelSums:
    """LevelSums from their saved form (a sum a state file of an older version lacks is zero)."""
    sums = {k: torch.tensor(v, dtype=torch.float64) for k, v in d["sums"].items()}
    p = len(next(iter(sums.values())))
    if "s0" not in sums:  # single paths: the fine paths themselves (no pairs then)
        sums.update(s0=torch.full((p,), float(d["n"]), dtype=torch.float64), s1=sums["f1"], s2=sums["f2"])
    return LevelSums(d["n"], {k: sums.get(k, torch.zeros(p, dtype=torch.float64)) for k in SUM_NAMES}, d["calls"])


class DriverState:
    """Per-level sums (``sums``), batches used per level (``batches``: the next stream index) and samples
    still to draw (``pending``); ``L`` the finest level so far, ``lmin`` the coarsest, and the automatic-Lmin
    pilot's cost not reused by the estimate (``pilot_nfe``, ``pilot_calls``)."""

    def __init__(self, path: str | None, fingerprint: str, pixels: int):
        self.path, self.fingerprint, self.pixels = path, fingerprint, pixels
        self.L: int | None = None
        self.lmin: int | None = None
        self.pilot_nfe, self.pilot_calls = 0.0, 0
        self.sums: dict[int, LevelSums] = {}  # the MLMC levels (plain at Lmin, coupled above)
        self.plain: dict[int, LevelSums] = {}  # plain samples of P_l drawn for a plain-MC finish
        self.batches: dict[int, int] = {}
        self.pending: dict[int, int] = {}
        self.pending_plain: dict[int, int] = {}
        self.phase = "pilot"  # pilot -> mlmc or mc
        self.mc_level: int | None = None  # the level of a plain-MC finish
        self.mc_reason: str | None = None  # when and why the run switched to it
        self.lmin_reason: str | None = None  # when and why the run raised its Lmin (``guards.raise_lmin``)
        self.pilot_n = 0  # pilot samples per pilot level
        self.rounds = 0
        self.sequential_calls = 0  # batched network calls made one after another
        self.round: list[dict] = []  # the batches of the round under way (rounds.Batch fields)
        self.round_done: dict[int, LevelSums] = {}  # their sums as they finish

    def ensure(self, level: int) -> None:
        if level not in self.sums:
            self.sums[level] = LevelSums.zeros(self.pixels)
            self.batches.setdefault(level, 0)
            self.pending.setdefault(level, 0)

    def save(self) -> None:
        if self.path is None or not is_rank_zero():  # every rank holds the same reduced sums
            return
        dump = lambda sums: {l: {"n": s.n, "calls": s.calls, "sums": {k: v.tolist() for k, v in s.sums.items()}}  # noqa: E731
                             for l, s in sums.items()}
        data = {"fingerprint": self.fingerprint, "L": self.L, "lmin": self.lmin, "pilot_nfe": self.pilot_nfe,
                "pilot_calls": self.pilot_calls, "pending": self.pending, "pending_plain": self.pending_plain,
                "batches": self.batches, "phase": self.phase, "mc_level": self.mc_level, "mc_reason": self.mc_reason,
                "lmin_reason": self.lmin_reason, "pilot_n": self.pilot_n,
                "rounds": self.rounds, "sequential_calls": self.sequential_calls, "round": self.round,
                "round_done": dump(self.round_done),
                "levels": dump(self.sums), "plain": dump(self.plain)}
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)

    def _read(self) -> dict | None:
        if self.path is None or not os.path.exists(self.path):
            return None
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, OSError) as e:
            raise InputError(f"state: cannot read {self.path} ({e}); delete it to start afresh") from None
        if data.get("fingerprint") != self.fingerprint:
            raise InputError(f"state: {self.path} was written with different arguments; "
                             "use the same arguments to resume or another --state file")
        return data

    @staticmethod
    def peek_lmin(path: str | None) -> int | None:
        """The Lmin of the run saved at ``path`` (None when there is none or it cannot be read; ``load``
        reports why): an automatic choice is not made twice."""
        try:
            with open(path) as f:
                return json.load(f).get("lmin")
        except (TypeError, OSError, ValueError, AttributeError):
            return None

    def load(self) -> bool:
        data = self._read()
        if data is None:
            return False
        self.L, self.lmin = data["L"], data.get("lmin")
        self.pilot_nfe, self.pilot_calls = float(data.get("pilot_nfe", 0.0)), int(data.get("pilot_calls", 0))
        ints = lambda d: {int(k): int(v) for k, v in d.items()}  # noqa: E731
        load = lambda sums: {int(l): _sums(d) for l, d in sums.items()}  # noqa: E731
        self.pending, self.pending_plain = ints(data["pending"]), ints(data.get("pending_plain", {}))
        self.batches = ints(data["batches"])
        self.sums, self.plain = load(data["levels"]), load(data.get("plain", {}))
        self.phase, self.mc_level = data.get("phase", "pilot"), data.get("mc_level")
        self.mc_reason, self.lmin_reason = data.get("mc_reason"), data.get("lmin_reason")
        self.pilot_n, self.rounds = data.get("pilot_n", 0), data.get("rounds", 0)
        self.sequential_calls = data.get("sequential_calls", 0)
        self.round, self.round_done = data.get("round", []), load(data.get("round_done", {}))
        return True
