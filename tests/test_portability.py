"""The tests whose results depend on how the computation is grouped, on MKL's Intel code path, on any x86-64 CPU.

MKL picks its kernels by CPU vendor, through the exported ``mkl_serv_intel_cpu_true``; on Intel CPUs (AVX-512)
it rounds the exact score's batched einsum differently by batch shape, which AMD CPUs do not: a resume test that
compared a resumed run bit for bit passed on AMD CI machines and failed on an Intel one. A one-line shared
library that returns 1 from that function, preloaded (LD_PRELOAD), makes torch's MKL take its Intel paths on an
AMD CPU too; this test compiles it and runs the grouping-sensitive tests (the resumes, the engine's batches
together, the two-process run, the Picard levels) and the same-command bit-identity tests under it, in a
subprocess. They compare across groupings to float rounding (tests/rounding.py) and bit for bit otherwise, so
they pass on either path."""

import ctypes
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYMBOL = "mkl_serv_intel_cpu_true"
TESTS = [
    "tests/test_mlmc.py::test_same_seed_bit_identical_and_resume_to_rounding",
    "tests/test_mlmc.py::test_auto_lmin_driver_counts_the_pilot_and_resumes",
    "tests/test_mlmc_engine.py::test_batches_of_every_level_together_give_each_batchs_own_sums",
    "tests/test_mlmc_engine.py::test_a_run_reports_the_calls_the_network_got",
    "tests/test_mlmc_distributed.py::test_two_processes_equal_one_process_drawing_both_shares",
    "tests/test_mlmc_picard_levels.py::test_window_one_is_the_sequential_coupled_pair",
    "tests/test_mlmc_picard_levels.py::test_a_tiny_tolerance_gives_the_sequential_estimate",
    "tests/test_dashboard.py::test_the_printed_command_reproduces_observation_0_bit_for_bit",
    "tests/test_cli_sample.py::test_npz_contract",
    "tests/test_samplers.py::test_same_seed_same_samples_and_noise_source_is_order_free",
]


def _mkl_exports_the_vendor_check() -> bool:
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        return os.path.exists(lib) and hasattr(ctypes.CDLL(lib), SYMBOL)
    except OSError:
        return False


def _skip_reason() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"MKL's Intel code path needs an x86-64 CPU, not {platform.machine()}"
    if not sys.platform.startswith("linux"):
        return "LD_PRELOAD needs Linux"
    if shutil.which("gcc") is None:
        return "gcc is needed to compile the vendor-check shim"
    if not torch.backends.mkl.is_available() or not _mkl_exports_the_vendor_check():
        return f"this torch has no MKL exporting {SYMBOL} (nothing to force)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_grouping_sensitive_tests_pass_on_mkls_intel_path(tmp_path):
    source, shim = tmp_path / "fakeintel.c", tmp_path / "libfakeintel.so"
    source.write_text(f"int {SYMBOL}(void) {{ return 1; }}\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(shim), str(source)], check=True, capture_output=True)
    env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, [str(shim), os.environ.get("LD_PRELOAD")])),
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline"}
    # The shim is what the process resolves the vendor check to (so MKL, inside libtorch_cpu, sees an Intel CPU).
    probe = subprocess.run([sys.executable, "-c", f"import ctypes, torch; print(ctypes.CDLL(None).{SYMBOL}())"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    assert probe.returncode == 0 and probe.stdout.strip() == "1", probe.stderr[-2000:]
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], env=env,
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    assert " passed" in p.stdout and "skipped" not in p.stdout, p.stdout[-2000:]
