"""The native ``PreparedInfer.addressed`` and the ``AddressedRun`` it makes
(csrc/runtime/program_runner.cpp), for the stub native calls of the fast-path tests on any
machine: what the native refuses before any rank runs, refused the same way (lists that do not
fit together, numbers of addresses other than the call's arrays: InvalidArgumentError in the
native's words; addresses that are no integers: TypeError, as pybind11's conversion); what it
fixes when made (names, sizes, GPUs, stream ordering), copied then, so that a caller changing
its lists afterwards changes nothing, as natively.
tests/test_collective_fast_path_gpu.py checks these words against the native ones."""

from __future__ import annotations

import mdtrt


_RANKS_RUNNING = [False]  # an addressed run's while_ranks_run is running now


def ranks_running() -> bool:
    """Whether a stub addressed run is inside its ``while_ranks_run`` now (where a one-shot call
    allocates the next call's outputs: tests tell a spare's allocation from the call's own)."""
    return _RANKS_RUNNING[0]


def addressed_run(run_flat, input_counts, names, nbytes, devices, stream_ordered=False):
    """As ``PreparedInfer.addressed(names, nbytes, devices, stream_ordered)`` of a call with
    ``input_counts[i]`` inputs on local rank i.

    Parameters
    ----------
    run_flat : callable
        ``run_flat(pointers, streams, names, nbytes, devices, stream_ordered)``: what a run that
        passed the checks does (the stub records it). Called through at each run, so that a test
        patching the stub's method afterwards is followed.
    input_counts : sequence of int
        The call's inputs per local rank.
    names, nbytes, devices, stream_ordered
        As the native ``addressed`` takes them.

    Returns
    -------
    callable
        ``run(pointers, streams, while_ranks_run=None)``, as the native ``AddressedRun``; it calls
        ``while_ranks_run`` after its checks, before ``run_flat`` (whose checks stand for the
        ranks'), as the native run calls it while its ranks check the call, none launching
        before it returned. What escapes it is raised and ``run_flat`` is not called, as natively
        no rank launches then (natively a rank's failed check, which the stub does not stand for
        here, becomes its ``__context__``).

    Raises
    ------
    mdtrt.InvalidArgumentError
        No names, or not one size and one GPU per output and rank.
    """
    n, m = len(input_counts), len(names)
    if m == 0 or len(nbytes) != n * m or len(devices) != n * m:
        raise mdtrt.InvalidArgumentError(
            f"a run with every output given takes the output names and, for each of the {n} local ranks, each "
            f"output's size and GPU: got {m} names, {len(nbytes)} sizes and {len(devices)} devices")
    names, nbytes, devices, stream_ordered = tuple(names), list(nbytes), list(devices), bool(stream_ordered)
    inputs, outputs = sum(input_counts), n * m

    def run(pointers, streams, while_ranks_run=None):
        for value in [*pointers, *streams]:
            if type(value) is not int or value < 0:  # pybind11's conversion to uintptr_t
                raise TypeError(f"an addressed run takes addresses and streams as integers, got {value!r}")
        if len(pointers) != inputs + outputs or len(streams) != len(pointers):
            raise mdtrt.InvalidArgumentError(
                f"this call takes {inputs} input and {outputs} output addresses, each with a stream: got "
                f"{len(pointers)} pointers and {len(streams)} streams")
        if while_ranks_run is not None:  # natively once the ranks have the call, before any launches
            _RANKS_RUNNING[0] = True
            try:
                while_ranks_run()  # what escapes: natively no rank launches, and it is raised
            finally:
                _RANKS_RUNNING[0] = False
        run_flat(list(pointers), list(streams), names, nbytes, devices, stream_ordered)  # returns None, as natively

    return run
