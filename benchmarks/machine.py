"""Machine, date and commit stamped into every benchmark result."""

import datetime
import os
import platform
import subprocess


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        # Uncommitted code makes the stamp "-dirty"; result files the benchmarks themselves rewrite do not.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ROOT,
                                ":(exclude)benchmarks/results"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        commit += "-dirty" if dirty else ""
    except OSError:
        commit = ""
    # A copy of the tree without its .git (a rented GPU machine) names its commit in BENCH_COMMIT.
    commit = commit or os.environ.get("BENCH_COMMIT", "") or "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
    }
