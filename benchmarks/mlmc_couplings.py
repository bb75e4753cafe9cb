"""Per-level coupled variance V_l of each coarse-noise coupling on the trained digits models.

For each model, grid and coupling (naive, the seed's weighted, jacobian with data_std 0.5), N coupled
(fine, coarse) pairs per level with the *same* seeds, so every coupling sees the same x_T and the same fine
noises and the comparison is paired. Reports V_l, its standard error V_l sqrt((kurtosis - 1) / N), the
mean |E[Y_l]| and the ratio to the naive coupling's V_l.

    .venv/bin/python -m benchmarks.mlmc_couplings      # writes results/mlmc_couplings.json
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from benchmarks.machine import machine_info
from benchmarks.mlmc_bench import (ROOT, TRAINED_MODELS, log, make_sampler, make_scheme, trained_model_paths,
                                   trained_target, write_result)

from lightning_mlmc.mlmc import level_stats

COUPLINGS = [("naive", 0.5), ("weighted", 0.5), ("jacobian", 0.5)]


def probe(target, grid: str, coupling: str, data_std: float, levels, n: int) -> list[dict]:
    s = make_sampler(target, make_scheme(grid, coupling, lmin=0, data_std=data_std), seed=7)
    rows = []
    for level in levels:
        st = level_stats(level, s(level, n), s.cost(level))
        rows.append({"level": level, "V_l": st.var, "V_l_se": st.var * math.sqrt(max(st.kurtosis - 1, 0.0) / n),
                     "mean_l": st.mean, "V_P_l": st.var_fine, "kurtosis": st.kurtosis})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(TRAINED_MODELS), default=sorted(TRAINED_MODELS))
    ap.add_argument("--grids", nargs="+", default=["logsnr", "uniform"])
    ap.add_argument("--levels", type=int, nargs=2, default=[2, 7], metavar=("FIRST", "LAST"))
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mlmc_couplings.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    levels = range(args.levels[0], args.levels[1] + 1)
    out = {"machine": machine_info(), "pairs_per_level": args.pairs, "rows": []}
    for name in args.models:
        target = trained_target(*trained_model_paths(name), TRAINED_MODELS[name])
        for grid in args.grids:
            naive = None
            for coupling, data_std in COUPLINGS:
                rows = probe(target, grid, coupling, data_std, levels, args.pairs)
                naive = naive or rows
                for r, rn in zip(rows, naive):
                    r["ratio_to_naive"] = r["V_l"] / rn["V_l"]
                out["rows"].append({"model": TRAINED_MODELS[name], "grid": grid, "coupling": coupling,
                                    "data_std": data_std if coupling == "jacobian" else None, "levels": rows})
                log(name, grid, coupling, " ".join(f"{r['V_l']:.2e}({r['ratio_to_naive']:.2f})" for r in rows))
                write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
