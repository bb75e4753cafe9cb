"""PNG figures of posterior UQ: one row per observation, truth | y | samples | mean | pixel std."""

from __future__ import annotations

import numpy as np
from torch import Tensor


def _image(ax, img: np.ndarray, vmin=None, vmax=None, cmap="gray"):
    img = img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0]
    if img.ndim == 3:  # colour: map [-1, 1] to [0, 1]
        ax.imshow(np.clip((img + 1) / 2, 0, 1))
    else:
        ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])


def posterior_grid(path: str, truth: Tensor, observation: Tensor, samples: Tensor, mean: Tensor, std: Tensor,
                   num_samples_shown: int = 4, title: str | None = None) -> None:
    """Write a PNG grid. Shapes: truth/observation/mean/std (N, C, H, W) (observation already at image
    size, e.g. ``operator.condition(y)[:, :C]``), samples (N, S, C, H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = truth.shape[0]
    shown = min(num_samples_shown, samples.shape[1])
    cols = ["truth", "y"] + [f"sample {i + 1}" for i in range(shown)] + ["posterior mean", "pixel std"]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.3 * len(cols), 1.3 * n + 0.4), squeeze=False)
    std_max = float(std.max()) or 1.0
    for i in range(n):
        row = [truth[i], observation[i]] + [samples[i, j] for j in range(shown)] + [mean[i]]
        for j, img in enumerate(row):
            _image(axes[i, j], img.detach().cpu().float().numpy(), -1, 1)
        _image(axes[i, -1], std[i].detach().cpu().float().numpy().mean(0, keepdims=True), 0, std_max, "magma")
    for j, name in enumerate(cols):
        axes[0, j].set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
