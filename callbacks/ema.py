"""Lightning's EMA callback with a multi-tensor (foreach) update.

``pytorch_lightning.callbacks.EMAWeightAveraging`` hands ``AveragedModel`` a per-tensor ``avg_fn``, so every
step updates the average with a Python loop of a few kernels per parameter tensor. For a small UNet on a GPU
that loop is launch-bound and costs as much as a third of the training step (benchmarks/train_throughput.py).
``FusedEMA`` gives ``AveragedModel`` the equivalent ``multi_avg_fn`` instead: one fused lerp over all tensors
of a device and dtype per step. Same average (up to float rounding), same checkpoint layout and state key
(a checkpoint written with either callback resumes with the other), same options.
"""

from __future__ import annotations

import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn
from typing_extensions import override

from lightning_mlmc.errors import InputError


class FusedEMA(EMAWeightAveraging):
    """EMA of the weights (and buffers), updated with one foreach lerp per step.

    Args:
        decay: EMA decay in (0, 1): average <- decay * average + (1 - decay) * weights.
        update_every_n_steps, update_starting_at_step, update_starting_at_epoch: when to update, as in
            ``EMAWeightAveraging`` (whose ``should_update`` this class keeps).
        device, use_buffers, **kwargs: as ``WeightAveraging`` (passed on to ``AveragedModel``).
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 update_starting_at_epoch: int | None = None, device: torch.device | str | int | None = None,
                 use_buffers: bool = True, **kwargs):
        if not 0.0 < decay < 1.0:
            raise InputError(f"decay: expected a number in (0, 1), got {decay}")
        # EMAWeightAveraging.__init__ would pass the per-tensor avg_fn, and AveragedModel takes only one of the two.
        WeightAveraging.__init__(self, device=device, use_buffers=use_buffers,
                                 multi_avg_fn=get_ema_multi_avg_fn(decay), **kwargs)
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    @property
    @override
    def state_key(self) -> str:
        # Lightning's key: checkpoints of runs made with EMAWeightAveraging resume with FusedEMA and back.
        return EMAWeightAveraging.__qualname__
