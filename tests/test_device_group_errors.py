"""Bad input to DeviceGroup gets a clear error on any machine."""

from __future__ import annotations

import pytest

import mdtrt
from mdtrt import _core


def test_no_gpu_is_explained():
    if _core.visible_gpu_count() > 0:
        pytest.skip("this machine has GPUs")
    with pytest.raises(mdtrt.InvalidArgumentError, match="no CUDA GPU"):
        mdtrt.DeviceGroup([0, 1])
    # Every visible GPU, of which there is none: the same reason, not "an empty list".
    with pytest.raises(mdtrt.InvalidArgumentError, match="no CUDA GPU is visible") as caught:
        mdtrt.DeviceGroup()
    assert "empty list" not in str(caught.value)


@pytest.mark.gpu
def test_missing_gpu_id_is_named():
    count = _core.visible_gpu_count()
    with pytest.raises(mdtrt.InvalidArgumentError, match=f"GPU {count} does not exist"):
        mdtrt.DeviceGroup([0, count])


def test_duplicate_and_negative_gpu_ids_are_named_on_any_machine():
    # Wrong on every machine, so named before the GPUs are looked for (also where there are none).
    with pytest.raises(mdtrt.InvalidArgumentError, match="GPU 0 is listed twice"):
        mdtrt.DeviceGroup([0, 0])
    with pytest.raises(mdtrt.InvalidArgumentError, match="GPU -1 is not a GPU id: ids count from 0"):
        mdtrt.DeviceGroup([0, -1])


def test_empty_and_non_integer_gpu_lists():
    with pytest.raises(mdtrt.InvalidArgumentError, match="at least one GPU"):
        mdtrt.DeviceGroup([])
    with pytest.raises(mdtrt.InvalidArgumentError, match="integers"):
        mdtrt.DeviceGroup(["0"])


def test_collective_output_shapes():
    assert _core.collective_output_shape("all_gather", [3, 4], 2) == [6, 4]
    assert _core.collective_output_shape("reduce_scatter", [4, 3], 2) == [2, 3]
    assert _core.collective_output_shape("all_to_all", [4, 3], 4) == [4, 3]
    with pytest.raises(mdtrt.InvalidArgumentError, match="multiple of 2"):
        _core.collective_output_shape("scatter", [3, 4], 2)
    with pytest.raises(mdtrt.InvalidArgumentError, match="unknown collective"):
        _core.collective_output_shape("allreduce", [3], 2)
