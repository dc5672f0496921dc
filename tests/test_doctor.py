"""`python -m mdtrt doctor` runs on any machine and exits as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mdtrt
from mdtrt import _core


def run_doctor(*args):
    return subprocess.run([sys.executable, "-m", "mdtrt", "doctor", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))


def test_doctor_json_matches_this_machine():
    out = run_doctor("--json")
    assert "Traceback" not in out.stderr
    report = json.loads(out.stdout)
    gpus = _core.visible_gpu_count()
    assert len(report["cuda"]["gpus"]) == gpus
    # Compared with a fresh process: in this one another library (torch) may have loaded its NCCL first.
    fresh = subprocess.run([sys.executable, "-c", "import mdtrt; print(mdtrt.nccl_library().version)"],
                           capture_output=True, text=True, timeout=60)
    assert report["nccl"]["found"] and report["nccl"]["version"] == fresh.stdout.strip()
    assert report["tensorrt"]["compiled_in"] == mdtrt.build_info()["tensorrt_backend"]
    assert out.returncode == (0 if report["can_run_multi_device"] else 1)
    if gpus < 2:
        assert not report["can_run_multi_device"]
        assert any("GPU" in r for r in report["reasons"])


def test_doctor_text_report():
    out = run_doctor()
    assert "Traceback" not in out.stderr
    assert "NCCL" in out.stdout and "GPUs" in out.stdout and "TensorRT" in out.stdout
    if _core.visible_gpu_count() < 2:
        assert out.returncode == 1
        assert "cannot run multi-device inference" in out.stdout


def test_doctor_rejects_unknown_option():
    out = run_doctor("--bogus")
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr


def test_build_info_fields():
    info = mdtrt.build_info()
    assert info["version"] == mdtrt.__version__
    assert info["cuda_version"] >= 12000
    assert isinstance(info["tensorrt_backend"], bool) and info["tensorrt_reason"]
