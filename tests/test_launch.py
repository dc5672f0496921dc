"""Launcher detection and NCCL id exchange through a file (no GPU needed)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import mdtrt
from mdtrt import _core
from mdtrt.launch import LaunchInfo, choose_device, detect_launch, exchange_unique_id, release_id_file


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
        # MPICH and Intel MPI (Hydra), MVAPICH, with local ranks where they give them.
        ({"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
         LaunchInfo(1, 4, 1, "MPICH/Intel MPI", 2)),
        ({"PMI_RANK": "3", "PMI_SIZE": "4"}, LaunchInfo(3, 4, None, "MPICH/Intel MPI")),
        ({"MV2_COMM_WORLD_RANK": "2", "MV2_COMM_WORLD_SIZE": "3", "MV2_COMM_WORLD_LOCAL_RANK": "0"},
         LaunchInfo(2, 3, 0, "MVAPICH")),
        # torchrun inside an srun task: SLURM says rank 0 of 1 task, torchrun started the worker.
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0",
          "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "abc",
          "TORCHELASTIC_RESTART_COUNT": "1"},
         LaunchInfo(3, 4, 3, "torchrun", 4, "abc.1")),
        # mpirun inside an sbatch script: the batch step's SLURM variables are stale in every rank.
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
          "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
         LaunchInfo(1, 2, 1, "Open MPI", 2)),
        # Two MPI launchers' variables that agree (MVAPICH also exports PMI's): no contradiction.
        ({"PMI_RANK": "1", "PMI_SIZE": "2", "MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2"},
         LaunchInfo(1, 2, None, "MPICH/Intel MPI")),
        # A partial launcher beside a complete one: the complete one is used.
        ({"SLURM_PROCID": "0", "PMI_RANK": "0", "PMI_SIZE": "2"}, LaunchInfo(0, 2, None, "MPICH/Intel MPI")),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9", "SLURM_STEP_ID": "3"},
         LaunchInfo(1, 2, None, "SLURM", None, "9.3")),
        ({}, None),
    ],
)
def test_detect_launch(env, expected):
    assert detect_launch(env) == expected


def test_contradicting_launchers_are_named():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "PMI_RANK": "1", "PMI_SIZE": "4"}
    with pytest.raises(mdtrt.InvalidArgumentError, match="Open MPI.*OMPI_COMM_WORLD_RANK=0.*MPICH/Intel MPI.*PMI_RANK=1"):
        detect_launch(env)


@pytest.mark.parametrize("env,missing", [
    ({"RANK": "1"}, "WORLD_SIZE"), ({"WORLD_SIZE": "2"}, "RANK"), ({"PMI_RANK": "0"}, "PMI_SIZE"),
    ({"SLURM_PROCID": "0"}, "SLURM_NTASKS"), ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK"),
])
def test_half_a_launcher_names_the_missing_variable(env, missing):
    with pytest.raises(mdtrt.InvalidArgumentError, match=f"but {missing} is not"):
        detect_launch(env)


def test_from_env_with_only_rank_names_world_size(monkeypatch):
    for var in [v for v in os.environ if v.startswith(("TRT_", "OMPI_", "PMI_", "MV2_", "SLURM_"))]:
        monkeypatch.delenv(var)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(mdtrt.InvalidArgumentError, match="RANK is set but WORLD_SIZE is not"):
        mdtrt.DeviceGroup.from_env()


@pytest.mark.parametrize("info,visible,gpu,expected", [
    # One GPU per process (per-rank CUDA_VISIBLE_DEVICES, --gpus-per-task=1): always device 0.
    (LaunchInfo(1, 2, 1, "SLURM"), 1, None, 0),
    (LaunchInfo(3, 4, None, "TRT_MY_RANK/TRT_WORLD_SIZE"), 1, None, 0),
    (LaunchInfo(3, 4, 1, "Open MPI", 2), 2, None, 1),
    (LaunchInfo(5, 8, None, "MPICH/Intel MPI"), 4, None, 1),
    (LaunchInfo(1, 2, 1, "torchrun", 2), 2, 0, 0),
])
def test_device_choice(info, visible, gpu, expected):
    assert choose_device(info, visible, gpu) == expected


@pytest.mark.parametrize("info,visible,gpu,match", [
    # Four ranks on this host and two GPUs each: rank 0 and 1 alone could start, so every rank refuses.
    (LaunchInfo(0, 4, 0, "Open MPI", 4), 2, None, "starts 4 ranks on this host but this process sees 2"),
    (LaunchInfo(2, 4, 2, "SLURM"), 2, None, "local rank 2 of this host but this process sees 2"),
    (LaunchInfo(0, 2, 0, "torchrun"), 2, 2, "gpu=2 is not a visible device"),
])
def test_device_layouts_that_cannot_work_are_refused(info, visible, gpu, match):
    with pytest.raises(mdtrt.InvalidArgumentError, match=match):
        choose_device(info, visible, gpu)


def test_a_rank_that_sees_no_gpu_gets_a_cuda_error():
    with pytest.raises(mdtrt.CudaError, match="no CUDA GPU is visible to rank 1: .*mdtrt doctor"):
        choose_device(LaunchInfo(1, 2, 1, "torchrun"), 0, None)


def test_torchrun_without_torch_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(mdtrt.InvalidArgumentError, match="torch is not installed.*pip install torch.*TRT_NCCL_ID_FILE"):
        exchange_unique_id(LaunchInfo(0, 2, 0, "torchrun"), timeout=1, env={"RANK": "0", "WORLD_SIZE": "2"})


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
    first, record = text.splitlines()  # the id, then who wrote it for which run
    assert len(first) == 256 and bytes.fromhex(first) == got[0]
    assert f"pid={os.getpid()} " in record
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]  # written through a renamed temp file


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def _stale_file(path, pid: int, run: str = "") -> bytes:
    """An id file as an earlier run's rank 0 left it; returns its id."""
    stale = bytes(range(128))
    path.write_text(f"{stale.hex()}\nrun={run} host={socket.gethostname()} pid={pid} start=1\n")
    return stale


READER = textwrap.dedent(
    """
    import sys, time, mdtrt
    from mdtrt import _core
    mdtrt.nccl_library()
    start = time.monotonic()
    uid = _core.exchange_unique_id_via_file(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
    print(uid.hex(), f"{time.monotonic() - start:.2f}", flush=True)
    """
)


def _reader(path, rank=1, timeout=20.0, run=""):
    return subprocess.Popen([sys.executable, "-c", READER, str(path), str(rank), str(timeout), run],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, NCCL_NVLS_ENABLE="0"))


@pytest.mark.parametrize("kind", ["exited-rank0", "no-record", "other-run-id"])
def test_stale_id_file_is_never_used(tmp_path, kind):
    # Rank 1 starts first and finds an earlier run's file; rank 0 starts a second later. Rank 1
    # must get rank 0's new id, never the stale one.
    path = tmp_path / "nccl_id"
    if kind == "no-record":  # NVIDIA's sample and older mdtrt wrote the id alone
        stale = bytes(range(128))
        path.write_text(stale.hex())
    else:
        stale = _stale_file(path, _dead_pid() if kind == "exited-rank0" else os.getpid(),
                            run="job1" if kind == "other-run-id" else "")
    reader = _reader(path, run="job2" if kind == "other-run-id" else "")
    time.sleep(1.0)
    assert reader.poll() is None, reader.communicate()  # still waiting: it did not take the stale id
    mdtrt.nccl_library()
    fresh = _core.exchange_unique_id_via_file(str(path), 0, 5.0, "job2" if kind == "other-run-id" else "")
    out, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    got = bytes.fromhex(out.split()[0])
    assert got == fresh != stale


def test_waiting_rank_names_the_stale_file(tmp_path):
    path = tmp_path / "nccl_id"
    _stale_file(path, _dead_pid())
    with pytest.raises(mdtrt.RankTimeoutError, match="from an earlier run: .*which has exited"):
        _core.exchange_unique_id_via_file(str(path), 1, 0.5)


def test_rank0_replaces_a_stale_file_and_refuses_a_live_one(tmp_path):
    mdtrt.nccl_library()
    path = tmp_path / "nccl_id"
    stale = _stale_file(path, _dead_pid())
    fresh = _core.exchange_unique_id_via_file(str(path), 0, 1.0)
    assert fresh != stale and path.read_text().split()[0] == fresh.hex()
    assert f"pid={os.getpid()} " in path.read_text()
    # A file another live process published: two runs share the path; neither may take it over.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(f"{stale.hex()}\nrun= host={socket.gethostname()} pid={sleeper.pid} "
                        f"start={_start_ticks(sleeper.pid)}\n")
        with pytest.raises(mdtrt.InvalidArgumentError, match=f"process {sleeper.pid}, which is still running"):
            _core.exchange_unique_id_via_file(str(path), 0, 1.0)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_rank0_removes_only_its_own_file(tmp_path):
    mdtrt.nccl_library()
    path = tmp_path / "nccl_id"
    info = LaunchInfo(0, 2, None, "TRT_MY_RANK/TRT_WORLD_SIZE")
    uid = exchange_unique_id(info, timeout=1, id_file=str(path))
    release_id_file(LaunchInfo(1, 2, None, "TRT_MY_RANK/TRT_WORLD_SIZE"), uid, str(path))  # not rank 0: kept
    assert path.exists()
    release_id_file(info, uid, str(path))
    assert not path.exists()
    other = exchange_unique_id(info, timeout=1, id_file=str(path))
    release_id_file(info, uid, str(path))  # another run's id: left alone
    assert path.read_text().split()[0] == other.hex()


def test_waiting_rank_times_out_when_rank0_never_writes(tmp_path):
    with pytest.raises(mdtrt.RankTimeoutError) as info:
        _core.exchange_unique_id_via_file(str(tmp_path / "never"), 1, 0.3)
    assert info.value.rank == 1 and "does not exist" in str(info.value)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", ["directory", "missing folder", "folder is a file"])
def test_unusable_id_file_path_fails_every_rank_at_once(tmp_path, rank, kind):
    """TRT_NCCL_ID_FILE naming a directory, or a file in a folder that does not exist: rank 0
    cannot write there, so no rank waits for the deadline (was: rank 1 waited the whole timeout,
    then said the file "does not exist"); the message says what to name instead."""
    mdtrt.nccl_library()
    (tmp_path / "plain").write_text("x")
    path, expected = {
        "directory": (tmp_path, f"is a directory: name a file in it instead, e.g. {tmp_path}/nccl_id"),
        "missing folder": (tmp_path / "no" / "nccl_id",
                           f"its folder {tmp_path / 'no'} is unusable (No such file or directory); create that folder"),
        "folder is a file": (tmp_path / "plain" / "nccl_id", "is unusable (not a directory)"),
    }[kind]
    expected = re.escape(expected)
    info = LaunchInfo(rank, 2, None, "TRT_MY_RANK/TRT_WORLD_SIZE")
    start = time.monotonic()
    with pytest.raises(mdtrt.InvalidArgumentError, match=f"TRT_NCCL_ID_FILE.*{expected}") as error:
        exchange_unique_id(info, timeout=30, id_file=str(path))
    assert time.monotonic() - start < 5 and error.value.rank == rank
    assert list(tmp_path.iterdir()) == [tmp_path / "plain"]  # nothing written, no temporary file left


def test_waiting_rank_names_the_folder_a_relative_id_file_was_taken_from(tmp_path, monkeypatch):
    """Ranks started in different folders with a relative TRT_NCCL_ID_FILE look at different
    files: the timeout says which file this rank looked at and what to do."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(mdtrt.RankTimeoutError) as info:
        _core.exchange_unique_id_via_file("nccl_id", 1, 0.3)
    assert (f"in nccl_id (a relative path: {tmp_path}/nccl_id for this rank) before the deadline (the file does "
            "not exist). Start rank 0 with the same TRT_NCCL_ID_FILE, as an absolute path or from the same folder"
            ) in str(info.value)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_from_env_refuses_an_unusable_id_file_before_asking_for_a_gpu(tmp_path, monkeypatch, rank):
    """The id file is checked with the launcher's other variables, before any GPU is asked for:
    on a machine without GPUs too, the error is the id file's (was: no GPU, then on a GPU machine
    rank 1 waited the whole timeout)."""
    _only(monkeypatch, TRT_MY_RANK=rank, TRT_WORLD_SIZE="2", TRT_NCCL_ID_FILE=str(tmp_path))
    monkeypatch.setattr(_core, "visible_gpu_count", lambda: pytest.fail("asked for a GPU first"))
    with pytest.raises(mdtrt.InvalidArgumentError, match=f"the NCCL id file {tmp_path} \\(TRT_NCCL_ID_FILE\\) is a "
                                                          "directory") as error:
        mdtrt.DeviceGroup.from_env(timeout=30)
    assert error.value.rank == int(rank)


def test_rank0_write_failure_gives_the_systems_reason():
    """A folder that exists but takes no files (/proc): the error carries the system's reason."""
    mdtrt.nccl_library()
    with pytest.raises(mdtrt.MdtrtError, match=r"cannot create a temporary file next to /proc/mdtrt_nccl_id: \w"):
        _core.exchange_unique_id_via_file("/proc/mdtrt_nccl_id", 0, 1.0)


def test_malformed_id_file_is_an_error(tmp_path):
    path = tmp_path / "nccl_id"
    # Published by a live rank 0 of this run (this process), but not hex.
    path.write_text("zz" * 128 + f"\nrun= host={socket.gethostname()} pid={os.getpid()} start={_start_ticks(os.getpid())}\n")
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


def test_half_of_nvidias_variables_names_the_missing_one_in_words():
    with pytest.raises(mdtrt.InvalidArgumentError,
                       match=r"TRT_MY_RANK is set but TRT_WORLD_SIZE is not: set TRT_WORLD_SIZE \(the number of ranks\)"):
        detect_launch({"TRT_MY_RANK": "0"})
    with pytest.raises(mdtrt.InvalidArgumentError, match=r"set TRT_MY_RANK \(this process's rank\) too"):
        detect_launch({"TRT_WORLD_SIZE": "2"})


def _only(monkeypatch, **env):
    for var in [v for v in os.environ if v.startswith(("TRT_", "OMPI_", "PMI_", "MV2_", "SLURM_", "MPI_"))
                or v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")]:
        monkeypatch.delenv(var)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_from_env_without_an_id_file_is_refused_before_any_gpu_is_looked_for(monkeypatch):
    # As NVIDIA's sample (exit 2 before CUDA): a setting error, on any machine, GPU or not.
    _only(monkeypatch, TRT_MY_RANK="0", TRT_WORLD_SIZE="2")
    monkeypatch.setattr(_core, "visible_gpu_count", lambda: pytest.fail("looked for GPUs"))
    with pytest.raises(mdtrt.InvalidArgumentError,
                       match="TRT_MY_RANK and TRT_WORLD_SIZE are set but TRT_NCCL_ID_FILE is not: set it to a path"):
        mdtrt.DeviceGroup.from_env()


def test_from_env_under_slurm_without_mpi4py_or_id_file_is_refused_first(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpi4py(name, *args, **kwargs):
        if name == "mpi4py" or name.startswith("mpi4py."):
            raise ImportError("No module named 'mpi4py'")
        return real_import(name, *args, **kwargs)

    _only(monkeypatch, SLURM_PROCID="0", SLURM_NTASKS="2")
    monkeypatch.setattr(builtins, "__import__", no_mpi4py)
    monkeypatch.setattr(_core, "visible_gpu_count", lambda: pytest.fail("looked for GPUs"))
    with pytest.raises(mdtrt.InvalidArgumentError, match="launched by SLURM but there is no way to share the NCCL id"):
        mdtrt.DeviceGroup.from_env()


class _FakeMpiWorld:
    """mpi4py's Ibcast/Test for ranks that are threads: a broadcast completes once the root posted."""

    def __init__(self):
        self.posted = {}  # broadcast index -> root's bytes
        self.lock = threading.Lock()

    def comm(self, rank: int, root_posts: bool = True):
        world = self

        class Comm:
            count = 0

            def Get_rank(self):
                return rank

            def Ibcast(self, buffer, root=0):
                index, Comm.count = Comm.count, Comm.count + 1

                class Request:
                    def Test(self):
                        with world.lock:
                            if rank == root:
                                if root_posts:
                                    world.posted[index] = bytes(buffer)
                                return root_posts
                            if index not in world.posted:
                                return False
                            np.frombuffer(buffer, dtype=np.uint8)[:] = np.frombuffer(world.posted[index], np.uint8)
                            return True

                return Request()

        return Comm()


def test_mpi_broadcast_hands_rank_0s_bytes_to_every_rank():
    from mdtrt.launch import broadcast_through_mpi

    world, payload, results, made = _FakeMpiWorld(), os.urandom(10_000) + b"\0" * 7, {}, []

    def rank(r):
        def produce():
            made.append(r)
            return payload
        results[r] = broadcast_through_mpi(produce, timeout=10, what="the test bytes", call="test", comm=world.comm(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert made == [0] and results == {0: payload, 1: payload, 2: payload}


def test_mpi_broadcast_waiting_for_a_rank_0_that_never_shares_ends_at_the_deadline():
    from mdtrt.launch import broadcast_through_mpi

    world = _FakeMpiWorld()
    start = time.monotonic()
    with pytest.raises(mdtrt.RankTimeoutError, match="rank 0 did not share the NCCL id through MPI within 0.3 s") as info:
        broadcast_through_mpi(lambda: b"never", timeout=0.3, what="the NCCL id", call="read NCCL id", comm=world.comm(1))
    assert time.monotonic() - start < 5 and info.value.rank == 1 and info.value.call == "read NCCL id"
