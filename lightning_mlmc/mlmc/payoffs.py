"""Payoffs f: the quantity MLMC estimates, E[f(X) | y], applied per pixel to flattened samples."""

from __future__ import annotations

from typing import Callable, Literal

import torch

from lightning_mlmc.errors import InputError

Tensor = torch.Tensor
PayoffName = Literal["second_moment", "mean", "moments", "mean_std"]
PAYOFFS = ("second_moment", "mean", "moments", "mean_std")


def make_payoff(name: str | Callable = "second_moment", clip: float | None = None) -> Callable[[Tensor], Tensor]:
    """Payoff f: (N, n) -> (N, k). ``second_moment`` (x^2, the default), ``mean`` (x), ``moments``
    ([x, x^2], k = 2n: posterior mean and variance from one run) or a callable; ``clip`` clamps x to
    [-clip, clip] first."""
    if callable(name):
        base = name
    elif name == "second_moment":
        base = lambda x: x * x  # noqa: E731
    elif name == "mean":
        base = lambda x: x  # noqa: E731
    elif name in ("moments", "mean_std"):  # mean_std: its first run's (``maps.mean_std_maps``)
        base = lambda x: torch.cat([x, x * x], dim=1)  # noqa: E731
    else:
        raise InputError(f"payoff: unknown payoff {name!r}; expected second_moment, mean, moments or a callable")
    if clip is not None:
        if not clip > 0:
            raise InputError(f"clip: expected a positive number, got {clip}")
        return lambda x: base(x.clamp(-clip, clip))
    return base


def apply_payoff(payoff: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """f of every sample of x (shape (N, *event_shape)), as float64 of shape (N, k); checks f's output."""
    flat = x.reshape(x.shape[0], -1)
    out = payoff(flat)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != flat.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"payoff: returned {got}, expected a tensor of shape ({flat.shape[0]}, k) "
                         "(samples x payoff components)")
    return out.to(torch.float64)
