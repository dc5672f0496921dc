"""The build without TensorRT headers stays green (users without the SDK get it): configure and
build mdtrt_core, the _core extension and the sample with CMake, no TensorRT variable set.

Marked `build` (about a minute on two cores): CI runs it; deselect with -m "not build".
"""

from __future__ import annotations

import re
import subprocess

import pytest

from project_build import build_targets, configure

pytestmark = pytest.mark.build


def test_core_extension_and_sample_build_without_tensorrt_headers(tmp_path):
    configured, cmake, env, build = configure(tmp_path, "-DCMAKE_BUILD_TYPE=Release")
    assert configured.returncode == 0, configured.stdout[-3000:] + configured.stderr[-3000:]
    found = re.search(r"mdtrt TensorRT backend: ON \(built against TensorRT \S+ headers at (.+)\)", configured.stdout)
    if found:
        # Skipped only for the reason said: headers in a system place (FindTensorRTHeaders.cmake's
        # search list). Headers found anywhere else, with no TensorRT variable set, are a defect.
        where = found.group(1)
        assert where.startswith(("/usr/", "/opt/")), f"the backend was built against {where}, which nobody named"
        pytest.skip(f"this machine has TensorRT headers in a system place ({where}), so the backend is built anyway")
    assert "mdtrt TensorRT backend: OFF" in configured.stdout, configured.stdout[-3000:]
    result = build_targets(cmake, build, env, "mdtrt_core", "_core", "sample_dist_collective")
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
        result = configure(tmp_path, f"-DTensorRT_INCLUDE_DIR={missing}")[0]
    else:
        result = configure(tmp_path, env_extra={"TensorRT_INCLUDE_DIR": missing})[0]
    assert result.returncode != 0
    text = " ".join((result.stdout + result.stderr).split())  # CMake wraps its messages
    assert "no TensorRT header NvInferVersion.h in TensorRT_INCLUDE_DIR=" in text and "no-tensorrt-here" in text, text[-3000:]
    assert "unset TensorRT_INCLUDE_DIR and TensorRT_ROOT" in text


def test_an_unknown_cuda_source_is_a_configure_error(tmp_path):
    result = configure(tmp_path, "-DMDTRT_CUDA_FROM=bogus")[0]
    assert result.returncode != 0
    text = " ".join((result.stdout + result.stderr).split())
    assert "MDTRT_CUDA_FROM=bogus is not one of auto, toolkit, wheels" in text, text[-3000:]
