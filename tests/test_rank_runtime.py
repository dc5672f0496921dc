"""The rank runtime on any machine: CPU-only rank threads running test programs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import pytest

import mdtrt
from mdtrt import _core


def thread_count() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads: line in /proc/self/status")


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_concurrent_bind_through_barrier(ranks):
    # Every rank waits in bind() until all ranks arrived: only a concurrent bind can finish (binds
    # one after another would end in a RankTimeoutError at the deadline, as the next test shows).
    _core.testing.run_bind_test(ranks, "barrier", sequential=False, timeout=10.0)


def test_sequential_bind_deadlock_becomes_timeout_error():
    start = time.monotonic()
    with pytest.raises(mdtrt.RankTimeoutError) as info:
        _core.testing.run_bind_test(4, "barrier", sequential=True, timeout=0.5)
    elapsed = time.monotonic() - start
    assert elapsed < 5.0, f"the deadline of 0.5 s took {elapsed:.1f} s to fire"
    message = str(info.value)
    assert "rank(s) 0 did not finish 'bind'" in message
    assert "rank(s) 1, 2, 3 never started it" in message
    assert "one after another" in message
    assert info.value.call == "bind"
    assert isinstance(info.value, TimeoutError)


@pytest.mark.parametrize("fail_rank", [0, 2, 3])
def test_exception_carries_its_rank(fail_rank):
    with pytest.raises(mdtrt.MdtrtError) as info:
        _core.testing.run_bind_test(4, "fail", timeout=5.0, fail_rank=fail_rank)
    assert info.value.rank == fail_rank
    assert info.value.call == "bind"
    assert str(info.value).startswith(f"rank {fail_rank}: bind: injected failure")


def test_create_destroy_cycles_leave_no_threads():
    _core.testing.run_bind_test(4, "barrier", timeout=5.0)  # warm up whatever the process creates once
    before = thread_count()
    for _ in range(200):
        _core.testing.run_bind_test(4, "barrier", timeout=5.0)
    assert thread_count() == before


def test_timed_out_runtime_threads_are_released():
    before = thread_count()
    for _ in range(3):
        with pytest.raises(mdtrt.RankTimeoutError):
            _core.testing.run_bind_test(2, "barrier", sequential=True, timeout=0.2)
    # The aborted barrier releases the waiting rank, so its thread is joined, not abandoned.
    assert thread_count() == before


def test_unknown_test_program_is_rejected():
    with pytest.raises(mdtrt.InvalidArgumentError, match="unknown test program nope"):
        _core.testing.run_bind_test(2, "nope")


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_every_rank_launches_after_every_check_passed(ranks):
    launched, error = _core.testing.run_checked_launch_test(ranks)
    assert error == "" and launched == [True] * ranks


@pytest.mark.parametrize("fail_rank", [0, 1, 3])
def test_one_rank_failing_its_checks_stops_every_launch_at_once(fail_rank):
    """Validate before enqueue: one rank's bad argument fails the call with that rank's error, well
    inside the deadline, and no rank launched anything (no NCCL kernel left waiting for it)."""
    start = time.monotonic()
    launched, error = _core.testing.run_checked_launch_test(4, fail_rank, timeout=20.0)
    assert time.monotonic() - start < 2.0
    assert launched == [False] * 4
    assert error.startswith(f"rank {fail_rank}: ") and "injected bad argument" in error


@pytest.mark.parametrize("throws", [False, True])
def test_the_callers_own_work_runs_while_its_ranks_run(throws):
    """while_ranks_run (where a one-shot call allocates the next call's outputs) runs while the
    ranks check (each rank's check waits for it to start: a caller that waited for the ranks first
    would leave them unreleased), and no rank launches before it returned (an allocation there may
    synchronize GPUs, which must not come between two ranks' NCCL launches). When it throws (Ctrl-C
    there), no rank launches: none may then wait for a peer that never comes."""
    for ranks in (1, 3):
        ran_while_ranks_ran, launched, error = _core.testing.run_while_ranks_run_test(ranks, throws)
        assert ran_while_ranks_ran
        if throws:  # the caller wants out (Ctrl-C there): no rank launches, and the call says why
            assert (launched, error) == (0, "the caller's own work failed")
        else:
            assert (launched, error) == (ranks, "")


@pytest.mark.parametrize("fail_check", [False, True])
def test_an_error_escaping_the_callers_own_work_cancels_the_call_and_is_never_lost(fail_check):
    """What AddressedRun.__call__ does with its while_ranks_run (bindings/while_ranks_run.h, the
    binding's own code): the callback runs with the GIL while the ranks run; an error escaping it
    (KeyboardInterrupt: Ctrl-C while it ran) lets the ranks go without launching, and is raised
    once they returned, also when the call failed too (rank 0's checks here), with the call's error
    as its context, not dropped for it."""
    ran, launches = [], []

    def callback():
        ran.append(threading.get_ident())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as raised:
        _core.testing.run_calling_back_test(2, fail_check, callback, launches)
    assert ran == [threading.get_ident()]  # once, on the calling thread
    assert launches == [0]
    context = raised.value.__context__
    if fail_check:
        assert isinstance(context, mdtrt.InvalidArgumentError) and "injected bad argument" in str(context)
    else:
        assert context is None
    with pytest.raises(mdtrt.InvalidArgumentError, match="injected bad argument") if fail_check else nullcontext():
        _core.testing.run_calling_back_test(2, fail_check, lambda: ran.append(None), launches)  # nothing escaping it
    assert ran[-1] is None and launches == [0, 0 if fail_check else 2]


@pytest.mark.parametrize("how, by_failure", [("close", False), ("abort", True), ("abort, then close", True),
                                             ("close, then abort", False)])
def test_only_a_failure_not_a_close_leaves_a_failed_runs_arrays_in_use(how, by_failure):
    """A run that raised keeps its arrays forever only when work of it may still run
    (PreparedInfer.arrays_may_be_in_use): when the group broke by a failure or an abort, not when
    it was only closed (a run refused for that queued nothing; holding its arrays would leak them
    on every call after close()). The first cause decides."""
    assert _core.testing.broken_by_failure_test(2, how) is by_failure


def test_a_step_of_the_group_inside_its_own_while_ranks_run_fails_instead_of_waiting_forever():
    """Garbage collection inside while_ranks_run may run a finalizer that calls into the same group
    (a step, or close()) on the thread that holds the group's locks: it fails with a clear error,
    where taking them again would hang with no deadline and no Ctrl-C; also after a call of
    another group, with a callback of its own, ran there, and from inside that callback (the thread
    still holds this group's locks there). In a subprocess: a hang fails the test at its timeout
    instead of hanging the suite."""
    code = ("from mdtrt import _core; import json; "
            "print(json.dumps(_core.testing.run_reentering_test(2)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    nested, other, reentered, closed, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert other == ""  # another group's call (its own callback too) runs from there
    for error, what in ((nested, "nested"), (reentered, "reentered"), (closed, "close")):
        assert what in error and "would wait for itself forever" in error
    assert after == ""


def test_a_rank_stuck_in_its_checks_ends_at_the_deadline_without_launches():
    start = time.monotonic()
    launched, error = _core.testing.run_checked_launch_test(3, 1, slow_check_seconds=1.0, timeout=0.3)
    assert time.monotonic() - start < 5.0
    assert "did not finish 'infer'" in error
    assert launched == [False] * 3  # the late rank arrives after the others gave up: it launches nothing


def _run_with_env(env_value: str, code: str, name: str = "MDTRT_RANK_POLL_US"):
    import os
    import subprocess
    import sys

    env = dict(os.environ, **{name: env_value})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name, value, ranks", [("MDTRT_RANK_POLL_US", "50", 4), ("MDTRT_RANK_SPIN_US", "100000", 2)])
def test_polling_and_spinning_rank_threads_run_calls(name, value, ranks):
    """Rank threads that poll (MDTRT_RANK_POLL_US > 0, the default where the host has cores for
    every rank) or spin (MDTRT_RANK_SPIN_US) between calls run every call of many runtimes made and
    destroyed one after another. (That destroying one does not wait for its idle threads is checked
    without timing by the next test.)"""
    code = (
        "from mdtrt import _core\n"
        f"for _ in range(40):\n"
        f"    launched, error = _core.testing.run_checked_launch_test({ranks})\n"
        f"    assert error == '' and launched == [True] * {ranks}, (launched, error)\n"
        "print('OK')\n")
    result = _run_with_env(value, code, name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK", result.stdout


@pytest.mark.parametrize("spin_us, poll_us", [(60_000_000, 0), (0, 60_000_000)], ids=["spinning", "polling"])
def test_an_idle_rank_thread_is_stopped_not_waited_for(spin_us, poll_us):
    """A rank worker destroyed while its thread idles, spinning or waking every interval, stops that
    thread at once. Here each idle phase would last a minute: a destructor that waited for it would
    run the subprocess past its 30 s deadline three times over (a deadline, not a measured time)."""
    import os
    import subprocess
    import sys

    code = ("from mdtrt import _core\n"
            f"for _ in range(3):\n"
            f"    _core.testing.stop_idle_worker({spin_us}, {poll_us})\n"
            "print('OK')\n")
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NCCL_NVLS_ENABLE="0"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stdout + result.stderr


@pytest.mark.parametrize("local_ranks", [1, 2, 8, "all"])
def test_rank_threads_spin_by_default_only_with_cores_for_every_rank(local_ranks, monkeypatch):
    """The default spin (2000 us) and poll (100 us) need 2 x (ranks + 1) hardware threads; on a
    smaller host the rank threads would take the cores that do the work."""
    import os

    from mdtrt import _core

    for name in ("MDTRT_RANK_SPIN_US", "MDTRT_RANK_POLL_US"):
        monkeypatch.delenv(name, raising=False)
    ranks = os.cpu_count() if local_ranks == "all" else local_ranks
    settings = _core.rank_runtime_settings(ranks)
    spins = os.cpu_count() >= 2 * (ranks + 1)
    assert (settings["spin_us"], settings["poll_us"]) == ((2000, 100) if spins else (0, 0)), (settings, os.cpu_count())


@pytest.mark.parametrize("name", ["MDTRT_RANK_POLL_US", "MDTRT_RANK_SPIN_US"])
@pytest.mark.parametrize("value", ["abc", "-1", "100001", "10us", " 50", "+50"])
def test_bad_rank_thread_times_are_a_clear_error(name, value):
    code = ("import mdtrt\n"
            "from mdtrt import _core\n"
            "try:\n"
            "    _core.testing.run_checked_launch_test(2)\n"
            "except mdtrt.InvalidArgumentError as e:\n"
            "    print(e)\n")
    result = _run_with_env(value, code, name)
    assert result.returncode == 0, result.stderr
    assert name in result.stdout and repr(value)[1:-1] in result.stdout, result.stdout


_LAUNCH_OR_PRINT_ERROR = ("import mdtrt\n"
                          "from mdtrt import _core\n"
                          "try:\n"
                          "    launched, error = _core.testing.run_checked_launch_test(2)\n"
                          "    print('ran', launched, error)\n"
                          "except mdtrt.InvalidArgumentError as e:\n"
                          "    print(e)\n")


@pytest.mark.parametrize("value", ["High", "low", "1", "highest"])
def test_bad_stream_priority_is_a_clear_error(value):
    result = _run_with_env(value, _LAUNCH_OR_PRINT_ERROR, name="MDTRT_STREAM_PRIORITY")
    assert result.returncode == 0, result.stderr
    assert "MDTRT_STREAM_PRIORITY" in result.stdout and f"'{value}'" in result.stdout, result.stdout
    assert "'high' or 'normal'" in result.stdout, result.stdout


@pytest.mark.parametrize("value", ["high", "normal", ""])
def test_stream_priority_values_are_accepted(value):
    result = _run_with_env(value, _LAUNCH_OR_PRINT_ERROR, name="MDTRT_STREAM_PRIORITY")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ran [True, True] "), result.stdout


_ABANDONED_RANK = """
import gc, sys, time
from mdtrt import _core

step = sys.argv[1]
# Rank 0's task sleeps 1.5 s ignoring the abort: the step times out at 0.2 s, gives rank 0 up after a
# 0.1 s grace and throws; the runtime (and for bind, the programs) go; rank 0's task returns ~1.2 s
# later into its state.
start = time.monotonic()
error = _core.testing.run_abandoned_rank_test(3, 0, 1.5, 0.2, 0.1, step)
elapsed = time.monotonic() - start
print("error:", error)
print(f"returned after {elapsed:.2f} s")
assert elapsed < 1.0, elapsed
what = "infer" if step == "launch" else "bind"
assert f"did not finish '{what}'" in error and "abandoned" in error, error
assert _core.testing.abandoned_rank_report() == (0, 0)
# Churn the heap meanwhile: memory freed with the caller's frame or the runtime is reused.
junk = []
deadline = time.monotonic() + 3.0
while _core.testing.abandoned_rank_report()[0] == 0 and time.monotonic() < deadline:
    junk.append([bytearray(64) for _ in range(1000)])
    launched, err = _core.testing.run_checked_launch_test(3)
    assert err == "" and launched == [True] * 3, (launched, err)
    if len(junk) > 50:
        junk.clear()
        gc.collect()
returned, intact = _core.testing.abandoned_rank_report()
print("late tasks:", returned, intact)
# The process is healthy after the late task: more calls work.
for _ in range(20):
    launched, err = _core.testing.run_checked_launch_test(3)
    assert err == "" and launched == [True] * 3, (launched, err)
print("OK")
"""


@pytest.mark.parametrize("step", ["launch", "bind"])
def test_a_rank_given_up_on_returns_into_state_it_owns(step):
    """A rank whose task ignores the abort past the grace is given up on: the step (a call's launch,
    or a bind of programs only the caller held) throws at its deadline and the runtime is destroyed
    while the task still runs. When it returns, it writes its result into the state it shares and
    reads its rank context: both must still be there (shared with the task, not owned by the
    caller's frame or the runtime). In a subprocess: the stuck thread stays behind, and a
    use-after-free would take the process down."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    result = subprocess.run([sys.executable, "-c", _ABANDONED_RANK, step], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "late tasks: 1 1" in result.stdout, result.stdout
    assert result.stdout.rstrip().endswith("OK"), result.stdout


def test_aborts_run_at_once():
    """run_concurrently (which aborts the communicators and the programs of a group after a
    deadline or a Ctrl-C, each abort taking a while) runs its steps at once: every step waits for
    all the others to have started, which only steps running at the same time can see (one after
    another, the first would wait out the 30 s alone). A count, not a timing; one step and none work too."""
    from mdtrt import _core

    assert _core.testing.concurrent_meeting(4, 30.0) == 4
    assert _core.testing.concurrent_meeting(1, 30.0) == 1
    assert _core.testing.concurrent_meeting(0, 30.0) == 0
