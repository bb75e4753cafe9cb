"""``lightning-mlmc mlmc`` and ``lightning-mlmc mlmc-test``: JSON results and the four convergence plots."""

from __future__ import annotations

import argparse
import sys

from lightning_mlmc.cli.common import (
    add_problem_args,
    check_out,
    load_target,
    nonneg_int,
    positive_float,
    positive_int,
    problem_source,
    write_json,
)
from lightning_mlmc.cli.save_images import add_save_images_arg, check_save_images, write_images
from lightning_mlmc.errors import InputError, WeakConvergenceFailure
from lightning_mlmc.samplers import DEFAULT_SAMPLER



def choices(field: str) -> list[str]:
    """The values of an ``MLMCConfig`` Literal field: the CLI's choices come from the config's types."""
    from typing import get_args, get_type_hints

    from lightning_mlmc.mlmc.config import MLMCConfig

    return list(get_args(get_type_hints(MLMCConfig)[field]))


def add_commands(sub) -> None:
    p = sub.add_parser("mlmc", help="adaptive MLMC estimate of E[f(X) | y] at target RMSE eps")
    _add_config_args(p)
    p.add_argument("--eps", type=positive_float("eps"), required=True)
    p.add_argument("--state", help="resumable per-level sums (JSON); a rerun with the same arguments continues")
    add_save_images_arg(p)
    p.set_defaults(func=cmd_mlmc)

    p = sub.add_parser("mlmc-test", help="Giles' convergence and complexity tables")
    _add_config_args(p)
    p.add_argument("--levels", type=nonneg_int("levels"), required=True)
    p.add_argument("--samples", type=positive_int("samples"), required=True)
    p.add_argument("--eps-list", type=positive_float("eps-list"), nargs="*", default=[])
    p.set_defaults(func=cmd_mlmc_test)


def _lmin_arg(s):
    return "auto" if s == "auto" else nonneg_int("lmin")(s)


def _add_config_args(p) -> None:
    """The options of ``MLMCConfig`` (same names; unset ones come from ``--scheme``) and the problem options."""
    add_problem_args(p, grid_default=None)
    p.add_argument("--scheme", choices=["default", "seed"], default="default",
                   help="default: log-SNR grid, naive coupling, automatic Lmin (what measures best); seed: the "
                        "seed's uniform grid, weighted coupling and Lmin 3, for comparison (explicit options win)")
    p.add_argument("--M", type=positive_int("M"), default=None, help="refinement factor (>= 2; default 2)")
    p.add_argument("--lmin", type=_lmin_arg, default=None,
                   help="coarsest level, or 'auto' (the default): chosen from a coupled pilot run")
    p.add_argument("--lmax", type=nonneg_int("lmax"), default=None, help="finest level allowed (default 12)")
    p.add_argument("--n0", type=positive_int("n0"), default=None,
                   help="largest pilot per level (default 100; the pilot is sized by cost up to it)")
    p.add_argument("--theta", type=positive_float("theta"), default=None,
                   help="largest share of eps^2 the bias may take (default 0.25)")
    p.add_argument("--payoff", choices=choices("payoff"), default=None, help="default second_moment")
    p.add_argument("--clip", type=positive_float("clip"), default=None)
    p.add_argument("--sampler", choices=choices("sampler"), default=None,
                   help=f"default {DEFAULT_SAMPLER} (a deterministic sampler couples the paths through x_T alone)")
    p.add_argument("--coupling", choices=choices("coupling"), default=None,
                   help="coarse noise from the fine noises: naive sum / sqrt(M) (default), the seed's weights, "
                        "or weights carried by the step Jacobian for Gaussian data of std --data-std")
    p.add_argument("--data-std", type=positive_float("data-std"), default=None,
                   help="data scale of --coupling jacobian (default 0.5, images in [-1, 1])")
    p.add_argument("--batch-size", type=positive_int("batch-size"), default=None,
                   help="samples per batch, each its own noise stream (default 1000)")
    p.add_argument("--row-budget", type=positive_int("row-budget"), default=None,
                   help="the most rows one network call takes; every batch of every level advances together in "
                        "calls of up to this many rows (default 4096)")
    p.add_argument("--picard-window", type=positive_int("picard-window"), default=None,
                   help="Picard-parallel levels: solve each batch's fine and coarse paths by sliding-window Picard "
                        "iteration with this window (fewer sequential network calls, more rows; off by default)")
    p.add_argument("--picard-tol", type=positive_float("picard-tol"), default=None,
                   help="per-step tolerance of --picard-window, in units of each step's noise std (default 0.01)")
    p.add_argument("--antithetic", action=argparse.BooleanOptionalAction, default=None,
                   help="antithetic pairs: every sample the mean of the paths driven by noise z and -z (default on)")
    p.add_argument("--coarse-checkpoint", default=None, metavar="DIR",
                   help="a cheaper network of the same problem (a distilled student, `lightning-mlmc distill`) for the "
                        "coarse levels: the student below --switch, the teacher (--checkpoint) from it up; costs in "
                        "teacher NFEs by FLOPs")
    p.add_argument("--switch", type=positive_int("switch"), default=None,
                   help="with --coarse-checkpoint: the level between the two networks (default: just above Lmin)")
    p.add_argument("--plots", help="folder for the convergence plots (PNG)")
    p.add_argument("--out", required=True)


def config_from_args(args):
    """The ``MLMCConfig`` of the parsed options, one option per field with the field's name (validated there:
    a bad value is a one-line error); ``MLMCConfig.to_cli_args`` writes them back."""
    from dataclasses import fields

    from lightning_mlmc.mlmc import MLMCConfig

    return MLMCConfig.from_scheme(args.scheme, **{f.name: getattr(args, f.name) for f in fields(MLMCConfig)})


def _levels(config, args):
    model, y, shape, start, dtype, device = load_target(args)
    check_save_images(getattr(args, "save_images", None), shape, payoff=config.payoff)
    coarse = None
    if config.coarse_checkpoint is not None:
        from lightning_mlmc.cli.common import load_coarse_model

        coarse = load_coarse_model(config.coarse_checkpoint, model, getattr(args, "allow_pickle", False))
    return config.level_sampler(model, y, shape, start=start, dtype=dtype, device=device, coarse_model=coarse)


def cmd_mlmc(args) -> int:
    from lightning_mlmc.figures import plot_levels
    from lightning_mlmc.mlmc import run_mlmc
    from lightning_mlmc.progress import for_terminal

    config = config_from_args(args)
    check_out(args.out)
    with distributed(args):
        levels = _levels(config, args)
        key = config.state_key(problem=problem_source(args), start=args.start)
        failure = None
        try:
            result = run_mlmc(config, levels, args.eps, state_path=args.state, state_key=key,
                              progress=for_terminal() if rank() == 0 else None)
        except WeakConvergenceFailure as e:
            result, failure = e.result, e
        if rank() == 0:  # every rank holds the same reduced estimate; one writes it
            data = result.to_json()
            write_json(args.out, data)
            if args.save_images:
                from lightning_mlmc.images import mlmc_pngs

                write_images(args.save_images, mlmc_pngs(levels.shape, config.payoff, data["estimate"]))
            if args.plots:
                plot_levels(result.levels, args.plots, M=config.M)
            for line in warning_lines(result):
                print(line, file=sys.stderr, flush=True)
            print(summary_line(result, args.out), flush=True)
    if failure is not None:
        raise failure
    return 0


def warning_lines(result) -> list[str]:
    """Giles' warnings on the run's levels (kurtosis, consistency), what automatic Lmin passed over, and why the
    run finished as plain MC: one ``warning:`` line each, for the console."""
    lines = [f"warning: {w}" for w in result.warnings]
    if result.lmin_reason:
        lines.append(f"warning: raised Lmin to {result.lmin} at {result.lmin_reason}")
    if result.method == "mc" and result.mc_reason:
        lines.append(f"warning: finished as plain MC at {result.mc_reason}")
    return lines


def summary_line(result, out: str) -> str:
    """The console line of a finished run: what it cost, what plain MC would have, which method ran, and the
    RMSE it certifies against eps (``converged`` means rmse estimate <= eps; the bound is an upper confidence
    bound, which may exceed eps)."""
    unit = "samples in antithetic pairs" if result.mc_antithetic else "samples"
    how = (f"finished as plain MC ({result.mc_samples} {unit} x {result.mc_steps} steps: predicted cheaper than "
           "MLMC from there on)" if result.method == "mc" else
           f"MLMC levels {result.lmin}..{result.levels[-1].level}")
    return (f"estimate written to {out}: {how}; nfe {result.nfe:.0f}, plain MC would need {result.nfe_mc:.0f} "
            f"({result.mc_samples} {unit} x {result.mc_steps} steps): savings {result.savings:.2f}x "
            f"({result.savings_same_grid:.2f}x against plain MC on the finest grid); {result.sequential_calls} "
            f"sequential network calls in {result.rounds} rounds ({result.rows_per_call:.0f} rows a call; plain MC: "
            f"{result.mc_sequential_calls}); rmse estimate {result.rmse_estimate:.3g} "
            f"{'<=' if result.rmse_estimate <= result.eps else '>'} eps {result.eps:.3g} "
            f"(upper confidence bound {result.rmse_bound:.3g})")


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class distributed:
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment): join the process group for the command (NCCL
    on CUDA devices, gloo on the CPU; each rank on its local GPU) and leave it after; otherwise nothing."""

    def __init__(self, args):
        self.args, self.joined = args, False

    def __enter__(self):
        import os

        import torch
        import torch.distributed as dist

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
            return self
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = self.args.device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
            if self.args.device in ("auto", "cuda"):
                self.args.device = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda else "gloo")
        self.joined = True
        return self

    def __exit__(self, *exc):
        if self.joined:
            import torch.distributed as dist

            dist.destroy_process_group()
        return False


def cmd_mlmc_test(args) -> int:
    from lightning_mlmc.figures import plot_levels
    from lightning_mlmc.mlmc import run_mlmc_test
    from lightning_mlmc.progress import for_terminal

    config = config_from_args(args)
    if args.levels <= (1 if config.lmin == "auto" else config.lmin):
        raise InputError(f"levels: expected more than lmin = {config.lmin}, got {args.levels}")
    check_out(args.out)
    res = run_mlmc_test(config, _levels(config, args), args.levels, args.samples, args.eps_list,
                        progress=for_terminal())
    print(res.tables())
    write_json(args.out, res.to_json())
    if args.plots:
        plot_levels(res.rows, args.plots, M=config.M, complexity=res.complexity,
                    samples=[args.samples] * len(res.rows))
    return 0
