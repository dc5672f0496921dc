"""Finding out, under a launcher, which rank this process is, and agreeing on one NCCL id.

Recognised launchers, first match wins: NVIDIA's samples (TRT_MY_RANK/TRT_WORLD_SIZE), Open MPI
(OMPI_COMM_WORLD_*), SLURM (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) and torchrun
(RANK/WORLD_SIZE/LOCAL_RANK). The id travels through a shared file (TRT_NCCL_ID_FILE), through
mpi4py under MPI, or through torch.distributed under torchrun: no server of our own.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from . import _core
from .errors import InvalidArgumentError

_LAUNCHERS = (
    ("TRT_MY_RANK", "TRT_WORLD_SIZE", None, "TRT_MY_RANK/TRT_WORLD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "Open MPI"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM"),
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "torchrun"),
)


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int | None
    launcher: str


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise InvalidArgumentError(f"{name}={env[name]!r} is not an integer") from None


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo | None:
    """Rank, world size and local rank from the environment, or None when not launched."""
    env = os.environ if env is None else env
    for rank_var, size_var, local_var, name in _LAUNCHERS:
        if rank_var in env and size_var in env:
            rank, size = _int(env, rank_var), _int(env, size_var)
            local = _int(env, local_var) if local_var and local_var in env else None
            if size < 1 or not 0 <= rank < size:
                raise InvalidArgumentError(f"{rank_var}={rank} is not a rank of a world of {size_var}={size}")
            return LaunchInfo(rank, size, local, name)
    return None


def exchange_unique_id(info: LaunchInfo, *, timeout: float, id_file: str | None = None,
                       env: Mapping[str, str] | None = None) -> bytes:
    """The NCCL unique id of this world, created by rank 0 and shared with every rank."""
    env = os.environ if env is None else env
    id_file = id_file or env.get("TRT_NCCL_ID_FILE")
    if id_file:
        return _core.exchange_unique_id_via_file(id_file, info.rank, timeout)
    if info.launcher in ("Open MPI", "SLURM") or "PMI_RANK" in env:
        try:
            from mpi4py import MPI
        except ImportError:
            MPI = None
        if MPI is not None:
            comm = MPI.COMM_WORLD
            uid = _core.nccl_unique_id() if comm.Get_rank() == 0 else None
            return comm.bcast(uid, root=0)
    if info.launcher == "torchrun":
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=_timedelta(timeout))
        box = [_core.nccl_unique_id() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    raise InvalidArgumentError(
        f"launched by {info.launcher} but there is no way to share the NCCL id: set TRT_NCCL_ID_FILE to a path "
        "every rank can read (rank 0 writes it; delete it between runs), or run under mpirun with mpi4py "
        "installed, or under torchrun")


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)
