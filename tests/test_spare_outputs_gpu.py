"""Outputs allocated for the next call while a stream-ordered call runs (SpareOutputs), on real
GPUs (every visible one, one is enough): a loop of default calls whose outputs are held, dropped
and consumed on the stream gets every call's own result, across two signatures and a change of
current stream; the op methods, prepare_collective and EngineRunner's infer and prepare alike;
two threads on streams of their own; a call after calls in inference mode gets ordinary tensors;
a dropped prepared call gives all its memory (inputs, spare) back at once; Ctrl-C while a spare is
made cancels the call, and close() from there is refused, the group going on in both cases."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import mdtrt
from mdtrt import _core

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def group():
    with mdtrt.DeviceGroup(list(range(_core.visible_gpu_count())), timeout=60) as g:
        yield g


def spare_addresses(holder) -> set:
    """Data pointers of every tensor in ``holder``'s spares (a DeviceGroup's or EngineRunner's)."""
    found = set()
    for outputs, _ in list(holder._spare_outputs._kept.values()):
        stack = [outputs]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                found.add(item.data_ptr())
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
            elif hasattr(item, "owner"):  # an ArrayRef
                stack.append(item.owner)
    return found


def reference(op, host):
    total = np.sum(host, axis=0)
    return [total] * len(host) if op == "all_reduce" else [np.concatenate(host)] * len(host)


def test_op_method_loop_gets_each_calls_own_result(group):
    """60 calls alternating all_reduce and all_gather on new random tensors, every tenth to
    fifteenth on a side stream: every third call's outputs held, a consumer (y * 2) of every call
    queued on the current stream at once, the other outputs dropped; all checked after the loop
    against numpy. Most calls run on outputs allocated while the call before ran."""
    n = len(group)
    side = [torch.cuda.Stream(device=d) for d in group.gpus]
    rng = np.random.default_rng(11)
    held, consumed, used = [], [], 0
    for it in range(60):
        op = ("all_reduce", "all_gather")[it % 2]
        on_side = 10 <= it % 20 < 15
        streams = side if on_side else [torch.cuda.default_stream(d) for d in group.gpus]
        host = [rng.standard_normal((64, 7)).astype(np.float32) for _ in range(n)]
        with _streams(streams):
            for s, d in zip(streams, group.gpus):
                s.wait_stream(torch.cuda.default_stream(d))
            xs = [torch.from_numpy(h).to(f"cuda:{d}") for h, d in zip(host, group.gpus)]
            spare = spare_addresses(group)
            got = getattr(group, op)(xs)
            used += any(t.data_ptr() in spare for t in got)
            consumed.append(([t * 2 for t in got], reference(op, host), it))
            if it % 3 == 0:
                held.append((got, reference(op, host), it))
            for x in xs:
                x.fill_(1e6)  # queued after the call: must not reach its result
        for s, d in zip(streams, group.gpus):
            torch.cuda.default_stream(d).wait_stream(s)
    group.synchronize()
    for d in group.gpus:
        torch.cuda.synchronize(d)
    for outs, want, it in held:
        for r, (t, w) in enumerate(zip(outs, want)):
            np.testing.assert_allclose(t.cpu().numpy(), w, rtol=1e-5, atol=1e-5, err_msg=f"call {it}, rank {r}")
    for outs, want, it in consumed:
        for r, (t, w) in enumerate(zip(outs, want)):
            np.testing.assert_allclose(t.cpu().numpy(), 2 * w, rtol=1e-5, atol=1e-5,
                                       err_msg=f"consumer of call {it}, rank {r}")
    assert used >= 40, f"only {used} of 60 calls ran on a spare"


class _streams:
    """torch.cuda.stream for several GPUs at once."""

    def __init__(self, streams):
        self._contexts = [torch.cuda.stream(s) for s in streams]

    def __enter__(self):
        for c in self._contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self._contexts):
            c.__exit__(*exc)


def run_refilled(xs, holder, call, outputs_of, seed: int, calls: int = 30):
    """``calls`` runs of ``call`` (no arguments), ``xs`` (one tensor per rank) refilled with new
    random numbers on the current stream before each: ([(outputs, numpy sum of the inputs, call
    index)], how many calls ran on a spare of ``holder`` (its group or runner))."""
    rng = np.random.default_rng(seed)
    results, used = [], 0
    for it in range(calls):
        host = [rng.standard_normal(tuple(x.shape)).astype(np.float32) for x in xs]
        for x, h in zip(xs, host):
            x.copy_(torch.from_numpy(h))
        spare = spare_addresses(holder)
        outs = outputs_of(call())
        used += any(t.data_ptr() in spare for t in outs)
        results.append((outs, np.sum(host, axis=0), it))
    return results, used


def check_sums(group, results, what: str) -> None:
    """After every GPU of ``group`` finished: each call's outputs (every rank's) equal its sum."""
    for d in group.gpus:
        torch.cuda.synchronize(d)
    for outs, want, it in results:
        for r, t in enumerate(outs):
            np.testing.assert_allclose(t.cpu().numpy(), want, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{what} call {it}, rank {r}")


def test_prepared_collective_without_out_gets_each_calls_own_result(group):
    """A prepared all_reduce refilled in place before each of 30 calls (on the current stream),
    every output held: each is its own call's sum; the calls from the third on run on spares."""
    n = len(group)
    xs = [torch.empty((128, 3), device=f"cuda:{d}") for d in group.gpus]
    call = group.prepare_collective("all_reduce", xs)
    results, used = run_refilled(xs, group, call, lambda got: got, seed=12)
    check_sums(group, results, "prepared all_reduce")
    assert len({t.data_ptr() for outs, _, _ in results for t in outs}) == 30 * n  # all held: all distinct
    assert used >= 27, f"only {used} of 30 calls ran on a spare"


@pytest.mark.parametrize("entry", ["infer", "prepare"])
def test_engine_runner_without_outputs_gets_each_calls_own_result(group, entry):
    """EngineRunner on the all_reduce program (torch inputs per rank, no outputs=): 30 calls,
    inputs refilled in place, every output held and checked against numpy."""
    n = len(group)
    program = _core.CollectiveProgram("all_reduce", "sum", 0, [], "float32", group.world_size, n)
    runner = mdtrt.EngineRunner(group, program=program)
    xs = [torch.empty((256, 5), device=f"cuda:{d}") for d in group.gpus]
    per_rank = [{"input": x} for x in xs]
    prepared = runner.prepare(per_rank, all_ranks=True) if entry == "prepare" else None
    results, used = run_refilled(
        xs, runner, prepared if prepared is not None else (lambda: runner.infer(per_rank, all_ranks=True)),
        lambda got: [rank["output"] for rank in got], seed=13)
    check_sums(group, results, entry)
    assert used >= 25, f"only {used} of 30 calls ran on a spare"


def test_two_threads_on_streams_of_their_own_get_each_calls_own_result(group):
    """Two threads call all_reduce of one signature (one kept call, one group's spares), each on
    streams of its own, 40 calls each on new random tensors, every output held: each is its own
    call's sum (numpy), and no output was returned twice."""
    n = len(group)
    results = {0: [], 1: []}
    start = threading.Barrier(2)
    group.all_reduce([torch.zeros((96, 5), device=f"cuda:{d}") for d in group.gpus])  # the signature's first call

    def calls(t):
        streams = [torch.cuda.Stream(device=d) for d in group.gpus]
        rng = np.random.default_rng(20 + t)
        with _streams(streams):
            start.wait(timeout=60)
            for it in range(40):
                host = [rng.standard_normal((96, 5)).astype(np.float32) for _ in range(n)]
                xs = [torch.from_numpy(h).to(f"cuda:{d}") for h, d in zip(host, group.gpus)]
                results[t].append((group.all_reduce(xs), np.sum(host, axis=0), it))

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(calls, t) for t in (0, 1)]:
            done.result(timeout=120)  # raises what the thread raised
    group.synchronize()
    for d in group.gpus:
        torch.cuda.synchronize(d)  # the outputs belong to the threads' streams
    for t, calls_made in results.items():
        assert len(calls_made) == 40
        for outs, want, it in calls_made:
            for r, out in enumerate(outs):
                np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-5, atol=1e-5,
                                           err_msg=f"thread {t}, call {it}, rank {r}")
    addresses = [out.data_ptr() for calls_made in results.values() for outs, _, _ in calls_made for out in outs]
    assert len(set(addresses)) == len(addresses) == 80 * n


def test_a_call_after_calls_in_inference_mode_gets_ordinary_tensors(group):
    """Calls in torch.inference_mode() return inference tensors, and the spare the last one kept
    is one too: the next call outside it must not return that spare, whose in-place update
    would raise. Its outputs are ordinary tensors, updated in place, right (numpy)."""
    n = len(group)
    rng = np.random.default_rng(14)
    host = [rng.standard_normal((48, 6)).astype(np.float32) for _ in range(n)]
    xs = [torch.from_numpy(h).to(f"cuda:{d}") for h, d in zip(host, group.gpus)]
    with torch.inference_mode():
        for _ in range(3):  # the general path, then the fast path (each keeping a spare)
            inside = group.all_gather(xs)
        assert all(t.is_inference() for t in inside)
    outs = group.all_gather(xs)
    assert not any(t.is_inference() for t in outs)
    for t in outs:
        t.add_(1)  # queued on the current stream, after the call
    for d in group.gpus:
        torch.cuda.synchronize(d)
    for r, t in enumerate(outs):
        np.testing.assert_allclose(t.cpu().numpy(), np.concatenate(host) + 1, rtol=1e-5, atol=1e-5,
                                   err_msg=f"rank {r}")


def test_a_dropped_prepared_call_gives_its_memory_back_at_once(group):
    """A prepared all_reduce without out= keeps a spare after each call; once the call, its
    outputs and inputs are dropped, torch's allocated memory on every GPU is what it was before
    (no garbage collection asked for): the spare held neither the call nor its inputs."""
    n = len(group)
    for d in group.gpus:
        torch.cuda.synchronize(d)
    before = [torch.cuda.memory_allocated(d) for d in group.gpus]
    rng = np.random.default_rng(15)
    host = [rng.standard_normal((1024, 64)).astype(np.float32) for _ in range(n)]
    xs = [torch.from_numpy(h).to(f"cuda:{d}") for h, d in zip(host, group.gpus)]
    call = group.prepare_collective("all_reduce", xs)
    outs = [call() for _ in range(3)]
    for d in group.gpus:
        torch.cuda.synchronize(d)
    for k, got in enumerate(outs):
        for r, t in enumerate(got):
            np.testing.assert_allclose(t.cpu().numpy(), np.sum(host, axis=0), rtol=1e-5, atol=1e-5,
                                       err_msg=f"call {k}, rank {r}")
    holding = [torch.cuda.memory_allocated(d) for d in group.gpus]
    assert all(h >= b + 5 * 1024 * 64 * 4 for h, b in zip(holding, before))  # inputs, 3 outputs, the spare
    del call, outs, xs, got, t
    assert [torch.cuda.memory_allocated(d) for d in group.gpus] == before


def test_free_spare_outputs_gives_the_spares_memory_back_and_calls_go_on(group):
    """README: the memory of the spares (torch.cuda.memory_allocated counts it) comes back with
    group.free_spare_outputs(), the group's and its runners'; the next calls still get each
    call's own result, and keep a spare again."""
    n = len(group)
    rng = np.random.default_rng(16)
    host = [rng.standard_normal((1024, 64)).astype(np.float32) for _ in range(n)]
    xs = [torch.from_numpy(h).to(f"cuda:{d}") for h, d in zip(host, group.gpus)]
    program = _core.CollectiveProgram("all_reduce", "sum", 0, [], "float32", group.world_size, n)
    runner = mdtrt.EngineRunner(group, program=program)
    for _ in range(3):
        group.all_reduce(xs)
        runner.infer([{"input": x} for x in xs], all_ranks=True)
    for d in group.gpus:
        torch.cuda.synchronize(d)
    assert spare_addresses(group) and spare_addresses(runner)
    holding = [torch.cuda.memory_allocated(d) for d in group.gpus]
    group.free_spare_outputs()
    assert not spare_addresses(group) and not spare_addresses(runner)
    freed = [h - torch.cuda.memory_allocated(d) for h, d in zip(holding, group.gpus)]
    assert all(f >= 2 * 1024 * 64 * 4 for f in freed), freed  # the group's spare and the runner's, per GPU
    got = group.all_reduce(xs)
    group.synchronize()
    for r, t in enumerate(got):
        np.testing.assert_allclose(t.cpu().numpy(), np.sum(host, axis=0), rtol=1e-5, atol=1e-5, err_msg=f"rank {r}")
    assert spare_addresses(group)


def test_ctrl_c_while_a_spare_is_made_cancels_the_call_and_the_group_goes_on(group, monkeypatch):
    """KeyboardInterrupt escaping the native run's while_ranks_run (Ctrl-C while the next call's
    outputs are allocated): no rank launches (the call's outputs, poisoned, stay so), the interrupt
    is raised once the ranks returned, the group is not broken, and the next calls give right
    results and keep spares again."""
    import sys

    from mdtrt import prepared_call

    real = prepared_call.SpareOutputs.keep_new
    armed, raised_in = [], []

    def keep_new(self, *args):
        if armed:
            del armed[:]
            raised_in.append(sys._getframe(1).f_code.co_name)  # _TorchRun's callback is a lambda
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(prepared_call.SpareOutputs, "keep_new", keep_new)
    n = len(group)
    xs = [torch.full((96,), float(r + 1), device=f"cuda:{d}") for r, d in enumerate(group.gpus)]
    total = torch.full((96,), float(n * (n + 1) // 2))
    group.free_spare_outputs()
    for _ in range(2):
        group.all_reduce(xs)  # the general path, then the addressed run, which keeps a spare
    (spare, _), = group._spare_outputs._kept.values()  # the interrupted call's outputs
    poisoned = spare[0]
    for t in poisoned:
        t.fill_(float("nan"))
    armed.append(True)
    with pytest.raises(KeyboardInterrupt):
        group.all_reduce(xs)
    assert raised_in == ["<lambda>"]  # from inside the native call, not after it
    group.synchronize()  # raises nothing: the group is not broken
    assert all(bool(torch.isnan(t).all()) for t in poisoned)  # no rank launched
    for _ in range(2):
        got = group.all_reduce(xs)
        for r in range(n):
            assert torch.equal(got[r].cpu(), total), r
    assert spare_addresses(group)


def test_close_from_inside_a_call_is_refused_and_leaves_the_group_as_it_was(monkeypatch):
    """close() from inside a call of the same group (a finalizer that garbage collection runs while
    the call allocates its next outputs, on the thread that holds the group's locks) raises
    InvalidArgumentError instead of waiting for itself, and leaves the group open on both sides:
    later calls give right results, and close() after them closes it."""
    from mdtrt import prepared_call

    real = prepared_call.SpareOutputs.keep_new
    armed, refused = [], []
    gpus = list(range(_core.visible_gpu_count()))
    g = mdtrt.DeviceGroup(gpus, timeout=60)

    def keep_new(self, *args):
        if armed:
            del armed[:]
            try:
                g.close()
            except mdtrt.InvalidArgumentError as error:
                refused.append(str(error))
        return real(self, *args)

    monkeypatch.setattr(prepared_call.SpareOutputs, "keep_new", keep_new)
    xs = [torch.full((64,), float(r + 1), device=f"cuda:{d}") for r, d in enumerate(gpus)]
    total = torch.full((64,), float(len(gpus) * (len(gpus) + 1) // 2))
    for _ in range(2):
        g.all_reduce(xs)  # the general path, then the addressed run
    armed.append(True)
    g.all_reduce(xs)  # its spare's allocation closes the group, from inside the call
    assert len(refused) == 1 and "from inside a call of this device group" in refused[0], refused
    for _ in range(2):
        got = g.all_reduce(xs)
    g.synchronize()
    for r in range(len(gpus)):
        assert torch.equal(got[r].cpu(), total), r
    g.close()
    with pytest.raises(mdtrt.InvalidArgumentError, match="closed"):
        g.all_reduce(xs)


def test_calls_refused_after_close_hold_none_of_their_arrays():
    """A group's prepared call and a runner's prepared call run after close() are refused by the
    native run ("closed") before any rank runs, so their arrays are not held for unfinished work
    (which would keep every such call's tensors for the life of the process). (A runner's infer
    after close() is refused in Python before it reaches the native run: it holds nothing either
    way, and proves nothing here.)"""
    from mdtrt import prepared_call

    gpus = list(range(_core.visible_gpu_count()))
    g = mdtrt.DeviceGroup(gpus, timeout=60)
    xs = [torch.ones(256, device=f"cuda:{d}") for d in gpus]
    call = g.prepare_collective("all_reduce", xs)
    program = _core.CollectiveProgram("all_reduce", "sum", 0, [], "float32", g.world_size, len(gpus))
    runner = mdtrt.EngineRunner(g, program=program)
    runner_call = runner.prepare([{"input": x} for x in xs], all_ranks=True)
    for _ in range(2):
        call()
        runner_call()
    g.synchronize()
    held = len(prepared_call._HELD_FOR_UNFINISHED_WORK)
    g.close()
    for refused in (call, runner_call):
        with pytest.raises(mdtrt.MdtrtError, match="this device group can no longer be used: the DeviceGroup was closed"):
            refused()
    assert len(prepared_call._HELD_FOR_UNFINISHED_WORK) == held


def test_an_addressed_run_run_again_from_inside_its_own_callback_is_refused(group):
    """A finalizer that garbage collection runs inside a call's while_ranks_run may run that very
    call again, on the thread that holds its lock: refused with InvalidArgumentError (before the
    lock is tried: try_lock by its owner is undefined), which cancels the outer run (no rank
    launched: its poisoned outputs stay so); the call runs right afterwards."""
    n = len(group)
    xs = [torch.full((37,), float(r + 1), device=f"cuda:{d}") for r, d in enumerate(group.gpus)]
    before = set(group._torch_calls)
    group.all_reduce(xs)  # a size no other test of this module uses: its first call keeps a call
    [run] = [run for key, run in group._torch_calls.items() if key not in before]
    addressed = run.kept.call.addressed(["output"], [37 * 4] * n, list(group.gpus), False)
    outs = [torch.full((37,), float("nan"), device=f"cuda:{d}") for d in group.gpus]
    pointers = [x.data_ptr() for x in xs] + [o.data_ptr() for o in outs]
    streams = [1] * (2 * n)
    with pytest.raises(mdtrt.InvalidArgumentError, match="from inside a call of this device group"):
        addressed(pointers, streams, lambda: addressed(pointers, streams))
    assert all(bool(torch.isnan(o).all()) for o in outs)
    addressed(pointers, streams)
    total = torch.full((37,), float(n * (n + 1) // 2))
    for r, o in enumerate(outs):
        assert torch.equal(o.cpu(), total), r


SPARES_MISSING_TORCHS_CACHE = """
import torch, mdtrt
group = mdtrt.DeviceGroup(gpus=[0, 1], timeout=60)
for it in range(200):
    n = 256 * 1024 * (1 + it % 41)  # a size torch's cache does not hold: the spare's block is a cudaMalloc
    xs = [torch.full((n,), float(r + 1), device=f"cuda:{r}") for r in range(2)]
    for _ in range(3):
        ys = group.all_reduce(xs)
    assert ys[0][-1].item() == 3.0 and ys[1][0].item() == 3.0, it
    del ys
    group.free_spare_outputs()
    torch.cuda.empty_cache()
group.close()
print("ok")
"""


@pytest.mark.multi_gpu
def test_spares_that_torch_allocates_with_cudamalloc_while_ranks_launch_never_hang():
    """The spare is allocated (while_ranks_run) while the rank threads launch the call's NCCL
    kernels on both GPUs: a cudaMalloc there (torch's cache emptied before each signature) must not
    stall a launch that the other GPU's kernel waits for (NCCL's known hang with allocations in
    another thread). In a subprocess: a hang fails at the timeout instead of hanging the suite."""
    if _core.visible_gpu_count() < 2:
        pytest.skip("needs 2 GPUs")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SPARES_MISSING_TORCHS_CACHE], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]
