"""EngineRunner's path (replication, fan-out, output return) on real GPUs, with a native
program standing in for a TensorRT engine: all_gather of a replicated input returns the input once
per rank, so any rank that received wrong or stale data shows."""

from __future__ import annotations

import numpy as np
import pytest

import mdtrt
from mdtrt import _core

pytestmark = pytest.mark.multi_gpu


@pytest.fixture(scope="module")
def group():
    with mdtrt.DeviceGroup(list(range(_core.visible_gpu_count())), timeout=60) as g:
        yield g


def every_pair_nvlink(group) -> bool:
    """replication="auto" takes peer copies only where every GPU pair is NVLink (DeviceGroup.peer_links)."""
    n, links = len(group), group.peer_links
    return all(links[a][b] == "nvlink" for a in range(n) for b in range(n) if a != b)


def gather_runner(group, dtype="float32"):
    n = len(group)
    program = _core.CollectiveProgram("all_gather", "none", 0, [], dtype, group.world_size, n)
    return mdtrt.EngineRunner(group, program=program)


# Sizes around the 4 MiB replication chunk, with an odd tail, and a tiny one.
SIZES = [12, 1 << 20, (9 << 20) + 12]


@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("mode", ["host", "peer", "broadcast", "auto"])
def test_replicated_host_input_reaches_every_rank(group, mode, nbytes):
    runner = gather_runner(group)
    rng = np.random.default_rng(nbytes)
    for trial in range(3):  # new data each time: a stale buffer from the previous call must not pass
        x = rng.standard_normal(nbytes // 4).astype(np.float32)
        outs = runner.infer({"input": x}, all_ranks=True, poison_outputs=True, replication=mode)
        expected = np.tile(x, len(group))
        assert len(outs) == len(group)  # every rank's outputs, so the loop below checks them all
        for rank, out in enumerate(outs):
            np.testing.assert_array_equal(out["output"], expected, err_msg=f"rank {rank}, {mode}, trial {trial}")
    assert runner.last_replication == ("host" if mode == "auto" else mode)


@pytest.mark.parametrize("pinned", [False, True])
def test_auto_replication_sends_large_pageable_inputs_through_peer_copies(group, pinned):
    """auto: a pageable host input of 16 MiB or more goes through one host copy and peer copies
    where every GPU pair is NVLink (measured faster than a pageable copy per GPU), a pinned one is
    copied by every GPU itself; the data arrives either way (poisoned outputs, random input)."""
    torch = pytest.importorskip("torch")
    runner = gather_runner(group)
    x = torch.randn((16 << 20) // 4 + 3, dtype=torch.float32)
    if pinned:
        x = x.pin_memory()
    outs = runner.infer({"input": x.numpy()}, all_ranks=True, poison_outputs=True, replication="auto")
    expected = np.tile(x.numpy(), len(group))
    assert len(outs) == len(group)
    for rank, out in enumerate(outs):
        np.testing.assert_array_equal(out["output"], expected, err_msg=f"rank {rank}")
    assert runner.last_replication == ("peer" if not pinned and every_pair_nvlink(group) else "host")
    small = runner.infer({"input": x[:1000].numpy()}, all_ranks=True, replication="auto")
    np.testing.assert_array_equal(small[1]["output"], np.tile(x[:1000].numpy(), len(group)))
    assert runner.last_replication == "host"


@pytest.mark.parametrize("sizes", [("large", "small"), ("small", "large"), ("large", "large")], ids="-".join)
def test_auto_replication_sends_each_input_its_own_way_within_one_call(group, sizes):
    """auto decides per input: within one call a pageable input of 16 MiB or more goes through peer
    copies (where every GPU pair is NVLink) and a small one through host copies, or two large
    ones both by peer, staged through the first GPU's chunk events one after the other. Every rank
    gets both inputs (poisoned outputs, new random data per trial, so a peer copy that read the
    first GPU's staging buffer before its chunk landed shows), on every visible GPU; last_replication
    is the mode of the last replicated input."""
    runner = mdtrt.EngineRunner(group, program=_core.testing.PairCopyProgram("float32"))
    n, all_nvlink = len(group), every_pair_nvlink(group)
    elements = {"large": (20 << 20) // 4 + 5, "small": 1000}  # 20 MiB and an odd tail: 6 chunks
    rng = np.random.default_rng([len(s) + 7 * i for i, s in enumerate(sizes)] + [sizes.count("large")])
    for trial in range(2):
        a, b = (rng.standard_normal(elements[s]).astype(np.float32) for s in sizes)
        outs = runner.infer({"a": a, "b": b}, all_ranks=True, poison_outputs=True, replication="auto")
        assert len(outs) == n
        for rank, out in enumerate(outs):
            np.testing.assert_array_equal(out["a_copy"], a, err_msg=f"input a, rank {rank}, trial {trial}")
            np.testing.assert_array_equal(out["b_copy"], b, err_msg=f"input b, rank {rank}, trial {trial}")
        assert runner.last_replication == ("peer" if sizes[1] == "large" and all_nvlink else "host")


def test_default_returns_first_rank_only(group):
    runner = gather_runner(group)
    x = np.arange(10, dtype=np.float32)
    out = runner.infer({"input": x})
    assert isinstance(out, dict) and set(out) == {"output"}
    np.testing.assert_array_equal(out["output"], np.tile(x, len(group)))
    # Every rank of an all_gather holds the same result: a copy of per-rank inputs tells rank 0's apart.
    copy = mdtrt.EngineRunner(group, program=_core.testing.CopyProgram("float32"))
    rng = np.random.default_rng(41)
    xs = [{"input": rng.standard_normal(64).astype(np.float32)} for _ in range(len(group))]
    out = copy.infer(xs, poison_outputs=True)
    assert isinstance(out, dict) and set(out) == {"output"}
    np.testing.assert_array_equal(out["output"], xs[0]["input"])


def test_per_rank_inputs(group):
    runner = gather_runner(group, "int32")
    rng = np.random.default_rng(42)
    xs = [{"input": rng.integers(-1000, 1000, size=5, dtype=np.int32)} for _ in range(len(group))]
    outs = runner.infer(xs, all_ranks=True, poison_outputs=True)
    expected = np.concatenate([x["input"] for x in xs])
    assert len(outs) == len(group)
    for rank, out in enumerate(outs):
        np.testing.assert_array_equal(out["output"], expected, err_msg=f"rank {rank}")


def test_device_input_on_one_gpu_is_copied_to_the_others(group):
    torch = pytest.importorskip("torch")
    runner = gather_runner(group)
    x = torch.randn(3 << 20, device=f"cuda:{group.gpus[0]}")
    x.add_(1.0)
    outs = runner.infer({"input": x}, all_ranks=True, poison_outputs=True)
    expected = np.tile(x.cpu().numpy(), len(group))
    for dev, out in zip(group.gpus, outs, strict=True):
        assert out["output"].device.index == dev
        np.testing.assert_array_equal(out["output"].cpu().numpy(), expected)


def test_wrong_inputs_are_named(group):
    runner = gather_runner(group)
    with pytest.raises(mdtrt.InvalidArgumentError, match=r"missing \['input'\]"):
        runner.infer({"x": np.ones(3, np.float32)})
    with pytest.raises(mdtrt.InvalidArgumentError, match="dtype float16"):
        runner.infer({"input": np.ones(3, np.float16)})
    with pytest.raises(mdtrt.InvalidArgumentError, match="replication"):
        runner.infer({"input": np.ones(3, np.float32)}, replication="magic")
    with pytest.raises(mdtrt.InvalidArgumentError, match="exactly one"):
        mdtrt.EngineRunner(group)


def test_time_infer_reports_every_call(group):
    runner = gather_runner(group)
    times = runner.time_infer({"input": np.ones(1024, np.float32)}, iterations=5, warmup=1)
    assert len(times) == 5 and all(t > 0 for t in times)


def test_preallocated_outputs_are_written_in_place(group):
    torch = pytest.importorskip("torch")
    n = len(group)
    xs = [torch.randn(64, 8, device=f"cuda:{d}") for d in group.gpus]
    outs = [torch.full((64 * n, 8), float("nan"), device=f"cuda:{d}") for d in group.gpus]
    result = group.all_gather(xs, out=outs)
    expected = torch.cat([x.cpu() for x in xs])
    for got, given in zip(result, outs, strict=True):
        assert got is given
        assert torch.equal(given.cpu(), expected)
    with pytest.raises(mdtrt.InvalidArgumentError, match="bytes"):
        group.all_gather(xs, out=[torch.empty(3, device=f"cuda:{d}") for d in group.gpus])


def test_copy_program_with_runner_outputs(group):
    torch = pytest.importorskip("torch")
    runner = mdtrt.EngineRunner(group, program=_core.testing.CopyProgram("float16"))
    x = torch.randn(1000, device=f"cuda:{group.gpus[0]}", dtype=torch.float16)
    outs = [torch.zeros(1000, device=f"cuda:{d}", dtype=torch.float16) for d in group.gpus]
    runner.infer({"input": x}, outputs={"output": outs})
    for o in outs:
        assert torch.equal(o.cpu(), x.cpu())
    with pytest.raises(mdtrt.InvalidArgumentError, match="does not have"):
        runner.infer({"input": x}, outputs={"nope": outs})


def test_machine_figures_are_plausible(group):
    peer = _core.testing.peer_copy_bandwidth(group.gpus[0], group.gpus[1], 64 << 20, 5)
    h2d = _core.testing.h2d_bandwidth(group.gpus[0], 64 << 20, 5, True)
    bare = _core.testing.bare_copy_loop([group.gpus[0]], 1024, 20)
    bare_all = _core.testing.bare_copy_loop(list(group.gpus), 1024, 20)
    assert 1 < peer < 2000 and 1 < h2d < 500
    assert len(bare) == len(bare_all) == 20 and all(0 < t < 1e6 for t in bare + bare_all)
    # The bare launch (the fan-out benchmark's reference from Python) leaves the current device as it was.
    copies = _core.testing.BareCopies(list(reversed(group.gpus)), 1024)
    before = _core.current_device()
    copies.launch()
    copies.synchronize()
    assert _core.current_device() == before


def test_cuda_graphs_capture_once_and_replay_on_the_same_buffers(group):
    """A native all_reduce through EngineRunner(cuda_graph=True): captured on the second call with
    the same buffers, replayed after (refilled inputs give new, correct results), captured anew
    for new buffers."""
    torch = pytest.importorskip("torch")
    n = len(group)
    program = _core.CollectiveProgram("all_reduce", "sum", 0, [], "float32", group.world_size, n)
    runner = mdtrt.EngineRunner(group, program=program, cuda_graph=True)
    rng = np.random.default_rng(23)

    def buffers():
        xs = [torch.empty(256, 4, device=f"cuda:{d}") for d in group.gpus]
        outs = [torch.empty(256, 4, device=f"cuda:{d}") for d in group.gpus]
        return xs, outs

    def check(call, xs, outs):
        host = [rng.standard_normal((256, 4)).astype(np.float32) for _ in range(n)]
        for x, h, o in zip(xs, host, outs, strict=True):
            x.copy_(torch.from_numpy(h))
            o.fill_(float("nan"))
        call()
        for o in outs:
            np.testing.assert_allclose(o.cpu().numpy(), sum(host), rtol=1e-5, atol=1e-5)

    xs, outs = buffers()
    call = runner.prepare([{"input": x} for x in xs], outputs={"output": outs}, all_ranks=True)
    check(call, xs, outs)
    assert runner.graph_captures == [0] * n  # the first call runs uncaptured
    for _ in range(4):
        check(call, xs, outs)
    assert runner.graph_captures == [1] * n  # captured once, replayed since
    xs2, outs2 = buffers()
    call2 = runner.prepare([{"input": x} for x in xs2], outputs={"output": outs2}, all_ranks=True)
    for _ in range(3):
        check(call2, xs2, outs2)
    assert runner.graph_captures == [2] * n


def test_program_that_cannot_be_captured_falls_back_with_one_warning(group):
    """A program that synchronizes inside its enqueue cannot be captured: with cuda_graph=True the
    failed capture turns into a plain run on every rank, the runner stays without graphs, and one
    RuntimeWarning names the rank, the program and what happened."""
    torch = pytest.importorskip("torch")
    xs = [torch.randn(512, device=f"cuda:{d}") for d in group.gpus]
    outs = [torch.full((512,), float("nan"), device=f"cuda:{d}") for d in group.gpus]
    inputs = [{"input": x} for x in xs]
    graphed = mdtrt.EngineRunner(group, program=_core.testing.SynchronizingCopyProgram("float32"), cuda_graph=True)
    call = graphed.prepare(inputs, outputs={"output": outs}, all_ranks=True)
    with pytest.warns(RuntimeWarning, match="cuda_graph=True") as caught:
        for _ in range(4):  # 1: uncaptured, 2: the capture fails -> plain on every rank, 3-4: plain
            for x, o in zip(xs, outs, strict=True):
                x.normal_()
                o.fill_(float("nan"))
            call()
            for x, o in zip(xs, outs, strict=True):
                assert torch.equal(o.cpu(), x.cpu())
    assert len([w for w in caught if "cuda_graph=True" in str(w.message)]) == 1
    assert "synchronizing copy test program" in graphed.graph_fallback
    assert graphed.graph_captures == [0] * len(group)
