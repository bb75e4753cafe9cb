"""Progress of long runs on a terminal (a tqdm bar, the way Lightning shows training), silent elsewhere.

``for_terminal()`` gives a bar when standard error is a terminal and ``QUIET`` otherwise (logs, pipes, the
validation callbacks), so progress never spams a log file. One bar per round of work: its total is the
round's network rows, its description what the round is (MLMC: the driver round, the levels, the samples
drawn and planned), its postfix the NFEs so far; tqdm estimates the time left.
"""

from __future__ import annotations

import sys


class Progress:
    """What long runs report; the base class reports nothing."""

    def start(self, description: str, total_rows: int) -> None:
        """A new stretch of work of ``total_rows`` network rows."""

    def advance(self, rows: int) -> None:
        """``rows`` more network rows evaluated."""

    def close(self) -> None:
        """The work is done."""


QUIET = Progress()


class TerminalProgress(Progress):
    def __init__(self, stream=None):
        self.stream, self.bar, self.rows = stream or sys.stderr, None, 0

    def start(self, description: str, total_rows: int) -> None:
        from tqdm.auto import tqdm

        self.close()
        self.bar = tqdm(total=total_rows, desc=description, unit="rows", unit_scale=True, leave=False,
                        file=self.stream, dynamic_ncols=True)

    def advance(self, rows: int) -> None:
        self.rows += rows
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix_str(f"NFEs {self.rows:,}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def for_terminal(stream=None) -> Progress:
    """A bar on a terminal, nothing otherwise."""
    stream = stream or sys.stderr
    return TerminalProgress(stream) if getattr(stream, "isatty", lambda: False)() else QUIET
