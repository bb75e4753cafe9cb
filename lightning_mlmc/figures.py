"""PNG figures: posterior UQ panels (one row per observation: truth | y | samples | mean | pixel std), the
Picard residual plot and the MLMC convergence plots."""

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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_panel(fig, axes, cols, path: str, title: str | None) -> None:
    """Column titles, optional suptitle, save as PNG, close."""
    for j, name in enumerate(cols):
        axes[0, j].set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def posterior_grid(path: str, truth: Tensor, observation: Tensor, samples: Tensor, mean: Tensor, std: Tensor,
                   num_samples_shown: int = 4, title: str | None = None) -> None:
    """Write a PNG grid. Shapes: truth/observation/mean/std (N, C, H, W) (observation already at image
    size, e.g. ``operator.condition(y)[:, :C]``), samples (N, S, C, H, W)."""
    plt = _plt()
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
    _save_panel(fig, axes, cols, path, title)


def uq_map(path: str, observation: Tensor, truth: Tensor, mean: Tensor, std: Tensor, title: str | None = None) -> None:
    """The standard uncertainty panel, one row per observation:
    observation | truth | posterior mean | pixel std | |error| / std (shapes (N, C, H, W)).

    Each quantity has its own colour scale and a colour bar: the std on [0, its largest value], the error in
    units of the std on [0, 3] (a calibrated posterior keeps about 95% of the pixels below 2), so a small std
    is not drawn black beside a larger error."""
    plt = _plt()
    n = truth.shape[0]
    cols = ["observation", "truth", "posterior mean", "pixel std", "|error| / std"]
    fig, axes = plt.subplots(n, 5, figsize=(7.5, 1.3 * n + 0.6), squeeze=False)
    z = (mean - truth).abs() / std.clamp_min(1e-8)
    std_max = float(std.max()) or 1.0
    for i in range(n):
        for j, img in enumerate((observation[i], truth[i], mean[i])):
            _image(axes[i, j], img.detach().cpu().float().numpy(), -1, 1)
        for j, img, vmax, cmap in ((3, std[i], std_max, "viridis"), (4, z[i], 3.0, "magma")):
            _image(axes[i, j], img.detach().cpu().float().numpy().mean(0, keepdims=True), 0, vmax, cmap)
            fig.colorbar(axes[i, j].images[0], ax=axes[i, j], fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    _save_panel(fig, axes, cols, path, title)


def zscore_histogram(path: str, z: np.ndarray) -> None:
    """Histogram of (truth - mean) / std against the standard normal density."""
    plt = _plt()
    z = np.asarray(z, dtype=float).ravel()
    z = z[np.isfinite(z)]
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.hist(np.clip(z, -6, 6), bins=40, range=(-6, 6), density=True, alpha=0.7, label="(truth - mean) / std")
    grid = np.linspace(-6, 6, 200)
    ax.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), "k--", label="N(0, 1)")
    ax.set_xlabel("z")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def residual_plot(path: str, residuals: list[float], tol: float) -> None:
    """Picard residual per round: the window's max error in units of tol (converged below 1)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.semilogy(np.arange(1, len(residuals) + 1), np.maximum(residuals, 1e-300), "o-", ms=3)
    ax.axhline(1.0, color="k", ls="--", lw=1, label=f"tol = {tol:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("residual / tol")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_levels(levels, folder: str, M: int = 2, complexity=None, samples: list[int] | None = None) -> list[str]:
    """The four MLMC plots as PNG: V_l and V[P_l]; mean_l and E[P_l]; N_l per eps; cost against eps.

    ``levels`` are level statistics (``LevelStats`` of a result, or ``ConvergenceRow`` of ``mlmc_test``
    with ``samples`` per row), ``complexity`` the ``ComplexityRow`` s of ``mlmc_test``.
    """
    import math
    import os

    plt = _plt()
    os.makedirs(folder, exist_ok=True)
    ls = [d.level for d in levels]
    log = lambda v: math.log(max(v, 1e-300), M)  # noqa: E731
    counts = samples if samples is not None else [d.n_samples for d in levels]
    paths = []

    for key, title, name in (("var", "V_l", "variance.png"), ("mean", "mean_l", "mean.png")):
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.plot(ls[1:], [log(getattr(d, key)) for d in levels[1:]], "o-", label="P_l - P_(l-1)")
        ax.plot(ls, [log(getattr(d, f"{key}_fine")) for d in levels], "s--", label="P_l")
        ax.set(xlabel="level l", ylabel=f"log_{M} {'variance' if key == 'var' else '|mean|'}", title=title)
        ax.legend()
        paths.append(_save_figure(fig, folder, name))

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    runs = [(c.eps, c.N_l) for c in complexity] if complexity else [(None, counts)]
    for eps, nl in runs:
        ax.semilogy(range(ls[0], ls[0] + len(nl)), nl, "o-", label=f"eps = {eps}" if eps else "N_l")
    ax.set(xlabel="level l", ylabel="N_l", title="samples per level")
    ax.legend()
    paths.append(_save_figure(fig, folder, "samples.png"))

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    if complexity:
        e = [c.eps for c in complexity]
        ax.loglog(e, [c.eps**2 * c.mlmc_cost for c in complexity], "o-", label="MLMC")
        ax.loglog(e, [c.eps**2 * c.std_cost for c in complexity], "s--", label="MC")
        ax.set(xlabel="eps", ylabel="eps^2 x cost (NFE)", title="cost")
        ax.legend()
    else:
        ax.bar(ls, [n * d.cost for n, d in zip(counts, levels)])
        ax.set(xlabel="level l", ylabel="NFEs", title="cost per level")
    paths.append(_save_figure(fig, folder, "cost.png"))
    return paths


def complexity_plot(path: str, eps: list[float], mlmc_nfe: list[float], mc_nfe: list[float],
                    title: str | None = None) -> None:
    """Giles' complexity figure, predicted: eps^2 x cost against eps for MLMC and plain MC (log-log; plain
    MC's grows like eps^-1 / alpha where MLMC's is flat, so the curves cross where MLMC starts to pay)."""
    plt = _plt()
    e = np.asarray(eps, dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.loglog(e, e**2 * np.asarray(mlmc_nfe, dtype=float), "o-", label="MLMC (predicted)")
    ax.loglog(e, e**2 * np.asarray(mc_nfe, dtype=float), "s--", label="plain MC (predicted)")
    ax.set(xlabel="eps", ylabel="eps^2 x cost (NFE)", title=title or "predicted cost against eps")
    ax.set_xticks(e, [f"{v:g}" for v in e])  # one plain label per eps (log minor labels overlapped)
    ax.xaxis.set_minor_formatter(_plt().NullFormatter())
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def trends_plot(path: str, history: list[dict], keys: list[str]) -> None:
    """Training trends: one panel per key (its value against the global step) from a list of
    ``{"global_step": ..., key: value}`` records (``uq_summary.json``'s history); missing values are skipped."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(h["global_step"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3)
        ax.set(xlabel="global step", title=key)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save_figure(fig, folder: str, name: str) -> str:
    import os

    path = os.path.join(folder, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path
