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
from lightning_mlmc.samplers import DEFAULT_SAMPLER, PICARD_PREFIX, SAMPLERS, SLIDE_RULES, command_line_samplers


def _per_sampler(option: str) -> str:
    """The registry's default of a Picard option for every sampler, for the help: 'ddpm 16, ddim 16, ...'."""
    return ", ".join(f"{name} {getattr(spec.picard, option)}" for name, spec in SAMPLERS.items())


def add_command(sub) -> None:
    p = sub.add_parser("sample", help="draw posterior samples")
    add_problem_args(p)
    p.add_argument("--sampler", choices=command_line_samplers(), default=DEFAULT_SAMPLER,
                   help=f"default {DEFAULT_SAMPLER}; "
                        + "; ".join(f"{name}: {spec.summary}" for name, spec in SAMPLERS.items())
                        + f"; {PICARD_PREFIX}NAME: the same sampler by sliding-window Picard iteration (ParaDiGMS; "
                          "the same noise, so the same samples up to the tolerance)")
    p.add_argument("--steps", type=positive_int("steps"), required=True)
    p.add_argument("--num-samples", type=positive_int("num-samples"), required=True)
    p.add_argument("--window", type=positive_int("window"), default=None,
                   help=f"Picard window p (default per sampler: {_per_sampler('window')})")
    p.add_argument("--tol", type=positive_float("tol"), default=None,
                   help=f"Picard tolerance, in units of each step's noise std (default {_per_sampler('tol')})")
    p.add_argument("--anderson", type=nonneg_int("anderson"), default=None,
                   help="triangular Anderson memory (ParaTAA; 0: plain Picard; default per sampler, measured by "
                        f"benchmarks/picard_anderson.py: {_per_sampler('anderson')})")
    p.add_argument("--slide", choices=SLIDE_RULES, default=None,
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

    from lightning_mlmc.samplers import get_sampler
    from lightning_mlmc.sampling import NoiseSource, sample

    picard = args.sampler.startswith(PICARD_PREFIX)
    spec = get_sampler(args.sampler.removeprefix(PICARD_PREFIX))
    options = spec.picard.with_overrides(args.window, args.tol, args.anderson, args.slide)  # validated there
    if args.antithetic and args.num_samples % 2:
        raise InputError(f"num-samples: antithetic pairs need an even number of samples, got {args.num_samples}")
    check_out(args.out)
    model, y, shape, start, dtype, device = load_target(args)
    check_save_images(args.save_images, shape)
    noise = NoiseSource(args.seed, (args.num_samples, *shape), dtype=dtype, device=device, antithetic=args.antithetic)
    grid = make_grid(args)
    if not picard:
        from lightning_mlmc.progress import for_terminal

        progress = for_terminal()
        progress.start(f"{args.sampler}: {args.num_samples} samples x {args.steps} steps", args.num_samples * args.steps)
        out = sample(model, y, noise, steps=args.steps, sampler=spec.name, start=start, grid=grid,
                     callback=lambda info: progress.advance(args.num_samples))
        progress.close()
    else:
        from lightning_mlmc.picard import picard_sample

        out = picard_sample(
            model, y, noise, steps=args.steps, sampler=spec.name, window=options.window, tol=options.tol,
            anderson=options.anderson, slide=options.slide, max_rounds=args.max_rounds, start=start, grid=grid,
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
