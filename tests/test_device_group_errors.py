"""Bad input to DeviceGroup gets a clear error on any machine."""

from __future__ import annotations

import pytest

import mdtrt
from mdtrt import _core
from mdtrt.cuda_state import cuda_problem


def test_no_gpu_is_explained():
    """No visible GPU is the machine's state, not a wrong argument: a CudaError with the driver's
    answer, whether the GPUs were named or not."""
    if _core.visible_gpu_count() > 0:
        pytest.skip("this machine has GPUs")
    why = cuda_problem(dict(_core.query_cuda()))
    for gpus in ([0, 1], None):
        with pytest.raises(mdtrt.CudaError, match="no CUDA GPU is visible on this machine") as caught:
            mdtrt.DeviceGroup(gpus)
        assert not isinstance(caught.value, ValueError)
        assert why and why in str(caught.value) and "mdtrt doctor" in str(caught.value)
        # Every visible GPU, of which there is none: the same reason, not "an empty list".
        assert "empty list" not in str(caught.value)
    assert "puts one rank on each visible GPU" in str(caught.value)


def test_no_gpu_without_a_driver_error_names_cuda_visible_devices(monkeypatch):
    """A driver that answers but lists no device (CUDA_VISIBLE_DEVICES hides them all): the error
    says so, on any machine (the driver's answer is stubbed)."""
    monkeypatch.setattr(_core, "visible_gpu_count", lambda: 0)
    monkeypatch.setattr(_core, "query_cuda", lambda: {"driver_version": 13000, "runtime_version": 13000, "error": "",
                                                      "gpus": [], "peer_access": []})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(mdtrt.CudaError, match="cudaGetDeviceCount found no device with CUDA_VISIBLE_DEVICES=''"):
        mdtrt.DeviceGroup()  # every visible GPU: refused before any native call


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
    with pytest.raises(mdtrt.InvalidArgumentError, match=r"op is 'allreduce' \(did you mean 'all_reduce'\?\)"):
        _core.collective_output_shape("allreduce", [3], 2)


class _TwoLocalRanks:
    """A native group of 2 local ranks on GPUs 0 and 1 as DeviceGroup._adopt takes it: the
    collectives' argument checks and program set-up run before any GPU is asked for."""

    num_local_ranks = world_size = 2
    ranks = devices = [0, 1]
    timeout = 60.0

    def close(self):
        pass


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "broadcast"])
def test_bool_collective_says_to_pass_uint8(op):
    """NCCL has no boolean type: the error says how to send such an array (as uint8), not only
    that bool is unsupported."""
    import numpy as np

    group = mdtrt.DeviceGroup.__new__(mdtrt.DeviceGroup)
    group._adopt(_TwoLocalRanks())
    flags = [np.random.default_rng(rank).random((2, 3)) > 0.5 for rank in range(2)]
    with pytest.raises(mdtrt.InvalidArgumentError,
                       match=r"dtype bool \(NCCL has no boolean type\): pass the array as uint8 \(numpy x\.view\(np\.uint8\)"):
        getattr(group, op)(flags)
