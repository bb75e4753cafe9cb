"""`lightning-mlmc sample`: the npz contract and one-line errors with exit status 2."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tests.analytic_cases import EXAMPLES

from lightning_mlmc.cli import main

SPEC = os.path.join(EXAMPLES, "bimodal2d.json")


def test_console_script_installed():
    exe = shutil.which("lightning-mlmc", path=os.path.dirname(sys.executable))
    assert exe is not None
    p = subprocess.run([exe, "sample", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--sampler" in p.stdout


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_npz_contract(tmp_path, sampler):
    out = tmp_path / "s.npz"
    rc = main(["sample", "--problem", SPEC, "--sampler", sampler, "--steps", "30", "--num-samples", "64",
               "--seed", "4", "--out", str(out)])
    assert rc == 0
    z = np.load(out, allow_pickle=False)
    assert z["samples"].shape == (64, 2) and z["samples"].dtype == np.float64
    stats = json.loads(str(z["stats"]))
    assert stats["steps"] == 30 and stats["nfe"] == 30 and stats["rounds"] == 30 and stats["wall_seconds"] >= 0
    assert stats["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    # Same seed -> same samples.
    out2 = tmp_path / "t.npz"
    main(["sample", "--problem", SPEC, "--sampler", sampler, "--steps", "30", "--num-samples", "64",
          "--seed", "4", "--out", str(out2)])
    assert np.array_equal(np.load(out2)["samples"], z["samples"])


@pytest.mark.parametrize("base, picard, options", [
    ("ddpm", "picard-ddpm", ["--anderson", "0", "--slide", "prefix"]),
    ("ddim", "picard-ddim", []),
    ("dpm2m", "picard-dpm2m", ["--slide", "prefix"]),
])
def test_picard_samplers_match_their_sequential_twin(tmp_path, base, picard, options):
    outs = {}
    for sampler, extra in ((base, []), (picard, ["--window", "16", "--tol", "1e-6", *options])):
        out = tmp_path / f"{sampler}.npz"
        assert main(["sample", "--problem", SPEC, "--sampler", sampler, "--steps", "40", "--num-samples", "32",
                     "--seed", "2", "--grid", "logsnr", "--out", str(out), *extra]) == 0
        outs[sampler] = np.load(out)
    a, b = outs[base]["samples"], outs[picard]["samples"]
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-5
    stats = json.loads(str(outs[picard]["stats"]))
    assert stats["rounds"] < 40 and stats["slide"] == (options[-1] if "--slide" in options else "paradigms")


def test_image_problem_with_masked_start(tmp_path):
    out = tmp_path / "s.npz"
    rc = main(["sample", "--problem", os.path.join(EXAMPLES, "inpaint4x4.json"), "--sampler", "ddpm",
               "--start", "masked", "--grid", "edm", "--steps", "16", "--num-samples", "8", "--out", str(out)])
    assert rc == 0 and np.load(out)["samples"].shape == (8, 16)


def _spec_file(tmp_path, mutate):
    d = json.load(open(SPEC))
    mutate(d)
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(d).replace("NaN", "NaN"))
    return str(f)


BAD = [
    ("missing file", lambda tmp: ["--problem", str(tmp / "nope.json")], "does not exist"),
    ("malformed json", lambda tmp: ["--problem", _write(tmp, '{"prior": [')], "not valid JSON"),
    ("truncated json", lambda tmp: ["--problem", _write(tmp, open(SPEC).read()[:100])], "not valid JSON"),
    ("wrong shape", lambda tmp: ["--problem", _spec_file(tmp, lambda d: d.__setitem__("y", [1, 2, 3]))], "y:"),
    ("not pd", lambda tmp: ["--problem", _spec_file(tmp, lambda d: d["prior"]["covs"][0].__setitem__(0, [-0.3, 0.1]))],
     "positive-definite"),
    ("nan in y", lambda tmp: ["--problem", _spec_file(tmp, lambda d: d.__setitem__("y", [float("nan")]))], "y: contains NaN"),
    ("steps 0", lambda tmp: ["--problem", SPEC, "--steps", "0"], "steps"),
    ("unknown sampler", lambda tmp: ["--problem", SPEC, "--sampler", "euler"], "--sampler"),
    ("out folder missing", lambda tmp: ["--problem", SPEC, "--out", str(tmp / "no" / "x.npz")], "out:"),
    ("unknown device", lambda tmp: ["--problem", SPEC, "--device", "tpu"], "--device"),
    ("unknown slide", lambda tmp: ["--problem", SPEC, "--sampler", "picard-ddpm", "--window", "4", "--slide", "greedy"],
     "--slide"),
    ("negative anderson", lambda tmp: ["--problem", SPEC, "--sampler", "picard-ddpm", "--window", "4", "--anderson",
                                       "-1"], "anderson"),
    ("gpu not visible", lambda tmp: ["--problem", SPEC, "--device", "cuda:99"], "device: cuda:99"),
]


def _write(tmp, text):
    f = tmp / "bad.json"
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize("name, args, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_exit_2(tmp_path, name, args, needle):
    base = {"--sampler": "ddpm", "--steps": "10", "--num-samples": "4", "--out": str(tmp_path / "out.npz")}
    extra = args(tmp_path)
    for k in list(base):
        if k in extra:
            del base[k]
    argv = ["sample", *extra, *[x for kv in base.items() for x in kv]]
    exe = shutil.which("lightning-mlmc", path=os.path.dirname(sys.executable))
    p = subprocess.run([exe, *argv], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert needle in lines[0]
    assert not os.path.exists(tmp_path / "out.npz")
