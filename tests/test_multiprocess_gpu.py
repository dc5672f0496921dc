"""One process per GPU, NVIDIA-sample style (TRT_MY_RANK, TRT_WORLD_SIZE, TRT_NCCL_ID_FILE)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from mdtrt import _core

pytestmark = pytest.mark.multi_gpu

WORKER = textwrap.dedent(
    """
    import sys, numpy as np, mdtrt
    try:
        with mdtrt.DeviceGroup.from_env(timeout=float(sys.argv[1])) as group:
            rank, world = group.ranks[0], group.world_size
            rng = np.random.default_rng(1234)
            data = rng.standard_normal((world, 2 * world, 8)).astype(np.float32)
            out = group.all_reduce(data[rank])[0]
            np.testing.assert_allclose(out, data.sum(0), rtol=1e-5, atol=1e-5)
            gathered = group.all_gather(data[rank])[0]
            np.testing.assert_array_equal(gathered, np.concatenate(list(data)))
            scattered = group.scatter(data[rank], root=world - 1)[0]
            chunk = data[world - 1].shape[0] // world
            np.testing.assert_array_equal(scattered, data[world - 1][rank * chunk:(rank + 1) * chunk])
            print(f"rank {rank} OK", flush=True)
    except mdtrt.RankTimeoutError as e:
        print(f"TIMEOUT {e}", flush=True)
        sys.exit(3)
    """
)


def launch(rank, world, id_file, timeout):
    env = dict(os.environ, TRT_MY_RANK=str(rank), TRT_WORLD_SIZE=str(world), TRT_NCCL_ID_FILE=str(id_file),
               NCCL_NVLS_ENABLE="0")
    return subprocess.Popen([sys.executable, "-c", WORKER, str(timeout)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_processes_exchange_the_id_through_a_file(tmp_path):
    world = min(_core.visible_gpu_count(), 4)
    id_file = tmp_path / "nccl_id"
    procs = [launch(r, world, id_file, 60) for r in range(world)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"rank {r} OK" in out


def test_rank_that_never_arrives_times_out_and_exits_cleanly(tmp_path):
    id_file = tmp_path / "nccl_id"
    start = time.monotonic()
    proc = launch(0, 2, id_file, 5)  # rank 1 is never started
    out = proc.communicate(timeout=60)[0]
    elapsed = time.monotonic() - start
    assert proc.returncode == 3, out
    assert "TIMEOUT" in out and "rank(s) 0 of 2" in out, out
    assert elapsed < 30, f"took {elapsed:.1f} s for a 5 s deadline"


def test_waiting_rank_without_rank0_times_out(tmp_path):
    proc = launch(1, 2, tmp_path / "nccl_id", 2)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 3, out
    assert "did not publish the NCCL id" in out
