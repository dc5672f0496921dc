"""mdtrt's TensorRT builder path against the TensorRT test double, on CPU (CI runs these).

The double (tests/tensorrt_double) implements TensorRT 11's C++ API from its headers; its plans
are its own text format, read back here with ``trt_double.read_plan`` so every layer mdtrt asked
for (op, reduce, root, groups, nbRanks, transposes, shapes) can be checked.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

import mdtrt
import trt_double as double
from mdtrt import _core, reference
from mdtrt import tensorrt as mdtrt_tensorrt

ROOTED = ("broadcast", "reduce", "gather", "scatter")
REDUCING = ("all_reduce", "reduce", "reduce_scatter")


def build(op, nb_ranks=2, shape=(4, 6), **kw):
    kw.setdefault("progress", False)
    return mdtrt_tensorrt.build_dist_collective_engine(op, nb_ranks=nb_ranks, shape=list(shape), **kw)


def expected_output_shape(op, shape, group_size, nb_ranks):
    """Output shape of the collective as the double's rule gives it: nbRanks for all_gather and
    reduce_scatter (TensorRT's documented use of it), the group for gather and scatter."""
    rows = shape[0]
    if op == "all_gather":
        rows *= nb_ranks
    elif op == "reduce_scatter":
        rows //= nb_ranks
    elif op == "gather":
        rows *= group_size
    elif op == "scatter":
        rows //= group_size
    return [rows, *shape[1:]]


def test_discovery_reports_the_double_as_full_tensorrt_11_1(trt_double):
    lib = mdtrt_tensorrt.tensorrt_library()
    assert os.path.realpath(lib.path) == os.path.realpath(trt_double)
    assert lib.found_by == "MDTRT_TENSORRT_LIBRARY"
    assert lib.version == "11.1.0" and lib.version_code == 110100
    assert lib.lean is False
    assert lib.header_version.startswith("11.")


def test_build_info_names_the_headers_the_double_is_built_against(trt_double):
    include = mdtrt.build_info()["tensorrt_include_dir"]
    assert os.path.isfile(os.path.join(include, "NvInferImpl.h"))
    assert double.header_dir() == os.path.abspath(include)


@pytest.mark.parametrize("op", reference.OPERATIONS)
@pytest.mark.parametrize("nb_ranks", [1, 2, 4])
def test_every_op_builds_a_plan_with_its_layer(trt_double, op, nb_ranks):
    shape = [4 * nb_ranks, 3]
    reduce = "max" if op in REDUCING else "sum"
    root = nb_ranks - 1 if op in ROOTED else 0
    plan = double.read_plan(build(op, nb_ranks=nb_ranks, shape=shape, reduce=reduce, root=root))
    assert [i["name"] for i in plan["inputs"]] == ["input"] and plan["inputs"][0]["dims"] == shape
    assert plan["inputs"][0]["dtype"] == "FLOAT"
    (layer,) = plan["layers"]
    assert layer["type"] == "dist_collective" and layer["op"] == op
    assert layer["reduce"] == (reduce if op in REDUCING else "none")
    assert layer["root"] == (root if op in ROOTED else -1)
    assert layer["groups"] == [] and layer["nb_ranks"] == nb_ranks
    assert plan["ranks"] == nb_ranks and plan["ranks_exact"]
    (out,) = plan["outputs"]
    assert out["name"] == "output" and layer["output"] == "output"
    assert out["dims"] == expected_output_shape(op, shape, nb_ranks, nb_ranks)


@pytest.mark.parametrize("op", REDUCING)
@pytest.mark.parametrize("reduce_op", reference.REDUCE_OPERATIONS)
def test_every_reduce_op_is_recorded(trt_double, op, reduce_op):
    plan = double.read_plan(build(op, reduce=reduce_op, root=1))
    assert plan["layers"][0]["reduce"] == reduce_op


@pytest.mark.parametrize("op", ROOTED)
@pytest.mark.parametrize("root", [0, 1, 2])
def test_every_root_is_recorded_as_a_world_rank(trt_double, op, root):
    plan = double.read_plan(build(op, nb_ranks=3, shape=[6, 2], root=root))
    assert plan["layers"][0]["root"] == root


GROUPS = [[0, 1], [1, 0], [2, 0], [3, 2, 1, 0], [1, 3]]


@pytest.mark.parametrize("op", reference.OPERATIONS)
@pytest.mark.parametrize("groups", GROUPS, ids=lambda g: "-".join(map(str, g)))
def test_groups_keep_their_order_and_root(trt_double, op, groups):
    """Reversed and partial groups go into the plan as given: the order is the group-local rank."""
    root = groups[-1] if op in ROOTED else 0
    plan = double.read_plan(build(op, nb_ranks=4, shape=[8, 2], groups=groups, root=root))
    layer = plan["layers"][0]
    assert layer["groups"] == groups
    assert layer["root"] == (root if op in ROOTED else -1)
    # nbRanks sets all_gather's and reduce_scatter's output shape (TensorRT's documented use of it):
    # mdtrt gives those two the group's size, every other op the world's (issue #15 item 4).
    nb_ranks = len(groups) if op in ("all_gather", "reduce_scatter") else 4
    assert layer["nb_ranks"] == nb_ranks and plan["ranks"] == max(nb_ranks, max(groups) + 1)
    assert plan["ranks_exact"] is False  # every layer grouped: the communicator needs at least that many
    assert plan["outputs"][0]["dims"] == expected_output_shape(op, [8, 2], len(groups), layer["nb_ranks"])
    assert plan["outputs"][0]["dims"] == list(_core.collective_output_shape(op, [8, 2], len(groups)))


@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter"])
@pytest.mark.parametrize("groups", [[0, 1], [1, 3], [2]], ids=lambda g: "-".join(map(str, g)))
def test_a_grouped_layer_has_its_group_size_as_nb_ranks(trt_double, op, groups):
    """nbRanks sets all_gather's and reduce_scatter's output shape: it must be the group's size."""
    layer = double.read_plan(build(op, nb_ranks=4, shape=[8, 2], groups=groups))["layers"][0]
    assert layer["nb_ranks"] == len(groups)


@pytest.mark.parametrize("op", reference.OPERATIONS)
def test_transpose_wraps_the_layer_in_2d_transposes(trt_double, op):
    plan = double.read_plan(build(op, nb_ranks=2, shape=[3, 8], transpose=True, root=1, dtype="float16"))
    first, layer, last = plan["layers"]
    assert first["type"] == last["type"] == "shuffle"
    assert first["first_transpose"] == [1, 0] and last["first_transpose"] == [1, 0]
    assert first["reshape"] is None and first["second_transpose"] == []
    assert first["output"] == layer["input"] and layer["output"] == last["input"]
    assert plan["tensors"][[t["name"] for t in plan["tensors"]].index(layer["input"])]["dims"] == [8, 3]
    collective = expected_output_shape(op, [8, 3], 2, 2)
    assert plan["outputs"][0]["dims"] == [collective[1], collective[0]]
    assert all(t["dtype"] == "HALF" for t in plan["tensors"])


@pytest.mark.parametrize("dtype,trt_name", [("float32", "FLOAT"), ("float16", "HALF"), ("bfloat16", "BF16"),
                                            ("int32", "INT32"), ("int8", "INT8"), ("uint8", "UINT8")])
def test_dtypes(trt_double, dtype, trt_name):
    plan = double.read_plan(build("all_gather", dtype=dtype))
    assert {t["dtype"] for t in plan["tensors"]} == {trt_name}


def test_progress_is_reported_in_phases_with_steps(trt_double):
    events = []

    def progress(event, phase, parent, step, nb_steps):
        events.append((event, phase, parent, step, nb_steps))
        return True

    build("all_reduce", progress=progress)
    starts = [e for e in events if e[0] == "start"]
    finishes = [e for e in events if e[0] == "finish"]
    assert starts and sorted(e[1] for e in starts) == sorted(e[1] for e in finishes)
    top = [e for e in starts if not e[2]]
    assert len(top) == 1 and top[0][4] > 0
    nested = [e for e in starts if e[2]]
    assert nested and all(e[2] == top[0][1] for e in nested)
    steps = [e[3] for e in events if e[0] == "step" and e[1] == top[0][1]]
    assert steps == list(range(top[0][4]))
    assert events[-1][0] == "finish" and events[-1][1] == top[0][1]


def test_cancelling_the_build_fails_it(trt_double):
    calls = []

    def cancel(event, phase, parent, step, nb_steps):
        calls.append(event)
        return event != "step"

    with pytest.raises(mdtrt.TensorRTError, match="cancelled"):
        build("all_reduce", progress=cancel)
    assert calls.count("step") == 1


def test_line_progress_prints_phases(trt_double, capfd):
    from mdtrt import _core

    _core.tensorrt_build_dist_collective("all_reduce", "sum", 0, [], 2, "float32", [4, 4], False, True, 0, "")
    err = capfd.readouterr().err
    assert "[mdtrt] building: phase" in err and "step 1/" in err


def test_timing_cache_is_created_then_reused(trt_double, tmp_path):
    cache = tmp_path / "double.cache"
    plan = double.read_plan(build("all_reduce", timing_cache=cache))
    assert plan["builder"]["timing_cache"] is True
    first = cache.read_bytes()
    assert first.startswith(b"MDTRT-TENSORRT-DOUBLE-TIMING-CACHE 1")
    build("all_gather", timing_cache=cache, transpose=True)
    assert cache.read_bytes() != first  # read, grown by the second build, written back
    assert double.read_plan(build("all_reduce"))["builder"]["timing_cache"] is False


def test_a_foreign_timing_cache_is_replaced_with_a_warning(trt_double, tmp_path, caplog):
    cache = tmp_path / "foreign.cache"
    cache.write_bytes(b"not a cache")
    build("all_reduce", timing_cache=cache)
    assert cache.read_bytes().startswith(b"MDTRT-TENSORRT-DOUBLE-TIMING-CACHE 1")
    assert any("not a timing cache of the TensorRT test double" in r.getMessage() for r in caplog.records)


def test_workspace_limit_is_recorded(trt_double):
    assert double.read_plan(build("all_reduce", workspace=1 << 20))["builder"]["workspace"] == 1 << 20


@pytest.mark.parametrize("kw,match", [
    ({"op": "all_reduce", "nb_ranks": 0}, "nb_ranks"),
    ({"op": "scatter", "root": 5}, "root 5"),
    ({"op": "reduce", "groups": [0, 1], "root": 2, "nb_ranks": 4}, "not a member of the group"),
    ({"op": "all_gather", "groups": [0, 0]}, "twice"),
    ({"op": "all_gather", "groups": [0, 7]}, "outside the world"),
    ({"op": "reduce_scatter", "shape": [3, 2]}, "multiple of 2"),
    ({"op": "all_to_all", "shape": [5, 2]}, "multiple of 2"),
    ({"op": "all_reduce", "shape": [0, 2]}, "static and positive"),
    ({"op": "all_reduce", "shape": [4, 2, 2], "transpose": True}, "2-D input"),
    ({"op": "all_reduce", "reduce": "median"}, "median"),
    ({"op": "all_reduce", "dtype": "float64"}, "float64"),
    ({"op": "rotate"}, "rotate"),
])
def test_bad_arguments_are_refused_before_building(trt_double, kw, match):
    calls = []
    kw = dict(kw)
    op = kw.pop("op")
    # mdtrt's own argument checks: an InvalidArgumentError (a TensorRTError would mean TensorRT refused it).
    with pytest.raises(mdtrt.InvalidArgumentError, match=match):
        build(op, progress=lambda *a: calls.append(a) or True, **kw)
    assert calls == [], "the builder ran"


def test_garbage_bytes_are_refused_with_the_doubles_message(trt_double):
    """Deserializing needs no GPU in the double, so this runs on CPU machines too."""
    with pytest.raises(mdtrt.TensorRTError) as info:
        mdtrt_tensorrt.check_engine(b"\x00" * 64 + b"definitely not a plan")
    message = str(info.value)
    assert info.value.call == "deserializeCudaEngine", message
    assert "not a plan of the TensorRT test double" in message
    assert "Is this a TensorRT 11 plan" in message


def test_read_and_write_plan_round_trip(trt_double):
    data = build("gather", nb_ranks=4, shape=[2, 3], groups=[3, 1], root=1, transpose=True)
    plan = double.read_plan(data)
    assert double.read_plan(double.write_plan(plan)) == plan
    with pytest.raises(ValueError, match="not a plan of the TensorRT test double"):
        double.read_plan(b"garbage")


# --- the execution context's refusals, driven without a GPU (tensorrt_double/check_context.cpp) ---


def context_check(trt_double, tmp_path, plan: bytes, *commands: str) -> list[tuple[str, str]]:
    """Runs the double's context driver on `plan`: (result, what the double logged) per command."""
    import subprocess

    path = tmp_path / "plan"
    path.write_bytes(plan)
    driver = os.path.join(os.path.dirname(trt_double), "double_context_check")
    out = subprocess.run([driver, trt_double, str(path), *commands], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    results, ran = [], []
    for line in out.stdout.splitlines():
        command, rest = line.split(" -> ", 1)
        result, _, log = rest.partition(" | ")
        results.append((result, log))
        ran.append(command)
    assert ran == list(commands)
    return results


def single_device_plan() -> bytes:
    """x [rows, 6] (rows 1..8) -> transpose -> y [6, rows]; written directly, since mdtrt builds
    single-device networks from ONNX and the double has no ONNX parser."""
    return double.write_plan({
        "tensors": [{"name": "x", "dtype": "FLOAT", "dims": [-1, 6]}, {"name": "y", "dtype": "FLOAT", "dims": [6, -1]}],
        "inputs": [{"name": "x", "min": [1, 6], "opt": [4, 6], "max": [8, 6]}],
        "layers": [{"type": "shuffle", "name": "t", "input": "x", "output": "y", "first_transpose": [1, 0]}],
        "outputs": [{"name": "y"}],
        "ranks": 0,
    })


def test_single_device_network_shapes_and_refusals(trt_double, tmp_path):
    io, comm, enqueue, too_big, wrong_rank, ok, shape = context_check(
        trt_double, tmp_path, single_device_plan(), "io", "comm-null", "enqueue", "shape:x:9,6", "shape:x:3", "shape:x:3,6",
        "get:y")
    assert io[0] == "x=in[-1,6] y=out[6,-1]"
    assert comm[0] == "false" and "no multi-device layers" in comm[1]
    assert enqueue[0] == "false"
    assert too_big[0] == "false" and "outside the range of input 'x'" in too_big[1] and "from (1, 6) to (8, 6)" in too_big[1]
    assert wrong_rank[0] == "false"
    assert ok == ("true", "")
    assert shape[0] == "[6,3]"


@pytest.mark.parametrize("commands,message", [
    ((), "the shape of input 'x' (-1, 6) is not set (setInputShape)"),
    (("shape:x:2,6",), "the address of tensor 'x' is not set"),
    (("shape:x:2,6", "address:x:0"), "the address of tensor 'y' is not set"),
    (("shape:x:2,6", "address:x:0", "address:y:4"), "'y' is not 256-byte aligned"),
    (("shape:x:2,6", "address:x:16", "address:y:0"), "'x' is not 256-byte aligned"),
])
def test_enqueue_names_what_is_missing(trt_double, tmp_path, commands, message):
    *_, (result, log) = context_check(trt_double, tmp_path, single_device_plan(), *commands, "enqueue")
    assert result == "false" and message in log


def test_multi_device_plan_needs_a_communicator_before_enqueue(trt_double, tmp_path):
    plan = build("all_gather", nb_ranks=2, shape=[2, 3])
    io, _, _, enqueue, comm = context_check(trt_double, tmp_path, plan, "io", "address:input:0", "address:output:0",
                                            "enqueue", "comm-null")
    assert io[0] == "input=in[2,3] output=out[4,3]"
    assert enqueue[0] == "false" and "no communicator" in enqueue[1] and "setCommunicator" in enqueue[1]
    assert comm[0] == "false" and "null" in comm[1]


def test_output_shapes_follow_the_input_shape_within_the_profile(trt_double, tmp_path):
    plan = double.write_plan({
        "tensors": [{"name": "input", "dtype": "HALF", "dims": [-1, 4]}, {"name": "output", "dtype": "HALF", "dims": [-1, 4]}],
        "inputs": [{"name": "input", "min": [2, 4], "opt": [4, 4], "max": [8, 4]}],
        "layers": [{"type": "dist_collective", "name": "rs", "input": "input", "output": "output", "nb_ranks": 2,
                    "op": "reduce_scatter", "reduce": "sum", "root": -1, "groups": []}],
        "outputs": [{"name": "output"}],
        "ranks": 2,
    })
    unset, set6, six, set3, three, small, wide = context_check(
        trt_double, tmp_path, plan, "get:output", "shape:input:6,4", "get:output", "shape:input:3,4", "get:output",
        "shape:input:1,4", "shape:input:8,5")
    assert unset[0] == "[-1,4]"
    assert set6[0] == "true" and six[0] == "[3,4]"
    assert set3[0] == "true"  # inside the profile: the uneven split is named when the shape is asked for
    assert three[0] == "invalid" and "does not split into 2 equal parts" in three[1]
    assert small[0] == "false" and wide[0] == "false"


@pytest.mark.parametrize("flags,loads", [
    ([], True),
    (["kVERSION_COMPATIBLE"], False),  # embeds the lean runtime: host code, refused by default
    (["kVERSION_COMPATIBLE", "kEXCLUDE_LEAN_RUNTIME"], True),
])
def test_version_compatible_plans_with_host_code_need_permission(trt_double, flags, loads):
    bits = {"kVERSION_COMPATIBLE": 12, "kEXCLUDE_LEAN_RUNTIME": 13}
    plan = double.read_plan(build("all_reduce"))
    plan["builder"].update(flags=sum(1 << bits[f] for f in flags), flag_names=flags)
    data = double.write_plan(plan)
    assert double.read_plan(data)["builder"]["flag_names"] == flags
    if loads:
        assert [t["name"] for t in mdtrt_tensorrt.check_engine(data)] == ["input", "output"]
        return
    with pytest.raises(mdtrt.TensorRTError, match="setEngineHostCodeAllowed") as info:
        mdtrt_tensorrt.check_engine(data)
    assert info.value.call == "deserializeCudaEngine" and "allow_host_code=True" in str(info.value)
    # mdtrt's opt-in (IRuntime::setEngineHostCodeAllowed(true)) lets the same plan load.
    assert [t["name"] for t in mdtrt_tensorrt.check_engine(data, allow_host_code=True)] == ["input", "output"]


def test_version_compatible_builds_need_host_code_permission_end_to_end(trt_double):
    embedded = build("all_reduce", version_compatible=True)
    excluded = build("all_reduce", version_compatible=True, exclude_lean_runtime=True)
    assert double.read_plan(embedded)["builder"]["flag_names"] == ["kVERSION_COMPATIBLE"]
    with pytest.raises(mdtrt.TensorRTError, match="allow_host_code=True"):
        mdtrt_tensorrt.check_engine(embedded)
    for plan, allow in ((embedded, True), (excluded, False)):
        assert [t["name"] for t in mdtrt_tensorrt.check_engine(plan, allow_host_code=allow)] == ["input", "output"]


def test_a_plan_the_double_cannot_run_is_refused_when_deserialized(trt_double):
    plan = double.read_plan(single_device_plan())
    plan["tensors"][0]["dims"] = [-1, 6, 2]
    plan["inputs"][0].update(min=[1, 6, 2], opt=[4, 6, 2], max=[8, 6, 2])
    plan["layers"][0]["first_transpose"] = [2, 0, 1]
    with pytest.raises(mdtrt.TensorRTError, match=r"runs only 2-D transposes") as info:
        mdtrt_tensorrt.check_engine(double.write_plan(plan))
    assert info.value.call == "deserializeCudaEngine"


def test_unimplemented_methods_log_through_the_ilogger_and_fail(trt_double, tmp_path):
    """The stubs generated from NvInferImpl.h: an error through the ILogger, a neutral result."""
    ((result, log),) = context_check(trt_double, tmp_path, single_device_plan(), "inspector")
    assert result == "null"
    assert "VCudaEngine::createEngineInspector is not implemented by the TensorRT test double" in log


def test_doctor_reports_the_double_as_full_tensorrt(trt_double):
    report = mdtrt_tensorrt.library_report()  # in a child process, which inherits MDTRT_TENSORRT_LIBRARY
    assert report["library_found"], report["error"]
    assert os.path.realpath(report["path"]) == os.path.realpath(trt_double)
    assert (report["version"], report["lean"], report["found_by"]) == ("11.1.0", False, "MDTRT_TENSORRT_LIBRARY")


# --- enqueueV3's data movement on CPU: the double on host memory with a fake NCCL of threads ------
# (tensorrt_double/host: fake_cudart.cpp, fake_nccl.cpp, host_run.cpp). The GPU tests run the same
# plans with CUDA and real NCCL; these catch layer-order, transpose, root and group mistakes on CI.


def host_run(trt_double, tmp_path, plan: bytes, xs: list[np.ndarray]):
    """Runs `plan` on len(xs) rank threads; per rank (ok, log, output array or None)."""
    import subprocess

    build_dir = os.path.dirname(trt_double)
    (tmp_path / "plan").write_bytes(plan)
    (tmp_path / "inputs").write_bytes(b"".join(np.ascontiguousarray(x).tobytes() for x in xs))
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(build_dir, "host"))
    out = subprocess.run([os.path.join(build_dir, "double_host_run"), os.path.join(build_dir, "libnvinfer_double_host.so"),
                          str(tmp_path / "plan"), str(len(xs)), str(tmp_path / "inputs"), str(tmp_path / "outputs")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    data = (tmp_path / "outputs").read_bytes()
    results, offset = [], 0
    for line in out.stdout.splitlines():
        head, _, log = line.partition(" | ")
        _, rank, _, shape, status = head.split(" ")
        dims = [int(d) for d in shape.split(",")] if shape != "-" else []
        count = int(np.prod(dims)) * xs[0].itemsize
        array = np.frombuffer(data[offset:offset + count], xs[0].dtype).reshape(dims) if status == "ok" else None
        offset += count if status == "ok" else 0
        results.append((status == "ok", log, array))
    assert len(results) == len(xs)
    return results


def host_cases():
    for n in (2, 3):
        for op in reference.OPERATIONS:
            for groups in (None, list(reversed(range(n)))):
                for root in ((0, n - 1) if op in ROOTED else (0,)):
                    yield pytest.param(n, op, groups, root, id=f"{n}ranks-{op}-{'rev' if groups else 'all'}-root{root}")


@pytest.mark.parametrize("n,op,groups,root", list(host_cases()))
@pytest.mark.parametrize("transpose", [False, True], ids=["plain", "transposed"])
def test_host_run_matches_the_reference(trt_double, tmp_path, n, op, groups, root, transpose):
    reduce = "sum" if op != "reduce" else "max"
    shape = [2, 3 * n] if transpose else [3 * n, 2]
    plan = build(op, nb_ranks=n, shape=shape, reduce=reduce, root=root, groups=groups, transpose=transpose)
    rng = np.random.default_rng(n * 100 + len(op) + root)
    xs = [rng.integers(-4, 5, size=shape).astype(np.float32) for _ in range(n)]
    if transpose:
        want = reference.collective(op, [np.ascontiguousarray(x.T) for x in xs], reduce=reduce, root=root, groups=groups)
        want = [None if w is None else np.ascontiguousarray(w.T) for w in want]
    else:
        want = reference.collective(op, xs, reduce=reduce, root=root, groups=groups)
    results = host_run(trt_double, tmp_path, plan, xs)
    for rank, ((ok, log, got), exp) in enumerate(zip(results, want, strict=True)):
        assert ok, f"rank {rank}: {log}"
        if exp is not None:
            np.testing.assert_array_equal(got, exp, err_msg=f"rank {rank}")


@pytest.mark.parametrize("op", REDUCING)
@pytest.mark.parametrize("reduce_op", reference.REDUCE_OPERATIONS)
@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_host_run_every_reduce_op(trt_double, tmp_path, op, reduce_op, dtype):
    plan = build(op, nb_ranks=3, shape=[6, 2], reduce=reduce_op, root=2, dtype=dtype)
    xs = [np.random.default_rng(r).integers(-4, 5, size=(6, 2)).astype(dtype) for r in range(3)]
    want = reference.collective(op, xs, reduce=reduce_op, root=2)
    for rank, ((ok, log, got), exp) in enumerate(zip(host_run(trt_double, tmp_path, plan, xs), want, strict=True)):
        assert ok, log
        if exp is not None:
            np.testing.assert_array_equal(got, exp, err_msg=f"rank {rank}")


@pytest.mark.parametrize("op,root", [("broadcast", 2), ("all_reduce", 0), ("scatter", 0), ("all_to_all", 0), ("gather", 2)])
def test_host_run_ranks_outside_the_group_keep_their_output(trt_double, tmp_path, op, root):
    groups = [2, 0]
    plan = build(op, nb_ranks=3, shape=[4, 2], root=root, groups=groups)
    xs = [np.random.default_rng(r).integers(-4, 5, size=(4, 2)).astype(np.float32) for r in range(3)]
    results = host_run(trt_double, tmp_path, plan, xs)
    want = reference.collective(op, xs, root=root, groups=groups)
    ok, log, untouched = results[1]
    assert ok, log
    assert untouched.tobytes() == b"\xa5" * untouched.nbytes  # rank 1 is not in the group
    for rank in (0, 2):
        assert results[rank][0], results[rank][1]
        if want[rank] is not None:
            np.testing.assert_array_equal(results[rank][2], want[rank], err_msg=f"rank {rank}")


def test_host_run_refuses_a_group_smaller_than_nb_ranks_naming_both(trt_double, tmp_path):
    """The double's rule: all_gather's nbRanks is the number of ranks taking part."""
    plan = double.write_plan({
        "tensors": [{"name": "input", "dtype": "FLOAT", "dims": [2, 2]}, {"name": "output", "dtype": "FLOAT", "dims": [6, 2]}],
        "inputs": [{"name": "input", "min": [2, 2], "opt": [2, 2], "max": [2, 2]}],
        "layers": [{"type": "dist_collective", "name": "ag", "input": "input", "output": "output", "nb_ranks": 3,
                    "op": "all_gather", "reduce": "none", "root": -1, "groups": [0, 1]}],
        "outputs": [{"name": "output"}],
        "ranks": 3,
        "ranks_exact": False,
    })
    results = host_run(trt_double, tmp_path, plan, [np.ones((2, 2), np.float32)] * 3)
    for rank in (0, 1):
        ok, log, _ = results[rank]
        assert not ok and "runs over a group of 2 ranks but was built with setNbRanks(3)" in log
    assert results[2][0]  # not in the group: nothing to do


def test_host_run_communicator_of_the_wrong_size_is_refused(trt_double, tmp_path):
    plan = build("all_reduce", nb_ranks=3, shape=[2, 2])
    results = host_run(trt_double, tmp_path, plan, [np.ones((2, 2), np.float32)] * 2)
    for ok, log, _ in results:
        assert not ok and "built for 3 ranks" in log and "communicator has 2" in log


@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter"])
def test_host_run_grouped_shape_ops_through_mdtrt(trt_double, tmp_path, op):
    plan = build(op, nb_ranks=3, shape=[4, 2], groups=[2, 0])
    xs = [np.random.default_rng(r).integers(-4, 5, size=(4, 2)).astype(np.float32) for r in range(3)]
    want = reference.collective(op, xs, groups=[2, 0])
    for rank, ((ok, log, got), exp) in enumerate(zip(host_run(trt_double, tmp_path, plan, xs), want, strict=True)):
        assert ok, f"rank {rank}: {log}"
        if exp is not None:
            np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize("ranks,expected", [(2, "blocked"), (1, "returned")])
def test_set_communicator_is_collective(trt_double, tmp_path, ranks, expected):
    """Rank 0 alone in setCommunicator waits for the other ranks of the communicator (which is why
    mdtrt binds every rank at once): blocked with 2 ranks, done with 1."""
    import subprocess

    build_dir = os.path.dirname(trt_double)
    (tmp_path / "plan").write_bytes(build("all_reduce", nb_ranks=ranks, shape=[2, 2]))
    out = subprocess.run([os.path.join(build_dir, "double_host_run"), os.path.join(build_dir, "libnvinfer_double_host.so"),
                          str(tmp_path / "plan"), str(ranks), "--bind-alone"],
                         env=dict(os.environ, LD_LIBRARY_PATH=os.path.join(build_dir, "host")), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split(" | ")[0] == expected, out.stdout


def test_host_run_two_collectives_in_one_network(trt_double, tmp_path):
    """all_reduce over ranks [2, 0], then all_gather over every rank: two splits, an intermediate
    tensor between them, rank 1 outside the first group."""
    plan = double.write_plan({
        "tensors": [{"name": "input", "dtype": "INT32", "dims": [2, 3]}, {"name": "mid", "dtype": "INT32", "dims": [2, 3]},
                    {"name": "output", "dtype": "INT32", "dims": [6, 3]}],
        "inputs": [{"name": "input", "min": [2, 3], "opt": [2, 3], "max": [2, 3]}],
        "layers": [
            {"type": "dist_collective", "name": "ar", "input": "input", "output": "mid", "nb_ranks": 2, "op": "all_reduce",
             "reduce": "sum", "root": -1, "groups": [2, 0]},
            {"type": "dist_collective", "name": "ag", "input": "mid", "output": "output", "nb_ranks": 3, "op": "all_gather",
             "reduce": "none", "root": -1, "groups": []},
        ],
        "outputs": [{"name": "output"}],
        "ranks": 3,
    })
    xs = [np.random.default_rng(r).integers(-9, 10, size=(2, 3)).astype(np.int32) for r in range(3)]
    results = host_run(trt_double, tmp_path, plan, xs)
    summed = xs[0] + xs[2]
    for rank, (ok, log, got) in enumerate(results):
        assert ok, log
        np.testing.assert_array_equal(got[0:2], summed)
        np.testing.assert_array_equal(got[4:6], summed)
        # rank 1 took no part in the all_reduce: its intermediate is whatever the context's memory held


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_true_draws_bars_only_on_a_terminal(trt_double, terminal, monkeypatch, capfd):
    """progress=True: tqdm bars on a terminal; into a file or CI log (where bars would be one long
    line of carriage returns) the line log, a line per step of the top-level phase."""
    pytest.importorskip("tqdm")
    monkeypatch.setattr(mdtrt_tensorrt, "stderr_is_terminal", lambda: terminal)
    build("all_reduce", progress=True)
    err = capfd.readouterr().err
    assert ("[mdtrt] building: phase" in err) == (not terminal), err
    assert ("TensorRT: " in err) == terminal, err
