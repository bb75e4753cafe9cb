"""Train (or reuse) a digits model for the MLMC benchmarks and write its inputs.

    .venv/bin/python -m benchmarks.prepare_model --config configs/digits_inpaint.yaml --run-dir runs/digits_inpaint

Trains the config with LightningCLI (W&B offline) unless RUN_DIR/checkpoints/last.ckpt exists, exports the
EMA model as a diffusers folder (RUN_DIR/export) and writes the first four validation observations as
RUN_DIR/observation_<i>.npz (y and the clean x), the inputs of `lightning-mlmc mlmc --checkpoint ...
--observation ...` and of benchmarks/mlmc_grids.py. `make demo` does the same for configs/digits_superres.yaml.
"""

from __future__ import annotations

import argparse
import os

import yaml

from lightning_mlmc.demo import export_run, train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    with open(args.config) as f:
        if not yaml.safe_load(f)["data"]["class_path"].endswith("DigitsDataModule"):
            raise SystemExit(f"prepare_model: {args.config} is not a digits config")
    ckpt = os.path.join(args.run_dir, "checkpoints", "last.ckpt")
    if not os.path.isfile(ckpt):
        ckpt = train(args.run_dir, None, args.config)
    export_run(ckpt, args.run_dir, args.config)
    print(f"model: {os.path.join(args.run_dir, 'export')}; observations: {args.run_dir}/observation_0..3.npz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
