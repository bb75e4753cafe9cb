"""Command line: ``lightning-mlmc sample | mlmc | mlmc-test | fit | validate | test | predict``.

Bad input exits with status 2 and one line naming the field; nothing half-written is left behind
(outputs are written to a temporary file and renamed into place).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

from lightning_mlmc import mlmc_cli
from lightning_mlmc.errors import InputError, NumericalError, WeakConvergenceFailure

PROG = "lightning-mlmc"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit status 2."""

    def error(self, message):
        raise InputError(message)


# ----------------------------------------------------------------------------------------------
# Argument types that name the field in their error (argparse keeps an ArgumentTypeError's text).


def _positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= 1, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= 1, got {v}")
        return v

    return parse


def _nonneg_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= 0, got {s!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= 0, got {v}")
        return v

    return parse


def _positive_float(name):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive number, got {s!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"{name}: expected a positive number, got {s}")
        return v

    return parse


def _check_out(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"out: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"out: folder {folder} is not writable")
    return path


def atomic_write(path: str, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, data: dict) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")

    atomic_write(path, w)


# ----------------------------------------------------------------------------------------------
# Problem / model loading shared by the commands.


def add_problem_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--problem", help="analytic problem spec (JSON): exact score")
    src.add_argument("--checkpoint", help="trained model: a Lightning .ckpt or an exported model folder")
    p.add_argument("--allow-pickle", action="store_true",
                   help="with --checkpoint: also load checkpoints that need full unpickling (can run code)")
    p.add_argument("--observation", help="with --checkpoint: y as .npy, or .npz with key 'y' "
                                          "(observation shape, optionally with a leading 1)")
    p.add_argument("--start", choices=["gaussian", "observation", "masked"], default="gaussian",
                   help="start distribution p_T(x | y)")
    p.add_argument("--grid", choices=["uniform", "polynomial", "logsnr", "edm"], default="uniform")
    p.add_argument("--rho", type=_positive_float("rho"), default=None, help="grid warp exponent")
    p.add_argument("--seed", type=_nonneg_int("seed"), default=0)
    p.add_argument("--device", type=_device_name, default="auto",
                   help="where the network runs: auto (a CUDA GPU when one is visible), cpu, cuda or cuda:N; "
                        "the noise is drawn on the CPU, so every device gives the same samples up to rounding")


def _device_name(s: str) -> str:
    if s in ("auto", "cpu", "cuda") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {s!r}")


def resolve_device(name: str):
    """The torch device for ``--device``; a clear error when the GPU asked for is not there."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise InputError(f"device: {name} asked for, but {count} CUDA GPU(s) are visible")
    return device


def _start(name, noise_std, dtype, what, denoise_y=None, inpaint_y=None, observed=None):
    """The start distribution ``name``; denoise_y / (inpaint_y, observed) are given for those problems."""
    from lightning_mlmc.sampling import gaussian_start, masked_start, observation_start

    if name == "gaussian":
        return gaussian_start()
    if name == "observation":
        if denoise_y is None:
            raise InputError(f"start: 'observation' needs a denoising problem (identity operator), not {what}")
        return observation_start(denoise_y.to(dtype), noise_std)
    if observed is None:
        raise InputError(f"start: 'masked' needs an inpainting problem, not {what}")
    return masked_start(inpaint_y.to(dtype), observed.to(dtype))


def load_observation(path: str, operator):
    """y from a .npy file or an .npz file's 'y', checked against the operator's observation shape."""
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise InputError(f"observation: no such file {path!r}")
    try:
        data = np.load(path, allow_pickle=False)
        y = data["y"] if isinstance(data, np.lib.npyio.NpzFile) else data
    except (ValueError, OSError, KeyError) as e:
        raise InputError(f"observation: cannot read {path!r} as .npy or .npz with key 'y' ({e})") from None
    y = torch.as_tensor(np.asarray(y, dtype=np.float32))
    want = tuple(operator.observation_shape)
    if tuple(y.shape) == want:
        y = y[None]
    if tuple(y.shape) != (1, *want):
        raise InputError(f"observation: expected shape {list(want)} for the model's {operator.name} operator, "
                         f"got {list(y.shape)}")
    if not torch.isfinite(y).all():
        raise InputError(f"observation: {path!r} contains NaN or Inf")
    return y


def load_target(args):
    """Return (model, y, event_shape, start, dtype, device) for --problem or --checkpoint."""
    import numpy as np
    import torch

    device = resolve_device(getattr(args, "device", "cpu"))
    if getattr(args, "checkpoint", None):
        model, y, shape, start, dtype = _load_checkpoint_target(args)
        return model.to(device), y.to(device), shape, start, dtype, device
    if getattr(args, "observation", None):
        raise InputError("observation: only with --checkpoint (an analytic spec carries its own y)")
    from lightning_mlmc.problems import AnalyticSpec, ExactPosteriorEps

    spec = AnalyticSpec.load(args.problem)
    model = ExactPosteriorEps(spec)
    y = torch.as_tensor(spec.y)[None]
    shape, dtype, noise_std = spec.shape, torch.float64, spec.noise_std
    kinds = {}
    mask = spec.selection_mask()
    if mask is not None:  # inpainting: y embedded in the image, observed-pixel mask
        kinds["inpaint_y"] = torch.as_tensor(spec.matrix.T @ spec.y).reshape(shape)
        kinds["observed"] = torch.as_tensor(mask, dtype=torch.float64).reshape(shape)
    elif spec.matrix.shape[0] == spec.dim and np.array_equal(spec.matrix, np.eye(spec.dim)):  # denoising
        kinds["denoise_y"] = torch.as_tensor(spec.y).reshape(shape)
    start = _start(args.start, noise_std, dtype, "this spec", **kinds)
    # y stays on the CPU: the exact score keys its posterior on it and computes on x_t's device.
    return model, y.to(dtype), tuple(shape), start, dtype, device


def _load_checkpoint_target(args):
    import torch

    from lightning_mlmc.module import load_score_model

    if not args.observation:
        raise InputError("observation: --checkpoint needs --observation Y.npy (the y to condition on)")
    model = load_score_model(args.checkpoint, allow_pickle=getattr(args, "allow_pickle", False))
    op = model.operator
    y = load_observation(args.observation, op)
    dtype = torch.float32
    kinds = {}
    if op.name == "denoise":
        kinds["denoise_y"] = y[0]
    elif op.name == "inpaint":
        kinds["inpaint_y"], kinds["observed"] = y[0], op.mask_like(y)[0].expand(op.shape)
    start = _start(args.start, op.noise_std, dtype, f"a {op.name} model", **kinds)
    return model, y, tuple(op.shape), start, dtype


def make_grid(args):
    from lightning_mlmc.schedule import TimeGrid

    rho = args.rho if args.rho is not None else (2.0 if args.grid == "polynomial" else 7.0)
    return TimeGrid(args.grid, rho=rho)


# ----------------------------------------------------------------------------------------------
# sample


def cmd_sample(args) -> int:
    import numpy as np

    from lightning_mlmc.sampling import NoiseSource, sample

    if args.sampler.startswith("picard"):
        if args.window is None or args.window < 1:
            raise InputError("window: expected an integer >= 1 for a Picard sampler")
        if not (args.tol > 0):
            raise InputError(f"tol: expected a positive number, got {args.tol}")
    _check_out(args.out)
    model, y, shape, start, dtype, device = load_target(args)
    noise = NoiseSource(args.seed, (args.num_samples, *shape), dtype=dtype, device=device)
    grid = make_grid(args)
    if args.sampler in ("ddpm", "ddim"):
        out = sample(model, y, noise, steps=args.steps, sampler=args.sampler, start=start, grid=grid)
    else:
        from lightning_mlmc.picard import picard_sample

        out = picard_sample(
            model, y, noise, steps=args.steps, sampler=args.sampler.removeprefix("picard-"),
            window=args.window, tol=args.tol, anderson=args.anderson, max_rounds=args.max_rounds,
            start=start, grid=grid,
        )
    stats = {"rounds": out.rounds, "nfe": out.nfe, "steps": out.steps, "wall_seconds": out.wall_seconds,
             "sampler": args.sampler, "seed": args.seed, "device": str(device)}
    stats.update({k: v for k, v in out.stats.items() if k not in stats})
    samples = out.samples.reshape(args.num_samples, -1).double().cpu().numpy()

    def w(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, samples=samples, stats=np.array(json.dumps(stats)))

    atomic_write(args.out, w)
    print(f"wrote {samples.shape[0]} samples to {args.out} "
          f"(rounds {out.rounds}, nfe {out.nfe}, {out.wall_seconds:.2f} s)")
    return 0


# ----------------------------------------------------------------------------------------------
# Parser.


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Diffusion-model posterior sampling with MLMC and Picard UQ.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("sample", help="draw posterior samples")
    add_problem_args(p)
    p.add_argument("--sampler", required=True, choices=["ddpm", "ddim", "picard-ddpm", "picard-ddim"])
    p.add_argument("--steps", type=_positive_int("steps"), required=True)
    p.add_argument("--num-samples", type=_positive_int("num-samples"), required=True)
    p.add_argument("--window", type=_positive_int("window"), default=None, help="Picard window p")
    p.add_argument("--tol", type=_positive_float("tol"), default=1e-3, help="Picard tolerance")
    p.add_argument("--anderson", type=_nonneg_int("anderson"), default=0, help="Anderson memory (0: off)")
    p.add_argument("--max-rounds", type=_positive_int("max-rounds"), default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sample)

    mlmc_cli.add_commands(sub, add_problem_args, _positive_float, _positive_int, _nonneg_int)
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
            raise InputError("command: expected one of sample, mlmc, mlmc-test, fit, validate, test, predict")
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


if __name__ == "__main__":
    sys.exit(main())
