"""mdtrt's TensorRT runtime path (EngineProgram, concurrent setCommunicator, enqueueV3, EngineRunner)
on real GPUs against the TensorRT test double, with real NCCL. Every result is checked against
mdtrt.reference on random data, with poisoned outputs, so a rank that wrote nothing shows.

`gpu` tests need one GPU, `multi_gpu` tests two. Misaligned views and grouped all_gather /
reduce_scatter were defects of issue #15 (items 3 and 4), fixed since: these tests keep them fixed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

import mdtrt
import trt_double as double
from mdtrt import _core, reference
from mdtrt import tensorrt as mdtrt_tensorrt

ROOTED = ("broadcast", "reduce", "gather", "scatter")
REDUCING = ("all_reduce", "reduce", "reduce_scatter")


def build(op, nb_ranks, shape, **kw):
    kw.setdefault("progress", False)
    return mdtrt_tensorrt.build_dist_collective_engine(op, nb_ranks=nb_ranks, shape=list(shape), **kw)


def data(rng, shape, dtype="float32"):
    """Small integers, so every reduction (sum, prod, avg of two) is exact in floating point."""
    return rng.integers(-4, 5, size=shape).astype(dtype)


def expected(op, xs, reduce="sum", root=0, groups=None, transpose=False):
    if transpose:
        out = reference.collective(op, [np.ascontiguousarray(x.T) for x in xs], reduce=reduce, root=root, groups=groups)
        return [None if o is None else np.ascontiguousarray(o.T) for o in out]
    return reference.collective(op, xs, reduce=reduce, root=root, groups=groups)


def check(outs, want, what):
    checked = 0
    for rank, (out, exp) in enumerate(zip(outs, want, strict=True)):
        if exp is None:  # outside the group, or the non-root of reduce/gather: undefined
            continue
        np.testing.assert_array_equal(out["output"], exp, err_msg=f"{what}, rank {rank}")
        checked += 1
    assert checked > 0


def assert_still_poisoned(out, what):
    """A rank outside the layer's group: the double leaves its output as it was, and poison_outputs
    filled it with 0xFF bytes first."""
    raw = np.ascontiguousarray(out["output"]).view(np.uint8)
    assert raw.size > 0 and (raw == 0xFF).all(), f"{what}: rank 0's output was written: {out['output']}"


def single_device_plan(rows=(1, 4, 8), cols=6, dtype="FLOAT"):
    """input "x" [rows, cols] (rows dynamic) -> transpose -> output "y" [cols, rows]: no multi-device layer."""
    lo, opt, hi = rows
    return double.write_plan({
        "tensors": [{"name": "x", "dtype": dtype, "dims": [-1, cols]}, {"name": "y", "dtype": dtype, "dims": [cols, -1]}],
        "inputs": [{"name": "x", "min": [lo, cols], "opt": [opt, cols], "max": [hi, cols]}],
        "layers": [{"type": "shuffle", "name": "transpose", "input": "x", "output": "y", "first_transpose": [1, 0]}],
        "outputs": [{"name": "y"}],
        "ranks": 0,
    })


def dynamic_gather_plan(nb_ranks=1, rows=(2, 4, 8), cols=4):
    """input [rows, cols] (rows dynamic, profile rows) -> all_gather over nb_ranks -> output."""
    lo, opt, hi = rows
    return double.write_plan({
        "tensors": [{"name": "input", "dtype": "FLOAT", "dims": [-1, cols]}, {"name": "output", "dtype": "FLOAT", "dims": [-1, cols]}],
        "inputs": [{"name": "input", "min": [lo, cols], "opt": [opt, cols], "max": [hi, cols]}],
        "layers": [{"type": "dist_collective", "name": "gather", "input": "input", "output": "output", "nb_ranks": nb_ranks,
                    "op": "all_gather", "reduce": "none", "root": -1, "groups": []}],
        "outputs": [{"name": "output"}],
        "ranks": nb_ranks,
    })


# ---------------------------------------------------------------------------------------------
# One GPU


@pytest.fixture(scope="module")
def one_gpu(trt_double):
    with mdtrt.DeviceGroup([0], timeout=60) as g:
        yield g


@pytest.mark.gpu
@pytest.mark.parametrize("op", reference.OPERATIONS)
def test_one_rank_multi_device_plan_every_op(one_gpu, op):
    rng = np.random.default_rng(len(op))
    reduce = "max" if op in REDUCING else "sum"
    runner = mdtrt.EngineRunner(one_gpu, build(op, 1, [4, 5], reduce=reduce, root=0))
    for trial in range(2):
        x = data(rng, (4, 5))
        outs = runner.infer({"input": x}, all_ranks=True, poison_outputs=True)
        check(outs, expected(op, [x], reduce=reduce, root=0), f"{op} trial {trial}")


@pytest.mark.gpu
def test_single_device_plan_runs_without_a_communicator(one_gpu):
    runner = mdtrt.EngineRunner(one_gpu, single_device_plan(), multi_device=False)
    assert runner.input_names == ["x"]
    rng = np.random.default_rng(1)
    for rows in (1, 3, 8):
        x = data(rng, (rows, 6))
        out = runner.infer({"x": x}, poison_outputs=True)
        np.testing.assert_array_equal(out["y"], x.T, err_msg=f"rows={rows}")


@pytest.mark.gpu
def test_plan_without_multi_device_layers_is_refused_naming_rank_and_call(one_gpu):
    with pytest.raises(mdtrt.TensorRTError) as info:
        mdtrt.EngineRunner(one_gpu, single_device_plan())
    assert info.value.rank == 0 and info.value.call == "setCommunicator"
    assert "no multi-device layers" in str(info.value)


@pytest.mark.gpu
def test_two_rank_plan_on_one_gpu_is_refused_saying_so(one_gpu):
    with pytest.raises(mdtrt.TensorRTError) as info:
        mdtrt.EngineRunner(one_gpu, build("all_reduce", 2, [4, 4]))
    message = str(info.value)
    assert info.value.rank == 0 and info.value.call == "setCommunicator"
    assert "built for 2 ranks" in message and "communicator has 1" in message


@pytest.mark.gpu
def test_shapes_inside_and_outside_the_profile(one_gpu):
    runner = mdtrt.EngineRunner(one_gpu, dynamic_gather_plan(rows=(2, 4, 8)))
    rng = np.random.default_rng(2)
    for rows in (2, 5, 8):
        x = data(rng, (rows, 4))
        out = runner.infer({"input": x}, poison_outputs=True)
        np.testing.assert_array_equal(out["output"], x, err_msg=f"rows={rows}")
    for rows in (1, 9):
        with pytest.raises(mdtrt.InvalidArgumentError) as info:
            runner.infer({"input": data(rng, (rows, 4))})
        message = str(info.value)
        assert f"cannot take shape ({rows}, 4)" in message and "outside the range" in message
        assert info.value.call == "setInputShape"
    x = data(rng, (3, 4))  # still usable after the refusals
    np.testing.assert_array_equal(runner.infer({"input": x})["output"], x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float16", "int32"])
def test_an_input_of_another_dtype_than_the_engine_says_which_to_pass(one_gpu, dtype):
    runner = mdtrt.EngineRunner(one_gpu, dynamic_gather_plan(rows=(2, 4, 8)))
    x = data(np.random.default_rng(3), (4, 4))
    with pytest.raises(mdtrt.InvalidArgumentError) as info:
        runner.infer({"input": x.astype(dtype)})
    message = str(info.value)  # found when the call is planned, before any rank runs
    assert f"input 'input' of rank 0 is {dtype}; the program takes float32: convert it to float32 first" in message, \
        message
    np.testing.assert_array_equal(runner.infer({"input": x}, poison_outputs=True)["output"], x)  # still usable


@pytest.mark.gpu
def test_check_engine_lists_io_and_profile(one_gpu):
    tensors = mdtrt_tensorrt.check_engine(dynamic_gather_plan(rows=(2, 4, 8)))
    by_name = {t["name"]: t for t in tensors}
    assert by_name["input"]["is_input"] and by_name["input"]["shape"] == (-1, 4)
    assert by_name["input"]["profile_min"] == (2, 4) and by_name["input"]["profile_max"] == (8, 4)
    assert not by_name["output"]["is_input"] and by_name["output"]["dtype"] == "float32"


@pytest.mark.gpu
def test_preallocated_device_inputs_and_outputs(one_gpu):
    torch = pytest.importorskip("torch")
    runner = mdtrt.EngineRunner(one_gpu, build("all_reduce", 1, [8, 64]))
    x = torch.randint(-4, 5, (8, 64), device="cuda:0").float()
    out = torch.full((8, 64), float("nan"), device="cuda:0")
    runner.infer({"input": x}, outputs={"output": [out]})
    torch.cuda.synchronize(0)
    assert torch.equal(out, x)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["input", "output"])
def test_misaligned_views_work(trt_double, which):
    torch = pytest.importorskip("torch")
    with mdtrt.DeviceGroup([0], timeout=60) as group:  # its own group: a failed enqueue stays there
        runner = mdtrt.EngineRunner(group, build("all_reduce", 1, [8, 64]))
        base = torch.randint(-4, 5, (8 * 64 + 1,), device="cuda:0").float()
        x = base[1:].view(8, 64) if which == "input" else base[:-1].view(8, 64)
        out_base = torch.full((8 * 64 + 1,), float("nan"), device="cuda:0")
        out = out_base[1:].view(8, 64) if which == "output" else out_base[:-1].view(8, 64)
        assert (x.data_ptr() % 256 != 0) or (out.data_ptr() % 256 != 0)
        runner.infer({"input": x}, outputs={"output": [out]})
        torch.cuda.synchronize(0)
        assert torch.equal(out, x)


@pytest.mark.gpu
def test_per_rank_engines_one_gpu(one_gpu):
    plan = build("broadcast", 1, [6, 2], root=0)
    runner = mdtrt.EngineRunner(one_gpu, engines=[bytearray(plan)])
    x = data(np.random.default_rng(3), (6, 2))
    np.testing.assert_array_equal(runner.infer({"input": x}, poison_outputs=True)["output"], x)


@pytest.mark.gpu
def test_cuda_graph_replays_with_new_data(one_gpu):
    torch = pytest.importorskip("torch")
    runner = mdtrt.EngineRunner(one_gpu, build("all_gather", 1, [16, 32], transpose=True), cuda_graph=True)
    x = torch.empty((16, 32), device="cuda:0")
    out = torch.empty((16, 32), device="cuda:0")
    call = runner.prepare({"input": x}, outputs={"output": [out]})
    for trial in range(4):
        x.copy_(torch.randint(-4, 5, (16, 32), device="cuda:0").float())
        out.fill_(float("nan"))
        call()
        torch.cuda.synchronize(0)
        assert torch.equal(out, x), f"trial {trial}"
    assert runner.graph_captures[0] >= 1


@pytest.mark.gpu
def test_prepared_call_reuses_host_buffers(one_gpu):
    runner = mdtrt.EngineRunner(one_gpu, build("reduce_scatter", 1, [6, 3], reduce="sum"))
    x = np.zeros((6, 3), np.float32)
    call = runner.prepare({"input": x}, poison_outputs=True)
    rng = np.random.default_rng(4)
    for trial in range(3):
        x[...] = data(rng, (6, 3))
        np.testing.assert_array_equal(call()["output"], x, err_msg=f"trial {trial}")


# ---------------------------------------------------------------------------------------------
# Two GPUs


@pytest.fixture(scope="module")
def two_gpus(trt_double):
    with mdtrt.DeviceGroup([0, 1], timeout=60) as g:
        yield g


def cases():
    for op in reference.OPERATIONS:
        for groups in (None, [1, 0]):
            roots = (0, 1) if op in ROOTED else (0,)
            for root in roots:
                yield pytest.param(op, groups, root, id=f"{op}-{'rev' if groups else 'all'}-root{root}")


@pytest.mark.multi_gpu
@pytest.mark.parametrize("op,groups,root", list(cases()))
def test_every_op_matches_the_reference(two_gpus, op, groups, root):
    reduce = "sum"
    plan = build(op, 2, [4, 3], reduce=reduce, root=root, groups=groups)
    runner = mdtrt.EngineRunner(two_gpus, plan)
    rng = np.random.default_rng(zlib.crc32(f"{op}-{root}-{groups}".encode()))
    for trial in range(2):
        xs = [data(rng, (4, 3)) for _ in range(2)]
        outs = runner.infer([{"input": x} for x in xs], all_ranks=True, poison_outputs=True)
        check(outs, expected(op, xs, reduce=reduce, root=root, groups=groups), f"{op} groups={groups} root={root}")


@pytest.mark.multi_gpu
@pytest.mark.parametrize("op", REDUCING)
@pytest.mark.parametrize("reduce", reference.REDUCE_OPERATIONS)
def test_every_reduce_op(two_gpus, op, reduce):
    runner = mdtrt.EngineRunner(two_gpus, build(op, 2, [4, 2], reduce=reduce, root=1))
    xs = [data(np.random.default_rng(r), (4, 2)) for r in range(2)]
    outs = runner.infer([{"input": x} for x in xs], all_ranks=True, poison_outputs=True)
    check(outs, expected(op, xs, reduce=reduce, root=1), f"{op} {reduce}")


@pytest.mark.multi_gpu
@pytest.mark.parametrize("op", reference.OPERATIONS)
@pytest.mark.parametrize("dtype", ["float16", "int32"])
def test_transposed_network_as_the_sample_builds_it(two_gpus, op, dtype):
    """input [rows, cols] -> transpose -> collective along cols -> transpose back."""
    reduce = "max" if op in REDUCING else "sum"
    runner = mdtrt.EngineRunner(two_gpus, build(op, 2, [3, 8], reduce=reduce, root=1, transpose=True, dtype=dtype))
    xs = [data(np.random.default_rng(10 + r), (3, 8), dtype) for r in range(2)]
    outs = runner.infer([{"input": x} for x in xs], all_ranks=True, poison_outputs=True)
    check(outs, expected(op, xs, reduce=reduce, root=1, transpose=True), f"{op} {dtype} transposed")


@pytest.mark.multi_gpu
@pytest.mark.parametrize("op,root", [("broadcast", 1), ("all_reduce", 0), ("scatter", 1), ("all_to_all", 0)])
def test_ranks_outside_the_group_keep_their_output(two_gpus, op, root):
    """groups=[1]: rank 0 takes no part, its (poisoned) output is left as it was."""
    runner = mdtrt.EngineRunner(two_gpus, build(op, 2, [2, 3], root=root if op in ROOTED else 0, groups=[1]))
    xs = [data(np.random.default_rng(20 + r), (2, 3)) for r in range(2)]
    outs = runner.infer([{"input": x} for x in xs], all_ranks=True, poison_outputs=True)
    want = expected(op, xs, root=1, groups=[1])
    assert want[0] is None
    check(outs, want, f"{op} groups=[1]")
    assert_still_poisoned(outs[0], f"{op} groups=[1]")


@pytest.mark.multi_gpu
@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter"])
def test_grouped_shape_ops_on_a_smaller_group(trt_double, op):
    with mdtrt.DeviceGroup([0, 1], timeout=60) as group:  # its own group: a failed enqueue stays there
        runner = mdtrt.EngineRunner(group, build(op, 2, [2, 3], groups=[1]))
        xs = [data(np.random.default_rng(30 + r), (2, 3)) for r in range(2)]
        outs = runner.infer([{"input": x} for x in xs], all_ranks=True, poison_outputs=True)
        want = expected(op, xs, groups=[1])
        assert want[0] is None
        check(outs, want, f"{op} groups=[1]")
        assert_still_poisoned(outs[0], f"{op} groups=[1]")


@pytest.mark.multi_gpu
def test_per_rank_engines(two_gpus):
    plan = build("all_gather", 2, [2, 4])
    runner = mdtrt.EngineRunner(two_gpus, engines=[bytes(plan), bytearray(plan)])
    xs = [data(np.random.default_rng(40 + r), (2, 4)) for r in range(2)]
    outs = runner.infer([{"input": x} for x in xs], all_ranks=True, poison_outputs=True)
    check(outs, expected("all_gather", xs), "per-rank engines")


@pytest.mark.multi_gpu
def test_cuda_graph_two_gpus(two_gpus):
    runner = mdtrt.EngineRunner(two_gpus, build("all_reduce", 2, [8, 8], transpose=True), cuda_graph=True)
    xs = [np.zeros((8, 8), np.float32) for _ in range(2)]
    call = runner.prepare([{"input": x} for x in xs], all_ranks=True, poison_outputs=True)
    rng = np.random.default_rng(50)
    for trial in range(4):
        for x in xs:
            x[...] = data(rng, (8, 8))
        check(call(), expected("all_reduce", xs), f"trial {trial}")


SEQUENTIAL = textwrap.dedent(
    """
    import sys, time, numpy as np, mdtrt
    from mdtrt import tensorrt
    plan = tensorrt.build_dist_collective_engine("all_reduce", nb_ranks=2, shape=[4, 4], progress=False)
    group = mdtrt.DeviceGroup([0, 1], timeout=3)
    start = time.monotonic()
    try:
        mdtrt.EngineRunner(group, plan, sequential_bind=True)
    except mdtrt.RankTimeoutError as e:
        print("RankTimeoutError after %.1f s: %s" % (time.monotonic() - start, e), flush=True)
    except Exception as e:
        print("OTHER %s: %s" % (type(e).__name__, e), flush=True)
    else:
        print("NO ERROR", flush=True)
    import os
    os._exit(0)  # rank threads stuck in the split were abandoned; do not wait for them
    """
)


@pytest.mark.multi_gpu
def test_sequential_bind_deadlocks_and_becomes_rank_timeout(trt_double):
    """setCommunicator is collective in the double as in TensorRT: binding rank after rank blocks
    rank 0 in the split until the deadline. In a subprocess: the stuck thread stays behind."""
    env = dict(os.environ, MDTRT_TENSORRT_LIBRARY=trt_double, NCCL_NVLS_ENABLE="0")
    out = subprocess.run([sys.executable, "-c", SEQUENTIAL], env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "RankTimeoutError after" in out.stdout, text
    seconds = float(out.stdout.split("RankTimeoutError after ")[1].split(" s")[0])
    assert seconds < 20, text
    assert "one after another" in out.stdout and "bind" in out.stdout, text
