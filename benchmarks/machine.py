"""Machine, date and commit stamped into every benchmark result."""

import datetime
import os
import platform
import subprocess


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commit() -> str:
    """Short commit of the tree, "-dirty" when code is uncommitted (result files the benchmarks rewrite and
    Markdown do not count). ``BENCH_COMMIT`` overrides it for a copy of the tree whose .git is stale or missing (a rented
    GPU machine): the caller names the commit it copied."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ROOT,
                                ":(exclude)benchmarks/results", ":(exclude)*.md"], capture_output=True, text=True,
                               cwd=ROOT).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("-dirty" if dirty else "")


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
    }
