"""What a network row costs, in a unit that stays honest across networks: FLOPs per row
(``torch.utils.flop_counter``), and seconds per row as the engine measures them at its batch sizes."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_mlmc.sampling import batch_obs, call_model


@torch.no_grad()
def flops_per_row(model, shape, y, dtype=torch.float32, device="cpu", rows: int = 2) -> float:
    """FLOPs of one row of ``model(x_t, y, t)`` (counted on ``rows`` rows at t = 0.5 and divided; the count of
    a network's matrix products and convolutions does not depend on the values)."""
    x = torch.zeros((rows, *shape), dtype=dtype, device=device)
    t = torch.full((rows,), 0.5, dtype=torch.float64, device=device)
    with FlopCounterMode(display=False) as counter:
        call_model(model, x, batch_obs(y, rows), t)
    return counter.get_total_flops() / rows
