"""Training-step time of ``ScoreModule`` under a Lightning Trainer against a plain PyTorch loop.

    python -m benchmarks.train_throughput [--steps 60] [--repeats 3] [--batch-size 128]

Both run the same UNet (configs/digits_superres.yaml sizes), the same batches from the same
DataLoader, the same loss (``ScoreModule.dsm_loss``), AdamW with the same warm-up schedule, on the same
device. The Lightning run has no logger, checkpointing or progress bar (framework overhead only); a
second Lightning row adds Lightning's EMA callback and a third ``callbacks.FusedEMA`` (the configs' EMA: the
same average with one foreach update per step); both are real costs, reported separately. A step's time is the
time between consecutive batch ends (data loading included); the first ``warmup`` steps are dropped and
each run reports its median step, which is robust to the machine's noise spikes. The variants alternate
``repeats`` times in one process and the medians over repeats are compared. Writes
benchmarks/results/train_throughput.json (train_throughput_cuda.json on a GPU).
"""

import argparse
import json
import os
import statistics
import time

import pytorch_lightning as pl
import torch

from benchmarks.machine import machine_info

from callbacks import FusedEMA
from datamodules import DigitsDataModule
from lightning_mlmc.module import ScoreModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPERATOR = {"name": "superres", "factor": 2, "noise_std": 0.05}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepTimer(pl.Callback):
    """Times between consecutive batch ends (a full step, data loading included) after ``warmup`` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.last, self.times = warmup, None, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync(pl_module.device)
        now = time.perf_counter()
        if self.last is not None and trainer.global_step > self.warmup:
            self.times.append(now - self.last)
        self.last = now


def batches(dm):
    """An endless iterator over the training DataLoader."""
    while True:
        yield from dm.train_dataloader()


def plain_loop(dm, steps: int, warmup: int, device) -> float:
    pl.seed_everything(0)
    module = ScoreModule(operator=dm.operator_config()).to(device)
    opt_conf = module.configure_optimizers()
    opt, sched = opt_conf["optimizer"], opt_conf["lr_scheduler"]["scheduler"]
    module.train()
    it = batches(dm)
    last, times = None, []
    for step in range(steps):
        x, y = next(it)
        x, y = x.to(device), y.to(device)
        loss = module.dsm_loss(x, y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _sync(device)
        now = time.perf_counter()
        if last is not None and step >= warmup:
            times.append(now - last)
        last = now
    return statistics.median(times)


EMA_CALLBACKS = {"": None, "_ema": lambda: pl.callbacks.EMAWeightAveraging(decay=0.995),
                 "_fused_ema": lambda: FusedEMA(decay=0.995)}


def lightning_loop(dm, steps: int, warmup: int, device, ema: str) -> float:
    pl.seed_everything(0)
    module = ScoreModule(operator=dm.operator_config())
    timer = StepTimer(warmup)
    callbacks = [timer] + ([EMA_CALLBACKS[ema]()] if EMA_CALLBACKS[ema] else [])
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         accelerator=device.type, devices=1, max_epochs=-1)
    trainer.fit(module, dm)
    return statistics.median(timer.times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    dm = DigitsDataModule(OPERATOR, batch_size=args.batch_size)
    dm.setup("fit")
    times = {"plain": [], **{f"lightning{ema}": [] for ema in EMA_CALLBACKS}}
    for _ in range(args.repeats):
        times["plain"].append(plain_loop(dm, args.steps, args.warmup, device))
        for ema in EMA_CALLBACKS:
            times[f"lightning{ema}"].append(lightning_loop(dm, args.steps, args.warmup, device, ema))
        print({k: round(v[-1] * 1e3, 2) for k, v in times.items()}, "ms/step")
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": machine_info(),
        "device": str(device),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "ms_per_step": {k: [round(t * 1e3, 3) for t in v] for k, v in times.items()},
        "median_ms_per_step": {k: round(v * 1e3, 3) for k, v in med.items()},
        "overhead_lightning": med["lightning"] / med["plain"] - 1.0,
        "overhead_lightning_ema": med["lightning_ema"] / med["plain"] - 1.0,
        "overhead_lightning_fused_ema": med["lightning_fused_ema"] / med["plain"] - 1.0,
        "target_overhead": 0.05,
    }
    print(json.dumps({k: result[k] for k in ("median_ms_per_step", "overhead_lightning", "overhead_lightning_ema",
                                             "overhead_lightning_fused_ema")}))
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    name = "train_throughput.json" if device.type == "cpu" else f"train_throughput_{device.type}.json"
    with open(os.path.join(ROOT, "benchmarks", "results", name), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
