"""A rank whose enqueue ignores the abort past the grace, on real GPUs: the call raises at its
deadline, the runner and group go, and the rank's task returns later into the call's state, which
it owns (staging and output buffers, results, stream-ordered events), and the call's arrays are
kept for the life of the process (the rank may still read or write them). The process must stay
healthy: a fresh group on the same GPUs computes correct results afterwards. In a subprocess: the
stuck thread stays behind, and a use-after-free would take the process down."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from mdtrt import _core

pytestmark = pytest.mark.gpu

SCRIPT = """
import gc, sys, time
import numpy as np
import mdtrt
from mdtrt import _core

mode = sys.argv[1]
# "first": rank 0 of (at most) two GPUs is the one given up on; "last": the last rank of every
# visible GPU, so that the ranks before it queue their work and order their own streams first.
last = sys.argv[2] == "last"
gpus = list(range(_core.visible_gpu_count() if last else min(2, _core.visible_gpu_count())))
stuck = len(gpus) - 1 if last else 0
group = mdtrt.DeviceGroup(gpus, timeout=30)
if mode == "late":
    # The stuck rank's enqueue sleeps 0.8 s, past the 0.5 s deadline but within the default grace: it is
    # waited for, not given up on, and queues its copy before the call raises. The group is broken
    # with that copy queued, so the call's arrays are still held.
    runner = mdtrt.EngineRunner(group, program=_core.testing.StubbornCopyProgram("float32", stuck, 0.8))
else:
    _core.testing.set_abort_grace(group._native, 0.2)
    # The stuck rank's enqueue sleeps 8 s on the host, ignoring the abort: it is given up on after the 0.5 s
    # deadline, the abort (ncclCommAbort took ~2 s on 2x H200) and the 0.2 s grace, and enqueues its
    # copy and writes its results seconds after the raise.
    runner = mdtrt.EngineRunner(group, program=_core.testing.StubbornCopyProgram("float32", stuck, 8.0))
if mode in ("host", "late"):
    x = np.arange(1 << 20, dtype=np.float32)
    run = lambda timeout: runner.infer({"input": x}, all_ranks=True, timeout=timeout)
else:
    import torch
    xs = [torch.arange(1 << 20, dtype=torch.float32, device=f"cuda:{g}") for g in gpus]
    outs = [torch.zeros(1 << 20, device=f"cuda:{g}") for g in gpus]
    run = lambda timeout: runner.infer([{"input": x} for x in xs], outputs={"output": outs}, timeout=timeout,
                                       stream_ordered=True)
# Within a long deadline first (the stuck rank takes 8 s, or 0.8 s when late): right results, and the next call reuses its state.
results = run(30)
if mode in ("host", "late"):
    assert len(results) == len(gpus) and all(np.array_equal(r["output"], x) for r in results)
else:
    for g in gpus:
        torch.cuda.synchronize(g)
    assert all(torch.equal(o, x) for o, x in zip(outs, xs))
    for o in outs:
        o.zero_()
print("first call right", flush=True)
start = time.monotonic()
try:
    run(0.5)
    print("NO ERROR", flush=True)
except mdtrt.RankTimeoutError as e:
    print(f"raised after {time.monotonic() - start:.2f} s: {e}", flush=True)
from mdtrt import prepared_call
print("arrays held:", len(prepared_call._HELD_FOR_UNFINISHED_WORK), flush=True)  # the stuck rank may still use them
if mode == "stream":
    for g in gpus:
        torch.cuda.synchronize(g)  # the events handed over for the rank given up on are recorded
    print("streams free", flush=True)
try:
    group.synchronize()
except mdtrt.MdtrtError as e:
    print(f"group broken: {type(e).__name__}", flush=True)
del runner
group.close()
del group
gc.collect()
# The stuck rank returns meanwhile and writes into the call's state; churn the heap around it.
junk = []
deadline = start + (1.5 if mode == "late" else 9.0)  # past the stubborn sleep
while time.monotonic() < deadline:
    junk.append([bytearray(256) for _ in range(1000)])
    if len(junk) > 40:
        junk.clear()
    time.sleep(0.01)
# A fresh group on the same GPUs works and computes the right thing.
with mdtrt.DeviceGroup(gpus, timeout=30) as fresh:
    copy = mdtrt.EngineRunner(fresh, program=_core.testing.CopyProgram("float32"))
    for trial in range(5):
        y = np.random.default_rng(trial).standard_normal(4096).astype(np.float32)
        outs = copy.infer({"input": y}, all_ranks=True)
        assert len(outs) == len(gpus) and all(np.array_equal(o["output"], y) for o in outs), trial
print("OK", flush=True)
"""


@pytest.mark.parametrize("mode, stuck", [
    ("host", "first"), ("stream", "first"), ("late", "first"),
    # The last rank of every visible GPU given up on: the ranks before it ordered their own caller
    # streams after their queued work, the caller orders only the stuck rank's (with an event
    # recorded for the watchdog, the rank keeping its own).
    pytest.param("stream", "last", marks=pytest.mark.multi_gpu),
    pytest.param("host", "last", marks=pytest.mark.multi_gpu),
])
def test_a_rank_given_up_on_in_its_enqueue_leaves_the_process_healthy(mode, stuck):
    """host / stream: a rank (first: rank 0 of two GPUs; last: the last of every GPU) is given up
    on; late: it returns within the grace, but the group broke with its work queued. Either way the
    failed call's arrays are held and the process is healthy."""
    if mode == "stream":
        pytest.importorskip("torch")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, stuck], env=env, capture_output=True, text=True,
                            timeout=180)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "first call right" in result.stdout, out
    stuck_rank = _core.visible_gpu_count() - 1 if stuck == "last" else 0
    named = r"0(, 1)?" if stuck == "first" else rf"([0-9]+, )*{stuck_rank}"
    assert "raised after" in result.stdout and re.search(rf"rank\(s\) {named} did not finish 'infer'",
                                                         result.stdout), out
    assert ("abandoned" in result.stdout) == (mode != "late"), out
    assert "arrays held: 1" in result.stdout, out
    assert "group broken" in result.stdout, out
    assert result.stdout.rstrip().endswith("OK"), out
