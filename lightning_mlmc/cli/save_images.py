"""``--save-images DIR`` of ``sample`` and ``mlmc``: the posterior mean, pixel std and a few samples as PNGs
(scales in ``lightning_mlmc/images.py``; each file written atomically, with ``images.json`` recording them)."""

from __future__ import annotations

import os

from lightning_mlmc.cli.common import atomic_write, write_json
from lightning_mlmc.errors import InputError


def add_save_images_arg(p) -> None:
    p.add_argument("--save-images", metavar="DIR",
                   help="write mean.png, std.png (and up to 4 sample_<k>.png) into DIR (created if missing)")


def check_save_images(folder: str | None, shape, payoff: str | None = None) -> None:
    """Fail before any sampling if ``folder`` cannot take PNGs of ``shape`` (None: nothing asked), or if an
    MLMC ``payoff`` gives no image (it must be ``moments`` or ``mean``)."""
    if folder is None:
        return
    from lightning_mlmc.images import check_image_shape

    check_image_shape(shape)
    if payoff is not None and payoff not in ("mean_std", "moments", "mean"):
        raise InputError(f"save-images: needs --payoff moments (posterior mean and std) or mean, not {payoff}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"save-images: {folder!r} exists and is not a folder")
    parent = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise InputError(f"save-images: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"save-images: folder {parent} is not writable")


def write_images(folder: str, pngs) -> None:
    """Write ``(file name -> PNG bytes, scales)`` from ``images.posterior_pngs`` into ``folder``."""
    files, scales = pngs
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        def w(tmp, data=data):
            with open(tmp, "wb") as f:
                f.write(data)

        atomic_write(os.path.join(folder, name), w)
    write_json(os.path.join(folder, "images.json"),
               {"files": list(files), "scale": {k: {"black": v[0], "white": v[1]} for k, v in scales.items()}})
    print(f"wrote {', '.join(files)} to {folder}", flush=True)
