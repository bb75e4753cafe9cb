"""`make demo`: the main job on the bundled default problem (see README)."""

import os
import sys

from lightning_mlmc.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    run = os.path.join(HERE, "runs", "demo")
    os.makedirs(run, exist_ok=True)
    sys.exit(main(["sample", "--problem", os.path.join(HERE, "examples", "inpaint4x4.json"), "--sampler", "ddpm",
                   "--steps", "200", "--num-samples", "2000", "--out", os.path.join(run, "samples.npz")]))
