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


def _configure(tmp_path, *defines, env_extra=None):
    """Configures the project in tmp_path/build with no TensorRT variable set (plus ``env_extra``):
    (the finished CMake process, the cmake command, the environment used, the build folder)."""
    pybind11 = pytest.importorskip("pybind11", reason="needs pybind11 (pip install '.[test]' brings it)")
    if not (REPO / "CMakeLists.txt").is_file():
        pytest.skip("the source tree is not beside the tests")
    try:
        configure_cmd = cmake_command()
    except DoubleBuildError as error:
        pytest.skip(str(error))
    env = {k: v for k, v in os.environ.items() if k not in ("TensorRT_INCLUDE_DIR", "TensorRT_ROOT")}
    env.update(env_extra or {})
    build = tmp_path / "build"
    result = subprocess.run(
        [*configure_cmd, "-S", str(REPO), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", *defines],
        env=env, capture_output=True, text=True, timeout=600)
    return result, configure_cmd, env, build


def test_core_extension_and_sample_build_without_tensorrt_headers(tmp_path):
    configure, configure_cmd, env, build = _configure(tmp_path, "-DCMAKE_BUILD_TYPE=Release")
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


@pytest.mark.parametrize("where", ["cmake", "environment"])
def test_a_tensorrt_path_given_without_headers_is_a_configure_error(tmp_path, where):
    """A TensorRT_INCLUDE_DIR the user named but that holds no headers fails the configure naming it,
    instead of building without the backend (or against headers found elsewhere)."""
    missing = str(tmp_path / "no-tensorrt-here")
    if where == "cmake":
        result = _configure(tmp_path, f"-DTensorRT_INCLUDE_DIR={missing}")[0]
    else:
        result = _configure(tmp_path, env_extra={"TensorRT_INCLUDE_DIR": missing})[0]
    assert result.returncode != 0
    text = " ".join((result.stdout + result.stderr).split())  # CMake wraps its messages
    assert "no TensorRT header NvInferVersion.h in TensorRT_INCLUDE_DIR=" in text and "no-tensorrt-here" in text, text[-3000:]
    assert "unset TensorRT_INCLUDE_DIR and TensorRT_ROOT" in text


def test_an_unknown_cuda_source_is_a_configure_error(tmp_path):
    result = _configure(tmp_path, "-DMDTRT_CUDA_FROM=bogus")[0]
    assert result.returncode != 0
    text = " ".join((result.stdout + result.stderr).split())
    assert "MDTRT_CUDA_FROM=bogus is not one of auto, toolkit, wheels" in text, text[-3000:]
