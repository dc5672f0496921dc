"""The build without TensorRT headers stays green (users without the SDK get it): configure and
build mdtrt_core, the _core extension and the sample with CMake, no TensorRT variable set.

Marked `build` (about a minute on two cores): CI runs it; deselect with -m "not build".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trt_double import DoubleBuildError, cmake_command

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.build


def test_core_extension_and_sample_build_without_tensorrt_headers(tmp_path):
    pybind11 = pytest.importorskip("pybind11", reason="needs pybind11 (pip install '.[test]' brings it)")
    if not (REPO / "CMakeLists.txt").is_file():
        pytest.skip("the source tree is not beside the tests")
    try:
        configure_cmd = cmake_command()
    except DoubleBuildError as error:
        pytest.skip(str(error))
    env = {k: v for k, v in os.environ.items() if k not in ("TensorRT_INCLUDE_DIR", "TensorRT_ROOT")}
    build = tmp_path / "build"
    configure = subprocess.run(
        [*configure_cmd, "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    if "mdtrt TensorRT backend: ON" in configure.stdout:
        pytest.skip("this machine has TensorRT headers in a system place, so the backend is built anyway")
    assert "mdtrt TensorRT backend: OFF" in configure.stdout, configure.stdout[-3000:]
    result = subprocess.run(
        [configure_cmd[0], "--build", str(build), "--parallel", str(min(4, os.cpu_count() or 1)), "--target", "mdtrt_core", "_core",
         "sample_dist_collective"],
        env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert list(build.glob("_core*.so")), "no _core extension was built"
    help_text = subprocess.run([str(build / "samples" / "sampleDistCollective" / "sample_dist_collective"), "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "This build has no TensorRT backend" in help_text
