"""Ctrl-C answers every blocking wait within about a second: KeyboardInterrupt, communicators
aborted, no rank thread left running. CPU tests run the waits that need no GPU (the id file, the
rank runtime's test programs); GPU tests wait for a rank that never arrives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mdtrt import _core


def _start(script: str, *args: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, NCCL_NVLS_ENABLE="0", **env))


def _interrupt_when_ready(proc: subprocess.Popen, ready: str = "WAITING", settle: float = 0.5) -> tuple[float, str, str]:
    """Waits for the `ready` line, lets the process block, sends SIGINT; returns (seconds from
    SIGINT to exit, stdout, stderr)."""
    line = proc.stdout.readline()
    assert ready in line, line + proc.stderr.read()
    time.sleep(settle)
    assert proc.poll() is None, "the process finished before it was interrupted"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running 10 s after SIGINT:\n{out}\n{err}")
    return time.monotonic() - sent, line + out, err


def test_from_env_waiting_for_the_id_file_answers_ctrl_c(tmp_path):
    # Rank 1 of 2 waits for an id file no rank 0 ever writes (deadline 60 s).
    script = """
        import sys, mdtrt
        from mdtrt import _core
        _core.visible_gpu_count = lambda: 1  # this machine may have no GPU: the wait comes first
        print("WAITING", flush=True)
        try:
            mdtrt.DeviceGroup.from_env(timeout=60)
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
            sys.exit(130)
    """
    proc = _start(script, TRT_MY_RANK="1", TRT_WORLD_SIZE="2", TRT_NCCL_ID_FILE=str(tmp_path / "never"))
    elapsed, out, err = _interrupt_when_ready(proc, settle=1.0)
    assert proc.returncode == 130 and "KeyboardInterrupt" in out, out + err
    assert elapsed < 2.0, f"took {elapsed:.1f} s to answer SIGINT"


def test_blocked_rank_threads_answer_ctrl_c():
    # A bind that can never finish (a barrier bound one rank after another), deadline 60 s.
    script = """
        import sys
        from mdtrt import _core
        def threads():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("Threads:"))
        _core.testing.run_bind_test(4, "barrier", timeout=5.0)  # whatever the process starts once
        before = threads()
        print("WAITING", flush=True)
        try:
            _core.testing.run_bind_test(4, "barrier", sequential=True, timeout=60.0)
        except KeyboardInterrupt:
            print(f"KeyboardInterrupt threads_left={threads() - before}", flush=True)
            sys.exit(130)
    """
    proc = _start(script)
    elapsed, out, err = _interrupt_when_ready(proc)
    assert proc.returncode == 130 and "KeyboardInterrupt" in out, out + err
    assert elapsed < 2.0, f"took {elapsed:.1f} s to answer SIGINT"
    # Every rank thread was released and joined.
    assert "threads_left=0" in out, out


def test_a_signal_handlers_own_exception_comes_through():
    # An application's SIGINT handler that raises its own exception gets it back, not KeyboardInterrupt.
    script = """
        import signal, sys
        from mdtrt import _core
        class Stop(Exception):
            pass
        def handler(*_):
            raise Stop("asked to stop")
        signal.signal(signal.SIGINT, handler)
        print("WAITING", flush=True)
        try:
            _core.testing.run_bind_test(2, "barrier", sequential=True, timeout=60.0)
        except Stop as e:
            print(f"Stop: {e}", flush=True)
            sys.exit(3)
    """
    proc = _start(script)
    elapsed, out, err = _interrupt_when_ready(proc)
    assert proc.returncode == 3 and "Stop: asked to stop" in out, out + err


@pytest.mark.multi_gpu
def test_rank_that_never_arrives_answers_ctrl_c(tmp_path):
    # Rank 0 of 2 publishes the id and waits in NCCL set-up for rank 1, which is never started.
    script = """
        import sys, mdtrt
        print("WAITING", flush=True)
        try:
            mdtrt.DeviceGroup.from_env(timeout=120)
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
            sys.exit(130)
    """
    proc = _start(script, TRT_MY_RANK="0", TRT_WORLD_SIZE="2", TRT_NCCL_ID_FILE=str(tmp_path / "id"))
    elapsed, out, err = _interrupt_when_ready(proc, settle=3.0)
    assert proc.returncode == 130 and "KeyboardInterrupt" in out, out + err
    assert elapsed < 3.0, f"took {elapsed:.1f} s to answer SIGINT"
    assert not (tmp_path / "id").exists(), "the interrupted rank 0 left its id file behind"


@pytest.mark.multi_gpu
def test_collective_waiting_for_a_missing_rank_answers_ctrl_c(tmp_path):
    # Both ranks join; then rank 1 stops taking part and rank 0 waits in an all_reduce.
    script = """
        import sys, time, numpy as np, mdtrt
        group = mdtrt.DeviceGroup.from_env(timeout=120)
        if group.ranks[0] == 1:
            print("WAITING", flush=True)
            time.sleep(60)
            sys.exit(0)
        print("WAITING", flush=True)
        try:
            group.all_reduce(np.ones(1024, np.float32))
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
            sys.exit(130)
    """
    env = dict(TRT_WORLD_SIZE="2", TRT_NCCL_ID_FILE=str(tmp_path / "id"))
    procs = [_start(script, TRT_MY_RANK=str(r), **env) for r in (0, 1)]
    try:
        elapsed, out, err = _interrupt_when_ready(procs[0], settle=2.0)
        assert procs[0].returncode == 130 and "KeyboardInterrupt" in out, out + err
        assert elapsed < 3.0, f"took {elapsed:.1f} s to answer SIGINT"
    finally:
        procs[1].kill()
        procs[1].communicate()


@pytest.mark.multi_gpu
def test_sample_answers_sigint_and_sigterm(tmp_path):
    import shutil

    program = os.environ.get("MDTRT_SAMPLE_DIST_COLLECTIVE") or shutil.which("sample_dist_collective")
    if not program:
        pytest.skip("sample_dist_collective is not built (pip install . puts it on PATH)")
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        id_file = tmp_path / f"id_{sig}"
        env = dict(os.environ, TRT_MY_RANK="0", TRT_WORLD_SIZE="2", TRT_NCCL_ID_FILE=str(id_file),
                   NCCL_NVLS_ENABLE="0")
        proc = subprocess.Popen([program, "--op", "all_reduce", "--backend", "nccl", "--timeout", "120"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not id_file.exists() and time.monotonic() < deadline:  # rank 0 is now waiting for rank 1
            time.sleep(0.1)
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == code, out + err
        assert "stopped by" in err and time.monotonic() - sent < 3.0, out + err
