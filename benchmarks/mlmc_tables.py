"""Print the README's MLMC tables (markdown) from results/mlmc_vs_mc.json and results/mlmc_grids_<model>.json."""

from __future__ import annotations

import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    path = os.path.join(HERE, "results", name)
    return json.load(open(path)) if os.path.exists(path) else None


def _machine(m) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['cpu']}, {m['cores']} cores{gpu}, {m['date'][:10]}, commit {m['commit']}"


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.3f}x"


def vs_mc_table(data) -> str:
    """MLMC against the plain MC its result names (run for real), per problem, scheme and eps."""
    stamps = {}
    for r in data["rows"]:
        stamps.setdefault(r["problem"].split(" (")[0], _machine(r.get("machine", data["machine"])))
    out = ["Machine: " + "; ".join(f"{k}: {v}" for k, v in stamps.items()) + ".", "",
           "| problem | scheme | eps | runs | MLMC: L (method) | MLMC NFE | plain MC it names (steps x samples) | "
           "MC NFE | **savings** (measured) | Giles' same-grid figure | MLMC RMSE | MC RMSE | rounds |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ls = sorted(set(r["L"]))
        lrange = f"{ls[0]}-{ls[-1]}" if len(ls) > 1 else str(ls[0])
        methods = sorted(set(r["methods"]))
        steps = sorted(set(r["mc_steps"]))
        mc = f"{'/'.join(map(str, steps))} x {int(np.mean(r['mc_samples'])):,}"
        out.append(f"| {r['problem'].split(' (')[0]} | {r['scheme']} | {r['eps']} | {r['repeats']} "
                   f"| {lrange} ({'/'.join(methods)}) | {r['mlmc_nfe']:,.0f} | {mc} | {r['mc_nfe']:,.0f} "
                   f"| **{_ratio(r['savings_measured'])}** | {_ratio(r['savings_same_grid'])} | {r['mlmc_rmse']:.4f} "
                   f"| {r['mc_rmse']:.4f} | {np.mean(r['rounds']):.1f} |")
    return "\n".join(out)


def grids_table(data) -> str:
    ref = data["reference"]
    against = (f"{ref['exact']}" if "exact" in ref else f"a reference MLMC run at eps {ref['eps']} (rmse_bound "
               f"{ref['rmse_bound']:.4f}, {ref['nfe']:,.0f} NFEs)")
    runs = data["runs"]
    machines = "; ".join(_machine(r["machine"]) for r in runs)
    out = [f"{data['model']}, {data['observation']}; machine{'s' if len(runs) > 1 else ''}: {machines}. Errors "
           f"against {against}." + ("" if data.get("complete") else " **Incomplete run.**"), "",
           "| scheme (grid/coupling/Lmin/M) | eps | Lmin..L | alpha | beta | MLMC NFE | MC NFE (same grid, L) "
           "| savings (measured) | vs the best plain MC | MLMC error | MC error |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = data["rows"]
    # Plain MC on each scheme's grid needs that grid's L; the cheapest of them is the fair bar for every scheme.
    best_mc = {eps: min(r["mc_nfe"] for r in rows if r["eps"] == eps) for eps in {r["eps"] for r in rows}}
    for r in rows:
        mark = "" if r["converged"] else "*"
        out.append(f"| {r['scheme'].removesuffix('/ddpm')} | {r['eps']} | {r['lmin']}..{r['L']}{mark} | {r['alpha']:.2f} "
                   f"| {r['beta']:.2f} | {r['mlmc_nfe']:,.0f} | {r['mc_nfe']:,.0f} | **{r['savings_measured']:.2f}x** "
                   f"| {_ratio(best_mc[r['eps']] / r['mlmc_nfe'])} | {r['mlmc_error']:.4f} | {r['mc_error']:.4f} |")
    if not all(r["converged"] for r in rows):
        out += ["", "\\* the bias test still failed at the benchmark's Lmax (11): the estimate is from levels up to 11."]
    return "\n".join(out)


def oracle_table(data) -> str:
    out = ["Exact oracle (4x4 Gaussian inpainting), slopes over levels 7..10:", "",
           "| grid | coupling | alpha | beta | V_10 |", "|---|---|---|---|---|"]
    for r in data["oracle"]:
        out.append(f"| {r['grid']} | {r['coupling']} | {r['alpha_fine']:.2f} | {r['beta_fine']:.2f} | {r['V_l'][-1]:.2e} |")
    return "\n".join(out)


def couplings_table(data) -> str:
    levels = [lv["level"] for lv in data["rows"][0]["levels"]]
    out = [f"Machine: {_machine(data['machine'])}; {data['pairs_per_level']} coupled pairs per level, the same seeds "
           "for every coupling. V_l (ratio to the naive coupling's):", "",
           "| model | grid | coupling | " + " | ".join(f"V_{l}" for l in levels) + " |",
           "|---|---|---|" + "---|" * len(levels)]
    for r in data["rows"]:
        c = f"jacobian({r['data_std']:g})" if r["coupling"] == "jacobian" else r["coupling"]
        cells = " | ".join(f"{lv['V_l']:.2e} ({lv['ratio_to_naive']:.2f})" for lv in r["levels"])
        out.append(f"| {r['model'].split(' (')[0]} | {r['grid']} | {c} | {cells} |")
    return "\n".join(out)


if __name__ == "__main__":
    for name, fn in (("mlmc_vs_mc.json", vs_mc_table), ("mlmc_grids_superres.json", grids_table),
                     ("mlmc_grids_inpaint.json", grids_table), ("mlmc_grids_analytic.json", grids_table),
                     ("mlmc_grids_superres.json", oracle_table), ("mlmc_couplings.json", couplings_table)):
        data = _load(name)
        if data is not None:
            print(f"### {name}\n\n{fn(data)}\n")
