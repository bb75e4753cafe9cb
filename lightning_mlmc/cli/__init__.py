"""Command line: ``lightning-mlmc sample | mlmc | mlmc-test | fit | validate | test | predict | distill``
(also ``python -m lightning_mlmc ...``).

Bad input exits with status 2 and one line naming the field; nothing half-written is left behind
(outputs are written to a temporary file and renamed into place). Exit status 3: a numerical failure or
MLMC weak convergence failing at Lmax (the result is still written); 130: interrupted.
"""

from __future__ import annotations

import sys

from lightning_mlmc.cli import mlmc_cmd, sample_cmd
from lightning_mlmc.cli.common import PROG, Parser
from lightning_mlmc.errors import InputError, NumericalError, WeakConvergenceFailure

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict", "distill")  # distill: fit a student (distill.py)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Diffusion-model posterior sampling with MLMC and Picard UQ.")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    sample_cmd.add_command(sub)
    mlmc_cmd.add_commands(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from lightning_mlmc.train_cli import run_lightning_cli

        return _guarded(lambda: run_lightning_cli(argv))
    parser = build_parser()

    def run():
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            raise InputError("command: expected one of sample, mlmc, mlmc-test, fit, validate, test, predict, distill")
        return args.func(args)

    return _guarded(run)


def _guarded(fn) -> int:
    try:
        return int(fn() or 0)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except NumericalError as e:
        print(f"{PROG}: numerical error: {e}", file=sys.stderr)
        return 3
    except WeakConvergenceFailure as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


__all__ = ["LIGHTNING_COMMANDS", "build_parser", "main"]
