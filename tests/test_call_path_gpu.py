"""The per-call path on real GPUs: every rank checks its arguments and allocates before any rank
enqueues (one bad rank fails the call at once and the group keeps working), outputs from pools or
torch's caching allocator that stay valid as long as they are held, misaligned arrays staged for
programs that need aligned addresses, bfloat16 through every entry point."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

import mdtrt
from mdtrt import _core
from mdtrt.reference import collective as reference

pytestmark = pytest.mark.multi_gpu

TIMEOUT = 30.0  # the group's deadline: a call failing "at once" must end well inside it


@pytest.fixture(scope="module")
def group():
    with mdtrt.DeviceGroup(list(range(_core.visible_gpu_count())), timeout=TIMEOUT) as g:
        yield g


_SEEDS = itertools.count(99)


def check_group_still_works(group):
    # New data on every use and poisoned outputs: the kept call's buffers still hold the previous
    # use's result, which the same data would reproduce even if this call wrote nothing.
    n = len(group)
    rng = np.random.default_rng(next(_SEEDS))
    xs = [rng.standard_normal((n * 3, 5)).astype(np.float32) for _ in range(n)]
    outs = group.all_reduce(xs, poison_outputs=True)
    for out, exp in zip(outs, reference("all_reduce", xs), strict=True):
        np.testing.assert_allclose(out, exp, rtol=1e-5, atol=1e-5)


class CaiOnly:
    """A device array that is not torch (like CuPy's): its outputs come from mdtrt's pools."""

    def __init__(self, t):
        self.t = t
        self.__cuda_array_interface__ = t.__cuda_array_interface__


# -- validate before enqueue ----------------------------------------------------------------------

def test_wrong_size_output_on_one_rank_fails_at_once(group):
    """Only the last rank's out= buffer is too small: before, the other ranks had already enqueued
    their all_reduce and waited for it until the deadline, which broke the group."""
    torch = pytest.importorskip("torch")
    n = len(group)
    xs = [torch.randn(n * 64, device=f"cuda:{d}") for d in group.gpus]
    outs = [torch.empty(n * 64, device=f"cuda:{d}") for d in group.gpus[:-1]]
    outs.append(torch.empty(n * 64 - 1, device=f"cuda:{group.gpus[-1]}"))
    start = time.monotonic()
    with pytest.raises(mdtrt.InvalidArgumentError, match="bytes") as info:
        group.all_reduce(xs, out=outs)
    assert time.monotonic() - start < TIMEOUT / 6
    assert info.value.rank == group.ranks[-1]
    assert not group._native.broken
    good = [torch.full((n * 64,), float("nan"), device=f"cuda:{d}") for d in group.gpus]
    group.all_reduce(xs, out=good)
    expected = sum(x.cpu() for x in xs)
    for o in good:
        torch.testing.assert_close(o.cpu(), expected)
    check_group_still_works(group)


def test_bad_per_rank_input_on_one_rank_fails_at_once(group):
    """A per-rank input only one rank's program refuses (reduce_scatter of a first dimension that
    does not split), through EngineRunner with one input dict per rank."""
    n = len(group)
    program = _core.CollectiveProgram("reduce_scatter", "sum", 0, [], "float32", group.world_size, n)
    runner = mdtrt.EngineRunner(group, program=program)
    inputs = [{"input": np.ones(n * 4, np.float32)} for _ in range(n - 1)] + [{"input": np.ones(n * 4 + 1, np.float32)}]
    start = time.monotonic()
    with pytest.raises(mdtrt.InvalidArgumentError, match="multiple of") as info:
        runner.infer(inputs, all_ranks=True)
    assert time.monotonic() - start < TIMEOUT / 6
    assert info.value.rank == group.ranks[-1]
    rng = np.random.default_rng(4)
    good = [{"input": rng.standard_normal(n * 4).astype(np.float32)} for _ in range(n)]
    outs = runner.infer(good, all_ranks=True, poison_outputs=True)
    expected = reference("reduce_scatter", [d["input"] for d in good])
    for out, exp in zip(outs, expected, strict=True):
        np.testing.assert_allclose(out["output"], exp, rtol=1e-5, atol=1e-5)
    check_group_still_works(group)


def test_wrong_output_on_the_first_rank_only(group):
    torch = pytest.importorskip("torch")
    runner = mdtrt.EngineRunner(group, program=_core.testing.CopyProgram("float32"))
    x = [torch.randn(100, device=f"cuda:{d}") for d in group.gpus]
    outs = [torch.empty(100, device=f"cuda:{d}") for d in group.gpus]
    outs[0] = torch.empty(100, device=f"cuda:{group.gpus[1]}")  # on the wrong GPU
    with pytest.raises(mdtrt.InvalidArgumentError, match=f"on GPU {group.gpus[1]}") as info:
        runner.infer([{"input": t} for t in x], outputs={"output": outs})
    assert info.value.rank == group.ranks[0]
    check_group_still_works(group)


# -- outputs: pooled, or from torch's caching allocator ---------------------------------------------

def test_held_outputs_stay_valid_across_later_calls(group):
    """Device outputs without out= (pooled for non-torch arrays): every output of a series of calls
    is still intact while held, and dropping them does not disturb the ones still held."""
    torch = pytest.importorskip("torch")
    n = len(group)

    rng = np.random.default_rng(8)
    held, expected = [], []
    for step in range(12):
        host = [rng.standard_normal((n * 256, 33)).astype(np.float32) for _ in range(n)]
        xs = [CaiOnly(torch.from_numpy(h).to(f"cuda:{d}")) for h, d in zip(host, group.gpus, strict=True)]
        outs = group.all_gather(xs, poison_outputs=True)
        assert len(outs) == n and all(isinstance(o, mdtrt.DeviceArray) for o in outs)
        if step % 3 == 0:
            held.append(outs)
            expected.append(reference("all_gather", host))
        del outs  # the others go back to the pool
    for outs, exp in zip(held, expected, strict=True):
        for o, e in zip(outs, exp, strict=True):
            np.testing.assert_array_equal(o.numpy(), e)


def test_dropped_outputs_return_to_the_pool(group):
    torch = pytest.importorskip("torch")
    n = len(group)
    runner = mdtrt.EngineRunner(group, program=_core.testing.CopyProgram("uint8"))
    nbytes = 64 << 20
    x = {"input": np.ones(nbytes, np.uint8)}
    runner.infer(x, all_ranks=True)  # numpy out: the runner's own buffers
    xs = [{"input": CaiOnly(torch.ones(nbytes, dtype=torch.uint8, device=f"cuda:{d}"))} for d in group.gpus]
    runner.infer(xs, all_ranks=True)
    torch.cuda.synchronize(group.gpus[0])
    free_before = torch.cuda.mem_get_info(group.gpus[0])[0]
    for _ in range(80):  # 5 GiB per GPU if nothing came back
        outs = runner.infer(xs, all_ranks=True)
        assert len(outs) == n and isinstance(outs[0]["output"], mdtrt.DeviceArray)
        assert outs[0]["output"].device == group.gpus[0]
        del outs
    torch.cuda.synchronize(group.gpus[0])
    free_after = torch.cuda.mem_get_info(group.gpus[0])[0]
    # The pool may keep up to its release threshold (1 GiB) of freed memory for the next calls.
    assert free_before - free_after < (1 << 30) + 4 * nbytes, (free_before, free_after)


def test_a_dropped_output_still_read_on_the_default_stream_is_not_reused(group):
    """A pooled output dropped while work queued on torch's default stream still reads it: its
    memory returns to the pool in that stream's order, so the next call cannot overwrite it."""
    torch = pytest.importorskip("torch")
    runner = mdtrt.EngineRunner(group, program=_core.testing.CopyProgram("float32"))
    dev = group.gpus[0]
    x = torch.arange(1 << 20, dtype=torch.float32, device=f"cuda:{dev}")
    y = torch.full((1 << 20,), -1.0, device=f"cuda:{dev}")
    torch.cuda.synchronize(dev)
    unordered = CaiOnly(y)  # ready now, and says so: no stream to order with
    unordered.__cuda_array_interface__ = {k: v for k, v in y.__cuda_array_interface__.items() if k != "stream"}
    first = runner.infer({"input": CaiOnly(x)})["output"]  # rank 0's pooled output
    with torch.cuda.device(dev):
        view = torch.as_tensor(first, device=f"cuda:{dev}")
        torch.cuda._sleep(200_000_000)  # the default stream stays busy for a while
        copy = view.clone()  # reads the output after the sleep
    del view, first  # the last references: the memory goes back to the pool, in stream order
    for _ in range(3):  # while the clone still waits: these must not get (and overwrite) that memory
        runner.infer({"input": unordered})
    torch.cuda.synchronize(dev)
    assert torch.equal(copy.cpu(), x.cpu())


def test_torch_in_torch_out_from_the_caching_allocator(group):
    """Collectives on torch tensors without out=: outputs are torch tensors of torch's caching
    allocator (they count in torch.cuda.memory_allocated), fresh per call, ordered after the
    stream that allocated them."""
    torch = pytest.importorskip("torch")
    n = len(group)
    xs = [torch.randn(n * 1024, 16, device=f"cuda:{d}") for d in group.gpus]
    expected = sum(x.cpu() for x in xs)
    dev = group.gpus[0]
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    first = group.all_reduce(xs)
    assert torch.cuda.memory_allocated(dev) - before >= xs[0].numel() * 4
    call = group.prepare_collective("all_reduce", xs)
    a, b = call(), call()
    for outs in (first, a, b):
        for o, d in zip(outs, group.gpus, strict=True):
            assert isinstance(o, torch.Tensor) and o.device == torch.device(f"cuda:{d}") and o.dtype == torch.float32
            torch.testing.assert_close(o.cpu(), expected)
    assert a[0].data_ptr() != b[0].data_ptr()  # a fresh output per call: the first one is still held
    gathered = group.all_gather(xs)
    assert len(gathered) == n
    for o in gathered:
        assert tuple(o.shape) == (n * n * 1024, 16)
        assert torch.equal(o.cpu(), torch.cat([x.cpu() for x in xs]))


def test_engine_outputs_for_torch_inputs_come_from_torch_after_the_first_call(group):
    """EngineRunner with torch inputs and no outputs=: the first call for some input shapes hands
    back pooled outputs (as torch tensors), later ones allocate from torch's caching allocator
    with the shapes learnt; new input shapes are learnt anew."""
    torch = pytest.importorskip("torch")
    runner = mdtrt.EngineRunner(group, program=_core.testing.CopyProgram("float32"))
    dev = group.gpus[0]
    for length in (4096, 1000):
        xs = [torch.randn(length, device=f"cuda:{d}") for d in group.gpus]
        first = runner.infer([{"input": x} for x in xs], all_ranks=True)
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        second = runner.infer([{"input": x} for x in xs], all_ranks=True)
        assert torch.cuda.memory_allocated(dev) - before >= length * 4  # held by torch's allocator
        call = runner.prepare([{"input": x} for x in xs], all_ranks=True)
        third, fourth = call(), call()
        assert third[0]["output"].data_ptr() != fourth[0]["output"].data_ptr()
        for outs in (first, second, third, fourth):
            for o, x, d in zip(outs, xs, group.gpus, strict=True):
                t = o["output"]
                assert isinstance(t, torch.Tensor) and t.device == torch.device(f"cuda:{d}") and t.shape == x.shape
                assert torch.equal(t.cpu(), x.cpu())
        del first, second, third, fourth, call  # freed here, not inside the next length's measurement


# -- alignment ------------------------------------------------------------------------------------

def test_misaligned_views_are_staged_for_programs_that_need_alignment(group):
    """Sliced float16 views (2 bytes past a 256-byte boundary) as inputs and as outputs= of a
    program that refuses misaligned addresses, as TensorRT's setTensorAddress does."""
    torch = pytest.importorskip("torch")
    runner = mdtrt.EngineRunner(group, program=_core.testing.AlignedCopyProgram("float16"))
    rng = np.random.default_rng(12)
    host = [rng.standard_normal(1001).astype(np.float16) for _ in group.gpus]
    bases = [torch.from_numpy(h).to(f"cuda:{d}") for h, d in zip(host, group.gpus, strict=True)]
    views = [b[1:] for b in bases]
    assert all(v.data_ptr() % 256 != 0 for v in views)
    out_bases = [torch.zeros(1001, dtype=torch.float16, device=f"cuda:{d}") for d in group.gpus]
    out_views = [b[1:] for b in out_bases]
    result = runner.infer([{"input": v} for v in views], outputs={"output": out_views}, all_ranks=True,
                          poison_outputs=True)
    for r, ov, ob, h in zip(result, out_views, out_bases, host, strict=True):
        assert r["output"] is ov
        np.testing.assert_array_equal(ov.cpu().numpy(), h[1:])
        assert ob[0].item() == 0  # the element before the view is untouched
    # Misaligned inputs, outputs from the runner; and a misaligned view on another GPU.
    result = runner.infer([{"input": v} for v in views], all_ranks=True)
    for r, h in zip(result, host, strict=True):
        np.testing.assert_array_equal(r["output"].cpu().numpy(), h[1:])
    result = runner.infer({"input": views[0]}, all_ranks=True)
    assert len(result) == len(group)
    for r in result:
        np.testing.assert_array_equal(r["output"].cpu().numpy(), host[0][1:])
    # Prepared, so that the staging happens on every call of the same buffers.
    call = runner.prepare([{"input": v} for v in views], outputs={"output": out_views}, all_ranks=True)
    for _ in range(3):
        for v, ov in zip(views, out_views, strict=True):
            v.add_(1)
            ov.fill_(float("nan"))
        call()
        for ov, v in zip(out_views, views, strict=True):
            assert torch.equal(ov.cpu(), v.cpu())


def test_native_collectives_take_misaligned_views_in_place(group):
    torch = pytest.importorskip("torch")
    n = len(group)
    bases = [torch.randn(n * 8 + 1, device=f"cuda:{d}", dtype=torch.float16) for d in group.gpus]
    views = [b[1:] for b in bases]
    out_bases = [torch.zeros(n * 8 + 1, device=f"cuda:{d}", dtype=torch.float16) for d in group.gpus]
    outs = [b[1:] for b in out_bases]
    group.all_reduce(views, out=outs)
    expected = reference("all_reduce", [v.cpu().numpy() for v in views])
    tol = 2e-3 * (n - 1)  # NCCL sums in float16: one rounding per rank after the first
    for o, e in zip(outs, expected, strict=True):
        np.testing.assert_allclose(o.cpu().numpy().astype(np.float32), e.astype(np.float32), rtol=tol, atol=tol)


# -- bfloat16 through every entry point --------------------------------------------------------------

def test_bfloat16_torch_cpu_tensors(group):
    torch = pytest.importorskip("torch")
    n = len(group)
    xs = [torch.randn(n * 4, 3).to(torch.bfloat16) for _ in range(n)]
    outs = group.all_gather(xs)
    assert len(outs) == n
    for o in outs:
        assert isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16 and o.device.type == "cpu"
        assert torch.equal(o, torch.cat(xs))
    runner = mdtrt.EngineRunner(group, program=_core.testing.CopyProgram("bfloat16"))
    out = runner.infer({"input": xs[0]})
    assert out["output"].dtype == torch.bfloat16 and torch.equal(out["output"], xs[0])


def test_bfloat16_ml_dtypes_arrays(group):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    n = len(group)
    rng = np.random.default_rng(21)
    xs = [rng.standard_normal((n * 2, 5)).astype(ml_dtypes.bfloat16) for _ in range(n)]
    outs = group.all_to_all(xs)
    for o, e in zip(outs, reference("all_to_all", xs), strict=True):
        assert o.dtype == np.dtype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(o.view(np.uint16), e.view(np.uint16))
    runner = mdtrt.EngineRunner(group, program=_core.testing.CopyProgram("bfloat16"))
    out = runner.infer({"input": xs[0]}, all_ranks=True)
    assert len(out) == n
    for r in out:
        np.testing.assert_array_equal(r["output"].view(np.uint16), xs[0].view(np.uint16))


def test_bfloat16_device_tensors_round_trip(group):
    torch = pytest.importorskip("torch")
    n = len(group)
    xs = [torch.randn(n * 4, 7, device=f"cuda:{d}").to(torch.bfloat16) for d in group.gpus]
    for outs in (group.broadcast(xs, root=group.ranks[-1]), group.prepare_collective("broadcast", xs,
                                                                                      root=group.ranks[-1])()):
        for o, d in zip(outs, group.gpus, strict=True):
            assert o.dtype == torch.bfloat16 and o.device == torch.device(f"cuda:{d}")
            assert torch.equal(o.cpu(), xs[-1].cpu())
    runner = mdtrt.EngineRunner(group, program=_core.testing.CopyProgram("bfloat16"))
    result = runner.infer([{"input": x} for x in xs], all_ranks=True)
    for r, x in zip(result, xs, strict=True):
        assert r["output"].dtype == torch.bfloat16 and torch.equal(r["output"].cpu(), x.cpu())


# -- one prepared call per argument signature ------------------------------------------------------

@pytest.mark.parametrize("kind", ["torch", "cai", "numpy"])
@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "gather"])
def test_one_shot_calls_on_new_arrays_each_time(group, op, kind):
    """A loop of one-shot calls on new random arrays each time (new addresses, same signature): the
    call kept for the signature must run on this call's arrays, never on the first call's."""
    torch = pytest.importorskip("torch")
    n = len(group)
    rng = np.random.default_rng(7)
    before = len(group._calls)
    for step in range(4):
        xs = [rng.standard_normal((n * 4, 3)).astype(np.float32) for _ in range(n)]
        if kind == "numpy":
            args = xs
        else:
            ts = [torch.from_numpy(x).to(f"cuda:{d}") for x, d in zip(xs, group.gpus, strict=True)]
            args = ts if kind == "torch" else [CaiOnly(t) for t in ts]
        outs = group.collective(op, args, poison_outputs=True)
        for r, (got, exp) in enumerate(zip(outs, reference(op, xs), strict=True)):
            if exp is None:
                assert got is None
                continue
            got = got.cpu().numpy() if kind == "torch" else got.numpy() if kind == "cai" else got
            np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5, err_msg=f"{op} step {step} rank {r}")
    assert len(group._calls) == before + 1  # one signature: one kept call


def test_kept_calls_do_not_keep_inputs_alive(group):
    import gc
    import weakref

    torch = pytest.importorskip("torch")
    ts = [torch.randn(64, device=f"cuda:{d}") for d in group.gpus]
    outs = [torch.empty_like(t) for t in ts]
    alive = [weakref.ref(t) for t in ts + outs]
    group.all_reduce(ts)
    group.all_reduce(ts, out=outs)
    del ts, outs
    gc.collect()
    assert all(ref() is None for ref in alive)  # neither the inputs nor the out= buffers


def test_one_shot_out_calls_write_this_calls_buffers(group):
    torch = pytest.importorskip("torch")
    n = len(group)
    for step in range(3):
        xs = [torch.randn(n * 8, device=f"cuda:{d}") for d in group.gpus]
        outs = [torch.full((n * 8,), float("nan"), device=f"cuda:{d}") for d in group.gpus]
        got = group.all_reduce(xs, out=outs)
        expected = sum(x.cpu() for x in xs)
        for g, o in zip(got, outs, strict=True):
            assert g is o
            torch.testing.assert_close(o.cpu(), expected)


def test_infer_on_new_arrays_each_time(group):
    """EngineRunner.infer keeps one prepared call per signature: shared host inputs (replicated),
    per-rank device inputs and shape changes each get their own, and every call runs on its own arrays."""
    torch = pytest.importorskip("torch")
    n = len(group)
    program = _core.CollectiveProgram("all_reduce", "sum", 0, [], "float32", group.world_size, n)
    runner = mdtrt.EngineRunner(group, program=program)
    rng = np.random.default_rng(3)
    for step in range(3):
        for rows in (n * 2, n * 5):
            x = rng.standard_normal((rows, 4)).astype(np.float32)
            out = runner.infer({"input": x}, all_ranks=True, poison_outputs=True)
            assert len(out) == n
            for o in out:
                np.testing.assert_allclose(o["output"], n * x, rtol=1e-5, atol=1e-5)
            xs = [rng.standard_normal((rows, 4)).astype(np.float32) for _ in range(n)]
            ts = [{"input": torch.from_numpy(v).to(f"cuda:{d}")} for v, d in zip(xs, group.gpus, strict=True)]
            out = runner.infer(ts, all_ranks=True, poison_outputs=True)
            assert len(out) == n
            for o in out:
                np.testing.assert_allclose(o["output"].cpu().numpy(), sum(xs), rtol=1e-5, atol=1e-5)
    assert len(runner._calls) == 4
