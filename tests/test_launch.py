"""Launcher detection and NCCL id exchange through a file (no GPU needed)."""

from __future__ import annotations

import os
import threading

import pytest

import mdtrt
from mdtrt import _core
from mdtrt.launch import LaunchInfo, detect_launch, exchange_unique_id


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"TRT_MY_RANK": "1", "TRT_WORLD_SIZE": "2"}, LaunchInfo(1, 2, None, "TRT_MY_RANK/TRT_WORLD_SIZE")),
        ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
         LaunchInfo(3, 4, 1, "Open MPI")),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2"}, LaunchInfo(2, 8, 2, "SLURM")),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, LaunchInfo(0, 2, 0, "torchrun")),
        # NVIDIA's variables win when a launcher's are also set (the sample's srun/mpirun lines).
        ({"TRT_MY_RANK": "0", "TRT_WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
         LaunchInfo(0, 2, None, "TRT_MY_RANK/TRT_WORLD_SIZE")),
        ({}, None),
    ],
)
def test_detect_launch(env, expected):
    assert detect_launch(env) == expected


@pytest.mark.parametrize("env", [{"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}])
def test_bad_launch_environment_is_named(env):
    with pytest.raises(mdtrt.InvalidArgumentError, match="RANK"):
        detect_launch(env)


def test_id_file_exchange_between_ranks(tmp_path):
    mdtrt.nccl_library()
    path = str(tmp_path / "nccl_id")
    got = {}

    def rank(r):
        got[r] = exchange_unique_id(LaunchInfo(r, 3, None, "TRT_MY_RANK/TRT_WORLD_SIZE"), timeout=10, id_file=path)

    readers = [threading.Thread(target=rank, args=(r,)) for r in (1, 2)]
    for t in readers:
        t.start()
    rank(0)
    for t in readers:
        t.join(20)
    assert len(got[0]) == 128 and got[0] == got[1] == got[2]
    with open(path) as f:
        text = f.read()
    assert len(text) == 256 and bytes.fromhex(text) == got[0]
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]  # written through a renamed temp file


def test_stale_id_file_is_refused(tmp_path):
    mdtrt.nccl_library()
    path = tmp_path / "nccl_id"
    path.write_text("ab" * 128)
    with pytest.raises(mdtrt.InvalidArgumentError, match="rm -f"):
        _core.exchange_unique_id_via_file(str(path), 0, 1.0)


def test_waiting_rank_times_out_when_rank0_never_writes(tmp_path):
    with pytest.raises(mdtrt.RankTimeoutError) as info:
        _core.exchange_unique_id_via_file(str(tmp_path / "never"), 1, 0.3)
    assert info.value.rank == 1 and "does not exist" in str(info.value)


def test_malformed_id_file_is_an_error(tmp_path):
    path = tmp_path / "nccl_id"
    path.write_text("zz" * 128)
    with pytest.raises(mdtrt.InvalidArgumentError, match="hex"):
        _core.exchange_unique_id_via_file(str(path), 1, 1.0)


def test_no_way_to_share_the_id_is_explained(monkeypatch):
    monkeypatch.delenv("TRT_NCCL_ID_FILE", raising=False)
    with pytest.raises(mdtrt.InvalidArgumentError, match="TRT_NCCL_ID_FILE"):
        exchange_unique_id(LaunchInfo(0, 2, None, "TRT_MY_RANK/TRT_WORLD_SIZE"), timeout=1, env={})


def test_from_env_without_launcher_says_what_to_do(monkeypatch):
    for var in ("TRT_MY_RANK", "TRT_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID",
                "SLURM_NTASKS", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(mdtrt.InvalidArgumentError, match="launcher"):
        mdtrt.DeviceGroup.from_env()
