"""Collective bind on real GPUs: a program whose bind splits the world communicator (a collective,
like TensorRT's setCommunicator) binds when ranks bind concurrently, and binding them one after
another is caught by the deadline instead of hanging."""

from __future__ import annotations

import time

import numpy as np
import pytest

import mdtrt
from mdtrt import _core, reference

pytestmark = pytest.mark.multi_gpu


def test_concurrent_bind_with_collective_inside_bind_works():
    n = _core.visible_gpu_count()
    with mdtrt.DeviceGroup(list(range(n)), timeout=60) as group:
        rng = np.random.default_rng(n)
        inputs = [rng.standard_normal((4 * n, 3)).astype(np.float32) for _ in range(n)]
        groups = list(reversed(range(n)))
        out = group.all_reduce(inputs, groups=groups)  # bind splits a group communicator
        for rank, (o, e) in enumerate(zip(out, reference.collective("all_reduce", inputs, groups=groups), strict=True)):
            np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-5, err_msg=f"rank {rank}")
        # A rooted op over the split group: a mix-up of group-local and world ranks shows here.
        out = group.broadcast(inputs, root=n - 1, groups=groups, poison_outputs=True)
        assert len(out) == n
        for rank, o in enumerate(out):
            np.testing.assert_array_equal(o, inputs[n - 1], err_msg=f"rank {rank}")


def test_sequential_bind_is_caught_by_the_deadline():
    n = _core.visible_gpu_count()
    group = mdtrt.DeviceGroup(list(range(n)), timeout=3)
    start = time.monotonic()
    with pytest.raises(mdtrt.RankTimeoutError) as info:
        group.all_reduce([np.ones(n, np.float32)] * n, groups=list(reversed(range(n))), sequential_bind=True)
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"deadline of 3 s fired after {elapsed:.1f} s"
    assert "bind" in str(info.value) and "one after another" in str(info.value)
    with pytest.raises(mdtrt.MdtrtError, match="can no longer be used"):
        group.all_reduce([np.ones(n, np.float32)] * n)
    group.close()
