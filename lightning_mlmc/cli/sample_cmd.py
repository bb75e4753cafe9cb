"""``lightning-mlmc sample``: posterior samples from the sequential or the Picard-parallel sampler."""

from __future__ import annotations

import json

from lightning_mlmc.cli.common import (
    add_problem_args,
    atomic_write,
    check_out,
    load_target,
    make_grid,
    nonneg_int,
    positive_float,
    positive_int,
)
from lightning_mlmc.cli.save_images import add_save_images_arg, check_save_images, write_images
from lightning_mlmc.errors import InputError


def add_command(sub) -> None:
    p = sub.add_parser("sample", help="draw posterior samples")
    add_problem_args(p)
    p.add_argument("--sampler", required=True,
                   choices=["ddpm", "ddim", "dpm2m", "picard-ddpm", "picard-ddim", "picard-dpm2m"],
                   help="dpm2m: DPM-Solver++(2M), the second-order multistep solver of the probability-flow ODE")
    p.add_argument("--steps", type=positive_int("steps"), required=True)
    p.add_argument("--num-samples", type=positive_int("num-samples"), required=True)
    p.add_argument("--window", type=positive_int("window"), default=None, help="Picard window p")
    p.add_argument("--tol", type=positive_float("tol"), default=1e-3, help="Picard tolerance")
    p.add_argument("--anderson", type=nonneg_int("anderson"), default=2,
                   help="triangular Anderson memory (ParaTAA; 0: plain Picard; default 2, the measured best)")
    p.add_argument("--slide", choices=["paradigms", "prefix"], default="paradigms",
                   help="window slide rule: paradigms (by the first unconverged step + 1, the default) or prefix")
    p.add_argument("--max-rounds", type=positive_int("max-rounds"), default=None)
    p.add_argument("--antithetic", action="store_true",
                   help="draw the samples in antithetic pairs (sample i + K/2 from the negated noise of sample i; K "
                        "even): their mean estimates a posterior mean with less variance, but the samples are not "
                        "independent draws (off by default)")
    p.add_argument("--out", required=True)
    add_save_images_arg(p)
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    import numpy as np

    from lightning_mlmc.sampling import NoiseSource, sample

    if args.sampler.startswith("picard"):
        if args.window is None or args.window < 1:
            raise InputError("window: expected an integer >= 1 for a Picard sampler")
        if not (args.tol > 0):
            raise InputError(f"tol: expected a positive number, got {args.tol}")
    if args.antithetic and args.num_samples % 2:
        raise InputError(f"num-samples: antithetic pairs need an even number of samples, got {args.num_samples}")
    check_out(args.out)
    model, y, shape, start, dtype, device = load_target(args)
    check_save_images(args.save_images, shape)
    noise = NoiseSource(args.seed, (args.num_samples, *shape), dtype=dtype, device=device, antithetic=args.antithetic)
    grid = make_grid(args)
    if args.sampler == "dpm2m":
        from lightning_mlmc.solvers import sample_dpm2m

        out = sample_dpm2m(model, y, noise, steps=args.steps, start=start, grid=grid)
    elif not args.sampler.startswith("picard-"):
        from lightning_mlmc.progress import for_terminal

        progress = for_terminal()
        progress.start(f"{args.sampler}: {args.num_samples} samples x {args.steps} steps", args.num_samples * args.steps)
        out = sample(model, y, noise, steps=args.steps, sampler=args.sampler, start=start, grid=grid,
                     callback=lambda info: progress.advance(args.num_samples))
        progress.close()
    else:
        from lightning_mlmc.picard import picard_sample

        out = picard_sample(
            model, y, noise, steps=args.steps, sampler=args.sampler.removeprefix("picard-"),
            window=args.window, tol=args.tol, anderson=args.anderson, slide=args.slide, max_rounds=args.max_rounds,
            start=start, grid=grid,
        )
    stats = {"rounds": out.rounds, "nfe": out.nfe, "steps": out.steps, "wall_seconds": out.wall_seconds,
             "sampler": args.sampler, "seed": args.seed, "device": str(device), "antithetic": args.antithetic}
    stats.update({k: v for k, v in out.stats.items() if k not in stats})
    samples = out.samples.reshape(args.num_samples, -1).double().cpu().numpy()

    def w(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, samples=samples, stats=np.array(json.dumps(stats)))

    atomic_write(args.out, w)
    if args.save_images:
        from lightning_mlmc.images import sample_pngs

        write_images(args.save_images, sample_pngs(shape, samples))
    print(f"wrote {samples.shape[0]} samples to {args.out} "
          f"(rounds {out.rounds}, nfe {out.nfe}, {out.wall_seconds:.2f} s)")
    return 0
