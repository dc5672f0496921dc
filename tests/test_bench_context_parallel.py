"""benchmarks/bench_context_parallel.py on a machine without GPUs: its arguments, its refusal to run
without 2 GPUs, and (where torch is installed) each strategy's buffer layouts and online softmax
on the CPU, with mdtrt.reference computing the collectives, against one-device attention."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH_DIR))
    try:
        yield importlib.import_module("bench_context_parallel")
    finally:
        sys.path.remove(str(BENCH_DIR))


def test_arguments(bench):
    args = bench.parse_args(["--smoke"])
    assert args.sequence_list == list(bench.SMOKE_SEQUENCES) and args.iteration_count == 3
    assert (args.heads, args.head_dim) == (4, 64) and args.strategy_list == list(bench.STRATEGIES)
    args = bench.parse_args(["--sequences", "8192,56320", "--strategies", "ring", "--iterations", "5"])
    assert args.sequence_list == [8192, 56320] and args.strategy_list == ["ring"] and args.iteration_count == 5
    assert bench.parse_args([]).sequence_list == list(bench.DEFAULT_SEQUENCES)
    # Ulysses' head groups: one by default; a given count must divide the heads per GPU.
    assert bench.DEFAULT_ULYSSES_HEAD_GROUPS == 1
    assert bench.parse_args([]).ulysses_group_heads == [16]  # 32 heads over 2 GPUs: 16 per GPU, one group
    assert bench.parse_args(["--heads", "6"]).ulysses_group_heads == [3]  # 3 heads per GPU: one group
    assert bench.parse_args(["--smoke", "--gpus", "0,1,2,3"]).ulysses_group_heads == [1]  # 4 heads: 1 per GPU
    assert bench.parse_args(["--ulysses-head-groups", "16"]).ulysses_group_heads == [1] * 16  # a count
    assert bench.parse_args(["--ulysses-head-groups", "2,12,2"]).ulysses_group_heads == [2, 12, 2]  # sizes
    assert bench.parse_args(["--smoke", "--gpus", "0,1,2,3,4,5,6,7"]).heads == 8  # smoke: one head per GPU at least
    with pytest.raises(SystemExit):  # argparse: a positive count
        bench.build_parser().parse_args(["--ulysses-head-groups", "0"])
    for bad, message in ((["--gpus", "0"], "at least 2 GPU"), (["--strategies", "tree"], "unknown strategies"),
                         (["--sequences", "1001"], "multiple of GPUs x --ring-blocks"),
                         (["--kv-head-groups", "5"], "must divide --heads 32"),
                         (["--heads", "3"], "not divisible by 2"),
                         (["--ulysses-head-groups", "3"],
                          "must divide the heads per GPU: --heads 32 over 2 GPUs is 16"),
                         (["--ulysses-head-groups", "32"], "is 16"),
                         (["--ulysses-head-groups", "2,12,3"], "group sizes add up to 17, not to the heads per GPU"),
                         (["--ulysses-head-groups", "8,4"], "add up to 12"),
                         (["--smoke", "--heads", "4", "--gpus", "0,1,2,3,4,5,6,7"], "--heads 4 is not divisible by 8")):
        with pytest.raises(SystemExit, match=message):
            bench.parse_args(bad)


def test_refuses_without_two_gpus():
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(BENCH_DIR / "bench_context_parallel.py"), "--smoke", "--out",
                        os.devnull], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "bench_context_parallel: cannot run: needs" in r.stderr and "Traceback" not in r.stderr


class _FakeStream:
    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass


class _FakeEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass


class _FakeGroup:
    """prepare_collective with mdtrt.reference's semantics on CPU torch tensors."""

    def prepare_collective(self, op, inputs, *, root=0, out=None, **kwargs):
        from mdtrt.reference import collective

        def call():
            results = collective(op, [t.contiguous().numpy() for t in inputs], reduce="none", root=root)
            for target, value in zip(out, results):
                target.copy_(__import__("torch").from_numpy(value).view(target.shape))
            return out

        return call

    def all_to_all(self, inputs, *, out=None, **kwargs):
        """The one-shot call (new arrays each time), recorded in ``one_shot``."""
        self.one_shot = getattr(self, "one_shot", []) + [("all_to_all", len(inputs))]
        return self.prepare_collective("all_to_all", inputs, out=out)()


def _cpu_as_devices(bench, torch, monkeypatch):
    """Every "GPU" is the CPU; streams and events do nothing (CPU work runs in program order)."""
    monkeypatch.setattr(bench, "device", lambda gpu: "cpu")
    monkeypatch.setattr(torch.cuda, "device", lambda gpu: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda gpu=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)


def _reference_attention_with_lse(torch, q, k, v):
    scores = (q.double() @ k.double().transpose(-1, -2)) / np.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v.double()).to(q.dtype), lse.float()


def test_attention_with_lse_falls_back_in_kernel_order(bench, monkeypatch):
    """On the CPU the cuDNN, flash and memory-efficient kernels are absent: the chain must reach the
    CPU kernel, on the strided sequence-first views, and agree with float64 attention."""
    torch = pytest.importorskip("torch")
    assert [name for name, _ in bench.LSE_KERNELS] == ["cudnn", "flash", "efficient", "cpu"]
    monkeypatch.setattr(bench, "_lse_choice", {})
    tried = []
    for index, (name, kernel) in enumerate(bench.LSE_KERNELS):
        def spy(torch, q, k, v, _kernel=kernel, _name=name):
            tried.append((_name, q.is_contiguous()))
            return _kernel(torch, q, k, v)
        monkeypatch.setattr(bench, "LSE_KERNELS", bench.LSE_KERNELS[:index] + ((name, spy),)
                            + bench.LSE_KERNELS[index + 1:])
    g = torch.Generator().manual_seed(3)
    # (S, B, H, D) storage seen as (B, H, S, D), as the benchmark passes it
    q, k, v = (torch.randn((24, 2, 4, 16), generator=g).permute(1, 2, 0, 3) for _ in range(3))
    k, v = k[:, :, :10], v[:, :, :10]  # fewer keys than queries, as a ring block
    out, lse = bench.attention_with_lse(torch, q, k, v)
    want, want_lse = _reference_attention_with_lse(torch, q, k, v)
    assert out.shape == (2, 4, 24, 16) and lse.shape == (2, 4, 24) and lse.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert [name for name, _ in tried] == ["cudnn", "cudnn", "flash", "flash", "efficient", "efficient", "cpu"]
    assert tried[0][1] is False and tried[1][1] is True  # strided views first, then contiguous copies
    tried.clear()
    bench.attention_with_lse(torch, q, k, v)
    assert tried == [("cpu", False)]  # the choice is remembered per layout: refusals paid once


def test_attention_with_lse_names_every_refusal(bench, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(bench, "_lse_choice", {})
    q = torch.randn(1, 2, 8, 16)
    k = v = torch.randn(1, 2, 8, 12)  # head dims that no kernel accepts
    with pytest.raises(RuntimeError, match="no attention kernel returned the log-sum-exp") as caught:
        bench.attention_with_lse(torch, q, k, v)
    for name in ("cudnn:", "flash:", "efficient:", "cpu:"):
        assert name in str(caught.value)
    assert not bench._lse_choice


def test_attention_with_lse_does_not_hide_out_of_memory(bench, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(bench, "_lse_choice", {})

    def out_of_memory(torch, q, k, v):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(bench, "LSE_KERNELS", (("cudnn", out_of_memory),) + bench.LSE_KERNELS[1:])
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="3.00 GiB"):
        bench.attention_with_lse(torch, q, q, q)  # not the CPU kernel's result


_ONLY_FOR = {"--ring-blocks": "ring", "--ulysses-head-groups": "ulysses", "--kv-head-groups": "allgather_kv"}


@pytest.mark.parametrize("ranks,heads,extra", [
    (2, 4, []), (4, 4, []), (2, 4, ["--ring-blocks", "1"]), (2, 4, ["--ring-blocks", "4"]),
    (2, 8, ["--ulysses-head-groups", "1"]), (2, 8, ["--ulysses-head-groups", "2"]),
    (2, 8, ["--ulysses-head-groups", "4"]), (4, 8, ["--ulysses-head-groups", "2"]),
    (2, 8, ["--ulysses-head-groups", "1,2,1"]), (2, 8, ["--ulysses-head-groups", "3,1"]),
    (2, 4, ["--kv-head-groups", "2"])])
@pytest.mark.parametrize("strategy", ["allgather_kv", "ulysses", "ring"])
def test_strategy_layouts_on_cpu(bench, monkeypatch, strategy, ranks, heads, extra):
    torch = pytest.importorskip("torch")
    pytest.importorskip("mdtrt")
    if extra and _ONLY_FOR[extra[0]] != strategy:
        pytest.skip(f"{extra[0]} only changes {_ONLY_FOR[extra[0]]}")
    _cpu_as_devices(bench, torch, monkeypatch)
    # Ring runs bench.attention_with_lse itself: on the CPU it falls back to torch's CPU flash kernel.
    # float32 on the CPU (torch's CPU kernels), the same layouts as float16 on GPUs.
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, dtype=None, **k: real_randn(*a, dtype=torch.float32, **k))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, dtype=None, **k: real_empty(*a, dtype=torch.float32, **k))
    monkeypatch.setattr(torch, "float16", torch.float32)
    args = bench.parse_args(["--smoke", "--gpus", ",".join(map(str, range(ranks))), "--heads", str(heads),
                             "--head-dim", "8", *extra])
    st = bench.Setup(torch, list(range(ranks)), 16, 2, heads, 8)
    q, k, v = (st.heads_view(t) for t in st.full)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    run = bench.make_strategy(strategy, torch, _FakeGroup(), st, args)
    for _ in range(2):  # a second pass reuses every buffer
        run.run()
    outputs = run.outputs()
    assert len(outputs) == ranks
    for r, out in enumerate(outputs):
        want = reference[:, :, r * st.chunk:(r + 1) * st.chunk]
        assert out.shape == want.shape
        torch.testing.assert_close(out.float(), want.float(), rtol=1e-4, atol=1e-5)
    check = bench.compare(torch, reference, outputs, st)
    assert check["passed"]
    wrong = [o.flip(2) for o in outputs]  # the check can fail
    assert not bench.compare(torch, reference, wrong, st)["passed"]
    full_kv = 2 * 16 * 2 * heads * 8 * 4
    kv = run.kv_bytes()
    allgather_kv = full_kv + full_kv // ranks  # its own chunk and the gathered whole
    if strategy == "ring":
        blocks = args.ring_blocks
        assert kv == full_kv // ranks + 3 * full_kv // (ranks * blocks)
        assert kv < allgather_kv or blocks == 1  # one block per chunk: three whole chunks in flight
        assert run.kernels() == ["cpu (strided)"]  # cuDNN, flash, efficient: absent on the CPU
    elif strategy == "allgather_kv":
        assert kv == allgather_kv
    else:
        assert kv == 2 * full_kv // ranks  # its K/V rows to send, and every row of its heads received
        assert len(run.to_heads) == len(run.to_sequence) == len(args.ulysses_group_heads)


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_ring_float16_sums_in_float32_on_cpu(bench, monkeypatch, blocks):
    """Real float16 buffers (torch's CPU kernels take them): the partial sums the fold keeps are
    float32, the output float16, and its error that of one float16 rounding of the result."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("mdtrt")
    _cpu_as_devices(bench, torch, monkeypatch)
    args = bench.parse_args(["--gpus", "0,1", "--heads", "4", "--head-dim", "16", "--ring-blocks", str(blocks)])
    st = bench.Setup(torch, [0, 1], 64, 1, 4, 16, seed=5)
    q, k, v = (st.heads_view(t) for t in st.full)
    want = _reference_attention_with_lse(torch, *(t.double() for t in (q, k, v)))[0]
    ring = bench.make_strategy("ring", torch, _FakeGroup(), st, args)
    sums = []
    real_fold = ring._fold

    def fold(r, k, v):
        real_fold(r, k, v)
        if ring.part[r] is not None and ring.seen[r] > 1:
            sums.append(ring.part[r].dtype)

    monkeypatch.setattr(ring, "_fold", fold)
    ring.run()
    assert sums == [torch.float32] * (2 * (ring.folds - 2))  # every partial sum after the first merge
    worst = 0.0
    for r, out in enumerate(ring.outputs()):
        assert out.dtype == torch.float16
        worst = max(worst, float((out.double() - want[:, :, r * st.chunk:(r + 1) * st.chunk]).abs().max()))
    single = float((torch.nn.functional.scaled_dot_product_attention(q, k, v).double() - want).abs().max())
    assert worst <= 2 * max(single, 1e-3)


class _StreamTrace:
    """CPU stand-ins for torch.cuda's streams and events that log what a pass queues where: which
    stream each attention went to, which events were recorded and waited for, and when each
    collective was called (collectives order themselves after the current stream)."""

    def __init__(self, bench, torch, monkeypatch):
        self.log, self.queue, self.sides = [], {}, 0
        trace = self

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                trace.log.append(("wait_stream", self.name, other.name))

            def wait_event(self, event):
                trace.log.append(("wait", self.name, event.id))

        class Event:
            count = 0

            def __init__(self, *args, **kwargs):
                Event.count += 1
                self.id = Event.count

            def record(self, stream):
                trace.log.append(("record", stream.name, self.id))

        currents = {}

        def current_stream(gpu=None):
            return currents.setdefault(gpu, Stream(f"current{gpu}"))

        def new_stream(device=None):
            trace.sides += 1
            return Stream(f"side{trace.sides - 1}")

        @contextlib.contextmanager
        def on_device(gpu):
            before = self.queue.get("gpu")
            self.queue["gpu"] = gpu
            yield
            self.queue["gpu"] = before

        @contextlib.contextmanager
        def on_stream(stream):
            before = self.queue.get("stream")
            self.queue["stream"] = stream.name
            yield
            self.queue["stream"] = before

        def queued(what, fn):
            def logged(*args, **kwargs):
                trace.log.append((what, self.queue.get("stream") or f"current{self.queue.get('gpu')}"))
                return fn(*args, **kwargs)
            return logged

        real_sdpa, real_lse, real_logaddexp = bench.sdpa, bench.attention_with_lse, torch.logaddexp

        monkeypatch.setattr(bench, "device", lambda gpu: "cpu")
        monkeypatch.setattr(bench, "sdpa", queued("attention", real_sdpa))
        monkeypatch.setattr(bench, "attention_with_lse", queued("attention", real_lse))
        monkeypatch.setattr(torch, "logaddexp", queued("merge", real_logaddexp))  # each merge of ring's fold
        monkeypatch.setattr(torch.Tensor, "record_stream",
                            lambda tensor, stream: trace.log.append(("record_stream", stream.name)))
        monkeypatch.setattr(torch.cuda, "device", on_device)
        monkeypatch.setattr(torch.cuda, "stream", on_stream)
        monkeypatch.setattr(torch.cuda, "Stream", new_stream)
        monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)

    def label(self, call, name):
        def labelled():
            self.log.append(("collective", name))
            return call()
        return labelled


@pytest.mark.parametrize("group_text", ["1", "2", "4", "1,2,1"])
def test_ulysses_pipelines_exchanges_over_head_groups(bench, monkeypatch, group_text):
    """The order a pass queues its work in: group g attends on the second stream; group g+1's
    exchange to heads runs while it attends; group g's exchange back waits (through the current
    stream) for group g's attention only, and runs while group g+1 attends."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("mdtrt")
    trace = _StreamTrace(bench, torch, monkeypatch)
    args = bench.parse_args(["--gpus", "0,1", "--heads", "8", "--head-dim", "8",
                             "--ulysses-head-groups", group_text])
    groups = len(args.ulysses_group_heads)
    st = bench.Setup(torch, [0, 1], 16, 1, 8, 8)
    fake = _FakeGroup()
    run = bench.make_strategy("ulysses", torch, fake, st, args)
    run.to_heads = [trace.label(c, ("to_heads", g)) for g, c in enumerate(run.to_heads)]
    run.to_sequence = [trace.label(c, ("back", g)) for g, c in enumerate(run.to_sequence)]
    run.run()
    log = trace.log
    q, k, v = (st.heads_view(t) for t in st.full)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert bench.compare(torch, reference, run.outputs(), st)["passed"]
    collectives = [e[1] for e in log if e[0] == "collective"]
    if groups == 1:  # one exchange each way around attention on the current stream
        assert [e[1] for e in log if e[0] == "attention"] == ["current0", "current1"]
        # Back: the attention outputs themselves through the one-shot all_to_all when they come
        # sequence-first (no copy), else the prepared call on the copies.
        one_shot = getattr(fake, "one_shot", [])
        assert [e for e in log if e[0] != "attention"] == [("collective", ("to_heads", 0))] + (
            [] if one_shot else [("collective", ("back", 0))])
        assert len(one_shot) in (0, 1)
        return
    assert sorted(collectives) == sorted([(way, g) for way in ("to_heads", "back") for g in range(groups)])
    where = {name: log.index(("collective", name)) for name in collectives}
    for rank in range(2):
        side, current = f"side{rank}", f"current{rank}"
        attentions = [i for i, e in enumerate(log) if e == ("attention", side)]
        assert len(attentions) == groups  # every group's attention on the second stream
        assert not [e for e in log if e == ("attention", current)]
        assert log.index(("wait_stream", side, current)) < attentions[0]  # starts after the pass began
        assert log[-2:].count(("wait_stream", current, side)) == 1  # the pass ends after the second stream
        records = {e[2]: i for i, e in enumerate(log) if e[0] == "record" and e[1] == side}
        for g in range(groups):
            assert where[("to_heads", g)] < attentions[g]  # its data arrived
            if g + 1 < groups:
                assert attentions[g] < where[("to_heads", g + 1)] < attentions[g + 1]  # travels while g attends
                assert attentions[g + 1] < where[("back", g)]  # back while g+1 attends
            waits = [records[e[2]] for e in log[:where[("back", g)]]
                     if e[0] == "wait" and e[1] == current and e[2] in records]
            assert waits and max(waits) > attentions[g]  # waited for group g's attention...
            assert g + 1 == groups or max(waits) < attentions[g + 1]  # ...and not for the next group's
            if g + 1 < groups:  # the exchange to heads waits for no attention
                assert not [e for e in log[:where[("to_heads", g + 1)]]
                            if e[0] == "wait" and e[1] == current and records.get(e[2], -1) > attentions[g]]


@pytest.mark.parametrize("blocks", [2, 4])
def test_ring_merges_on_a_fold_stream(bench, monkeypatch, blocks):
    """Ring's order of work: every attention on the rank's attention stream; each merge on its fold
    stream, after an event that follows that attention only (so a merge overlaps the next block's
    attention), with the attention's outputs kept from reuse there; the pass ends after both."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("mdtrt")
    trace = _StreamTrace(bench, torch, monkeypatch)
    args = bench.parse_args(["--gpus", "0,1", "--heads", "4", "--head-dim", "8", "--ring-blocks", str(blocks)])
    st = bench.Setup(torch, [0, 1], 16, 1, 4, 8)
    run = bench.make_strategy("ring", torch, _FakeGroup(), st, args)
    run.calls = [trace.label(c, ("broadcast", i)) for i, c in enumerate(run.calls)]
    run.run()
    log = trace.log
    q, k, v = (st.heads_view(t) for t in st.full)
    assert bench.compare(torch, torch.nn.functional.scaled_dot_product_attention(q, k, v), run.outputs(), st)["passed"]
    last_collective = max(i for i, e in enumerate(log) if e[0] == "collective")
    for r in range(2):
        attend, fold, current = run.streams[r].name, run.fold_streams[r].name, f"current{r}"
        attentions = [i for i, e in enumerate(log) if e == ("attention", attend)]
        merges = [i for i, e in enumerate(log) if e == ("merge", fold)]
        assert len(attentions) == run.folds and len(merges) == run.folds - 1
        assert not [e for e in log if e[0] in ("attention", "merge") and e[1] not in (attend, fold)
                    and e[1].startswith("current")]
        for index, at in enumerate(attentions):
            record = log[at + 1]
            assert record[:2] == ("record", attend)  # the event right after this attention
            wait = log.index(("wait", fold, record[2]))
            assert log[wait + 1:wait + 3] == [("record_stream", fold)] * 2  # out and lse kept for the fold
            if index:
                assert wait < merges[index - 1]  # its merge waits for it
                if index + 1 < len(attentions):
                    assert merges[index - 1] < attentions[index + 1]  # queued before the next attention runs
        # The attention stream waits only for the current stream (the pass's start, then each block
        # a stream-ordered broadcast delivered there): never for a merge.
        attend_waits = [e for e in log if e[0] in ("wait", "wait_stream") and e[1] == attend]
        assert attend_waits and set(attend_waits) == {("wait_stream", attend, current)}
        assert len(attend_waits) == 1 + (run.folds - 1)
        assert log.index(("wait_stream", current, fold)) > last_collective  # folds never delay a broadcast
        assert ("wait_stream", current, attend) in log[last_collective:]


def _synthetic_results(speedup_ulysses: float, ring_kv: int, ring_passed: bool = True) -> dict:
    def strategy(ms, kv, passed=True):
        return {"median_ms": ms, "times_ms": [ms], "speedup": 100.0 / ms, "comm_ms": 1.2, "comm_share": 1.2 / ms,
                "peak_bytes": [3 << 30, 3 << 30], "kv_bytes": kv, "max_abs_error": 1e-3, "max_reference": 4.0,
                "passed": passed}

    points = [{"sequence": s, "single": {"median_ms": 100.0, "times_ms": [100.0], "peak_bytes": 5 << 30,
                                         "kv_bytes": 2 << 30},
               "strategies": {"allgather_kv": strategy(100 / 1.8, 3 << 30),
                              "ulysses": strategy(100 / speedup_ulysses, 1 << 30),
                              "ring": strategy(60.0, ring_kv, ring_passed)}}
              for s in (8192, 56320)]
    return {"context_parallel": {"config": {"gpus": [0, 1], "heads": 32, "head_dim": 128, "batch": 1,
                                            "iterations": 20, "ring_blocks": 4,
                                            "strategies": ["allgather_kv", "ulysses", "ring"]},
                                 "method": "synthetic", "points": points, "skipped": []}}


def test_report_targets_and_section(tmp_path):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        report = importlib.import_module("report")
    finally:
        sys.path.remove(str(BENCH_DIR))
    good = {v["target"]: v for v in report.context_parallel_targets(_synthetic_results(1.95, 1 << 30)["context_parallel"])}
    assert [v["met"] for v in good.values()] == [True, True, True]
    assert "ulysses 1.95x" in next(v["value"] for t, v in good.items() if "56320" in t)
    bad = report.context_parallel_targets(_synthetic_results(1.85, 4 << 30, ring_passed=False)["context_parallel"])
    assert [v["met"] for v in bad] == [False, False, False]
    assert "collectives alone" in bad[0]["why"] and "ring at 8192" in bad[2]["why"]
    text = report.render_markdown(_synthetic_results(1.95, 1 << 30), str(tmp_path / "B.md"))
    assert "## 5. Context-parallel attention" in text and "| 56320 | ulysses |" in text
    assert report.context_parallel_targets(None) == []


def test_run_all_selects_context_parallel_only_when_asked(monkeypatch, tmp_path):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        run_all = importlib.import_module("run_all")
    finally:
        sys.path.remove(str(BENCH_DIR))
    assert "context_parallel" not in run_all.DEFAULT_BENCHMARKS
    args = run_all.build_parser().parse_args(["--context-parallel", "--out", str(tmp_path)])
    cmd = run_all.bench_command("context_parallel", args, str(tmp_path / "cp.json"), 300)
    assert cmd[1].endswith("bench_context_parallel.py") and "--timeout" in cmd


@pytest.mark.multi_gpu
def test_smoke_run_on_gpus(tmp_path):  # pragma: no cover - needs 2 GPUs and torch
    pytest.importorskip("torch")
    out = tmp_path / "cp.json"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    r = subprocess.run([sys.executable, str(BENCH_DIR / "bench_context_parallel.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    result = json.loads(out.read_text())
    assert [p["sequence"] for p in result["points"]] == [256, 512]
    for point in result["points"]:
        for name in ("allgather_kv", "ulysses", "ring"):
            s = point["strategies"][name]
            assert s.get("passed"), (point["sequence"], name, s)
            assert s["median_ms"] > 0 and 0 < s["comm_share"] and len(s["peak_bytes"]) == 2
        assert point["strategies"]["ring"]["kv_bytes"] < point["strategies"]["allgather_kv"]["kv_bytes"]
        kernels = point["strategies"]["ring"]["lse_kernels"]
        assert kernels and not any(k.startswith("cpu") for k in kernels), kernels


@pytest.mark.multi_gpu
@pytest.mark.parametrize("groups", ["2", "4", "2,4,2"])
def test_ulysses_head_groups_on_gpus(tmp_path, groups):  # pragma: no cover - needs 2 GPUs and torch
    """Ulysses pipelined over 2 and 4 groups of heads and over unequal ones (the smoke run covers
    the default, one exchange each way): all match the one-GPU output."""
    pytest.importorskip("torch")
    import json

    out = tmp_path / "cp.json"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    r = subprocess.run([sys.executable, str(BENCH_DIR / "bench_context_parallel.py"), "--smoke", "--heads", "16",
                        "--strategies", "ulysses", "--ulysses-head-groups", groups, "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    sizes = [int(x) for x in groups.split(",")]
    expected = [8 // sizes[0]] * sizes[0] if len(sizes) == 1 else sizes  # a count of equal groups, or the sizes
    assert result["config"]["ulysses_group_heads"] == expected  # --smoke --heads 16 on 2 GPUs: 8 heads per GPU
    for point in result["points"]:
        assert point["strategies"]["ulysses"].get("passed"), point
