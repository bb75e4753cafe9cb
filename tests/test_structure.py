"""The package layout rules (DESIGN.md section 1, STYLE.md 12 and 14): dependencies point one way, no import
cycles (module-level or lazy), small modules, entry points inside the packages."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("lightning_mlmc", "callbacks", "datamodules")
MAX_LINES = 400


def _modules(package: str) -> dict[str, str]:
    """module name -> file path of every module of a package."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, module: str) -> set[str]:
    """Every module this file imports, at module level or inside functions (absolute names)."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph(package: str) -> dict[str, set[str]]:
    mods = _modules(package)
    return {m: {i for i in _imports(p, m) if i in mods and i != m} for m, p in mods.items()}


def test_the_library_imports_neither_callbacks_nor_datamodules():
    for module, path in _modules("lightning_mlmc").items():
        bad = {i for i in _imports(path, module) if i.split(".")[0] in ("callbacks", "datamodules")}
        assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    graph = _graph(package)
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_stay_small(package):
    long = {m: n for m, p in _modules(package).items() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_python_m_lightning_mlmc_is_the_command_line(tmp_path):
    """``python -m lightning_mlmc`` runs the same commands as the console script, with the same errors."""
    spec = os.path.join(ROOT, "examples", "bimodal2d.json")
    outs = []
    for cmd in ([sys.executable, "-m", "lightning_mlmc"], [os.path.join(os.path.dirname(sys.executable), "lightning-mlmc")]):
        out = tmp_path / f"{len(outs)}.npz"
        p = subprocess.run([*cmd, "sample", "--problem", spec, "--sampler", "ddim", "--steps", "5", "--num-samples",
                            "3", "--out", str(out)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        outs.append(out.read_bytes())
    import numpy as np

    a, b = (np.load(tmp_path / f"{i}.npz")["samples"] for i in range(2))
    assert np.array_equal(a, b)
    p = subprocess.run([sys.executable, "-m", "lightning_mlmc", "mlmc", "--problem", spec, "--eps", "0",
                        "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "eps" in p.stderr
