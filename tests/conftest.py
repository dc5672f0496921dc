"""Markers: `gpu` tests need one CUDA GPU, `multi_gpu` tests need two; both skip with the reason
when the machine has fewer (CI has none)."""

from __future__ import annotations

import os

import pytest

# NVLink multicast stays off on shared machines, also in subprocesses the tests start.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def _gpu_count() -> int:
    try:
        from mdtrt import _core

        return _core.visible_gpu_count()
    except Exception:  # noqa: BLE001 - no extension or no driver: no GPUs
        return 0


def pytest_collection_modifyitems(config, items):
    count = _gpu_count()
    for item in items:
        if "multi_gpu" in item.keywords and count < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs at least 2 CUDA GPUs, this machine has {count}"))
        elif "gpu" in item.keywords and count < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU, this machine has none"))
