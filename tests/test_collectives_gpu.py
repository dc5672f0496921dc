"""Native DistCollective ops on real GPUs against the numpy reference (mdtrt.reference).

Random data, outputs poisoned before every run, non-reducing ops bit-exact.
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest

import mdtrt
from mdtrt import _core
from mdtrt.reference import collective as reference

pytestmark = pytest.mark.multi_gpu

DTYPES = ["float32", "float16", "bfloat16", "int32", "int8", "uint8"]
NON_REDUCING = ["all_gather", "broadcast", "all_to_all", "gather", "scatter"]
REDUCING = ["all_reduce", "reduce", "reduce_scatter"]
REDUCE_OPS = ["sum", "prod", "max", "min", "avg"]


def gpu_count() -> int:
    return _core.visible_gpu_count()


# Groups by name, resolved for the machine's GPU count: every rank in order, every rank reversed
# (root remapping), a one-rank group, and two real subgroups on 4 or more GPUs.
GROUPS = ["all", "reversed", "single", "0-2", "3-1"]


def resolve_groups(name: str, n: int):
    if name == "all":
        return None
    if name == "reversed":
        return list(reversed(range(n)))
    if name == "single":
        return [0]
    ranks = [int(r) for r in name.split("-")]
    if max(ranks) >= n:
        pytest.skip(f"group {ranks} needs {max(ranks) + 1} GPUs")
    return ranks


@pytest.fixture(scope="module")
def group():
    with mdtrt.DeviceGroup(list(range(gpu_count())), timeout=60) as g:
        yield g


def numpy_dtype(name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def random_inputs(rng, n, shape, dtype, reduce):
    dt = numpy_dtype(dtype)
    # avg of integers: NCCL divides the sum it accumulated in the dtype itself (wrapping), the
    # reference the exact sum, so the n ranks' sum must stay inside int8/uint8 (sum, prod, max and
    # min wrap alike in both and need no bound).
    def bound(limit, most):
        return min(most, limit // n) if reduce == "avg" else most

    out = []
    for _ in range(n):
        if dtype in ("int32", "int8"):
            lo, hi = (1, 3) if reduce == "prod" else (-bound(127, 20), bound(127, 20))
            x = rng.integers(lo, hi + 1, size=shape).astype(dt)
        elif dtype == "uint8":
            lo, hi = (1, 3) if reduce == "prod" else (0, bound(255, 40))
            x = rng.integers(lo, hi + 1, size=shape).astype(dt)
        else:
            x = (rng.uniform(0.5, 1.5, size=shape) if reduce == "prod" else rng.standard_normal(shape)).astype(dt)
        out.append(x)
    return out


def assert_matches(ours, expected, dtype, exact, reduce="none", members=2):
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    if exact:
        np.testing.assert_array_equal(ours.view(np.uint8), expected.view(np.uint8))
    elif dtype in ("int32", "int8", "uint8"):
        # Integer sum, prod, max and min are exact (wrapping as the reference does); only avg's
        # division may round differently, by one.
        np.testing.assert_allclose(ours.astype(np.int64), expected.astype(np.int64), atol=1 if reduce == "avg" else 0)
    else:
        # NCCL reduces in the dtype itself: one rounding per member after the first (two members:
        # one, as the reference's cast of its float64 result), so the tolerance grows with the group.
        tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[dtype] * max(1, members - 1)
        np.testing.assert_allclose(ours.astype(np.float64), expected.astype(np.float64), rtol=tol, atol=tol)


def check(group, op, dtype, groups, reduce="none", root=None, seed=0):
    n = len(group)
    g = len(groups) if groups else n
    rng = np.random.default_rng(seed)
    inputs = random_inputs(rng, n, (g * 4, 6), dtype, reduce)
    if root is None:
        root = groups[-1] if groups else n - 1  # not rank 0, so the root remapping matters
    kwargs = {"groups": groups}
    if op in REDUCING:
        kwargs["reduce"] = reduce
    if op in ("broadcast", "reduce", "gather", "scatter"):
        kwargs["root"] = root
    ours = group.collective(op, inputs, poison_outputs=True, **kwargs)
    expected = reference(op, inputs, **kwargs)
    assert len(ours) == n
    for rank, (a, b) in enumerate(zip(ours, expected, strict=True)):
        if b is None:
            assert a is None, f"rank {rank} should have no output"
            continue
        assert a is not None, f"rank {rank} has no output"
        assert_matches(a, b, dtype, exact=op not in REDUCING, reduce=reduce, members=g)


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", NON_REDUCING)
def test_non_reducing(group, op, dtype, groups):
    check(group, op, dtype, resolve_groups(groups, len(group)))


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("reduce", REDUCE_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", REDUCING)
def test_reducing(group, op, dtype, reduce, groups):
    check(group, op, dtype, resolve_groups(groups, len(group)), reduce=reduce)


@pytest.mark.parametrize("root", range(8))
@pytest.mark.parametrize("op", ["broadcast", "reduce", "gather", "scatter"])
def test_every_root(group, op, root):
    if root >= len(group):
        pytest.skip(f"root {root} needs {root + 1} GPUs")
    check(group, op, "float32", None, reduce="sum", root=root, seed=root + 7)


def test_nvidia_sample_cases(group):
    # NVIDIA's sampleDistCollective, 2 ranks: 3x4 input, transposed, collective along dim 0, back.
    if len(group) != 2:
        pytest.skip("the sample's cases are for exactly 2 ranks")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = a + 100
    out = group.all_to_all([np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)])
    np.testing.assert_array_equal(out[0].T.ravel(), [0, 1, 100, 101, 4, 5, 104, 105, 8, 9, 108, 109])
    np.testing.assert_array_equal(out[1].T.ravel(), [2, 3, 102, 103, 6, 7, 106, 107, 10, 11, 110, 111])


def test_torch_device_arrays_zero_copy_and_stream_ordered(group):
    torch = pytest.importorskip("torch")
    n = len(group)
    xs = []
    for i, dev in enumerate(group.gpus):
        x = torch.randn(n * 1024, 64, device=f"cuda:{dev}")
        x.mul_(3.0).add_(i)  # queued on the current stream; mdtrt must wait for it
        xs.append(x)
    expected = reference("all_gather", [x.cpu().numpy() for x in xs])
    outs = group.all_gather(xs, poison_outputs=True)
    for dev, out, exp in zip(group.gpus, outs, expected, strict=True):
        assert isinstance(out, torch.Tensor) and out.device == torch.device(f"cuda:{dev}")
        np.testing.assert_array_equal(out.cpu().numpy(), exp)
    bf = [torch.randn(n * 8, 4, device=f"cuda:{d}").to(torch.bfloat16) for d in group.gpus]
    outs = group.all_reduce(bf, reduce="max")
    exp = torch.stack([t.cpu().float() for t in bf]).amax(0)
    assert len(outs) == n
    for out in outs:
        assert out.dtype == torch.bfloat16
        assert torch.equal(out.cpu().float(), exp)


def test_cupy_style_cuda_array_interface(group):
    torch = pytest.importorskip("torch")

    class CaiOnly:  # an object that only speaks __cuda_array_interface__
        def __init__(self, t):
            self.t = t
            self.__cuda_array_interface__ = t.__cuda_array_interface__

    xs = [CaiOnly(torch.arange(len(group) * 6, dtype=torch.int32, device=f"cuda:{d}") * (i + 1))
          for i, d in enumerate(group.gpus)]
    outs = group.all_reduce(xs)
    expected = sum(np.arange(len(group) * 6, dtype=np.int32) * (i + 1) for i in range(len(group)))
    assert len(outs) == len(group)
    for out in outs:
        assert isinstance(out, mdtrt.DeviceArray)
        np.testing.assert_array_equal(out.numpy(), expected)


def test_bad_inputs_are_named(group):
    n = len(group)
    with pytest.raises(mdtrt.InvalidArgumentError, match="one input per local rank"):
        group.all_reduce([np.ones(4, np.float32)] * (n + 1))
    with pytest.raises(mdtrt.InvalidArgumentError, match="one shape and dtype"):
        group.all_reduce([np.ones(4, np.float32)] + [np.ones(5, np.float32)] * (n - 1))
    with pytest.raises(mdtrt.InvalidArgumentError, match="multiple of"):
        group.reduce_scatter([np.ones(n + 1, np.float32)] * n)
    with pytest.raises(mdtrt.InvalidArgumentError, match="root 7"):
        group.broadcast([np.ones(4, np.float32)] * n, root=7)
    with pytest.raises(mdtrt.InvalidArgumentError, match="reduce is 'mean'; it must be one of"):
        group.all_reduce([np.ones(4, np.float32)] * n, reduce="mean")
    with pytest.raises(mdtrt.InvalidArgumentError, match="not supported"):
        group.all_reduce([np.ones(4, np.complex64)] * n)


def test_communicators_expose_handles(group):
    comms = group.communicators
    assert [c.rank for c in comms] == list(range(len(group)))
    assert all(c.ptr != 0 for c in comms)
    assert len({c.ptr for c in comms}) == len(comms)
    capsule = comms[0].capsule()
    assert type(capsule).__name__ == "PyCapsule" and "ncclComm_t" in repr(capsule)


def test_dlpack_only_device_arrays(group):
    torch = pytest.importorskip("torch")

    class DLPackOnly:  # like a JAX array: no __cuda_array_interface__
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, stream=None):
            return self.t.__dlpack__(stream=stream)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    xs = [torch.randn(len(group) * 4, 3, device=f"cuda:{d}") for d in group.gpus]
    outs = group.all_gather([DLPackOnly(x) for x in xs], poison_outputs=True)
    expected = reference("all_gather", [x.cpu().numpy() for x in xs])
    for out, exp in zip(outs, expected, strict=True):
        assert isinstance(out, mdtrt.DeviceArray)
        np.testing.assert_array_equal(out.numpy(), exp)


@pytest.mark.parametrize("stream", ["default", "side"])
def test_device_inputs_wait_for_their_producer_streams(group, stream):
    """Each rank's input is still being written by a slow kernel on its GPU when mdtrt is called:
    the rank must read it after the work queued on the stream current for that GPU (torch's
    default stream is the legacy default stream, which non-blocking rank streams ignore unless told)."""
    torch = pytest.importorskip("torch")
    n = len(group)
    xs = [torch.zeros(n * 256, device=f"cuda:{d}") for d in group.gpus]
    outs = [torch.full((n * 256,), float("nan"), device=f"cuda:{d}") for d in group.gpus]
    for d in group.gpus:
        torch.cuda.synchronize(d)
    values = np.random.default_rng(11).standard_normal(n).astype(np.float32)
    streams = [torch.cuda.Stream(device=d) if stream == "side" else torch.cuda.default_stream(d) for d in group.gpus]
    with contextlib.ExitStack() as current:
        for s in streams:
            current.enter_context(torch.cuda.stream(s))
        for x, s, v in zip(xs, streams, values, strict=True):
            with torch.cuda.device(s.device):
                torch.cuda._sleep(100_000_000)  # tens of ms: the fill below is still pending at the call
                x.fill_(float(v))
        group.all_reduce(xs, out=outs)
        results = [o.cpu().numpy() for o in outs]  # on the same streams, after the call
    for r in results:
        np.testing.assert_allclose(r, np.full(n * 256, values.sum(), np.float32), rtol=1e-5)


def test_prepared_collective_reads_the_buffers_anew_each_call(group):
    torch = pytest.importorskip("torch")
    n = len(group)
    rng = np.random.default_rng(3)
    xs = [torch.empty(n * 8, 5, device=f"cuda:{d}") for d in group.gpus]
    outs = [torch.empty(n * 8, 5, device=f"cuda:{d}") for d in group.gpus]
    call = group.prepare_collective("all_reduce", xs, reduce="max", out=outs)
    for _ in range(3):
        host = [rng.standard_normal((n * 8, 5)).astype(np.float32) for _ in range(n)]
        for x, h in zip(xs, host, strict=True):
            x.copy_(torch.from_numpy(h))  # refilled in place, on the current stream
        for o in outs:
            o.fill_(float("nan"))
        results = call()
        assert all(r is o for r, o in zip(results, outs, strict=True))
        expected = reference("all_reduce", host, reduce="max")
        for o, e in zip(outs, expected, strict=True):
            np.testing.assert_array_equal(o.cpu().numpy(), e)


def test_prepared_collective_gives_none_off_the_root(group):
    torch = pytest.importorskip("torch")
    n = len(group)
    xs = [torch.randn(4, device=f"cuda:{d}") for d in group.gpus]
    results = group.prepare_collective("reduce", xs, root=n - 1)()
    assert [r is None for r in results] == [r != n - 1 for r in group.ranks]
    np.testing.assert_allclose(results[-1].cpu().numpy(), sum(x.cpu().numpy() for x in xs), rtol=1e-5)


@pytest.mark.parametrize("op", ["broadcast", "gather", "scatter", "all_to_all"])
def test_large_own_chunks(group, op):
    """Chunks of megabytes that a rank keeps for itself (the root's, all_to_all's own), which NCCL
    copies inside its kernel: every root, poisoned outputs, random data."""
    n = len(group)
    rng = np.random.default_rng(17)
    inputs = [rng.standard_normal((n * 1024, 512)).astype(np.float32) for _ in range(n)]  # 2 MiB per rank chunk
    roots = group.ranks if op != "all_to_all" else [0]
    for root in roots:
        outs = group.collective(op, inputs, root=root, poison_outputs=True)
        expected = reference(op, inputs, root=root)
        for rank, out, exp in zip(group.ranks, outs, expected, strict=True):
            if op == "gather" and rank != root:
                assert out is None
                continue
            np.testing.assert_array_equal(out, exp, err_msg=f"{op} root={root} rank={rank}")
