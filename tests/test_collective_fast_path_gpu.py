"""The one-shot collectives' fast path for torch CUDA tensors on real GPUs: from the second call
of a signature on, calls run on each call's own tensors and streams, and a tensor at a kept
signature's address but of another shape, dtype, stride or GPU is never run as if it matched."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import mdtrt
from mdtrt import _core
from mdtrt.arrays import torch_current_streams

from addressed_stub import addressed_run

pytestmark = pytest.mark.multi_gpu
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def group(gpu_pair):  # conftest's 2-GPU group, under the name these tests use
    return gpu_pair


def reference(op, host):
    """numpy reference per rank of a 2-rank collective along dimension 0 (root 1 where rooted)."""
    s = host[0] + host[1]
    half = host[0].shape[0] // 2
    return {"all_reduce": [s, s], "all_gather": [np.concatenate(host)] * 2, "reduce_scatter": [s[:half], s[half:]],
            "broadcast": [host[1], host[1]], "reduce": [None, s], "gather": [None, np.concatenate(host)]}[op]


@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce", "gather"])
def test_one_shot_loop_follows_each_calls_tensors_and_streams(group, op, with_out):
    """A loop of op-method calls on new tensors, every other iteration on a side stream of both
    GPUs, the results read on the stream current at the call: each iteration's own result."""
    method = getattr(group, op)
    kw = {"root": 1} if op in ("broadcast", "reduce", "gather") else {}
    side = [torch.cuda.Stream(device=r) for r in range(2)]
    rng = np.random.default_rng(5)
    before = len(group._torch_calls)
    for it in range(6):
        host = [rng.standard_normal((8, 5)).astype(np.float32) for _ in range(2)]
        streams = side if it % 2 else [torch.cuda.current_stream(r) for r in range(2)]
        with torch.cuda.stream(streams[0]), torch.cuda.stream(streams[1]):
            xs = [torch.from_numpy(h).to(f"cuda:{r}") for r, h in enumerate(host)]
            if with_out:
                shape = tuple(_core.collective_output_shape(op, [8, 5], 2))
                outs = [torch.full(shape, float("nan"), device=f"cuda:{r}") for r in range(2)]
                got = method(xs, out=outs, **kw)
            else:
                got = method(xs, **kw)
            copies = [None if g is None else g.clone() for g in got]  # on the current stream
            for x in xs:
                x.fill_(-1000.0)  # after the call on the same stream: must not change its result
        for r in range(2):
            torch.cuda.synchronize(r)  # the copies were queued on the stream current at the call
        for r, want in enumerate(reference(op, host)):
            if want is None:
                assert got[r] is None
            else:
                np.testing.assert_allclose(copies[r].cpu().numpy(), want, rtol=1e-5, atol=1e-5,
                                           err_msg=f"{op} iteration {it} rank {r}")
                if with_out:
                    assert got[r] is outs[r]
    assert len(group._torch_calls) == before + 1  # one signature, found again on every later call


def test_same_address_other_shape_dtype_stride_or_gpu(group):
    """Tensors at the addresses of a kept signature: another shape, dtype or GPU runs as what it
    is; a non-contiguous view, a too small out= or out= on the other GPU fail as on a first call,
    and the group keeps working."""
    xs = [torch.arange(16, dtype=torch.float32, device=f"cuda:{r}") + 100 * r for r in range(2)]
    outs = [torch.empty(16, device=f"cuda:{r}") for r in range(2)]
    for _ in range(2):
        group.all_reduce(xs, out=outs)
        group.all_reduce(xs)
    expected = (xs[0] + xs[1].to("cuda:0")).cpu()
    got = group.all_reduce([x[:8] for x in xs])  # same pointers, another shape
    assert [tuple(g.shape) for g in got] == [(8,), (8,)]
    torch.testing.assert_close(got[1].cpu(), expected[:8])
    as_int = [x.view(torch.int32) for x in xs]  # same pointers, another dtype
    got = group.all_reduce(as_int)
    assert got[0].dtype == torch.int32
    torch.testing.assert_close(got[0].cpu(), as_int[0].cpu() + as_int[1].cpu())
    with pytest.raises(mdtrt.InvalidArgumentError, match="non-contiguous"):
        group.all_reduce([x.view(4, 4).t() for x in xs])  # same pointer, other strides
    got = group.all_reduce([xs[1], xs[0]])  # each rank's input on the other GPU: copied to it
    assert [g.device.index for g in got] == [0, 1]
    torch.testing.assert_close(got[1].cpu(), expected)
    with pytest.raises(mdtrt.InvalidArgumentError, match="bytes"):
        group.all_reduce(xs, out=[o[:8] for o in outs])  # same pointers, too small
    with pytest.raises(mdtrt.InvalidArgumentError, match="bytes"):
        group.all_reduce(xs, out=[outs[1], outs[0]])  # each rank's out= on the other GPU
    group.synchronize()
    for o in outs:
        o.fill_(float("nan"))  # the loop above left the right sum in them: a call that wrote nothing must show
    got = group.all_reduce(xs, out=outs)
    assert all(g is o for g, o in zip(got, outs, strict=True))
    torch.testing.assert_close(outs[0].cpu(), expected)
    torch.testing.assert_close(outs[1].cpu(), expected)


def test_an_addressed_run_refuses_lists_that_do_not_fit(group):
    """The native entry of the fast path: made with a size and a GPU per output and rank, run with
    an address and a stream per input and output; a stream-ordered run needs every stream. Each
    refusal names what it got and leaves the call working."""
    xs = [torch.ones(8, device=f"cuda:{r}") for r in range(2)]
    for _ in range(2):
        group.all_reduce(xs)  # the second call of the signature keeps its call for the fast path
    run = next(iter(group._torch_calls.values()))
    call = run.kept.call
    with pytest.raises(mdtrt.InvalidArgumentError, match="each output's size and GPU: got 1 names, 1 sizes"):
        call.addressed(["output"], [32], [0, 1], False)
    with pytest.raises(mdtrt.InvalidArgumentError, match="got 0 names"):
        call.addressed([], [32, 32], [0, 1], False)
    addressed = call.addressed(["output"], [32, 32], [0, 1], False)
    p = xs[0].data_ptr()
    with pytest.raises(mdtrt.InvalidArgumentError, match="2 input and 2 output addresses.*got 3 pointers"):
        addressed([p] * 3, [1] * 3)
    with pytest.raises(mdtrt.InvalidArgumentError, match="got 4 pointers and 3 streams"):
        addressed([p] * 4, [1] * 3)
    with pytest.raises(mdtrt.InvalidArgumentError, match="got 5 pointers"):
        addressed([p] * 5, [1] * 5)
    ordered = call.addressed(["output"], [32, 32], [0, 1], True)
    with pytest.raises(mdtrt.InvalidArgumentError, match="stream-ordered call needs device inputs with a stream"):
        ordered([xs[0].data_ptr(), xs[1].data_ptr(), xs[0].data_ptr(), xs[1].data_ptr()], [0] * 4)
    group.synchronize()
    # The kept call still runs, on new random data (the ones above summed to 2 everywhere, which a
    # reused output block of an earlier call would still hold).
    host = [np.random.default_rng(31 + r).standard_normal(8).astype(np.float32) for r in range(2)]
    fresh = [torch.from_numpy(h).to(f"cuda:{r}") for r, h in enumerate(host)]
    got = group.all_reduce(fresh)
    for r in range(2):
        np.testing.assert_allclose(got[r].cpu().numpy(), host[0] + host[1], rtol=1e-5, atol=1e-5)


def kept_call(group, elements):
    """The prepared call the fast path keeps for all_reduce of float32 tensors of ``elements``
    (a size no other test of this module uses), made by that signature's first call."""
    before = set(group._torch_calls)
    group.all_reduce([torch.zeros(elements, device=f"cuda:{r}") for r in range(2)])
    [run] = [run for key, run in group._torch_calls.items() if key not in before]
    return run.kept.call


def addressed_sum(elements, rng):
    """(host inputs, device inputs, NaN outputs, pointers, streams) of one run of a 2-rank
    all_reduce of ``elements`` float32 on new random data, as an addressed run takes them."""
    host = [rng.standard_normal(elements).astype(np.float32) for _ in range(2)]
    xs = [torch.from_numpy(h).to(f"cuda:{r}") for r, h in enumerate(host)]
    outs = [torch.full((elements,), float("nan"), device=f"cuda:{r}") for r in range(2)]
    streams = torch_current_streams([0, 1])
    return host, xs, outs, [x.data_ptr() for x in xs] + [o.data_ptr() for o in outs], streams + streams


def test_a_kept_plan_still_refuses_what_a_new_plan_refuses(group):
    """A stream-ordered addressed run keeps the plan of its first run: a later run with a null
    input, or an input or output without a stream, is still refused as a first run's plan would
    refuse it, before anything runs (its outputs stay NaN), and the next run gets the right sums."""
    call = kept_call(group, 13)
    ordered = call.addressed(["output"], [52, 52], [0, 1], True)
    rng = np.random.default_rng(41)
    bad = [(lambda p, s: ([0] + p[1:], s), r"input '\w+' of rank 0 has no data \(a null pointer\) for 52 bytes"),
           (lambda p, s: (p, [0] + s[1:]), r"needs device inputs with a stream.*input '\w+' of rank 0 is on a device "
                                           r"without a stream"),
           (lambda p, s: (p, s[:3] + [0]),
            r"needs output buffers on a device with a stream.*output 'output' of rank 1")]
    for attempt in range(len(bad) + 1):
        if attempt > 0:  # the plan was kept by the run before
            host, xs, outs, pointers, streams = addressed_sum(13, rng)
            spoil, message = bad[attempt - 1]
            with pytest.raises(mdtrt.InvalidArgumentError, match=message):
                ordered(*spoil(pointers, streams))
            group.synchronize()
            for r in range(2):
                torch.cuda.synchronize(r)
                assert torch.isnan(outs[r]).all(), f"refused run {attempt} wrote rank {r}'s output"
        host, xs, outs, pointers, streams = addressed_sum(13, rng)
        ordered(pointers, streams)
        group.synchronize()
        for r in range(2):
            torch.cuda.synchronize(r)  # the outputs belong to the caller streams
            np.testing.assert_allclose(outs[r].cpu().numpy(), host[0] + host[1], rtol=1e-5, atol=1e-5,
                                       err_msg=f"run after refusal {attempt}, rank {r}")


def test_two_threads_running_one_addressed_run_get_their_own_sums(group):
    """Two threads run one addressed run at once, 30 times each on tensors of their own (a run
    finding it taken by the other thread's works on copies of its arguments): every run's outputs
    are its own inputs' sum."""
    call = kept_call(group, 17)
    waiting = call.addressed(["output"], [68, 68], [0, 1], False)
    start = threading.Barrier(2)

    def calls(t):
        rng = np.random.default_rng(50 + t)
        start.wait(timeout=60)
        for it in range(30):
            host, xs, outs, pointers, streams = addressed_sum(17, rng)
            waiting(pointers, streams)  # returns once every rank has finished
            for r in range(2):
                np.testing.assert_allclose(outs[r].cpu().numpy(), host[0] + host[1], rtol=1e-5, atol=1e-5,
                                           err_msg=f"thread {t}, run {it}, rank {r}")

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(calls, t) for t in (0, 1)]:
            done.result(timeout=120)  # raises what the thread raised


def test_the_stubs_addressed_run_refuses_as_the_native_one(group):
    """tests/addressed_stub.py stands for the native addressed run in the CPU tests: for lists
    that do not fit, when made and at a run, both refuse alike, InvalidArgumentError in the same
    words (TypeError for addresses that are no integers)."""
    call = kept_call(group, 19)
    for names, nbytes, devices in [(["output"], [76], [0, 1]), ([], [76, 76], [0, 1]), (["output"], [76, 76], [0]),
                                   (["output", "output"], [76, 76], [0, 1])]:
        with pytest.raises(mdtrt.InvalidArgumentError) as native:
            call.addressed(names, nbytes, devices, False)
        with pytest.raises(mdtrt.InvalidArgumentError) as stub:
            addressed_run(lambda *args: None, [1, 1], names, nbytes, devices, False)
        assert str(stub.value) == str(native.value)
    run = call.addressed(["output"], [76, 76], [0, 1], False)
    stub_run = addressed_run(lambda *args: None, [1, 1], ["output"], [76, 76], [0, 1], False)
    p = 0x1000  # never read: every list below is refused first
    for pointers, streams in [([p] * 3, [1] * 3), ([p] * 4, [1] * 3), ([p] * 5, [1] * 5), ([], [])]:
        with pytest.raises(mdtrt.InvalidArgumentError) as native:
            run(pointers, streams)
        with pytest.raises(mdtrt.InvalidArgumentError) as stub:
            stub_run(pointers, streams)
        assert str(stub.value) == str(native.value)
    for pointers, streams in [([None, p, p, p], [1] * 4), ([p] * 4, [1, 1, 1.5, 1])]:
        with pytest.raises(TypeError):
            run(pointers, streams)
        with pytest.raises(TypeError):
            stub_run(pointers, streams)
