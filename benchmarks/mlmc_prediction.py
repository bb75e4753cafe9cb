"""Does the MLMC callback's predicted complexity hold? Its prediction at eps 0.01 against measured runs.

On `make demo`'s trained super-resolution model and observation 0, with the callback of
configs/digits_superres.yaml (payoff moments, clip 2, the library's MLMC defaults): a validation-sized run
(``--validation-eps``, default the config's 0.02 and the callback's default 0.1) gives the prediction at
``predict_eps`` 0.01 (``MLMCCallback.predict``: the driver on synthetic levels fitted to the run, with its
bootstrap spread); three adaptive runs at eps 0.01 measure the cost and the savings (their own honest
``nfe_mc``). Predictions and measurements use different seeds. The check: the mean
predicted MLMC NFEs and the predicted savings (ratio of the mean NFEs) within 30% of the measured ones.

    .venv/bin/python -m benchmarks.mlmc_prediction     # about 5 minutes on 2 CPU cores

Needs `make demo`'s model (runs/digits_superres/export, observation_0.npz). Writes
benchmarks/results/mlmc_prediction.json.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch
import yaml

from benchmarks.machine import machine_info
from benchmarks.mlmc_bench import ROOT, log, trained_model_paths, trained_target, write_result
from callbacks import MLMCCallback
from lightning_mlmc import WeakConvergenceFailure
from lightning_mlmc.mlmc import run_mlmc

TOLERANCE = 0.30


def one_run(target, config, eps: float) -> tuple:
    levels = config.level_sampler(target.model, target.y, target.shape, dtype=target.dtype, device=target.device)
    tic = time.perf_counter()
    try:
        r, converged = run_mlmc(config, levels, eps), True
    except WeakConvergenceFailure as e:
        r, converged = e.result, False
    return r, {"seed": config.seed, "eps": eps, "converged": converged, "method": r.method, "lmin": r.lmin,
               "L": r.levels[-1].level, "N_l": [lv.n_samples for lv in r.levels], "nfe": r.nfe, "nfe_mc": r.nfe_mc,
               "mc_steps": r.mc_steps, "mc_samples": r.mc_samples, "savings": r.savings,
               "sequential_calls": r.sequential_calls, "alpha": r.alpha, "beta": r.beta,
               "wall_seconds": time.perf_counter() - tic}


def predictions(target, cb: MLMCCallback, eps: float, seeds: list[int]) -> list[dict]:
    out = []
    for seed in seeds:
        r, run = one_run(target, replace(cb.config, seed=seed), eps)
        tic = time.perf_counter()
        p = cb.predict(r)
        row = p.row(cb.predict_eps)
        out.append({"validation_run": run, "predicted_nfe": row.nfe, "predicted_nfe_mc": row.nfe_mc,
                    "predicted_savings": row.savings, "predicted_sequential_calls": row.sequential_calls,
                    "savings_sd": p.savings_sd, "nfe_sd": p.nfe_sd,
                    "savings_interval": list(p.savings_interval), "predicted_L": row.L,
                    "predicted_method": row.method, "table": p.table(), "predict_seconds": time.perf_counter() - tic})
        log(f"validation eps {eps:g} seed {seed}: run nfe {r.nfe:.0f}, N_l {run['N_l']}; predicted at "
            f"{cb.predict_eps:g}: nfe {row.nfe:.0f}, nfe_mc {row.nfe_mc:.0f}, savings {row.savings:.2f} "
            f"(sd {p.savings_sd:.2f})")
    return out


def compare(preds: list[dict], measured: list[dict]) -> dict:
    """Means over the seeds; savings as the ratio of the mean NFEs (as the callback's totals)."""
    pn, pm = np.mean([p["predicted_nfe"] for p in preds]), np.mean([p["predicted_nfe_mc"] for p in preds])
    mn, mm = np.mean([m["nfe"] for m in measured]), np.mean([m["nfe_mc"] for m in measured])
    out = {"predicted_nfe": float(pn), "measured_nfe": float(mn), "predicted_nfe_mc": float(pm),
           "measured_nfe_mc": float(mm), "predicted_savings": float(pm / pn), "measured_savings": float(mm / mn),
           "predicted_savings_each": [p["predicted_savings"] for p in preds],
           "measured_savings_each": [m["savings"] for m in measured],
           "bootstrap_sd_each": [p["savings_sd"] for p in preds],
           "predicted_sequential_calls": float(np.mean([p["predicted_sequential_calls"] for p in preds])),
           "measured_sequential_calls": float(np.mean([m["sequential_calls"] for m in measured]))}
    out["nfe_rel_error"] = out["predicted_nfe"] / out["measured_nfe"] - 1
    out["nfe_mc_rel_error"] = out["predicted_nfe_mc"] / out["measured_nfe_mc"] - 1
    out["savings_rel_error"] = out["predicted_savings"] / out["measured_savings"] - 1
    out["within_tolerance"] = bool(abs(out["nfe_rel_error"]) <= TOLERANCE and abs(out["savings_rel_error"]) <= TOLERANCE)
    return out


def demo_callback() -> MLMCCallback:
    """The MLMC callback as configs/digits_superres.yaml (the demo's config) builds it."""
    with open(os.path.join(ROOT, "configs", "digits_superres.yaml")) as f:
        callbacks = yaml.safe_load(f)["trainer"]["callbacks"]
    return MLMCCallback(**next(c["init_args"] for c in callbacks if c["class_path"] == "callbacks.MLMCCallback"))


def main(argv=None) -> int:
    cb = demo_callback()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--validation-eps", type=float, nargs="+", default=[cb.eps, MLMCCallback().eps])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mlmc_prediction.json"))
    args = ap.parse_args(argv)
    checkpoint, observation = trained_model_paths("superres")
    target = trained_target(checkpoint, observation, "digits super-resolution (trained UNet)")
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"machine": machine_info(), "model": checkpoint, "observation": observation,
           "config": cb.config.to_json(), "predict_eps": cb.predict_eps, "tolerance": TOLERANCE,
           "bootstrap_replicates": cb.bootstrap, "measured": [], "validation": []}
    for seed in range(args.seeds):
        _, run = one_run(target, replace(cb.config, seed=seed), cb.predict_eps)
        log(f"measured eps {cb.predict_eps:g} seed {seed}: nfe {run['nfe']:.0f}, nfe_mc {run['nfe_mc']:.0f}, "
            f"savings {run['savings']:.2f}, N_l {run['N_l']}, {run['wall_seconds']:.0f} s")
        out["measured"].append(run)
    write_result(args.out, out)
    for eps in args.validation_eps:
        preds = predictions(target, cb, eps, [100 + s for s in range(args.seeds)])
        row = {"validation_eps": eps, **compare(preds, out["measured"]), "runs": preds}
        log(f"validation eps {eps:g}: predicted nfe {row['predicted_nfe']:.0f} vs measured {row['measured_nfe']:.0f} "
            f"({row['nfe_rel_error']:+.0%}); savings {row['predicted_savings']:.2f} vs {row['measured_savings']:.2f} "
            f"({row['savings_rel_error']:+.0%}); within {TOLERANCE:.0%}: {row['within_tolerance']}")
        out["validation"].append(row)
        write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
