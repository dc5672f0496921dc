"""Finding out, under a launcher, which rank this process is, which GPU it runs on, and agreeing
on one NCCL id.

Launchers nest (``torchrun`` inside an ``srun`` task, ``mpirun`` inside an ``sbatch`` script, which
leaves SLURM's variables of the batch step in every MPI process), and each leaves its variables in
the processes it starts. The launcher that started this process is the innermost one, and the
nesting goes one way only: SLURM allocates, MPI launchers and torchrun start processes inside it.
So the tiers below are tried innermost first and the first tier with a complete set of variables
wins:

1. NVIDIA's ``TRT_MY_RANK``/``TRT_WORLD_SIZE``: set by hand for this process, so they win.
2. torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, also set by other Python launchers).
3. MPI: Open MPI (``OMPI_COMM_WORLD_*``), MPICH and Intel MPI (Hydra's ``PMI_RANK``/``PMI_SIZE``,
   ``MPI_LOCALRANKID``), MVAPICH (``MV2_COMM_WORLD_*``).
4. SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``).

Two launchers of one tier that disagree (Open MPI's and MPICH's variables naming different ranks)
cannot be told apart: that is an error naming both. A rank variable without its world size (or the
reverse) is an error naming the missing one when no complete launcher is found.

The id travels through a shared file (``TRT_NCCL_ID_FILE``), through mpi4py under MPI, or through
torch.distributed's store under torchrun: no server of our own, and the application's process
groups are never touched.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Mapping

from . import _core
from .cuda_state import no_gpu_error
from .errors import InvalidArgumentError, RankTimeoutError


@dataclasses.dataclass(frozen=True)
class _Launcher:
    name: str
    tier: int
    rank: str
    size: str
    local_rank: str | None = None
    local_size: str | None = None


_LAUNCHERS = (
    _Launcher("TRT_MY_RANK/TRT_WORLD_SIZE", 0, "TRT_MY_RANK", "TRT_WORLD_SIZE"),
    _Launcher("torchrun", 1, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    _Launcher("Open MPI", 2, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
              "OMPI_COMM_WORLD_LOCAL_SIZE"),
    _Launcher("MPICH/Intel MPI", 2, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    _Launcher("MVAPICH", 2, "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
              "MV2_COMM_WORLD_LOCAL_SIZE"),
    _Launcher("SLURM", 3, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)
_MPI = ("Open MPI", "MPICH/Intel MPI", "MVAPICH", "SLURM")


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    """This process's place in a launched world.

    Attributes
    ----------
    rank : int
        This process's rank, 0 <= rank < world_size.
    world_size : int
        Number of processes (NCCL ranks) of the world, >= 1.
    local_rank : int or None
        Its rank among the processes of this host, where the launcher gives it.
    launcher : str
        Which launcher's variables were read: "TRT_MY_RANK/TRT_WORLD_SIZE", "torchrun", "Open MPI",
        "MPICH/Intel MPI", "MVAPICH" or "SLURM".
    local_size : int or None
        Number of processes on this host, where the launcher gives it.
    run_id : str or None
        The launcher's id of this run (job and step, torchrun's run id and restart), used to tell
        this run's NCCL id file from an earlier run's; None when the launcher has none.
    """

    rank: int
    world_size: int
    local_rank: int | None
    launcher: str
    local_size: int | None = None
    run_id: str | None = None


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise InvalidArgumentError(f"{name}={env[name]!r} is not an integer") from None


def _run_id(name: str, env: Mapping[str, str]) -> str | None:
    def joined(*names):
        values = [env.get(n) for n in names]
        return ".".join(v for v in values if v) if values[0] else None

    if name == "torchrun":
        return joined("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
    if name == "SLURM":
        return joined("SLURM_JOB_ID", "SLURM_STEP_ID")
    if name == "Open MPI":
        return env.get("OMPI_MCA_ess_base_jobid") or env.get("PMIX_NAMESPACE")
    if name == "MVAPICH":
        return env.get("MPIRUN_ID")
    if name == "MPICH/Intel MPI":
        return env.get("PMI_KVSNAME") or env.get("PMIX_NAMESPACE")
    return None


def _info(launcher: _Launcher, env: Mapping[str, str]) -> LaunchInfo:
    rank, size = _int(env, launcher.rank), _int(env, launcher.size)
    if size < 1 or not 0 <= rank < size:
        raise InvalidArgumentError(f"{launcher.rank}={rank} is not a rank of a world of {launcher.size}={size}")
    local = _int(env, launcher.local_rank) if launcher.local_rank and launcher.local_rank in env else None
    local_size = _int(env, launcher.local_size) if launcher.local_size and launcher.local_size in env else None
    return LaunchInfo(rank, size, local, launcher.name, local_size, _run_id(launcher.name, env))


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """Rank, world size and local rank from the launcher that started this process (the innermost
    one, see the module's documentation), or None when no launcher's variables are set.

    Parameters
    ----------
    env : mapping of str to str, optional
        The environment to read (default ``os.environ``).

    Returns
    -------
    LaunchInfo or None
        None when no launcher's rank and world-size variables are set.

    Raises
    ------
    InvalidArgumentError
        A variable is not an integer or not a rank of the world; two launchers of one tier
        disagree (both named); only one of a launcher's rank and world-size variables is set (the
        missing one named) and no other launcher is complete.
    """
    env = os.environ if env is None else env
    for tier in sorted({launcher.tier for launcher in _LAUNCHERS}):
        found = [(launcher, _info(launcher, env)) for launcher in _LAUNCHERS
                 if launcher.tier == tier and launcher.rank in env and launcher.size in env]
        if not found:
            continue
        first_launcher, first = found[0]
        for launcher, other in found[1:]:
            if (other.rank, other.world_size) != (first.rank, first.world_size):
                raise InvalidArgumentError(
                    f"two launchers set this process's rank and disagree: {first.launcher} "
                    f"({first_launcher.rank}={first.rank}, {first_launcher.size}={first.world_size}) and "
                    f"{other.launcher} ({launcher.rank}={other.rank}, {launcher.size}={other.world_size}); "
                    "unset the variables of the one that did not start this process, or set "
                    "TRT_MY_RANK/TRT_WORLD_SIZE, which win")
        return first
    for launcher in _LAUNCHERS:
        given = [v for v in (launcher.rank, launcher.size) if v in env]
        if len(given) == 1:
            missing = launcher.size if given[0] == launcher.rank else launcher.rank
            meaning = "the number of ranks" if missing == launcher.size else "this process's rank"
            raise InvalidArgumentError(
                f"{given[0]} is set but {missing} is not: set {missing} ({meaning}) too, or unset {given[0]}")
    return None


def choose_device(info: LaunchInfo, visible: int, gpu: int | None = None) -> int:
    """The CUDA device this rank runs on, among the ``visible`` devices of this process.

    ``gpu`` when given; device 0 when the process sees one GPU (a per-rank
    ``CUDA_VISIBLE_DEVICES``, SLURM's ``--gpus-per-task=1``); else the local rank; else the rank
    modulo the visible count. Every rank of a host sees the same launcher variables and GPUs, so
    a layout that cannot work (more ranks on this host than GPUs each can see) fails on every rank
    here, before any rank waits for the others.

    Parameters
    ----------
    info : LaunchInfo
        This process's place in the world (from :func:`detect_launch`).
    visible : int
        Number of CUDA devices this process sees (after ``CUDA_VISIBLE_DEVICES``).
    gpu : int, optional
        The device asked for by the caller, an index among the visible devices.

    Returns
    -------
    int
        CUDA device index, 0 <= index < ``visible``.

    Raises
    ------
    CudaError
        No GPU is visible (the message gives the driver's answer).
    InvalidArgumentError
        ``gpu`` is not a visible device, or the host has more ranks than this process sees GPUs.
    """
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"this process sees {visible} GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else "")
    if visible == 0:
        raise no_gpu_error(f"to rank {info.rank}")
    if gpu is not None:
        if isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu < visible:
            raise InvalidArgumentError(f"gpu={gpu!r} is not a visible device: {seen}, numbered 0..{visible - 1}")
        return gpu
    if visible == 1:
        return 0
    if info.local_size is not None and info.local_size > visible:
        raise InvalidArgumentError(
            f"{info.launcher} starts {info.local_size} ranks on this host but {seen}: give each rank its own GPU "
            "(one per process with a per-rank CUDA_VISIBLE_DEVICES or --gpus-per-task=1, or all of them to "
            "every process), or pass gpu= to from_env")
    if info.local_rank is not None:
        if info.local_rank >= visible:
            raise InvalidArgumentError(
                f"rank {info.rank} is local rank {info.local_rank} of this host but {seen}: give each rank its own "
                "GPU (see above), or pass gpu= to from_env")
        return info.local_rank
    return info.rank % visible


def id_file_path(id_file: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The NCCL id file to use: ``id_file``, else ``TRT_NCCL_ID_FILE``, else None.

    Parameters
    ----------
    id_file : str, optional
        A path given by the caller; wins over the environment.
    env : mapping of str to str, optional
        The environment to read (default ``os.environ``).

    Returns
    -------
    str or None
        The path (an empty string counts as not given).
    """
    env = os.environ if env is None else env
    return id_file or env.get("TRT_NCCL_ID_FILE") or None


_exchanges = itertools.count()  # every rank calls from_env the same number of times: same keys


def _id_channel(info: LaunchInfo, id_file: str | None, env: Mapping[str, str]) -> str:
    """How this world shares the NCCL id: "file", "mpi" or "torch"; raises when there is no way."""
    path = id_file_path(id_file, env)
    if path:
        _core.check_unique_id_file_path(path, info.rank)  # before any GPU is asked for, on every rank
        return "file"
    if info.launcher in _MPI:
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            pass
        else:
            return "mpi"
    if info.launcher == "torchrun":
        try:
            import torch.distributed  # noqa: F401
        except ImportError:
            raise InvalidArgumentError(
                "launched by torchrun (RANK/WORLD_SIZE are set) but torch is not installed, and mdtrt shares the "
                "NCCL id through torch.distributed there: pip install torch, or set TRT_NCCL_ID_FILE to a path "
                "every rank can read") from None
        return "torch"
    if info.launcher == _LAUNCHERS[0].name:
        raise InvalidArgumentError(
            "TRT_MY_RANK and TRT_WORLD_SIZE are set but TRT_NCCL_ID_FILE is not: set it to a path every rank can "
            "read (rank 0 writes the NCCL id there), as NVIDIA's sample needs")
    raise InvalidArgumentError(
        f"launched by {info.launcher} but there is no way to share the NCCL id: set TRT_NCCL_ID_FILE to a path "
        "every rank can read (rank 0 writes it), or run under mpirun with mpi4py installed (pip install mpi4py), "
        "or under torchrun with torch installed")


def check_id_exchange(info: LaunchInfo, *, id_file: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Refuses, before any GPU is asked for, a world whose ranks have no way to share the NCCL id;
    otherwise names the channel the id (and whatever rank 0 shares later, see
    :func:`mdtrt.build_once`) travels by.

    Parameters
    ----------
    info : LaunchInfo
        This process's place in the world.
    id_file : str, optional
        The id file given by the caller (else ``TRT_NCCL_ID_FILE``).
    env : mapping of str to str, optional
        The environment to read (default ``os.environ``).

    Returns
    -------
    str
        ``"file"`` (the id file), ``"mpi"`` (mpi4py) or ``"torch"`` (torch.distributed).

    Raises
    ------
    InvalidArgumentError
        No id file is given and the launcher offers no channel (mpi4py under MPI, torch under
        torchrun): the message says what to set or install.
    """
    return _id_channel(info, id_file, os.environ if env is None else env)


def exchange_unique_id(info: LaunchInfo, *, timeout: float, id_file: str | None = None,
                       env: Mapping[str, str] | None = None) -> bytes:
    """The NCCL unique id of this world, created by rank 0 and shared with every rank.

    Through ``id_file`` (or ``TRT_NCCL_ID_FILE``) when given; under MPI through mpi4py; under
    torchrun through torch.distributed's store, without creating, changing or leaving behind any
    process group of the application.

    Parameters
    ----------
    info : LaunchInfo
        This process's place in the world; rank 0 creates the id.
    timeout : float
        Seconds a rank other than 0 waits for the id.
    id_file : str, optional
        Path every rank can read (else ``TRT_NCCL_ID_FILE``); rank 0 writes the id there, tagged
        with ``info.run_id`` so that a file left by an earlier run is not read.
    env : mapping of str to str, optional
        The environment to read (default ``os.environ``).

    Returns
    -------
    bytes
        The ``ncclUniqueId`` (NCCL_UNIQUE_ID_BYTES = 128 bytes), the same on every rank.

    Raises
    ------
    InvalidArgumentError
        There is no way to share the id (the message says what to install or set).
    RankTimeoutError
        Rank 0 did not publish the id in time.
    KeyboardInterrupt
        Ctrl-C while waiting.
    """
    env = os.environ if env is None else env
    channel = _id_channel(info, id_file, env)
    if channel == "file":
        return _core.exchange_unique_id_via_file(id_file_path(id_file, env), info.rank, timeout, info.run_id or "")
    if channel == "mpi":
        return broadcast_through_mpi(_core.nccl_unique_id, timeout=timeout, what="the NCCL id", call="read NCCL id")
    return _exchange_through_torch(info, timeout, env)


def release_id_file(info: LaunchInfo, uid: bytes, id_file: str | None = None,
                    env: Mapping[str, str] | None = None) -> None:
    """Rank 0, once every rank joined (or when joining failed): removes the id file it wrote, so
    that no later run can find it. Other ranks and other exchanges do nothing.

    Parameters
    ----------
    info : LaunchInfo
        This process's place in the world; only rank 0 removes anything.
    uid : bytes
        The id this run exchanged; the file is removed only when it still holds this id.
    id_file : str, optional
        The id file given by the caller (else ``TRT_NCCL_ID_FILE``); nothing happens without one.
    env : mapping of str to str, optional
        The environment to read (default ``os.environ``).
    """
    path = id_file_path(id_file, env)
    if path and info.rank == 0:
        _core.remove_unique_id_file(path, uid)


def _exchange_through_torch(info: LaunchInfo, timeout: float, env: Mapping[str, str]) -> bytes:
    return broadcast_through_torch(info, _core.nccl_unique_id, timeout=timeout, what="the NCCL id",
                                   call="read NCCL id", env=env,
                                   key=f"mdtrt/nccl_unique_id/{info.run_id or ''}/{next(_exchanges)}")


def broadcast_through_mpi(produce, *, timeout: float, what: str, call: str, comm=None) -> bytes:
    """Bytes made by ``produce()`` on MPI rank 0, handed to every rank of ``comm``.

    Non-blocking broadcasts (``Ibcast``, the size then the bytes) polled from Python: the wait has a
    deadline and answers Ctrl-C between polls, where a blocking ``bcast`` would wait forever for a
    rank that died.

    Parameters
    ----------
    produce : callable() -> bytes-like
        Called on rank 0 only.
    timeout : float
        Seconds each rank waits for each of the two broadcasts (rank 0's ``produce()`` comes first).
    what, call : str
        Name what is shared and the call, for the timeout error.
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    bytes
        The same bytes on every rank.

    Raises
    ------
    RankTimeoutError
        A broadcast did not complete within ``timeout`` (rank 0 failed, or a rank never came).
    """
    import numpy as np

    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    data = bytes(produce()) if rank == 0 else b""
    deadline = time.monotonic() + timeout

    def bcast(buffer) -> None:
        request = comm.Ibcast(buffer, root=0)
        while not request.Test():  # a Python loop: Ctrl-C is answered between polls
            if time.monotonic() >= deadline:
                raise RankTimeoutError(f"rank 0 did not share {what} through MPI within {timeout:g} s (did it "
                                       "fail? see its output)", rank=rank, call=call)
            time.sleep(0.02)

    size = np.array([len(data)], dtype=np.int64)
    bcast(size)
    buffer = np.frombuffer(data, dtype=np.uint8).copy() if rank == 0 else np.empty(int(size[0]), dtype=np.uint8)
    bcast(buffer)
    return data if rank == 0 else buffer.tobytes()


def broadcast_through_torch(info: LaunchInfo, produce, *, timeout: float, what: str, call: str, key: str,
                            env: Mapping[str, str] | None = None) -> bytes:
    """Bytes made by ``produce()`` on rank 0, handed to every rank under torchrun, without creating,
    changing or leaving behind any process group of the application: through torchrun's agent store
    when it offers one, else a separate gloo group (the application has a default group), else a
    temporary default gloo group destroyed afterwards.

    Parameters
    ----------
    info : LaunchInfo
        This process's place in the world; rank 0 calls ``produce``.
    produce : callable
        Called with no arguments on rank 0 only; returns bytes (or a bytes-like object).
    timeout : float
        Seconds for the whole exchange, ``produce()`` on rank 0 included.
    what : str
        How errors name the bytes ("the NCCL id").
    call : str
        The call named by a :class:`RankTimeoutError`.
    key : str
        Store key: the same on every rank and new for each exchange.
    env : mapping of str to str, optional
        The environment to read (default ``os.environ``).

    Returns
    -------
    bytes
        What rank 0's ``produce()`` returned, on every rank.

    Raises
    ------
    RankTimeoutError
        Through torchrun's agent store: rank 0 did not publish within ``timeout``.
    ImportError
        torch is not installed.
    """
    import torch.distributed as dist

    env = os.environ if env is None else env
    address, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true" and address and port:
        # torchrun's agent hosts a store every worker may use: no process group needed at all.
        store = dist.TCPStore(address, int(port), None, False, timeout=_timedelta(timeout))
        return _through_store(store, key, info, produce, timeout, what, call)
    if dist.is_initialized():
        # The application's own group (perhaps NCCL, on devices it chose): broadcast in a separate
        # CPU group instead, and leave the application's groups as they are.
        group = dist.new_group(backend="gloo", timeout=_timedelta(timeout))
        try:
            box = [bytes(produce()) if info.rank == 0 else None]
            dist.broadcast_object_list(box, src=0, group=group)
            return box[0]
        finally:
            dist.destroy_process_group(group)
    # No store to borrow: a default gloo group just for the exchange, destroyed afterwards, so that
    # the application can still call init_process_group itself.
    dist.init_process_group("gloo", timeout=_timedelta(timeout))
    try:
        box = [bytes(produce()) if info.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    finally:
        dist.destroy_process_group()


def _through_store(store, key: str, info: LaunchInfo, produce, timeout: float, what: str, call: str) -> bytes:
    if info.rank == 0:
        data = bytes(produce())
        store.set(key, data)
        return data
    deadline = time.monotonic() + timeout
    while not store.check([key]):  # a Python loop: Ctrl-C is answered between polls
        if time.monotonic() > deadline:
            raise RankTimeoutError(f"rank 0 did not publish {what} in torchrun's store within {timeout:g} s",
                                   rank=info.rank, call=call)
        time.sleep(0.02)
    return bytes(store.get(key))


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)
