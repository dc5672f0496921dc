"""build_once: under a launcher rank 0 builds, the other ranks receive its plan (issue 15, item 8).

The file channel runs here with threads standing in for ranks (no GPU, no NCCL: the id file is
written as rank 0's id exchange writes it); mpi4py and torch.distributed are not installed here.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

import mdtrt
from mdtrt.launch import LaunchInfo
from mdtrt.plan_sharing import build_once

LAUNCHER = "TRT_MY_RANK/TRT_WORLD_SIZE"


def write_id_file(path, seed: int) -> bytes:
    uid = bytes((seed + i) % 256 for i in range(128))
    with open(path, "w") as f:
        f.write(uid.hex())
    return uid


def run_ranks(world, build_for_rank, id_file, timeout=20.0):
    """Calls build_once on `world` threads; returns ({rank: plan or exception}, {rank: build calls})."""
    results, calls = {}, {r: 0 for r in range(world)}

    def rank(r):
        def build():
            calls[r] += 1
            return build_for_rank(r)

        try:
            results[r] = build_once(build, LaunchInfo(r, world, r, LAUNCHER), timeout=timeout, id_file=str(id_file))
        except Exception as error:  # noqa: BLE001 - handed to the test
            results[r] = error

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return results, calls


def test_rank_0_builds_once_and_every_rank_gets_its_plan(tmp_path):
    id_file = tmp_path / "nccl_id"
    write_id_file(id_file, 7)
    plan = os.urandom(1 << 16) + b"\x00" * 100  # binary, with zero bytes

    def build(r):
        if r != 0:
            raise AssertionError("only rank 0 builds")
        time.sleep(0.5)  # the others are waiting meanwhile
        return plan

    results, calls = run_ranks(3, build, id_file)
    assert calls == {0: 1, 1: 0, 2: 0}
    assert all(results[r] == plan for r in range(3)), {r: type(v) for r, v in results.items()}


def test_a_plan_left_by_an_earlier_run_is_never_read(tmp_path):
    id_file = tmp_path / "nccl_id"
    old_id = write_id_file(id_file, 1)
    from mdtrt import _core

    _core.publish_shared_bytes(f"{id_file}.engine.plan", old_id, b"stale plan of the earlier run")
    write_id_file(id_file, 2)  # this run's id
    results, calls = run_ranks(2, lambda r: (time.sleep(0.3), b"this run's plan")[1], id_file)
    assert results == {0: b"this run's plan", 1: b"this run's plan"}


def test_waiting_rank_times_out_naming_the_plan_when_rank_0_never_shares(tmp_path):
    id_file = tmp_path / "nccl_id"
    write_id_file(id_file, 3)
    start = time.monotonic()
    with pytest.raises(mdtrt.RankTimeoutError) as info:
        build_once(lambda: b"never called", LaunchInfo(1, 2, 1, LAUNCHER), timeout=0.5, id_file=str(id_file))
    assert time.monotonic() - start < 5
    assert info.value.rank == 1 and "did not share the plan 'engine'" in str(info.value)


def test_without_an_id_file_of_this_run_it_says_to_create_the_group_first(tmp_path):
    with pytest.raises(mdtrt.RankTimeoutError, match="DeviceGroup.from_env"):
        build_once(lambda: b"plan", LaunchInfo(0, 2, 0, LAUNCHER), timeout=0.2, id_file=str(tmp_path / "missing"))


def test_outside_a_launcher_it_just_builds(monkeypatch):
    assert build_once(lambda: bytearray(b"plan"), None, env={}) == b"plan"
    assert build_once(lambda: b"plan", LaunchInfo(0, 1, 0, LAUNCHER), env={}) == b"plan"
    with pytest.raises(mdtrt.InvalidArgumentError, match="empty plan"):
        build_once(lambda: b"", None, env={})


def test_no_channel_is_explained(tmp_path):
    with pytest.raises(mdtrt.InvalidArgumentError, match="TRT_NCCL_ID_FILE"):
        build_once(lambda: b"plan", LaunchInfo(0, 2, 0, LAUNCHER), env={})
