"""Triangular Anderson acceleration of the Picard window (ParaTAA, Tang et al. 2024)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class TriangularAnderson:
    """Triangular Anderson acceleration (ParaTAA, Tang et al., "Accelerating parallel sampling of diffusion
    models", ICML 2024) of the sliding-window Picard map G, memory m.

    The fixed-point system x_{i+1} = G_i(x_{j..i}) is lower triangular: step i depends only on the steps
    before it. Anderson's update X <- G(X) - dG gamma takes, for every step i, its own mixing coefficients
    gamma_i, the least-squares fit of the residual F = G(X) - X by the residual differences dF restricted
    to the window's steps j..i (cumulative Gram matrices over the window). Every sample of the batch is its
    own system and gets its own coefficients.

    The history holds *copies* of the last m + 1 iterates X and their images G(X), each with the absolute
    index of its first step, so it survives window slides: a pair of iterates contributes on the steps both
    cover (and the current window covers); elsewhere its differences are zero. Restart safeguard: a sample
    whose residual did not shrink (on the steps the last two iterates share) drops its history and takes the
    plain Picard value that round.

    Args:
        memory: m >= 1, the number of residual differences kept (ParaTAA uses 2 or 3).
        reg: Tikhonov regularisation of each Gram matrix, relative to its trace.
        max_coef: safeguard; a step whose mixing coefficients exceed this (or whose system is singular)
            takes the plain Picard value G(X).
    """

    def __init__(self, memory: int, reg: float = 1e-8, max_coef: float = 5.0):
        self.m, self.reg, self.max_coef = int(memory), reg, max_coef
        # (first absolute step, X, G(X), per-sample validity), oldest first
        self.hist: list[tuple[int, Tensor, Tensor, Tensor]] = []

    def __call__(self, first: int, x: Tensor, g: Tensor) -> Tensor:
        """The accelerated iterate for the window whose rows are the absolute steps first..first + p - 1.

        Args:
            first: absolute index of the window's first row (trajectory point j + 1 for window start j).
            x: the current iterate X, shape (p, B, ...).
            g: the Picard image G(X), same shape.

        Returns:
            The new iterate, shape (p, B, ...); its first row is G(X)'s (exact, the window start is final).
        """
        p, batch = g.shape[0], g.shape[1]
        valid = torch.ones(batch, dtype=torch.bool, device=g.device)
        if self.hist:
            # Safeguard (restart): a sample whose residual did not shrink on the steps both iterates cover
            # drops its history and takes the plain Picard value this round.
            f0, x0, g0, _ = self.hist[-1]
            lo, hi = max(f0, first), min(f0 + x0.shape[0], first + p)
            if hi > lo:
                old = (g0[lo - f0 : hi - f0] - x0[lo - f0 : hi - f0]).transpose(0, 1).reshape(batch, -1)
                new = (g[lo - first : hi - first] - x[lo - first : hi - first]).transpose(0, 1).reshape(batch, -1)
                grew = new.double().norm(dim=1) >= old.double().norm(dim=1)
                for entry in self.hist:
                    entry[3].logical_and_(~grew)
        self.hist.append((first, x.detach().clone(), g.detach().clone(), valid))
        self.hist = self.hist[-(self.m + 1):]
        d_res, d_g = [], []
        for (f0, x0, g0, v0), (f1, x1, g1, _) in zip(self.hist[:-1], self.hist[1:]):
            lo = max(f0, f1, first)
            hi = min(f0 + x0.shape[0], f1 + x1.shape[0], first + p)
            if hi <= lo:
                continue
            dr, dg = torch.zeros_like(g), torch.zeros_like(g)
            a0, a1, c = slice(lo - f0, hi - f0), slice(lo - f1, hi - f1), slice(lo - first, hi - first)
            dg[c] = g1[a1] - g0[a0]
            dr[c] = dg[c] - (x1[a1] - x0[a0])
            keep = v0.reshape(1, batch, *([1] * (g.dim() - 2))).to(g.dtype)  # pairs from before a restart: none
            d_res.append(dr * keep)
            d_g.append(dg * keep)
        if not d_res:
            return g.clone()
        k, batch = len(d_res), g.shape[1]
        dR = torch.stack(d_res, -1).reshape(p, batch, -1, k)  # (p, B, D, k): residual differences per step
        dG = torch.stack(d_g, -1).reshape(p, batch, -1, k)
        # The small least-squares systems are solved in float64 whatever the sample dtype: in float32 a
        # window whose residual differences vanish gives an exactly singular (and underflowing) system.
        dR64, r = dR.double(), (g - x).reshape(p, batch, -1, 1).double()
        gram = torch.cumsum(dR64.transpose(-1, -2) @ dR64, 0)  # (p, B, k, k): steps first..i, per sample
        rhs = torch.cumsum(dR64.transpose(-1, -2) @ r, 0)  # (p, B, k, 1)
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)[..., None, None]
        gamma, info = torch.linalg.solve_ex(gram + self.reg * scale * eye, rhs)
        # Safeguard: steps whose system is singular or whose coefficients blow up take the plain Picard value.
        ok = (info == 0) & torch.isfinite(gamma).all(-1).all(-1)
        ok &= torch.nan_to_num(gamma, nan=float("inf")).abs().amax((-2, -1)) <= self.max_coef
        gamma = torch.where(ok[..., None, None], gamma, torch.zeros_like(gamma)).to(dG.dtype)
        out = (g.reshape(p, batch, -1) - (dG @ gamma).squeeze(-1)).reshape(g.shape)
        out[0] = g[0]
        return out
