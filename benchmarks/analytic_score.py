"""A trained MLP score against the exact score of an analytic problem (configs/analytic_inpaint.yaml).

    python -m benchmarks.analytic_score [--spec examples/inpaint4x4.json] [--epochs 30]

Trains ``ScoreModule(network="mlp")`` on draws from the spec's Gaussian-mixture prior (``AnalyticDataModule``,
EMA weights), then reports, for two kinds of observation,
- the spec's own y (for inpaint4x4 an atypical one: Mahalanobis^2 about 35 on 8 observations under the
  prior predictive, so the amortised network has seen few training pairs near it), and
- typical y: the datamodule's fixed validation observations, drawn like the training pairs,
the relative L2 error of eps_theta against the exact eps (= the score's relative error) for t on a grid
in [0.01, 1], with x_t from the exact diffused posterior, and the per-pixel posterior second moment
E[x^2 | y] of DDPM samples from the network next to the same sampler with the exact score (separating the
network's error from the discretisation bias) and the exact posterior value.
Writes benchmarks/results/analytic_score.json.
"""

import argparse
import json
import os
import time

import pytorch_lightning as pl
import torch

from benchmarks.machine import machine_info

from datamodules import AnalyticDataModule
from lightning_mlmc import NoiseSource, sample
from lightning_mlmc.module import ScoreModule
from lightning_mlmc.problems import ExactPosteriorEps, eps_relative_error, exact_posterior

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]


def second_moment(model, spec, n, steps, seed):
    y = torch.as_tensor(spec.y)[None]
    out = sample(model, y, NoiseSource(seed, (n, *spec.shape)), steps=steps, sampler="ddpm")
    x2 = out.samples.reshape(n, -1).double() ** 2
    return x2.mean(0), x2.std(0) / n**0.5


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=os.path.join(ROOT, "examples", "inpaint4x4.json"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--num-train", type=int, default=50000)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--typical", type=int, default=8, help="validation observations averaged over")
    args = ap.parse_args()
    pl.seed_everything(0)
    dm = AnalyticDataModule(args.spec, num_train=args.num_train, num_val=2000, batch_size=512)
    module = ScoreModule(operator=dm.operator_config(), network="mlp", lr=1e-3, warmup_steps=100)
    trainer = pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[pl.callbacks.EMAWeightAveraging(decay=0.999)], check_val_every_n_epoch=args.epochs)
    tic = time.perf_counter()
    trainer.fit(module, dm)
    train_s = time.perf_counter() - tic
    module = module.double().eval()
    _, val_y = dm.validation_observations(args.typical)
    cases = {"spec_y": [dm.spec]} | {"typical_y": [dm.spec.with_observation(y.double().numpy()) for y in val_y]}
    result = {
        "machine": machine_info(),
        "spec": os.path.relpath(args.spec, ROOT),
        "epochs": args.epochs,
        "train_steps": trainer.global_step,
        "train_seconds": train_s,
        "sampler": f"ddpm, {args.steps} steps, {args.samples} samples",
    }
    for name, specs in cases.items():
        errors = {str(t): sum(eps_relative_error(module, s, t) for s in specs) / len(specs) for t in TIMES}
        rel_net, rel_ref = [], []
        for s in specs:
            m2_net, _ = second_moment(module, s, args.samples, args.steps, seed=1)
            m2_ref, _ = second_moment(ExactPosteriorEps(s), s, args.samples, args.steps, seed=1)
            m2_exact = exact_posterior(s).second_moment
            rel_net.append(float((m2_net - m2_exact).norm() / m2_exact.norm()))
            rel_ref.append(float((m2_ref - m2_exact).norm() / m2_exact.norm()))
        result[name] = {
            "observations": len(specs),
            "eps_relative_l2_error": errors,
            "second_moment_relative_l2_error_network": sum(rel_net) / len(rel_net),
            "second_moment_relative_l2_error_exact_score_sampler": sum(rel_ref) / len(rel_ref),
        }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "analytic_score.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
