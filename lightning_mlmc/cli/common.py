"""What the commands share: one-line argument errors, argument types, the problem/model options and their
loading, the time grid, and atomic writes (outputs are written to a temporary file and renamed)."""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

from lightning_mlmc.errors import InputError

PROG = "lightning-mlmc"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit status 2."""

    def error(self, message):
        raise InputError(message)


# ----------------------------------------------------------------------------------------------
# Argument types that name the field in their error (argparse keeps an ArgumentTypeError's text).


def _int_at_least(name: str, minimum: int):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= {minimum}, got {s!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= {minimum}, got {v}")
        return v

    return parse


def positive_int(name):
    return _int_at_least(name, 1)


def nonneg_int(name):
    return _int_at_least(name, 0)


def positive_float(name):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive number, got {s!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"{name}: expected a positive number, got {s}")
        return v

    return parse


def device_name(s: str) -> str:
    if s in ("auto", "cpu", "cuda") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {s!r}")


# ----------------------------------------------------------------------------------------------
# Outputs.


def check_out(path: str) -> str:
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
# The problem or model to sample, shared by sample, mlmc and mlmc-test.


def add_problem_args(p: argparse.ArgumentParser, grid_default: str | None = "logsnr") -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--problem", help="analytic problem spec (JSON): exact score")
    src.add_argument("--checkpoint", help="trained model: a Lightning .ckpt, an exported model folder, or a diffusers "
                                          "DDPM folder (DDPMPipeline.save_pretrained; then --operator and --noise-std)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="with --checkpoint: also load checkpoints that need full unpickling (can run code)")
    p.add_argument("--observation", help="with --checkpoint: y as .npy, .npz with key 'y' (observation shape, "
                                          "optionally with a leading 1), or a PNG (scaled [0, 255] -> [-1, 1])")
    p.add_argument("--resize", action="store_true",
                   help="resize a PNG observation of another size to the model's (bicubic)")
    p.add_argument("--operator", help="with a diffusers --checkpoint: the inverse problem (denoise)")
    p.add_argument("--noise-std", type=positive_float("noise-std"), default=None,
                   help="with a diffusers --checkpoint: the observation noise std")
    p.add_argument("--start", choices=["gaussian", "observation", "masked"], default=None,
                   help="start distribution p_T(x | y) (default: observation for a diffusers model, else gaussian)")
    p.add_argument("--grid", choices=["uniform", "polynomial", "logsnr", "edm"], default=grid_default,
                   help="time-grid family (default log-SNR, which measures best; uniform is the seed's)")
    p.add_argument("--rho", type=positive_float("rho"), default=None,
                   help="grid warp exponent (default: 2 for polynomial, 7 for edm)")
    p.add_argument("--seed", type=nonneg_int("seed"), default=0)
    p.add_argument("--device", type=device_name, default="auto",
                   help="where the network runs: auto (a CUDA GPU when one is visible), cpu, cuda or cuda:N; "
                        "the noise is drawn on the CPU, so every device gives the same samples up to rounding")


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


def make_grid(args):
    from lightning_mlmc.schedule import TimeGrid

    return TimeGrid(args.grid, rho=args.rho)


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


def load_observation(path: str, operator, resize: bool = False):
    """y from a .npy file, an .npz file's 'y' or a PNG (``images.read_png``), checked against the operator's
    observation shape."""
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise InputError(f"observation: no such file {path!r}")
    from lightning_mlmc.images import is_png, read_png

    if is_png(path):
        y, note = read_png(path, tuple(operator.observation_shape), resize=resize)
        print(f"observation {path}: {note}", flush=True)
        return y[None]
    if resize:
        raise InputError(f"resize: only for a PNG --observation, not {path!r}")
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
    pretrained = bool(getattr(args, "checkpoint", None)) and _is_diffusers(args.checkpoint)
    if not pretrained:
        for field in ("operator", "noise_std"):
            if getattr(args, field, None) is None:
                continue
            if getattr(args, "checkpoint", None):
                raise InputError(f"checkpoint: {args.checkpoint!r} is not a diffusers DDPM folder (model_index.json, "
                                 "or a UNet2DModel config.json with a scheduler_config.json beside it), which "
                                 f"--{field.replace('_', '-')} is for; a lightning-mlmc model carries its own operator")
            raise InputError(f"{field.replace('_', '-')}: only with a diffusers DDPM --checkpoint (an analytic spec "
                             "carries its own operator)")
    args.start = getattr(args, "start", None) or ("observation" if pretrained else "gaussian")
    if pretrained:
        model, y, shape, start, dtype = _load_pretrained_target(args)
        return model.to(device), y.to(device), shape, start, dtype, device
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


def load_coarse_model(path: str, model, allow_pickle: bool = False):
    """The cheaper network of ``--coarse-checkpoint`` (a distilled student): a trained model of the same inverse
    problem as ``model`` (its operator: name, shape and noise), on ``model``'s device."""
    from lightning_mlmc.module import load_score_model

    operator = getattr(model, "operator", None)
    if operator is None:
        raise InputError("coarse-checkpoint: needs a trained --checkpoint (an analytic --problem has its exact score)")
    if not os.path.exists(path):
        raise InputError(f"coarse-checkpoint: {path!r} does not exist")
    coarse = load_score_model(path, allow_pickle=allow_pickle)
    other = getattr(coarse, "operator", None)
    same = other is not None and (other.name, tuple(other.shape), float(other.noise_std)) == (
        operator.name, tuple(operator.shape), float(operator.noise_std))
    if not same:
        raise InputError(f"coarse-checkpoint: {path!r} solves another problem "
                         f"({getattr(other, 'name', None)}) than --checkpoint ({operator.name}, {tuple(operator.shape)}, "
                         f"noise {operator.noise_std})")
    return coarse.to(next(model.parameters()).device).eval()


def _load_checkpoint_target(args):
    import torch

    from lightning_mlmc.module import load_score_model

    if not args.observation:
        raise InputError("observation: --checkpoint needs --observation Y.npy (the y to condition on)")
    model = load_score_model(args.checkpoint, allow_pickle=getattr(args, "allow_pickle", False))
    op = model.operator
    y = load_observation(args.observation, op, resize=getattr(args, "resize", False))
    dtype = torch.float32
    kinds = {}
    if op.name == "denoise":
        kinds["denoise_y"] = y[0]
    elif op.name == "inpaint":
        kinds["inpaint_y"], kinds["observed"] = y[0], op.mask_like(y)[0].expand(op.shape)
    start = _start(args.start, op.noise_std, dtype, f"a {op.name} model", **kinds)
    return model, y, tuple(op.shape), start, dtype


def _is_diffusers(path: str) -> bool:
    """Whether --checkpoint is a diffusers DDPM folder (this project's exports have no scheduler config)."""
    if not os.path.isdir(path):
        return False
    from lightning_mlmc.pretrained import find_layout

    return find_layout(path) is not None


def _load_pretrained_target(args):
    """An unconditional diffusers DDPM for denoising from the observation start (``pretrained.py``)."""
    import torch

    from lightning_mlmc.pretrained import load_pretrained

    if args.operator is None:
        raise InputError("operator: a diffusers model is unconditional; give the problem it solves with "
                         "--operator denoise --noise-std S")
    if not args.observation:
        raise InputError("observation: --checkpoint needs --observation Y (.npy, .npz or .png)")
    if args.start != "observation":
        raise InputError(f"start: an unconditional diffusers model sees y only through the observation start, "
                         f"not {args.start!r} (drop --start or pass --start observation)")
    model = load_pretrained(args.checkpoint, operator=args.operator, noise_std=args.noise_std)
    op = model.operator
    y = load_observation(args.observation, op, resize=getattr(args, "resize", False))
    start = _start("observation", op.noise_std, torch.float32, "a diffusers model", denoise_y=y[0])
    if start.t > model.t_max:
        raise InputError(f"noise-std: {op.noise_std} starts at t = {start.t:.4g}, beyond the model's largest noise "
                         f"level (t = {model.t_max:.4g})")
    return model, y, tuple(op.shape), start, torch.float32


def problem_source(args) -> list[str]:
    """The files that define the problem (absolute paths), for run fingerprints; for a diffusers model also its
    operator and noise std (options, not files, define its likelihood)."""
    source = [os.path.abspath(p) for p in (args.problem, args.checkpoint, args.observation) if p]
    if getattr(args, "operator", None) is not None:
        source.append(f"operator={args.operator} noise_std={getattr(args, 'noise_std', None)!r}")
    return source
