"""DeviceGroup: the GPUs taking part, one rank thread and one NCCL communicator per GPU."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Sequence

from . import _core
from .arrays import ArrayRef, describe, host_output, wrap_device_output
from .errors import InvalidArgumentError
from .launch import choose_device, detect_launch, exchange_unique_id, release_id_file
from .nccl import nccl_library

COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "reduce", "reduce_scatter", "all_to_all", "gather", "scatter")
REDUCE_OPS = ("sum", "prod", "max", "min", "avg")
_ROOTED = ("broadcast", "reduce", "gather", "scatter")
# Each cached collective may own a NCCL communicator split off for its group: keep a few.
_MAX_CACHED_COLLECTIVES = 16
_REDUCING = ("all_reduce", "reduce", "reduce_scatter")


@dataclasses.dataclass(frozen=True)
class Communicator:
    """One rank's world communicator. ``ptr`` is the ncclComm_t as an integer; ``capsule()`` is the
    PyCapsule named "ncclComm_t" that TensorRT's Python ``IExecutionContext.set_communicator`` takes."""

    rank: int
    device: int
    ptr: int
    _group: Any = dataclasses.field(repr=False, compare=False)
    _local: int = dataclasses.field(repr=False, compare=False)

    def capsule(self):
        return self._group._live()._native.comm_capsule(self._local)


class DeviceGroup:
    """The GPUs of this process that run one multi-device program together.

    ``DeviceGroup(gpus=[0, 1])`` puts every rank in this process (rank i on ``gpus[i]``).
    ``DeviceGroup.from_env()`` joins a world started by a launcher (one process per GPU).
    Every blocking step waits at most ``timeout`` seconds, then names the ranks that did not finish.
    """

    def __init__(self, gpus: Sequence[int] | None = None, *, timeout: float = 60.0):
        nccl_library()  # so the C++ side also finds NCCL in the nvidia-nccl wheel
        if gpus is None:
            gpus = list(range(_core.visible_gpu_count()))
        self._native = _core.DeviceGroup.create_local(_gpu_list(gpus), float(timeout))
        self._runners: OrderedDict = OrderedDict()

    @classmethod
    def from_env(cls, *, timeout: float = 60.0, gpu: int | None = None, id_file: str | None = None) -> "DeviceGroup":
        """This process's rank of a world started by a launcher, one process per GPU.

        Parameters
        ----------
        timeout : float
            Seconds every blocking step (the id exchange, NCCL set-up, later calls) may wait.
        gpu : int, optional
            This process's CUDA device. Default: device 0 when the process sees one GPU (per-rank
            ``CUDA_VISIBLE_DEVICES``, SLURM's ``--gpus-per-task=1``), else the local rank, else the
            rank modulo the number of visible GPUs.
        id_file : str, optional
            A file every rank can read, to share the NCCL id through (default ``TRT_NCCL_ID_FILE``;
            without either, mpi4py under MPI launchers and torch.distributed's store under torchrun).

        The launcher is the innermost one whose variables are set: NVIDIA's
        TRT_MY_RANK/TRT_WORLD_SIZE, torchrun, Open MPI, MPICH/Intel MPI, MVAPICH, SLURM (see
        :mod:`mdtrt.launch`). An application's torch.distributed process groups are left alone.

        Raises
        ------
        InvalidArgumentError
            No launcher, contradicting launchers, a GPU layout that cannot work (raised on every rank
            before any waits), or no way to share the NCCL id.
        RankTimeoutError
            A rank did not arrive within ``timeout``.
        KeyboardInterrupt
            Ctrl-C while waiting; the communicators are aborted.
        """
        info = detect_launch()
        if info is None:
            raise InvalidArgumentError(
                "no launcher found in the environment (TRT_MY_RANK/TRT_WORLD_SIZE, RANK/WORLD_SIZE of torchrun, "
                "OMPI_COMM_WORLD_RANK, PMI_RANK, MV2_COMM_WORLD_RANK or SLURM_PROCID): start one process per GPU "
                "with a launcher, or use DeviceGroup(gpus=[...]) for all GPUs in one process")
        nccl_library()
        device = choose_device(info, _core.visible_gpu_count(), gpu)
        uid = exchange_unique_id(info, timeout=timeout, id_file=id_file)
        try:
            native = _core.DeviceGroup.create_member([device], [info.rank], info.world_size, uid, float(timeout))
        finally:
            # Joined or failed: either way no later run may find this run's id.
            release_id_file(info, uid, id_file)
        self = cls.__new__(cls)
        self._native = native
        self._runners = OrderedDict()
        return self

    # -- what the group is ------------------------------------------------------------------
    def _live(self):
        if self._native is None:
            raise InvalidArgumentError("this DeviceGroup was closed")
        return self

    @property
    def gpus(self) -> list[int]:
        return list(self._live()._native.devices)

    @property
    def ranks(self) -> list[int]:
        return list(self._live()._native.ranks)

    @property
    def world_size(self) -> int:
        return self._live()._native.world_size

    @property
    def timeout(self) -> float:
        return self._live()._native.timeout

    def __len__(self) -> int:
        return self._live()._native.num_local_ranks

    @property
    def peer_access(self) -> list[list[bool]]:
        n = len(self)
        return [[self._native.peer_access(a, b) for b in range(n)] for a in range(n)]

    @property
    def communicators(self) -> list[Communicator]:
        native = self._live()._native
        return [Communicator(r, d, native.comm_ptr(i), self, i) for i, (r, d) in enumerate(zip(native.ranks, native.devices))]

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Destroys the communicators and stops the rank threads."""
        self._runners.clear()
        self._native = None

    def abort(self) -> None:
        """Aborts every communicator now; the group cannot be used afterwards."""
        if self._native is not None:
            self._native.abort()

    def __enter__(self) -> "DeviceGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._native is None:
            return "DeviceGroup(closed)"
        return f"DeviceGroup(gpus={self.gpus}, ranks={self.ranks}, world_size={self.world_size})"

    # -- collectives --------------------------------------------------------------------------
    def collective(self, op: str, inputs, *, reduce: str = "sum", root: int = 0, groups: Sequence[int] | None = None,
                   out=None, poison_outputs: bool = False, sequential_bind: bool = False) -> list:
        """Runs one DistCollective operation, with TensorRT's semantics, on every local rank.

        ``inputs`` holds one array per local rank (a single array is fine with one local rank):
        numpy arrays come back as numpy arrays, device arrays (torch, CuPy, ...) as device arrays,
        without copies. The operation runs along the first dimension. ``groups`` is an ordered list
        of world ranks taking part (position = group-local rank); ``root`` is a world rank of the
        group. Ranks outside the group, and non-root ranks of ``reduce`` and ``gather`` (whose
        output is undefined), get None. ``out``: one preallocated device array per local rank to
        write into (device inputs only), so that no output is allocated per call.
        """
        return self.prepare_collective(op, inputs, reduce=reduce, root=root, groups=groups, out=out,
                                       poison_outputs=poison_outputs, sequential_bind=sequential_bind)()

    def prepare_collective(self, op: str, inputs, *, reduce: str = "sum", root: int = 0,
                           groups: Sequence[int] | None = None, out=None, poison_outputs: bool = False,
                           sequential_bind: bool = False):
        """``collective`` with its arguments checked and converted once: the returned callable runs
        the operation again on the same buffers (refill them in place between calls) and returns
        what ``collective`` would, for latency-bound loops."""
        native = self._live()._native
        if op not in COLLECTIVES:
            raise InvalidArgumentError(f"unknown collective {op!r}; choose one of {', '.join(COLLECTIVES)}")
        if op in _REDUCING and reduce not in REDUCE_OPS:
            raise InvalidArgumentError(f"unknown reduce op {reduce!r}; choose one of {', '.join(REDUCE_OPS)}")
        n = native.num_local_ranks
        ranks = native.ranks
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        if len(inputs) != n:
            raise InvalidArgumentError(f"{op} needs one input per local rank: got {len(inputs)} for {n} ranks {ranks}")
        refs = [describe(x, "input of rank", r) for x, r in zip(inputs, ranks)]
        first = refs[0]
        for ref, r in zip(refs, ranks):
            if ref.dtype != first.dtype or ref.shape != first.shape:
                raise InvalidArgumentError(
                    f"every rank's input must have one shape and dtype: rank {ranks[0]} has {first.shape} "
                    f"{first.dtype}, rank {r} has {ref.shape} {ref.dtype}")
        groups = [int(g) for g in groups] if groups else []
        reduce_name = reduce if op in _REDUCING else "none"
        root = int(root) if op in _ROOTED else 0
        key = (op, reduce_name, root, tuple(groups), first.dtype, sequential_bind)
        runner = self._runners.get(key)
        if runner is None:
            program = _core.CollectiveProgram(op, reduce_name, root, groups, first.dtype, native.world_size, n)
            runner = _core.ProgramRunner(native, [program] * n, sequential_bind)
            self._runners[key] = runner
            if len(self._runners) > _MAX_CACHED_COLLECTIVES:
                self._runners.popitem(last=False)
        self._runners.move_to_end(key)
        out_refs = None
        if out is not None:
            if not isinstance(out, (list, tuple)):
                out = [out]
            if len(out) != n:
                raise InvalidArgumentError(f"out= needs one array per local rank: got {len(out)} for {n}")
            out_refs = [{"output": describe(o, "out of rank", r)} for o, r in zip(out, ranks)]
        call = PreparedCall(runner, [[ref] for ref in refs], fetch_all=True, poison_outputs=poison_outputs,
                            out=out_refs)
        members = groups or range(native.world_size)
        # Outside the group, and off the root of reduce/gather, a rank's output is undefined.
        defined = [r in members and not (op in ("reduce", "gather") and r != root) for r in ranks]
        if all(defined):
            return lambda: [o["output"] for o in call()]
        return lambda: [o["output"] if d else None for o, d in zip(call(), defined)]

    def all_reduce(self, inputs, *, reduce: str = "sum", groups=None, **kw) -> list:
        return self.collective("all_reduce", inputs, reduce=reduce, groups=groups, **kw)

    def all_gather(self, inputs, *, groups=None, **kw) -> list:
        return self.collective("all_gather", inputs, groups=groups, **kw)

    def broadcast(self, inputs, *, root: int = 0, groups=None, **kw) -> list:
        return self.collective("broadcast", inputs, root=root, groups=groups, **kw)

    def reduce(self, inputs, *, reduce: str = "sum", root: int = 0, groups=None, **kw) -> list:
        return self.collective("reduce", inputs, reduce=reduce, root=root, groups=groups, **kw)

    def reduce_scatter(self, inputs, *, reduce: str = "sum", groups=None, **kw) -> list:
        return self.collective("reduce_scatter", inputs, reduce=reduce, groups=groups, **kw)

    def all_to_all(self, inputs, *, groups=None, **kw) -> list:
        return self.collective("all_to_all", inputs, groups=groups, **kw)

    def gather(self, inputs, *, root: int = 0, groups=None, **kw) -> list:
        return self.collective("gather", inputs, root=root, groups=groups, **kw)

    def scatter(self, inputs, *, root: int = 0, groups=None, **kw) -> list:
        return self.collective("scatter", inputs, root=root, groups=groups, **kw)


def _gpu_list(gpus) -> list[int]:
    out = []
    for g in gpus:
        if isinstance(g, bool) or not isinstance(g, int) and not hasattr(g, "__index__"):
            raise InvalidArgumentError(f"GPU ids are integers, got {g!r}")
        out.append(int(g))
    return out


class PreparedCall:
    """A ProgramRunner call whose arguments were checked and converted once: calling it runs the
    program again on the same buffers (their current contents), with no per-call argument work.
    Device arrays are ordered with the streams that were current when the call was prepared."""

    def __init__(self, runner, per_rank_refs: list[list[ArrayRef]], *, fetch_all: bool, poison_outputs: bool = False,
                 replication: str = "auto", timeout: float | None = None, fetch_ranks: Sequence[int] | None = None,
                 out: list[dict[str, ArrayRef]] | None = None):
        # One pass over the inputs; a replicated input list is the same object on every rank.
        on_device = on_host = False
        native_by_list: dict[int, list] = {}
        native_inputs = []
        for refs in per_rank_refs:
            native = native_by_list.get(id(refs))
            if native is None:
                native = native_by_list[id(refs)] = [ref.as_native() for ref in refs]
                for ref in refs:
                    if ref.device >= 0:
                        on_device = True
                    else:
                        on_host = True
            native_inputs.append(native)
        if on_device and on_host:
            raise InvalidArgumentError("mix of host and device inputs: pass all numpy arrays or all device arrays")
        if out is not None and not on_device:
            raise InvalidArgumentError("preallocated outputs are for device inputs; with numpy inputs outputs come back as numpy")
        if out is not None and any(ref.device < 0 for given in out for ref in given.values()):
            raise InvalidArgumentError("preallocated outputs must be device arrays")
        n = len(per_rank_refs)
        fetch = [] if on_device else (list(range(n)) if fetch_all else list(fetch_ranks or [0]))
        self._infer = runner.infer
        # Positional arguments: pybind11 matches keywords noticeably slower, and this is the hot path.
        self._args = (native_inputs, replication, poison_outputs, fetch, on_device, float(timeout or 0.0),
                      [[ref.as_output(name) for name, ref in given.items()] for given in out] if out else [])
        self._refs = per_rank_refs  # keeps the arrays alive as long as the call can run
        self._out = out
        self._on_device = on_device

    def __call__(self) -> list[dict]:
        results = self._infer(*self._args)
        out, on_device, refs = self._out, self._on_device, self._refs
        outputs = []
        for i, res in enumerate(results):
            named = {}
            for k, (name, dtype, shape) in enumerate(res["outputs"]):
                if out and name in out[i]:
                    named[name] = out[i][name].owner
                elif on_device:
                    named[name] = wrap_device_output(res["device"][k], dtype, shape, refs[i][0] if refs[i] else None)
                elif res["host"]:
                    named[name] = host_output(res["host"][k], dtype, shape)
            outputs.append(named)
        return outputs
