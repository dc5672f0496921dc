"""Markers: `gpu` tests need one CUDA GPU, `multi_gpu` tests need two; both skip with the reason
when the machine has fewer (CI has none).

Fixture `gpu_pair`: a DeviceGroup of GPUs 0 and 1, per test module.

Fixture `trt_double`: the TensorRT test double (tests/tensorrt_double), built once per session
and loaded as mdtrt's TensorRT through MDTRT_TENSORRT_LIBRARY (see tests/trt_double.py).

A test, or a whole test file, skipped for a missing optional module (torch, matplotlib) says how to
install it."""

from __future__ import annotations

import os

import pytest

# NVLink multicast stays off on shared machines, also in subprocesses the tests start.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def _gpu_count() -> int:
    # No exception is taken for "no GPU": visible_gpu_count() itself answers 0 where CUDA sees no
    # device, and an extension that cannot be imported or answer must fail the run, not skip every
    # GPU test with a wrong reason.
    from mdtrt import _core

    return _core.visible_gpu_count()


def _why_no_gpu() -> str:
    """What CUDA says stops it (no driver, an old driver, its error), for the skip reasons: on a
    machine that should have GPUs, a skip then says what to fix."""
    from mdtrt import _core
    from mdtrt.cuda_state import cuda_problem

    problem = cuda_problem(dict(_core.query_cuda()))
    return f" ({problem})" if problem else ""


@pytest.fixture(scope="module")
def gpu_pair():
    """A DeviceGroup of GPUs 0 and 1 (timeout 60 s), closed after the module's tests; skips on
    machines with fewer GPUs."""
    if _gpu_count() < 2:
        pytest.skip("needs 2 GPUs")
    import mdtrt

    group = mdtrt.DeviceGroup(gpus=[0, 1], timeout=60)
    yield group
    group.close()


@pytest.fixture(scope="session")
def trt_double() -> str:
    """Path of the TensorRT test double, loaded as this process's TensorRT (and set in
    MDTRT_TENSORRT_LIBRARY for the subprocesses tests start). Skips when mdtrt was built without
    the TensorRT backend; fails when the headers are there and the double does not build, or when
    another TensorRT was loaded into the process first."""
    import trt_double as double

    if double.without_backend():
        pytest.skip(f"{double.without_backend()}: the TensorRT test double has nothing to stand in for")
    if double.header_dir() is None:
        pytest.skip("no TensorRT 11 headers here to build the TensorRT test double against")
    path = double.build_double()
    os.environ["MDTRT_TENSORRT_LIBRARY"] = path
    from mdtrt import tensorrt

    lib = tensorrt.tensorrt_library()
    if os.path.realpath(lib.path) != os.path.realpath(path):
        pytest.fail(f"this process already loaded TensorRT from {lib.path} (found by {lib.found_by}), not the test double "
                    f"{path}: TensorRT is loaded once per process, so run the double's tests in their own session")
    return path


def pytest_collection_modifyitems(config, items):
    count = _gpu_count()
    why = _why_no_gpu() if count < 2 else ""
    for item in items:
        if "multi_gpu" in item.keywords and count < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs at least 2 CUDA GPUs, this machine has {count}{why}"))
        elif "gpu" in item.keywords and count < 1:
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU, this machine has none{why}"))


# Optional modules some tests need, and how to install each. The CPU tests of the torch fast paths
# (fake CUDA tensors) need only a CPU build of torch, a small download; `.[bench]` pulls torch's
# CUDA build (gigabytes), which the GPU tests and the benchmarks need.
_INSTALL_HINT = {
    "torch": ("a CPU build is enough for the tests without a GPU: pip install torch --index-url "
              "https://download.pytorch.org/whl/cpu; for the GPU tests and benchmarks: pip install '.[bench]'"),
    "matplotlib": "pip install '.[bench]' installs it",
}


def _with_install_hint(report) -> None:
    """A skip by pytest.importorskip of an optional module says how to install it."""
    if report.skipped and isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        path, lineno, message = report.longrepr
        for module, hint in _INSTALL_HINT.items():
            if f"could not import '{module}'" in message:
                report.longrepr = (path, lineno, f"{message} ({hint})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that skipped itself (importorskip inside the test)."""
    outcome = yield
    _with_install_hint(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole test file skipped when it was collected (importorskip at module level: the fast-path
    CPU tests), which pytest_runtest_makereport never sees."""
    outcome = yield
    _with_install_hint(outcome.get_result())
