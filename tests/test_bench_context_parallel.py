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
    for bad, message in ((["--gpus", "0"], "at least 2 GPU"), (["--strategies", "tree"], "unknown strategies"),
                         (["--sequences", "1001"], "multiple of GPUs x --ring-blocks"),
                         (["--heads", "3"], "not divisible by 2")):
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


def _reference_attention_with_lse(torch, q, k, v):
    scores = (q.double() @ k.double().transpose(-1, -2)) / np.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v.double()).to(q.dtype), lse.float()


@pytest.mark.parametrize("ranks,heads", [(2, 4), (4, 4)])
@pytest.mark.parametrize("strategy", ["allgather_kv", "ulysses", "ring"])
def test_strategy_layouts_on_cpu(bench, monkeypatch, strategy, ranks, heads):
    torch = pytest.importorskip("torch")
    pytest.importorskip("mdtrt")
    monkeypatch.setattr(bench, "device", lambda gpu: "cpu")
    monkeypatch.setattr(bench, "attention_with_lse", _reference_attention_with_lse)
    monkeypatch.setattr(torch.cuda, "device", lambda gpu: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda gpu=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    # float32 on the CPU (torch's CPU kernels), the same layouts as float16 on GPUs.
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, dtype=None, **k: real_randn(*a, dtype=torch.float32, **k))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, dtype=None, **k: real_empty(*a, dtype=torch.float32, **k))
    monkeypatch.setattr(torch, "float16", torch.float32)
    args = bench.parse_args(["--smoke", "--gpus", ",".join(map(str, range(ranks))), "--heads", str(heads),
                             "--head-dim", "8"])
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
    if strategy == "ring":
        assert kv < full_kv  # own chunk plus two blocks: never the whole K and V
    elif strategy == "allgather_kv":
        assert kv == full_kv + full_kv // ranks
