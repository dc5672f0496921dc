"""Configuring and building this source tree with CMake from tests (marked `build`): the same
clean environment (no TensorRT variable, so only what a test passes decides the backend) for every
test that builds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trt_double import DoubleBuildError, cmake_command

REPO = Path(__file__).resolve().parent.parent


def configure(tmp_path, *defines, env_extra=None, python=True):
    """Configures the project in tmp_path/build with no TensorRT variable set (plus ``env_extra``),
    with this Python and pybind11 unless ``python`` is False: (the finished CMake process, the
    cmake command, the environment used, the build folder). Skips without the source tree, cmake,
    or (``python``) pybind11."""
    if not (REPO / "CMakeLists.txt").is_file():
        pytest.skip("the source tree is not beside the tests")
    python_defines = []
    if python:
        pybind11 = pytest.importorskip("pybind11", reason="needs pybind11 (pip install '.[test]' brings it)")
        python_defines = [f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    try:
        cmake = cmake_command()
    except DoubleBuildError as error:
        pytest.skip(str(error))
    env = {k: v for k, v in os.environ.items() if k not in ("TensorRT_INCLUDE_DIR", "TensorRT_ROOT")}
    env.update(env_extra or {})
    build = tmp_path / "build"
    result = subprocess.run([*cmake, "-S", str(REPO), "-B", str(build), *python_defines, *defines],
                            env=env, capture_output=True, text=True, timeout=600)
    return result, cmake, env, build


def build_targets(cmake, build, env, *targets):
    """Builds ``targets`` in ``build`` (at most 4 jobs): the finished CMake process."""
    return subprocess.run([cmake[0], "--build", str(build), "--parallel", str(min(4, os.cpu_count() or 1)),
                           "--target", *targets], env=env, capture_output=True, text=True, timeout=1200)
