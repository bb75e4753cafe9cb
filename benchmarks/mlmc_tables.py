"""Print the README's MLMC tables (markdown) from results/mlmc_vs_mc.json and results/mlmc_grids_<model>.json."""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    path = os.path.join(HERE, "results", name)
    return json.load(open(path)) if os.path.exists(path) else None


def _machine(m) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['cpu']}, {m['cores']} cores{gpu}, {m['date'][:10]}, commit {m['commit']}"


def vs_mc_table(data) -> str:
    out = [f"Machine: {_machine(data['machine'])}; scheme {data['scheme']}, theta {data['theta']}.", "",
           "| problem | eps | runs | L | MLMC NFE | MC NFE | savings (measured) | MLMC RMSE | MC RMSE | "
           "rmse_bound | alpha | beta | network share of MLMC wall |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ls = sorted(set(r["L"])) if isinstance(r["L"], list) else [r["L"]]
        out.append(f"| {r['problem']} | {r['eps']} | {r['repeats']} | {'-'.join(map(str, (ls[0], ls[-1]))) if len(ls) > 1 else ls[0]} "
                   f"| {r['mlmc_nfe']:,.0f} | {r['mc_nfe']:,.0f} | **{r['savings_measured']:.2f}x** "
                   f"| {r['mlmc_rmse']:.4f} | {r['mc_rmse']:.4f} | {r['rmse_bound_mean']:.4f} | {r['alpha']:.2f} "
                   f"| {r['beta']:.2f} | {100 * r['network_fraction']:.0f}% |")
    return "\n".join(out)


def grids_table(data) -> str:
    ref = data["reference"]
    against = (f"{ref['exact']}" if "exact" in ref else f"a reference MLMC run at eps {ref['eps']} (rmse_bound "
               f"{ref['rmse_bound']:.4f}, {ref['nfe']:,.0f} NFEs)")
    runs = data.get("runs") or [{"machine": data["machine"]}]
    machines = "; ".join(_machine(r["machine"]) for r in runs)
    out = [f"{data['model']}, {data['observation']}; machine{'s' if len(runs) > 1 else ''}: {machines}. Errors "
           f"against {against}." + ("" if data.get("complete") else " **Incomplete run.**"), "",
           "| scheme (grid/coupling/Lmin/M) | eps | Lmin..L | alpha | beta | MLMC NFE | MC NFE | savings (measured) "
           "| MLMC error | MC error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data.get("rows") or data["digits"]:  # "digits" in files written at commit 6501a5c
        out.append(f"| {r['scheme'].removesuffix('/ddpm')} | {r['eps']} | {r['lmin']}..{r['L']} | {r['alpha']:.2f} "
                   f"| {r['beta']:.2f} | {r['mlmc_nfe']:,.0f} | {r['mc_nfe']:,.0f} | **{r['savings_measured']:.2f}x** "
                   f"| {r['mlmc_error']:.4f} | {r['mc_error']:.4f} |")
    return "\n".join(out)


def oracle_table(data) -> str:
    out = ["Exact oracle (4x4 Gaussian inpainting), slopes over levels 7..10:", "",
           "| grid | coupling | alpha | beta | V_10 |", "|---|---|---|---|---|"]
    for r in data["oracle"]:
        out.append(f"| {r['grid']} | {r['coupling']} | {r['alpha_fine']:.2f} | {r['beta_fine']:.2f} | {r['V_l'][-1]:.2e} |")
    return "\n".join(out)


if __name__ == "__main__":
    for name, fn in (("mlmc_vs_mc.json", vs_mc_table), ("mlmc_grids_superres.json", grids_table),
                     ("mlmc_grids_inpaint.json", grids_table), ("mlmc_grids_analytic.json", grids_table),
                     ("mlmc_grids_superres.json", oracle_table)):
        data = _load(name)
        if data is not None:
            print(f"### {name}\n\n{fn(data)}\n")
