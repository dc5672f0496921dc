"""EngineRunner's diagnostics read from one thread while another thread's calls run (one GPU)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import mdtrt
from mdtrt import _core

pytestmark = pytest.mark.gpu


def test_diagnostics_read_during_calls_on_another_thread():
    """graph_captures, graph_fallback and last_replication are read in a loop while the main
    thread runs captured all_reduce calls: every read returns a value the runner can have (the
    capture count only grows), no read hangs, and the calls' results stay right."""
    with mdtrt.DeviceGroup([0], timeout=60) as group:
        program = _core.CollectiveProgram("all_reduce", "sum", 0, [], "float32", group.world_size, 1)
        runner = mdtrt.EngineRunner(group, program=program, cuda_graph=True)
        stop = threading.Event()
        seen, errors = [], []

        def read():
            try:
                while not stop.is_set():
                    seen.append(tuple(runner.graph_captures))
                    assert runner.graph_fallback == ""
                    assert runner.last_replication in ("host", "peer", "broadcast")
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        rng = np.random.default_rng(5)
        x = np.empty((1024, 4), np.float32)
        try:
            for _ in range(200):
                x[...] = rng.standard_normal(x.shape, dtype=np.float32)
                got = runner.infer({"input": x}, poison_outputs=True)["output"]
                np.testing.assert_array_equal(got, x)  # the sum over one rank
        finally:
            stop.set()
            reader.join(timeout=30)
        assert not reader.is_alive(), "a diagnostic read did not return"
        assert not errors, errors
        assert seen, "the reader read nothing"
        counts = [s[0] for s in seen]
        final = runner.graph_captures[0]
        assert counts == sorted(counts) and 0 <= counts[0] and counts[-1] <= final, (counts[0], counts[-1], final)
        assert final >= 1  # the calls were captured (the reads did not switch graphs off)


@pytest.mark.parametrize("mode", ["auto", "host", "peer", "broadcast"])
def test_one_gpu_accepts_every_replication_mode_and_replicates_nothing(mode):
    """With one GPU in the group there is nothing to replicate: every mode is accepted (the same
    code runs on any number of GPUs; "peer" needs no peer access, "broadcast" no other rank), the
    input reaches the rank as given and last_replication says host."""
    with mdtrt.DeviceGroup([0], timeout=60) as group:
        runner = mdtrt.EngineRunner(group, program=_core.testing.CopyProgram("float32"), replication=mode)
        x = np.random.default_rng(7).standard_normal((257, 3)).astype(np.float32)
        out = runner.infer({"input": x}, poison_outputs=True)
        np.testing.assert_array_equal(out["output"], x)
        assert runner.last_replication == "host"
        out = runner.infer({"input": x + 1}, replication=mode, poison_outputs=True)
        np.testing.assert_array_equal(out["output"], x + 1)
