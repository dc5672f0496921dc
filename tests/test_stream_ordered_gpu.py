"""Stream-ordered calls on GPUs: the call returns once its work is queued, and the caller's streams
wait for it (torch.distributed's semantics). Every result is checked against numpy on random
data, and the ordering is provoked: the caller's stream is kept busy (torch.cuda._sleep) so that a
call which did not order itself after it, or a caller stream that did not wait for the call, reads
or writes the wrong data."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import mdtrt
from mdtrt import _core

pytestmark = pytest.mark.multi_gpu
torch = pytest.importorskip("torch")

BUSY_CYCLES = 2_000_000_000  # about 1 s of torch.cuda._sleep on an H200 (1.98 GHz)


@pytest.fixture(scope="module")
def group(gpu_pair):  # conftest's 2-GPU group, under the name these tests use
    return gpu_pair


def random_inputs(seed, shape=(64, 33), n=2):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def to_gpus(arrays):
    return [torch.from_numpy(a).to(f"cuda:{r}") for r, a in enumerate(arrays)]


def busy(gpus=(0, 1), cycles=BUSY_CYCLES):
    for g in gpus:
        with torch.cuda.device(g):
            torch.cuda._sleep(cycles)


def test_torch_call_returns_before_the_gpus_are_done_and_results_follow_the_stream(group):
    host = random_inputs(1)
    xs = to_gpus(host)
    first = group.all_reduce(xs)  # the first call of a signature sets the runner up (a communicator split)
    group.synchronize()
    later = random_inputs(101)
    staged = to_gpus(later)
    for g in (0, 1):
        torch.cuda.synchronize(g)
    busy()  # the inputs' producer stream is busy: the call must order itself after it
    for x, s in zip(xs, staged, strict=True):
        x.copy_(s)  # new inputs, written behind the busy kernel: a call not ordered after it reads the old ones
    out = group.all_reduce(xs)  # `first` is still held: its memory (holding the old sum) is not reused
    pending = [not torch.cuda.current_stream(g).query() for g in (0, 1)]
    assert all(pending), "a stream-ordered call returned only after the GPUs were done"
    for r in range(2):
        np.testing.assert_allclose(out[r].cpu().numpy(), later[0] + later[1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(first[r].cpu().numpy(), host[0] + host[1], rtol=1e-5, atol=1e-5)


def test_inputs_overwritten_right_after_the_call_do_not_change_its_result(group):
    host = random_inputs(2)
    xs = to_gpus(host)
    busy()
    out = group.all_gather(xs)
    for x in xs:
        x.fill_(-1000.0)  # queued on the current stream, which waits for the gather
    expected = np.concatenate(host)
    for r in range(2):
        np.testing.assert_array_equal(out[r].cpu().numpy(), expected)


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"])
def test_prepared_stream_ordered_loop_with_out_sees_each_iterations_inputs(group, op):
    """prepare_collective(out=) called in a loop, the inputs refilled on the caller's stream
    between calls and each output copied on it: every iteration's output is that iteration's."""
    xs = to_gpus(random_inputs(3, shape=(8, 5)))
    shape = tuple(_core.collective_output_shape(op, list(xs[0].shape), 2))
    outs = [torch.full(shape, float("nan"), device=f"cuda:{r}") for r in range(2)]
    call = group.prepare_collective(op, xs, out=outs)
    copies, expected = [], []
    for it in range(6):
        host = random_inputs(100 + it, shape=(8, 5))
        if it % 2 == 0:
            busy(cycles=BUSY_CYCLES // 10)
        for r in range(2):
            xs[r].copy_(torch.from_numpy(host[r]).to(f"cuda:{r}", non_blocking=False))
        call()
        copies.append([o.clone() for o in outs])  # on the caller's stream: after the call
        expected.append(reference(op, host))
    for got, want in zip(copies, expected, strict=True):
        for r in range(2):
            if want[r] is not None:
                np.testing.assert_allclose(got[r].cpu().numpy(), want[r], rtol=1e-5, atol=1e-5)


def reference(op, host):
    """numpy reference per rank of a 2-rank collective along dimension 0 (root 0)."""
    s = host[0] + host[1]
    half = host[0].shape[0] // 2
    if op == "all_reduce":
        return [s, s]
    if op == "all_gather":
        return [np.concatenate(host)] * 2
    if op == "reduce_scatter":
        return [s[:half], s[half:]]
    if op == "all_to_all":
        return [np.concatenate([host[0][:half], host[1][:half]]), np.concatenate([host[0][half:], host[1][half:]])]
    if op == "broadcast":
        return [host[0], host[0]]
    raise AssertionError(op)


def test_an_input_copied_to_another_gpu_is_not_overwritten_before_the_copy(group):
    """EngineRunner with one device input on GPU 0 for both ranks: rank 1 copies it peer-to-peer.
    GPU 0's stream waits for rank 1's copy too, so overwriting the input right after the call
    cannot reach rank 1's output."""
    from mdtrt._core import testing

    runner = mdtrt.EngineRunner(group, program=testing.CopyProgram("float32"))
    host = random_inputs(7, shape=(4096,), n=1)[0]
    x = torch.from_numpy(host).to("cuda:0")
    outs = {"output": [torch.full((4096,), float("nan"), device=f"cuda:{r}") for r in range(2)]}
    runner.infer({"input": x}, outputs=outs)  # the first call of the signature
    group.synchronize()
    for o in outs["output"]:
        o.fill_(float("nan"))
    busy()
    runner.infer({"input": x}, outputs=outs)
    assert not torch.cuda.current_stream(0).query(), "the call waited for the GPUs"
    x.fill_(-1000.0)  # on GPU 0's current stream: after both ranks' work
    for r in range(2):
        np.testing.assert_array_equal(outs["output"][r].cpu().numpy(), host)


def test_waiting_call_still_waits(group):
    xs = to_gpus(random_inputs(4))
    busy()
    out = group.all_reduce(xs, stream_ordered=False)
    assert all(torch.cuda.current_stream(g).query() for g in (0, 1)), "a waiting call returned early"
    np.testing.assert_allclose(out[1].cpu().numpy(), (xs[0].cpu() + xs[1].cpu()).numpy(), rtol=1e-5)


def test_stream_ordered_calls_then_a_waiting_call_and_synchronize(group):
    host = random_inputs(5)
    xs = to_gpus(host)
    outs = [group.all_reduce(xs) for _ in range(5)]
    host_out = group.all_reduce(host)  # numpy: waits, ordered after the queued work on the ranks
    group.synchronize()
    expected = host[0] + host[1]
    for o in outs + [host_out]:
        for r in range(2):
            got = o[r].cpu().numpy() if hasattr(o[r], "cpu") else o[r]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_stream_ordered_requests_that_cannot_be_met_are_refused_before_anything_runs(group):
    host = random_inputs(6)
    with pytest.raises(mdtrt.InvalidArgumentError, match="stream-ordered call needs device inputs"):
        group.all_reduce(host, stream_ordered=True)

    class NoStream:  # a device array whose producer names no stream
        def __init__(self, t):
            self.t = t
            self.__cuda_array_interface__ = dict(t.__cuda_array_interface__, stream=None)

    with pytest.raises(mdtrt.InvalidArgumentError, match="on a device without a stream"):
        group.all_reduce([NoStream(t) for t in to_gpus(host)], stream_ordered=True)
    with pytest.raises(mdtrt.InvalidArgumentError, match="outputs the caller owns"):
        _pooled_outputs_refused(group, host)
    # The group still works.
    out = group.all_reduce(to_gpus(host))
    np.testing.assert_allclose(out[0].cpu().numpy(), host[0] + host[1], rtol=1e-5, atol=1e-5)


def _pooled_outputs_refused(group, host):
    """torch inputs, but outputs the runner would allocate from its pool: a CAI-wrapped torch
    tensor with its stream (device arrays in, mdtrt.DeviceArray out)."""

    class WithStream:
        def __init__(self, t):
            self.t = t
            self.__cuda_array_interface__ = dict(t.__cuda_array_interface__,
                                                 stream=torch.cuda.current_stream(t.device).cuda_stream or 1)

    return group.all_reduce([WithStream(t) for t in to_gpus(host)], stream_ordered=True)


WORKER = textwrap.dedent(
    """
    import os, sys, time, torch, mdtrt
    rank = int(os.environ["TRT_MY_RANK"])
    group = mdtrt.DeviceGroup.from_env(timeout=3)
    x = torch.ones(1024, device=f"cuda:{group.gpus[0]}")
    call = group.prepare_collective("all_reduce", x)  # both ranks set the collective up (a split)
    call()  # both: NCCL connects the ranks at their first collective (an enqueue that would wait)
    group.synchronize()
    if rank == 1:
        print("rank 1 stays away", flush=True)
        time.sleep(25)
        os._exit(0)
    start = time.monotonic()
    out = call()  # stream-ordered (torch in and out): queued; rank 1 never joins
    print(f"returned after {time.monotonic() - start:.2f} s", flush=True)
    try:
        group.synchronize()
        print("NO ERROR", flush=True)
    except mdtrt.RankTimeoutError as e:
        print(f"TIMEOUT after {time.monotonic() - start:.1f} s: {e}", flush=True)
    torch.cuda.synchronize()  # the watchdog aborted the communicator: the stream is free again
    print("stream free", flush=True)
    try:
        group.all_reduce(x, stream_ordered=False)
    except mdtrt.MdtrtError as e:
        print(f"LATER {e}", flush=True)
    os._exit(0)
    """
)


def test_watchdog_aborts_a_stream_ordered_call_whose_peer_never_arrives(tmp_path):
    """A stream-ordered all_reduce that rank 1 never joins: the call returns at once, the
    watchdog aborts the communicators at the 3 s deadline (so torch.cuda.synchronize() returns),
    and synchronize() and the next call name the timeout."""
    if _core.visible_gpu_count() < 2:
        pytest.skip("needs 2 GPUs")
    procs = []
    for r in range(2):
        env = dict(os.environ, TRT_MY_RANK=str(r), TRT_WORLD_SIZE="2", TRT_NCCL_ID_FILE=str(tmp_path / "id"),
                   NCCL_NVLS_ENABLE="0")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    start = time.monotonic()
    out0 = procs[0].communicate(timeout=90)[0]
    elapsed = time.monotonic() - start
    procs[1].kill()
    procs[1].communicate()
    assert "returned after" in out0, out0
    returned = float(out0.split("returned after ")[1].split(" s")[0])
    assert returned < 2.0, out0
    assert "TIMEOUT after" in out0 and "did not finish within 3 s" in out0, out0
    assert "stream free" in out0, out0
    later = [line for line in out0.splitlines() if line.startswith("LATER ")]
    assert later and "this device group can no longer be used" in later[0] and "did not finish within 3 s" in later[0], out0
    assert elapsed < 60, out0


def test_stream_ordered_calls_from_several_threads_on_one_group(group):
    """Two threads call different collectives (two runners of one group) stream-ordered, each on
    streams of its own, the first one behind a busy kernel; group.synchronize() then waits for
    every call of both, and every output is numpy's. The runtime hands each call's events to its
    watchdog in the order they were queued on the rank streams, also across threads."""
    import threading

    host = random_inputs(7)
    expected = {"all_reduce": host[0] + host[1], "all_gather": np.concatenate(host)}
    outputs = {op: [] for op in expected}
    errors = []
    start = threading.Barrier(2)

    def calls(op, busy_first):
        try:
            streams = [torch.cuda.Stream(device=g) for g in (0, 1)]
            with torch.cuda.stream(streams[0]), torch.cuda.stream(streams[1]):
                xs = to_gpus(host)
                getattr(group, op)(xs)  # the first call of a signature sets its runner up
                start.wait(timeout=60)
                if busy_first:
                    busy(cycles=BUSY_CYCLES // 4)
                for _ in range(20):
                    outputs[op].append(getattr(group, op)(xs))
        except Exception as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)

    threads = [threading.Thread(target=calls, args=("all_gather", True)),
               threading.Thread(target=calls, args=("all_reduce", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread's calls did not return"
    assert not errors, errors
    group.synchronize()
    for g in (0, 1):
        torch.cuda.synchronize(g)  # the outputs belong to the threads' streams
    for op, outs in outputs.items():
        assert len(outs) == 20
        for out in outs:
            for r in range(2):
                np.testing.assert_allclose(out[r].cpu().numpy(), expected[op], rtol=1e-5, atol=1e-5)
