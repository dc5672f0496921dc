"""Build an engine once under a launcher: rank 0 builds, every other rank receives its plan.

Under a launcher (one process per GPU) every process building its own multi-device engine wastes
the build time N times over, and a slow build on one rank can use up the others' deadline for the
collective set-up. :func:`build_once` runs the build on rank 0 only and hands the same plan bytes to
every rank, over the channel the NCCL id already travels by (see :mod:`mdtrt.launch`):

- the id file (``TRT_NCCL_ID_FILE``): rank 0 writes ``<id file>.<name>.plan`` (through a temporary
  file and a rename), tagged with this run's NCCL id, so a plan left by an earlier run is never
  read; the other ranks poll for it;
- mpi4py under MPI launchers: a broadcast from rank 0 with a deadline;
- torch.distributed under torchrun: a broadcast from rank 0 on a gloo group made for it.

The wait for the plan has its own deadline (``timeout``, generous: it covers rank 0's build); the
deadlines of the group's later steps (binding the engine) start after the plan arrived.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Callable, Mapping

from . import _core
from .errors import InvalidArgumentError, RankTimeoutError
from .launch import (LaunchInfo, broadcast_through_mpi, broadcast_through_torch, check_id_exchange, detect_launch,
                     id_file_path)

# Polling interval of the file channel: short next to a build, long enough not to load the disk.
_POLL_SECONDS = 0.02
_shares = itertools.count()  # every rank shares the same plans in the same order: same keys


def build_once(build: Callable[[], bytes], info: LaunchInfo | None = None, *, group=None, timeout: float = 900.0,
               id_file: str | None = None, name: str = "engine", env: Mapping[str, str] | None = None) -> bytes:
    """Run ``build()`` on rank 0 only and return its plan on every rank.

    Parameters
    ----------
    build : callable() -> bytes
        Builds the plan, e.g. ``lambda: build_dist_collective_engine(..., device=group.gpus[0])``.
        Called on rank 0 only (and in a process that was not started by a launcher).
    info : LaunchInfo, optional
        This process's rank; default: :func:`mdtrt.launch.detect_launch`. None and no launcher
        found: ``build()`` is called here and its plan returned.
    group : DeviceGroup, optional
        The group made by ``DeviceGroup.from_env()`` for this run: its NCCL id tags the plan on
        the file channel (rank 0 removes the id file itself once every rank joined). Without it the
        id is read from the id file, which then must still be there.
    timeout : float
        Seconds a rank other than 0 waits for the plan (rank 0's build included).
    id_file : str, optional
        The NCCL id file of this run (default ``TRT_NCCL_ID_FILE``); it must have been written
        already (``DeviceGroup.from_env()`` does that), since the plan is tagged with its id.
    name : str
        Distinguishes several plans of one run (the file channel's file name).
    env : mapping of str to str, optional
        The environment to read the launcher's variables and ``TRT_NCCL_ID_FILE`` from (default
        ``os.environ``).

    Returns
    -------
    bytes
        The same plan on every rank.

    Raises
    ------
    RankTimeoutError
        The plan did not arrive within ``timeout`` (rank 0 failed or is slow to build), or, on the
        file channel without ``group``, the id file held no id of this run within ``timeout``.
    InvalidArgumentError
        No channel to share the plan (no id file, no mpi4py under MPI, not torchrun, or torchrun
        without torch), a name that cannot be part of a file name, ``build()`` returned something
        that is not bytes-like or an empty plan, or the launcher's variables are inconsistent
        (see :func:`mdtrt.launch.detect_launch`).
    """
    env = os.environ if env is None else env
    info = detect_launch(env) if info is None else info
    if info is None or info.world_size == 1:
        return _plan_bytes(build())
    if not name or os.sep in name:
        raise InvalidArgumentError(f"name must be a non-empty file name part without '{os.sep}', got {name!r}")
    # The channel the NCCL id took (launch.check_id_exchange): the plan follows the same way.
    channel = check_id_exchange(info, id_file=id_file, env=env)
    if channel == "file":
        return _share_via_file(build, info, id_file_path(id_file, env), name, timeout,
                               getattr(group, "_unique_id", None))
    if channel == "mpi":
        return broadcast_through_mpi(lambda: _plan_bytes(build()), timeout=timeout, what=f"the plan '{name}'",
                                     call="build_once")
    return _share_via_torch(build, info, name, timeout, env)

def _plan_bytes(plan) -> bytes:
    try:
        data = bytes(memoryview(plan))
    except TypeError:
        raise InvalidArgumentError(f"build() returned {type(plan).__name__}, not the plan's bytes") from None
    if not data:
        raise InvalidArgumentError("build() returned an empty plan")
    return data


def _run_tag(id_file: str, rank: int, deadline: float) -> bytes:
    """This run's NCCL id, read from the id file (waiting for it, as the id exchange does)."""
    while True:
        try:
            with open(id_file) as f:
                text = f.read().strip()
            if len(text) == 256:
                return bytes.fromhex(text)
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            raise RankTimeoutError(
                f"the NCCL id file {id_file} holds no id of this run: create the group first "
                "(mdtrt.DeviceGroup.from_env() writes it on rank 0), then share the plan with build_once(..., group=group)",
                rank=rank, call="build_once")
        time.sleep(_POLL_SECONDS)


def _share_via_file(build, info: LaunchInfo, id_file: str, name: str, timeout: float, tag: bytes | None) -> bytes:
    deadline = time.monotonic() + timeout
    tag = tag or _run_tag(id_file, info.rank, deadline)
    path = f"{id_file}.{name}.plan"
    if info.rank == 0:
        plan = _plan_bytes(build())
        _core.publish_shared_bytes(path, tag, plan)
        return plan
    while True:  # short sleeps between polls: Ctrl-C stays responsive
        plan = _core.try_read_shared_bytes(path, tag)
        if plan is not None:
            return plan
        if time.monotonic() >= deadline:
            raise RankTimeoutError(
                f"rank 0 did not share the plan '{name}' in {path} within {timeout:g} s (did its build fail? see its "
                "output; raise timeout= for slower builds)", rank=info.rank, call="build_once")
        time.sleep(_POLL_SECONDS)


def _share_via_torch(build, info: LaunchInfo, name: str, timeout: float, env: Mapping[str, str]) -> bytes:
    return broadcast_through_torch(info, lambda: _plan_bytes(build()), timeout=timeout, what=f"the plan '{name}'",
                                   call="build_once", key=f"mdtrt/plan/{info.run_id or ''}/{name}/{next(_shares)}",
                                   env=env)


__all__ = ["build_once"]
