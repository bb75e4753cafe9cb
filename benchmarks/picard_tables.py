"""Markdown tables for the README and docs/picard.md from the Picard result files.

    python -m benchmarks.picard_tables [--results benchmarks/results] [--suffix _cuda]
"""

import argparse
import json
import math
import os
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(folder, name):
    path = os.path.join(folder, name)
    return json.load(open(path)) if os.path.isfile(path) else None


def _stamp(d) -> str:
    m = d["machine"]
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date'][:10]}, commit {m['commit']}"


def grid_table(d) -> str:
    rows = [r for r in d["rows"] if r["part"] == "grid"]
    key = lambda r: (r["sampler"], r["steps"], r["window"], r["tol"])  # noqa: E731
    by = defaultdict(dict)
    for r in rows:
        by[key(r)][r["scheme"]] = r
    out = ["| sampler | steps | window | tol | rounds: prefix / ParaDiGMS / Anderson 2 | NFE: prefix / ParaDiGMS / "
           "Anderson 2 | dev/spread: ParaDiGMS / Anderson 2 | wall speedup: ParaDiGMS / Anderson 2 |",
           "|---|---|---|---|---|---|---|---|"]
    for k in sorted(by, key=lambda k: (k[0], k[1], k[2], -k[3])):
        s = by[k]
        a, p, q = s["picard-prefix"], s["picard"], s["anderson2"]
        out.append(f"| {k[0].upper()} | {k[1]} | {k[2]} | {k[3]:g} | {a['rounds']} / {p['rounds']} / {q['rounds']} | "
                   f"{a['nfe']} / {p['nfe']} / {q['nfe']} | {p['rms_dev_over_spread']:.1e} / "
                   f"{q['rms_dev_over_spread']:.1e} | {p['speedup_wall']:.2f} / {q['speedup_wall']:.2f} |")
    return "\n".join(out)


def seeds_table(d, part="seeds") -> str:
    rows = [r for r in d["rows"] if r["part"] == part]
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[(r["problem"], r["sampler"], r["steps"], r["window"])][r["scheme"]].append(r)
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    out = ["| problem | sampler | steps | window | scheme | tol | rounds per seed | mean rounds | vs ParaDiGMS Picard | "
           "max dev/spread |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(by):
        base = sum(r["rounds"] for r in by[k]["picard"]) / len(by[k]["picard"])
        for s in schemes:
            rs = sorted(by[k][s], key=lambda r: r["seed"])
            if not rs:
                continue
            mean = sum(r["rounds"] for r in rs) / len(rs)
            out.append(f"| {k[0]} | {k[1].upper()} | {k[2]} | {k[3]} | {s} | {rs[0]['tol']:g} | "
                       f"{', '.join(str(r['rounds']) for r in rs)} | {mean:.1f} | {mean / base:.2f}x | "
                       f"{max(r['rms_dev_over_spread'] for r in rs):.1e} |")
    return "\n".join(out)


def _steps_for(seq, err) -> float:
    """Sequential steps needed for ``err``: log-log interpolation of the sequential curve; 0 when even its fewest
    steps do better, inf when even its most steps do worse."""
    pts = sorted((r["steps"], r["err_m2"]) for r in seq)
    for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
        if e1 <= err <= e0:
            return math.exp(math.log(n0) + (math.log(err) - math.log(e0)) * (math.log(n1) - math.log(n0))
                            / (math.log(e1) - math.log(e0)))
    return float("inf") if err < pts[-1][1] else 0.0


def _fmt_steps(n, seq) -> str:
    if n == 0:
        return f"< {min(r['steps'] for r in seq)}"
    if math.isinf(n):
        return f"> {max(r['steps'] for r in seq)}"
    return f"{n:.0f}"


def piadm_table(d, sampler="ddim") -> str:
    seq = defaultdict(list)
    for r in d["rows"]:
        if r["kind"] == "sequential" and r["sampler"] == sampler:
            seq[r["grid"]].append(r)
    rows = [r for r in d["rows"] if r["kind"] == "piadm" and r["sampler"] == sampler]
    out = ["| clock | blocks x points (steps) | K | corrector | rounds | NFE | error E[x^2] | sequential steps for it "
           "(uniform / log-SNR) | steps / rounds |", "|---|---|---|---|---|---|---|---|---|"]
    # The Pareto front of error against rounds, per clock and corrector.
    groups = defaultdict(list)
    for r in rows:
        groups[(r["clock"], r["corrector"])].append(r)
    for g in sorted(groups):
        front, best = [], float("inf")
        for r in sorted(groups[g], key=lambda r: (r["rounds"], r["err_m2"])):
            if r["err_m2"] < best:
                front.append(r)
                best = r["err_m2"]
        for r in front:
            nu, nl = _steps_for(seq["uniform"], r["err_m2"]), _steps_for(seq["logsnr"], r["err_m2"])
            best = min(nu, nl)
            saved = "-" if best == 0 else ("never reached" if math.isinf(best) else f"{best / r['rounds']:.1f}x")
            out.append(f"| {r['clock']} | {r['blocks']} x {r['points']} ({r['steps']}) | {r['sweeps']} | "
                       f"{r['corrector']} | {r['rounds']} | {r['nfe']} | {r['err_m2']:.2e} | "
                       f"{_fmt_steps(nu, seq['uniform'])} / {_fmt_steps(nl, seq['logsnr'])} | {saved} |")
    return "\n".join(out)


def sequential_table(d) -> str:
    by = defaultdict(dict)
    for r in d["rows"]:
        if r["kind"] == "sequential":
            by[r["steps"]][(r["sampler"], r["grid"])] = r["err_m2"]
    cols = [("ddpm", "uniform"), ("ddpm", "logsnr"), ("ddim", "uniform"), ("ddim", "logsnr")]
    out = ["| steps | " + " | ".join(f"{s.upper()} {g}" for s, g in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in sorted(by):
        out.append(f"| {n} | " + " | ".join(f"{by[n][c]:.2e}" for c in cols) + " |")
    return "\n".join(out)


def digits_table(d) -> str:
    return seeds_table(d, part="digits").replace("| problem |", "| model |")


def weak_order_table(d) -> str:
    """Weak order of DDIM and DPM-Solver++(2M): fitted slopes and the errors at a few step counts."""
    weak = defaultdict(dict)
    for r in d["rows"]:
        if r["kind"] == "weak":
            weak[(r["grid"], r["solver"])][r["steps"]] = r["err_flow_m2"]
    slopes = {(r["grid"], r["solver"]): r["slope"] for r in d["rows"] if r["kind"] == "slope"}
    shown = (16, 64, 256)
    out = ["| grid | solver | slope (32..256 steps) | " + " | ".join(f"error at {n}" for n in shown) + " |",
           "|---" * (3 + len(shown)) + "|"]
    for key in sorted(weak):
        errs = weak[key]
        out.append(f"| {key[0]} | {key[1]} | {slopes[key]:.2f} | " + " | ".join(f"{errs[n]:.1e}" for n in shown) + " |")
    return "\n".join(out)


def solver_picard_table(d) -> str:
    rows = [r for r in d["rows"] if r["kind"] == "picard"]
    out = ["| solver | steps | window | tol | rounds: Picard / Anderson 2 | NFE: Picard / Anderson 2 | "
           "dev/spread: Picard / Anderson 2 |", "|---|---|---|---|---|---|---|"]
    by = defaultdict(dict)
    for r in rows:
        by[(r["solver"], r["steps"], r["window"], r["tol"])][r["anderson"]] = r
    for k in sorted(by, key=lambda k: (k[0], k[1], k[2], -k[3])):
        p, q = by[k].get(0), by[k].get(2)
        if p is None or q is None:
            continue
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]:g} | {p['rounds']} / {q['rounds']} | {p['nfe']} / {q['nfe']} | "
                   f"{p['rms_dev_over_spread']:.1e} / {q['rms_dev_over_spread']:.1e} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--suffix", default="")
    args = ap.parse_args()
    for name, parts in ((f"picard{args.suffix}.json", (("grid", grid_table), ("seeds", seeds_table))),
                        (f"picard_piadm{args.suffix}.json", (("sequential", sequential_table),
                                                             ("piadm-ode", piadm_table),
                                                             ("piadm-sde", lambda d: piadm_table(d, "ddpm")))),
                        (f"picard_digits{args.suffix}.json", (("digits", digits_table),)),
                        (f"picard_solvers{args.suffix}.json", (("weak order", weak_order_table),
                                                               ("Picard over the solvers", solver_picard_table)))):
        d = _load(args.results, name)
        if d is None:
            continue
        print(f"## {name} ({_stamp(d)})\n")
        for title, fn in parts:
            print(f"### {title}\n\n{fn(d)}\n")


if __name__ == "__main__":
    main()
