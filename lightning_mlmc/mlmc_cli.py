"""``lightning-mlmc mlmc`` and ``lightning-mlmc mlmc-test``: JSON results and the four convergence plots."""

from __future__ import annotations

import math
import os

from lightning_mlmc.errors import InputError, WeakConvergenceFailure


def add_commands(sub, add_problem_args, positive_float, positive_int, nonneg_int) -> None:
    def common(p):
        add_problem_args(p)
        p.add_argument("--M", type=positive_int("M"), default=2, help="refinement factor (>= 2)")
        p.add_argument("--lmin", type=lmin_arg(nonneg_int("lmin")), default=0,
                       help="coarsest level, or 'auto' (mlmc only): chosen from a coupled pilot run")
        p.add_argument("--lmax", type=nonneg_int("lmax"), default=10)
        p.add_argument("--n0", type=positive_int("n0"), default=100, help="pilot samples per level")
        p.add_argument("--theta", type=positive_float("theta"), default=0.25)
        p.add_argument("--payoff", choices=["second_moment", "mean", "moments"], default="second_moment")
        p.add_argument("--clip", type=positive_float("clip"), default=None)
        p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
        # The choices repeat diffusion.COUPLINGS: importing it here would load torch to parse arguments.
        p.add_argument("--coupling", choices=["naive", "weighted", "jacobian"], default="naive",
                       help="coarse noise from the fine noises: naive sum / sqrt(M) (default), the seed's weights, "
                            "or weights carried by the step Jacobian for Gaussian data of std --data-std")
        p.add_argument("--data-std", type=positive_float("data-std"), default=0.5,
                       help="data scale of --coupling jacobian (default 0.5, images in [-1, 1])")
        p.add_argument("--batch-size", type=positive_int("batch-size"), default=1000)
        p.add_argument("--plots", help="folder for the convergence plots (PNG)")
        p.add_argument("--out", required=True)

    p = sub.add_parser("mlmc", help="adaptive MLMC estimate of E[f(X) | y] at target RMSE eps")
    common(p)
    p.add_argument("--eps", type=positive_float("eps"), required=True)
    p.add_argument("--state", help="resumable per-level sums (JSON); a rerun with the same arguments continues")
    p.set_defaults(func=cmd_mlmc)

    p = sub.add_parser("mlmc-test", help="Giles' convergence and complexity tables")
    common(p)
    p.add_argument("--levels", type=nonneg_int("levels"), required=True)
    p.add_argument("--samples", type=positive_int("samples"), required=True)
    p.add_argument("--eps-list", type=positive_float("eps-list"), nargs="*", default=[])
    p.set_defaults(func=cmd_mlmc_test)


def lmin_arg(as_int):
    def parse(s):
        return "auto" if s == "auto" else as_int(s)

    return parse


def _sampler(args):
    from lightning_mlmc.cli import load_target, make_grid
    from lightning_mlmc.mlmc import CoupledLevelSampler, make_payoff

    if args.M < 2:
        raise InputError(f"M: expected an integer >= 2, got {args.M}")
    model, y, shape, start, dtype, device = load_target(args)
    lmin = 0 if args.lmin == "auto" else args.lmin  # mlmc() moves it to the pilot's choice
    return CoupledLevelSampler(model, y, shape, M=args.M, lmin=lmin, sampler=args.sampler,
                               coupling=args.coupling, data_std=args.data_std,
                               payoff=make_payoff(args.payoff, args.clip),
                               start=start, grid=make_grid(args), seed=args.seed, dtype=dtype, device=device)


def _check_levels(args):
    if args.lmin == "auto":
        if args.lmax < 1:
            raise InputError(f"lmax: expected at least 1 with --lmin auto, got {args.lmax}")
    elif args.lmin >= args.lmax:
        raise InputError(f"lmin: expected lmin < lmax, got lmin={args.lmin}, lmax={args.lmax}")
    if not 0 < args.theta < 1:
        raise InputError(f"theta: expected 0 < theta < 1, got {args.theta}")


def cmd_mlmc(args) -> int:
    from lightning_mlmc.cli import _check_out, write_json
    from lightning_mlmc.mlmc import fingerprint, mlmc

    _check_levels(args)
    _check_out(args.out)
    sampler = _sampler(args)
    source = [os.path.abspath(p) for p in (args.problem, args.checkpoint, args.observation) if p]
    key = fingerprint(problem=source,
                      start=args.start, grid=args.grid, rho=args.rho, seed=args.seed, payoff=args.payoff,
                      clip=args.clip, sampler=args.sampler, coupling=args.coupling,
                      **({"data_std": args.data_std} if args.coupling == "jacobian" else {}))
    failure = None
    try:
        result = mlmc(sampler, args.eps, M=args.M, lmin=args.lmin, lmax=args.lmax, n0=args.n0, theta=args.theta,
                      cost_fn=sampler.cost, batch_size=args.batch_size, state_path=args.state, state_key=key,
                      pixels=sampler.pixels)
    except WeakConvergenceFailure as e:
        result, failure = e.result, e
    data = result.to_json()
    write_json(args.out, data)
    if args.plots:
        plot_levels(data["levels"], args.plots, M=args.M)
    print(f"estimate written to {args.out}: {len(data['levels'])} levels, nfe {data['nfe']:.0f}, "
          f"savings {data['savings']:.2f}x, rmse bound {data['rmse_bound']:.3g}", flush=True)
    if failure is not None:
        raise failure
    return 0


def cmd_mlmc_test(args) -> int:
    from lightning_mlmc.cli import _check_out, write_json
    from lightning_mlmc.mlmc import mlmc_test

    _check_levels(args)
    if args.lmin == "auto":
        raise InputError("lmin: 'auto' is for mlmc; mlmc-test tabulates the fixed levels lmin..levels")
    if args.levels <= args.lmin:
        raise InputError(f"levels: expected more than lmin = {args.lmin}, got {args.levels}")
    _check_out(args.out)
    sampler = _sampler(args)
    res = mlmc_test(sampler, args.levels, args.samples, args.eps_list, n0=args.n0, theta=args.theta,
                    lmax=args.lmax, batch_size=args.batch_size)
    print(res.tables())
    write_json(args.out, res.to_json())
    if args.plots:
        levels = [{"level": r.level, "mean": r.mean, "var": r.var, "mean_fine": r.mean_fine,
                   "var_fine": r.var_fine, "n_samples": args.samples, "cost": r.cost} for r in res.rows]
        plot_levels(levels, args.plots, M=args.M, complexity=res.complexity)
    return 0


def plot_levels(levels: list[dict], folder: str, M: int = 2, complexity: list | None = None) -> list[str]:
    """The four MLMC plots as PNG: V_l and V[P_l]; mean_l and E[P_l]; N_l per eps; cost against eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    ls = [d["level"] for d in levels]
    log = lambda v: math.log(max(v, 1e-300), M)  # noqa: E731
    paths = []

    for key, title, name in (("var", "V_l", "variance.png"), ("mean", "mean_l", "mean.png")):
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.plot(ls[1:], [log(d[key]) for d in levels[1:]], "o-", label="P_l - P_(l-1)")
        ax.plot(ls, [log(d[f"{key}_fine"]) for d in levels], "s--", label="P_l")
        ax.set(xlabel="level l", ylabel=f"log_{M} {'variance' if key == 'var' else '|mean|'}", title=title)
        ax.legend()
        paths.append(_save(fig, folder, name))

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    runs = complexity or [{"eps": None, "N_l": [d["n_samples"] for d in levels]}]
    for c in runs:
        nl = c["N_l"]
        ax.semilogy(range(ls[0], ls[0] + len(nl)), nl, "o-", label=f"eps = {c['eps']}" if c["eps"] else "N_l")
    ax.set(xlabel="level l", ylabel="N_l", title="samples per level")
    ax.legend()
    paths.append(_save(fig, folder, "samples.png"))

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    if complexity:
        e = [c["eps"] for c in complexity]
        ax.loglog(e, [c["eps"] ** 2 * c["mlmc_cost"] for c in complexity], "o-", label="MLMC")
        ax.loglog(e, [c["eps"] ** 2 * c["std_cost"] for c in complexity], "s--", label="MC")
        ax.set(xlabel="eps", ylabel="eps^2 x cost (NFE)", title="cost")
        ax.legend()
    else:
        cost = [d["n_samples"] * d["cost"] for d in levels]
        ax.bar(ls, cost)
        ax.set(xlabel="level l", ylabel="NFEs", title="cost per level")
    paths.append(_save(fig, folder, "cost.png"))
    return paths


def _save(fig, folder, name):
    import matplotlib.pyplot as plt

    path = os.path.join(folder, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
