"""Issue 15's TensorRT integration fixes on GPUs, with the TensorRT test double as TensorRT:
lifetimes (contexts go before their communicator), one bind per engine program, shapes set only
when they change, CUDA graph capture falling back on every rank together, setCommunicator's
refusal, the build's GPU.

Expected values are numpy's (an all_reduce of one rank is its input; of two, their sum), outputs
are compared in full.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import mdtrt
from mdtrt import _core
from mdtrt import tensorrt as mdtrt_tensorrt


def plan_for(nb_ranks: int, shape=(8, 4), op="all_reduce", device=0) -> bytes:
    return mdtrt_tensorrt.build_dist_collective_engine(op, nb_ranks=nb_ranks, shape=list(shape), progress=False,
                                                       device=device)


def single_device_plan() -> bytes:
    """A plan without multi-device layers (a transpose): mdtrt builds those from ONNX, the double
    has no ONNX parser, so it is written directly in the double's plan format."""
    from trt_double import write_plan

    return write_plan({
        "tensors": [{"name": "input", "dtype": "FLOAT", "dims": [4, 2]}, {"name": "output", "dtype": "FLOAT", "dims": [2, 4]}],
        "inputs": [{"name": "input", "min": [4, 2], "opt": [4, 2], "max": [4, 2]}],
        "layers": [{"type": "shuffle", "name": "transpose", "input": "input", "output": "output",
                    "first_transpose": [1, 0], "nb_ranks": 1}],
        "outputs": [{"name": "output"}],
        "ranks": 0,
    })


# --- item 1: a context never outlives its communicator -----------------------------------------------

CLOSED_GROUP_SCRIPT = textwrap.dedent(
    """
    import ctypes, gc, sys
    import numpy as np
    import mdtrt
    from mdtrt import tensorrt

    plan = tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=1, shape=[8, 4], progress=False, device=0)
    group = mdtrt.DeviceGroup([0], timeout=60)
    program = tensorrt.engine_program([plan])
    runner = mdtrt.EngineRunner(group, program=program)
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    np.testing.assert_array_equal(runner.infer({"input": x})["output"], x)
    communicator = group.communicators[0]
    capsule = communicator.capsule()
    group.close()
    try:
        runner.infer({"input": x})
    except mdtrt.MdtrtError as e:
        assert "the DeviceGroup was closed" in str(e), e
        print("REFUSED", flush=True)
    else:
        sys.exit("a runner of a closed group still ran")
    del runner
    gc.collect()
    del program  # its contexts go now, before the communicator they hold
    gc.collect()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    nccl = ctypes.CDLL(mdtrt.nccl_library().path)

    def comm_count(ptr):
        count = ctypes.c_int(-1)
        rc = nccl.ncclCommCount(ctypes.c_void_p(ptr), ctypes.byref(count))
        return rc, count.value

    assert comm_count(communicator.ptr) == (0, 1)  # the Communicator object keeps the group's alive
    del communicator
    gc.collect()
    assert comm_count(get(capsule, b"ncclComm_t")) == (0, 1)  # the capsule keeps its own alive
    print("CAPSULE ALIVE", flush=True)
    del capsule
    gc.collect()
    print("CLEAN EXIT", flush=True)
    """
)


@pytest.mark.gpu
def test_runner_and_program_kept_after_group_close(trt_double):
    """In a child process (a crash must fail the test, not end the session)."""
    env = dict(os.environ, MDTRT_TENSORRT_LIBRARY=trt_double, NCCL_NVLS_ENABLE="0")
    out = subprocess.run([sys.executable, "-c", CLOSED_GROUP_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["REFUSED", "CAPSULE", "ALIVE", "CLEAN", "EXIT"], out.stdout + out.stderr


# --- item 2: one bind per engine program ---------------------------------------------------------------


@pytest.mark.gpu
def test_second_bind_of_an_engine_program_is_refused(trt_double):
    plan = plan_for(1)
    rng = np.random.default_rng(2)
    with mdtrt.DeviceGroup([0], timeout=60) as group, mdtrt.DeviceGroup([0], timeout=60) as other:
        program = mdtrt_tensorrt.engine_program([plan])
        first = mdtrt.EngineRunner(group, program=program)
        for target in (group, other):  # a second runner on the same group, and one on another group
            with pytest.raises(mdtrt.InvalidArgumentError, match="already bound") as info:
                mdtrt.EngineRunner(target, program=program)
            assert info.value.call == "bind" and info.value.rank == 0
        x = rng.standard_normal((8, 4)).astype(np.float32)
        np.testing.assert_array_equal(first.infer({"input": x})["output"], x)  # the first runner is untouched


# --- item 5: shapes once, CUDA graph fallback on every rank --------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_input_shapes_are_set_only_when_they_change(trt_double, cuda_graph):
    rng = np.random.default_rng(5)
    with mdtrt.DeviceGroup([0], timeout=60) as group:
        runner = mdtrt.EngineRunner(group, plan_for(1), cuda_graph=cuda_graph)
        for _ in range(5):
            x = rng.standard_normal((8, 4)).astype(np.float32)
            np.testing.assert_array_equal(runner.infer({"input": x}, poison_outputs=True)["output"], x)
        assert runner.program.shape_changes == [1]
        if cuda_graph:
            assert runner.graph_fallback == ""
            assert runner.graph_captures == [1]  # captured on the second call, replayed since


@pytest.mark.multi_gpu
def test_capture_failing_on_one_rank_falls_back_on_every_rank_with_one_warning():
    """Rank 1's enqueue synchronizes (cannot be captured) while rank 0's all_reduce captures fine:
    without the fallback rank 0 would launch its graph and wait for rank 1 until the deadline."""
    rng = np.random.default_rng(55)
    with mdtrt.DeviceGroup([0, 1], timeout=20) as group:
        program = _core.testing.RankSynchronizingAllReduceProgram(group.ranks[1])
        runner = mdtrt.EngineRunner(group, program=program, cuda_graph=True)
        xs = [np.empty(1024, np.float32) for _ in range(2)]
        call = runner.prepare([{"input": x} for x in xs], all_ranks=True, poison_outputs=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):  # 1: plain, 2: the capture fails on rank 1 -> plain everywhere, 3-4: plain
                for x in xs:
                    x[:] = rng.standard_normal(1024)
                outs = call()
                assert len(outs) == 2
                for out in outs:
                    np.testing.assert_allclose(out["output"], xs[0] + xs[1], rtol=1e-6)
        fallbacks = [w for w in caught if issubclass(w.category, RuntimeWarning) and "cuda_graph" in str(w.message)]
        assert len(fallbacks) == 1, [str(w.message) for w in caught]
        assert f"rank {group.ranks[1]}" in str(fallbacks[0].message)
        assert "rank-synchronizing all_reduce test program" in runner.graph_fallback
        assert runner.graph_captures == [0, 0]
        assert not group._native.broken


@pytest.mark.multi_gpu
def test_a_rank_failing_before_its_enqueue_does_not_leave_the_others_waiting():
    """With cuda_graph=True every rank meets the others before launching: rank 1 failing on its own
    output buffer (before its enqueue) stops rank 0 before its all_reduce, so the call fails at once
    with rank 1's error instead of rank 0 waiting on the collective until the deadline."""
    torch = pytest.importorskip("torch")
    import time

    with mdtrt.DeviceGroup([0, 1], timeout=30) as group:
        program = _core.CollectiveProgram("all_reduce", "sum", 0, [], "float32", group.world_size, len(group))
        runner = mdtrt.EngineRunner(group, program=program, cuda_graph=True)
        xs = [torch.randn(256, device=f"cuda:{d}") for d in group.gpus]
        bad = [torch.empty(256, device=f"cuda:{group.gpus[0]}"), torch.empty(128, device=f"cuda:{group.gpus[1]}")]
        start = time.monotonic()
        with pytest.raises(mdtrt.InvalidArgumentError, match="the buffer given for output 'output'") as info:
            runner.infer([{"input": x} for x in xs], outputs={"output": bad}, all_ranks=True)
        assert time.monotonic() - start < 10 and info.value.rank == group.ranks[1]
        assert not group._native.broken
        good = [torch.full((256,), float("nan"), device=f"cuda:{d}") for d in group.gpus]
        runner.infer([{"input": x} for x in xs], outputs={"output": good}, all_ranks=True)
        want = (xs[0].cpu() + xs[1].cpu()).numpy()
        for o in good:
            np.testing.assert_allclose(o.cpu().numpy(), want, rtol=1e-5, atol=1e-6)


# --- item 10: setCommunicator's refusal --------------------------------------------------------------


@pytest.mark.gpu
def test_refused_communicator_names_both_causes_and_the_world_size(trt_double):
    with mdtrt.DeviceGroup([0], timeout=60) as group:
        for plan in (plan_for(2), single_device_plan()):  # built for 2 ranks; no multi-device layer
            with pytest.raises(mdtrt.TensorRTError) as info:
                mdtrt.EngineRunner(group, plan)
            message = str(info.value)
            assert info.value.call == "setCommunicator" and info.value.rank == 0
            assert "communicator of 1 ranks" in message and "world size 1" in message
            assert "no multi-device layer" in message and "multi_device=False" in message
            assert "another number of ranks" in message
        x = np.arange(8, dtype=np.float32).reshape(4, 2)
        plain = mdtrt.EngineRunner(group, single_device_plan(), multi_device=False)
        np.testing.assert_array_equal(plain.infer({"input": x})["output"], x.T)


# --- item 6: plans with host code ------------------------------------------------------------------------


@pytest.mark.gpu
def test_plans_embedding_the_lean_runtime_need_allow_host_code(trt_double):
    """A version-compatible plan embeds the lean runtime (host code) unless built with
    exclude_lean_runtime: TensorRT loads it only after IRuntime::setEngineHostCodeAllowed(true).
    Needs the double to model that rule (see the report of issue 15)."""
    def build(**flags):
        return mdtrt_tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=1, shape=[8, 4], progress=False,
                                                           device=0, **flags)

    x = np.random.default_rng(6).standard_normal((8, 4)).astype(np.float32)
    embedded, excluded = build(version_compatible=True), build(version_compatible=True, exclude_lean_runtime=True)
    with mdtrt.DeviceGroup([0], timeout=60) as group:
        with pytest.raises(mdtrt.TensorRTError, match="allow_host_code=True") as info:
            mdtrt.EngineRunner(group, embedded)
        assert info.value.call == "deserializeCudaEngine"
        for runner in (mdtrt.EngineRunner(group, embedded, allow_host_code=True), mdtrt.EngineRunner(group, excluded)):
            np.testing.assert_array_equal(runner.infer({"input": x})["output"], x)


# --- item 7: the build's GPU ---------------------------------------------------------------------------


@pytest.mark.multi_gpu
@pytest.mark.parametrize("device", [1, 0])
def test_engine_is_built_on_the_requested_gpu(trt_double, device):
    seen = []

    def progress(event, phase, parent, step, nb_steps):
        seen.append(_core.current_device())

    _core.set_current_device(1 - device)
    try:
        mdtrt_tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=2, shape=[8, 4], progress=progress,
                                                    device=device)
        assert seen and set(seen) == {device}, seen
        assert _core.current_device() == 1 - device  # the caller's GPU is restored
    finally:
        _core.set_current_device(0)
