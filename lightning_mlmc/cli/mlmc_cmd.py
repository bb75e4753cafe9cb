"""``lightning-mlmc mlmc`` and ``lightning-mlmc mlmc-test``: JSON results and the four convergence plots."""

from __future__ import annotations

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

# The choices repeat MLMCConfig's Literal fields: importing it here would load torch to parse arguments.
COUPLING_CHOICES = ["naive", "weighted", "jacobian"]
PAYOFF_CHOICES = ["second_moment", "mean", "moments"]


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
    """The options of ``MLMCConfig`` (same names) and the problem options."""
    add_problem_args(p)
    p.add_argument("--M", type=positive_int("M"), default=2, help="refinement factor (>= 2)")
    p.add_argument("--lmin", type=_lmin_arg, default=0,
                   help="coarsest level, or 'auto' (mlmc only): chosen from a coupled pilot run")
    p.add_argument("--lmax", type=nonneg_int("lmax"), default=10)
    p.add_argument("--n0", type=positive_int("n0"), default=100, help="pilot samples per level")
    p.add_argument("--theta", type=positive_float("theta"), default=0.25)
    p.add_argument("--payoff", choices=PAYOFF_CHOICES, default="second_moment")
    p.add_argument("--clip", type=positive_float("clip"), default=None)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--coupling", choices=COUPLING_CHOICES, default="naive",
                   help="coarse noise from the fine noises: naive sum / sqrt(M) (default), the seed's weights, "
                        "or weights carried by the step Jacobian for Gaussian data of std --data-std")
    p.add_argument("--data-std", type=positive_float("data-std"), default=0.5,
                   help="data scale of --coupling jacobian (default 0.5, images in [-1, 1])")
    p.add_argument("--batch-size", type=positive_int("batch-size"), default=1000)
    p.add_argument("--plots", help="folder for the convergence plots (PNG)")
    p.add_argument("--out", required=True)


def config_from_args(args):
    """The ``MLMCConfig`` of the parsed options (validated there: a bad value is a one-line error)."""
    from lightning_mlmc.mlmc import MLMCConfig

    return MLMCConfig(grid=args.grid, rho=args.rho, coupling=args.coupling, data_std=args.data_std,
                      sampler=args.sampler, M=args.M, lmin=args.lmin, lmax=args.lmax, n0=args.n0, theta=args.theta,
                      payoff=args.payoff, clip=args.clip, batch_size=args.batch_size, seed=args.seed)


def _levels(config, args):
    model, y, shape, start, dtype, device = load_target(args)
    check_save_images(getattr(args, "save_images", None), shape, payoff=config.payoff)
    return config.level_sampler(model, y, shape, start=start, dtype=dtype, device=device)


def cmd_mlmc(args) -> int:
    from lightning_mlmc.figures import plot_levels
    from lightning_mlmc.mlmc import run_mlmc

    config = config_from_args(args)
    check_out(args.out)
    levels = _levels(config, args)
    key = config.state_key(problem=problem_source(args), start=args.start)
    failure = None
    try:
        result = run_mlmc(config, levels, args.eps, state_path=args.state, state_key=key)
    except WeakConvergenceFailure as e:
        result, failure = e.result, e
    data = result.to_json()
    write_json(args.out, data)
    if args.save_images:
        from lightning_mlmc.images import mlmc_pngs

        write_images(args.save_images, mlmc_pngs(levels.shape, config.payoff, data["estimate"]))
    if args.plots:
        plot_levels(result.levels, args.plots, M=config.M)
    print(f"estimate written to {args.out}: {len(data['levels'])} levels, nfe {data['nfe']:.0f}, "
          f"savings {data['savings']:.2f}x, rmse bound {data['rmse_bound']:.3g}", flush=True)
    if failure is not None:
        raise failure
    return 0


def cmd_mlmc_test(args) -> int:
    from lightning_mlmc.figures import plot_levels
    from lightning_mlmc.mlmc import run_mlmc_test

    config = config_from_args(args)
    if config.lmin == "auto":
        raise InputError("lmin: 'auto' is for mlmc; mlmc-test tabulates the fixed levels lmin..levels")
    if args.levels <= config.lmin:
        raise InputError(f"levels: expected more than lmin = {config.lmin}, got {args.levels}")
    check_out(args.out)
    res = run_mlmc_test(config, _levels(config, args), args.levels, args.samples, args.eps_list)
    print(res.tables())
    write_json(args.out, res.to_json())
    if args.plots:
        plot_levels(res.rows, args.plots, M=config.M, complexity=res.complexity,
                    samples=[args.samples] * len(res.rows))
    return 0
