"""Your own pictures: PNG observations in, posterior mean / pixel std / samples out as PNGs.

Scaling (the models' data range is [-1, 1]): a PNG is converted to the model's channels (1: grayscale by
PIL's ``L`` conversion, 3: ``RGB``; 16-bit grayscale is reduced to 8 bits first) and its values v in [0, 255]
become 2 v / 255 - 1. Written images map [-1, 1] back to [0, 255] (clipped) for the mean and the samples; the
pixel std is written as 255 std / max(std) (white = the largest std; the CLI records every file's scale in
``images.json``).
"""

from __future__ import annotations

import io

import numpy as np
import torch

from lightning_mlmc.errors import InputError

MAX_SAMPLES = 4
PNG_MODES = {1: "L", 3: "RGB"}


def is_png(path: str) -> bool:
    return path.lower().endswith(".png")


def read_png(path: str, shape, resize: bool = False) -> tuple[torch.Tensor, str]:
    """A PNG as a (C, H, W) float32 tensor in [-1, 1] for images of ``shape``, and a note on what was done.

    Args:
        path: the PNG file.
        shape: (C, H, W) of the observation; C must be 1 or 3.
        resize: resize a PNG of another size to (H, W) with PIL's bicubic filter (else a one-line error).
    """
    from PIL import Image, UnidentifiedImageError

    c, h, w = check_image_shape(shape, "observation")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"observation: cannot read {path!r} as a PNG ({e})") from None
    note = f"{img.width}x{img.height} {img.mode}"
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64) / 65535.0
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    img = img.convert(PNG_MODES[c])
    if (img.width, img.height) != (w, h):
        if not resize:
            raise InputError(f"observation: {path!r} is {img.width}x{img.height}, the model's images are {w}x{h}; "
                             "resize it, or pass --resize (bicubic)")
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        note += f", resized to {w}x{h} (bicubic)"
    arr = np.asarray(img, dtype=np.float32).reshape(h, w, c).transpose(2, 0, 1)
    return torch.from_numpy(arr * (2.0 / 255.0) - 1.0), note + f", scaled [0, 255] -> [-1, 1], {c} channel(s)"


def check_image_shape(shape, field: str = "save-images") -> tuple[int, int, int]:
    """(C, H, W) if images of ``shape`` can be written as PNGs (1 or 3 channels), else a one-line error."""
    if len(shape) != 3 or shape[0] not in PNG_MODES:
        raise InputError(f"{field}: needs images of 1 or 3 channels (C, H, W), got shape {list(shape)}")
    return tuple(int(s) for s in shape)


def png_bytes(img, lo: float = -1.0, hi: float = 1.0) -> bytes:
    """A (C, H, W) array as 8-bit PNG bytes, mapping [lo, hi] to [0, 255] (clipped)."""
    from PIL import Image

    arr = np.asarray(img, dtype=np.float64)
    scaled = (np.clip((arr - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(scaled[:, :, 0] if scaled.shape[2] == 1 else scaled).save(buf, format="PNG")
    return buf.getvalue()


def posterior_pngs(shape, mean=None, std=None, samples=None) -> tuple[dict[str, bytes], dict]:
    """The posterior as PNG files: ``mean.png``, ``std.png`` and ``sample_<k>.png`` (up to 4), and their scales.

    Args:
        shape: (C, H, W); every array is reshaped to it.
        mean, std: per-pixel posterior mean and std (C*H*W values each), or None.
        samples: (K, C*H*W) posterior samples, or None.

    Returns:
        (file name -> PNG bytes, the value each file maps to black and to white).
    """
    shape = check_image_shape(shape)
    files, scales = {}, {}
    if mean is not None:
        files["mean.png"] = png_bytes(np.asarray(mean, dtype=np.float64).reshape(shape))
        scales["mean.png"] = [-1.0, 1.0]
    if std is not None:
        std = np.asarray(std, dtype=np.float64).reshape(shape)
        top = float(std.max()) if float(std.max()) > 0 else 1.0
        files["std.png"] = png_bytes(std, 0.0, top)
        scales["std.png"] = [0.0, top]
    if samples is not None:
        samples = np.asarray(samples, dtype=np.float64)
        for k in range(min(MAX_SAMPLES, samples.shape[0])):
            files[f"sample_{k}.png"] = png_bytes(samples[k].reshape(shape))
            scales[f"sample_{k}.png"] = [-1.0, 1.0]
    return files, scales


def sample_pngs(shape, samples: np.ndarray):
    """``posterior_pngs`` of (K, n) draws: their mean, pixel std (ddof 1, from 2 or more samples) and first draws."""
    std = samples.std(axis=0, ddof=1) if samples.shape[0] > 1 else None
    return posterior_pngs(shape, samples.mean(axis=0), std, samples)


def mlmc_pngs(shape, payoff: str, estimate):
    """``posterior_pngs`` of an MLMC estimate: ``moments`` gives mean and std (sqrt of E[x^2] - E[x]^2, floored
    at 0), ``mean`` the mean; other payoffs are a one-line error."""
    est = np.asarray(estimate, dtype=np.float64)
    n = int(np.prod(shape))
    if payoff == "moments":
        mean, second = est[:n], est[n:]
        return posterior_pngs(shape, mean, np.sqrt(np.clip(second - mean**2, 0.0, None)))
    if payoff == "mean_std":
        return posterior_pngs(shape, est[:n], est[n:])
    if payoff == "mean":
        return posterior_pngs(shape, est)
    raise InputError(f"save-images: needs --payoff mean_std or moments (posterior mean and std) or mean, not {payoff}")
