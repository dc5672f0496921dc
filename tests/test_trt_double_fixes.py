"""Issue 15's TensorRT integration fixes, on the TensorRT test double, without a GPU: what the
builders put into plans (rank counts, groups, flags, output shapes), where they build, the timing
cache, and TensorRT errors logged from other threads.

Plans are read back with ``trt_double.read_plan``; expected shapes come from the numpy reference
(``mdtrt.reference``), not from the native ``collective_output_shape``: the builder itself refuses a
layer whose shape differs from that one, so comparing with it could not fail.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import mdtrt
from mdtrt import _core, reference
from mdtrt import tensorrt as mdtrt_tensorrt
from trt_double import without_backend

BACKEND = bool(_core.build_info()["tensorrt_backend"])
needs_backend = pytest.mark.skipif(not BACKEND, reason=without_backend())


def read_plan(plan: bytes) -> dict:
    from trt_double import read_plan as read

    return read(plan)


def reference_output_shape(op: str, shape, world: int, groups=None, root: int = 0) -> list[int]:
    """The shape of a group member's output in the numpy reference (the root's for reduce and
    gather, whose other members get none)."""
    outputs = reference.collective(op, [np.zeros(shape, np.float32)] * world, root=root, groups=groups)
    return list(next(out for out in outputs if out is not None).shape)


def collective_layer(plan: dict) -> dict:
    layers = [layer for layer in plan["layers"] if layer["type"] == "dist_collective"]
    assert len(layers) == 1, plan["layers"]
    return layers[0]


# --- item 4: grouped all_gather / reduce_scatter -------------------------------------------------


@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter"])
@pytest.mark.parametrize("groups", [[1, 3], [2, 0, 1], None])
@pytest.mark.parametrize("transpose", [False, True])
def test_shape_setting_ops_get_the_groups_rank_count(trt_double, op, groups, transpose):
    """nbRanks sets the output shape of all_gather and reduce_scatter (NvInfer.h): a group's layer
    gets the group's size, and the plan's output is the reference's shape for that group."""
    world, shape = 4, [12, 24]
    plan = mdtrt_tensorrt.build_dist_collective_engine(op, groups=groups, nb_ranks=world, shape=shape,
                                                       transpose=transpose, progress=False)
    info = read_plan(plan)
    layer = collective_layer(info)
    group_size = len(groups) if groups else world
    assert layer["nb_ranks"] == group_size
    assert layer["groups"] == (groups or [])
    collective_in = shape[::-1] if transpose else shape
    expected = reference_output_shape(op, collective_in, world, groups)
    if transpose:
        expected = expected[::-1]
    assert info["outputs"][0]["dims"] == expected


@pytest.mark.parametrize("op", ["all_reduce", "broadcast", "reduce", "all_to_all", "gather", "scatter"])
def test_other_ops_keep_the_worlds_rank_count_with_a_group(trt_double, op):
    """Their shapes do not depend on nbRanks: they keep the world's count (NVIDIA's sample's choice)."""
    world, groups, shape = 4, [3, 1], [8, 3]
    plan = mdtrt_tensorrt.build_dist_collective_engine(op, groups=groups, root=3, nb_ranks=world, shape=shape,
                                                       progress=False)
    info = read_plan(plan)
    assert collective_layer(info)["nb_ranks"] == world
    assert info["outputs"][0]["dims"] == reference_output_shape(op, shape, world, groups, root=3)


# --- item 6: version-compatible plans -------------------------------------------------------------


def test_version_compatible_flags_reach_the_plan(trt_double):
    plain = read_plan(mdtrt_tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=2, shape=[4, 2],
                                                                  progress=False))
    assert not any("VERSION_COMPATIBLE" in f or "EXCLUDE_LEAN_RUNTIME" in f for f in plain["builder"]["flag_names"])
    compatible = read_plan(mdtrt_tensorrt.build_dist_collective_engine(
        "all_reduce", nb_ranks=2, shape=[4, 2], progress=False, version_compatible=True))
    assert any("VERSION_COMPATIBLE" in f for f in compatible["builder"]["flag_names"])
    assert not any("EXCLUDE_LEAN_RUNTIME" in f for f in compatible["builder"]["flag_names"])
    excluded = read_plan(mdtrt_tensorrt.build_dist_collective_engine(
        "all_reduce", nb_ranks=2, shape=[4, 2], progress=False, version_compatible=True, exclude_lean_runtime=True))
    names = excluded["builder"]["flag_names"]
    assert any("VERSION_COMPATIBLE" in f for f in names) and any("EXCLUDE_LEAN_RUNTIME" in f for f in names)


def test_exclude_lean_runtime_alone_is_refused_before_building():
    with pytest.raises(mdtrt.InvalidArgumentError, match="version_compatible=True"):
        mdtrt_tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=2, shape=[4, 2], progress=False,
                                                    exclude_lean_runtime=True)
    with pytest.raises(mdtrt.InvalidArgumentError, match="version_compatible=True"):
        mdtrt_tensorrt.build_engine_from_onnx(b"model", progress=False, exclude_lean_runtime=True)


# --- item 7: the build's GPU ------------------------------------------------------------------------


@pytest.mark.parametrize("device", [-1, "0", True])
def test_build_device_must_be_a_gpu_id(device):
    with pytest.raises(mdtrt.InvalidArgumentError, match="device must be a GPU id"):
        mdtrt_tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=2, shape=[4, 2], progress=False,
                                                    device=device)


def test_build_on_a_gpu_this_machine_lacks_is_refused(trt_double):
    visible = _core.visible_gpu_count()
    missing = visible + 3
    expected = ((mdtrt.InvalidArgumentError, rf"GPU {missing} does not exist") if visible else
                (mdtrt.CudaError, "no CUDA GPU is visible"))
    with pytest.raises(expected[0], match=expected[1]):
        mdtrt_tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=2, shape=[4, 2], progress=False,
                                                    device=missing)


# --- item 9: timing cache, progress ------------------------------------------------------------------


def test_timing_cache_is_written_through_a_temporary_file_of_its_own(trt_double, tmp_path):
    """Another process's temporary file (here: a folder where the old fixed name `<cache>.tmp` was)
    does not stop this build from writing the cache, and no temporary file is left behind."""
    cache = tmp_path / "timing.cache"
    (tmp_path / "timing.cache.tmp").mkdir()  # what a concurrent writer's fixed-name temp file would block
    plan = mdtrt_tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=2, shape=[4, 2], progress=False,
                                                       timing_cache=cache)
    assert read_plan(plan)["builder"]["timing_cache"]
    assert cache.is_file() and cache.stat().st_size > 0
    first = cache.read_bytes()
    mdtrt_tensorrt.build_dist_collective_engine("all_gather", nb_ranks=2, shape=[4, 2], progress=False,
                                                timing_cache=cache)  # reads the cache back, writes it again
    assert cache.stat().st_size > 0 and cache.read_bytes()[:8] == first[:8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timing.cache", "timing.cache.tmp"]


def test_progress_callback_errors_and_cancel_end_the_build(trt_double):
    events = []

    def failing(event, phase, parent, step, nb_steps):
        events.append(event)
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        mdtrt_tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=2, shape=[4, 2], progress=failing)
    assert events == ["start"]  # the first exception cancels: no more calls
    with pytest.raises(mdtrt.TensorRTError, match="cancelled by the progress callback"):
        mdtrt_tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=2, shape=[4, 2],
                                                    progress=lambda *a: False)


# --- item 11: TensorRT errors from other threads ----------------------------------------------------


@needs_backend
@pytest.mark.parametrize("other_thread", [False, True])
def test_errors_tensorrt_logs_on_its_own_threads_reach_the_failing_call(other_thread):
    text = _core.testing.tensorrt_error_text(f"the reason, other thread={other_thread}", other_thread)
    assert text == f"the call: the reason, other thread={other_thread}"
    # ... and an error of an earlier call is not blamed on the next one.
    assert _core.testing.tensorrt_error_text("the next reason", other_thread) == "the call: the next reason"


@needs_backend
def test_error_of_another_mdtrt_call_is_not_blamed():
    """An error logged by a thread inside its own call (ErrorScope) belongs to that call only."""
    import threading

    results = {}

    def call(name):
        results[name] = _core.testing.tensorrt_error_text(f"error of {name}", False)

    threads = [threading.Thread(target=call, args=(f"call {i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, text in results.items():
        assert text == f"the call: error of {name}"
