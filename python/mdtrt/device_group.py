"""DeviceGroup: the GPUs taking part, one rank thread and one NCCL communicator per GPU."""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from typing import Any, NamedTuple, Sequence

from . import _core, arguments
from .arrays import ArrayRef, describe, read_torch_cuda, torch_allocator, torch_current_streams, torch_output_factory
from .cuda_state import no_gpu_error
from .errors import InvalidArgumentError
from .launch import check_id_exchange, choose_device, detect_launch, exchange_unique_id, release_id_file
from .nccl import nccl_library
from .prepared_call import KeptCalls, PreparedCall, SpareOutputs, spare_bytes
from .vocabulary import COLLECTIVES, REDUCE_OPS
from .vocabulary import REDUCING as _REDUCING
from .vocabulary import ROOTED as _ROOTED

# Each cached collective may own a NCCL communicator split off for its group: keep a few.
_MAX_CACHED_COLLECTIVES = 16
# Prepared one-shot calls, one per argument signature (op, dtype, shape, devices, out= or not).
_MAX_CACHED_CALLS = 64
_OUTPUT_NAMES = ("output",)  # a collective's outputs, as its addressed runs name them


def _exact_ints(values) -> tuple | None:
    """``values`` as a tuple when it is a list or tuple of ints (no bools, no other integer types),
    else None: options that equal a checked key may then stand for it (True == 1, 1.0 == 1)."""
    if type(values) is not list and type(values) is not tuple:
        return None
    for v in values:
        if type(v) is not int:
            return None
    return tuple(values)


class _KeptCollective(NamedTuple):
    """A collective's prepared call as the one-shot calls keep it per argument signature."""

    call: PreparedCall
    defined: list | None  # per local rank, whether its output is defined (None: every rank's is)
    runner_key: tuple  # the runner it runs on: it goes when that runner is evicted

    def results(self, outputs) -> list:
        """What the collective returns: ``outputs`` (one per local rank), None for undefined ones."""
        defined = self.defined
        if defined is None:
            return list(outputs)
        return [o if d else None for o, d in zip(outputs, defined)]


class _TorchRun:
    """A kept collective run on torch CUDA tensors of one signature (as ``read_torch_cuda`` reads
    it) without an ArrayRef per tensor: made from the first call of that signature that passed
    the general path's checks, whose arrays (not kept) give what every call of the signature
    shares (devices, output sizes, stream ordering).

    Parameters
    ----------
    kept : _KeptCollective
    refs : list of ArrayRef
        That call's inputs.
    out_refs : list of dict or None
        That call's ``out`` (``{"output": ArrayRef}`` per rank), None when outputs are allocated.
    out_shape : tuple of int or None
        The output's shape, when outputs are allocated.
    rank_devices : list of int
        Each local rank's CUDA device (where allocated outputs go).
    spares : SpareOutputs
        The group's, shared by its runs: allocated outputs come from there when it has this run's.
    """

    __slots__ = ("kept", "_run", "_defined", "_ordered", "_devices", "_out_devices", "_out_streams",
                 "_out_nbytes", "_allocate", "_spares", "_spare_key", "_spare_bytes", "__weakref__")

    def __init__(self, kept, refs, out_refs, out_shape, rank_devices, spares):
        self.kept = kept
        self._spares = spares
        self._spare_key = spares.key_for(self)  # its spares go when this run goes (evicted)
        self._defined = kept.defined
        self._devices = [ref.device for ref in refs]
        self._allocate = None
        if out_refs is None:  # torch outputs, as the PreparedCall's new_out allocates them
            out_refs = [{"output": ArrayRef(0, device, refs[0].dtype, out_shape, None, "torch")}
                        for device in rank_devices]
            self._allocate = torch_allocator(out_shape, refs[0].dtype, rank_devices, refs[0].shape, self._devices)
        outs = [given["output"] for given in out_refs]
        self._ordered = kept.call.stream_ordered_for(out_refs)
        self._out_devices = [o.device for o in outs]
        self._out_streams = self._out_devices != self._devices  # outputs on other GPUs: read their streams
        self._out_nbytes = [o.nbytes for o in outs]
        self._spare_bytes = spare_bytes([[nbytes] for nbytes in self._out_nbytes])
        self._run = kept.call.addressed(_OUTPUT_NAMES, self._out_nbytes, self._out_devices, self._ordered)

    def __call__(self, inputs, pointers, out) -> list:
        """Runs the call on ``inputs``, into ``out`` (None: new tensors from torch's caching
        allocator); ``pointers``: the inputs' data pointers, then ``out``'s (a list of this call's:
        allocated outputs' are appended). Returns as :meth:`DeviceGroup.collective`."""
        streams = torch_current_streams(self._devices)
        out_streams = torch_current_streams(self._out_devices) if self._out_streams else streams
        allocating = out is None
        keep_spare = None
        if allocating:
            spare = self._spares.take(self._spare_key, out_streams)
            out, addresses = spare if spare is not None else self._new_outputs(inputs)
            pointers += addresses
            if self._ordered:  # the next call's outputs, made while the ranks check this one
                keep_spare = lambda: self._spares.keep_new(self._spare_key, out_streams, self._spare_bytes,  # noqa: E731
                                                           self._new_outputs, inputs)
        try:
            self._run(pointers, streams + out_streams, keep_spare)
        except BaseException:
            self.kept.call.hold_if_in_use(inputs, out)  # work of the failed run may still use them
            if keep_spare is not None:
                self._spares.forget(self._spare_key)  # a failed call keeps no spare
            raise
        return list(out) if self._defined is None else self.kept.results(out)

    def _new_outputs(self, inputs) -> tuple:
        """(one new tensor per rank, their data pointers)."""
        out = self._allocate(inputs)
        addresses = []
        for t in out:  # a loop: a comprehension's set-up costs more for a few ranks
            addresses.append(t.data_ptr())
        return out, addresses


@dataclasses.dataclass(frozen=True)
class Communicator:
    """One rank's world communicator. ``ptr`` is the ncclComm_t as an integer; ``capsule()`` is the
    PyCapsule named "ncclComm_t" that TensorRT's Python ``IExecutionContext.set_communicator`` takes.

    TensorRT requires the communicator to outlive every execution context it is attached to. This
    object keeps the group's native part (threads, communicators) alive, so ``ptr`` stays valid as
    long as it exists, also after ``group.close()``; each capsule holds the communicator itself,
    until the capsule is gone. Keep the capsule (or this object) at least as long as the contexts
    you attach it to."""

    rank: int
    device: int
    ptr: int
    _native: Any = dataclasses.field(repr=False, compare=False)
    _local: int = dataclasses.field(repr=False, compare=False)

    def capsule(self):
        """A PyCapsule named "ncclComm_t" holding this communicator (and keeping it alive), for
        TensorRT's Python ``IExecutionContext.set_communicator``."""
        return self._native.comm_capsule(self._local)


class DeviceGroup:
    """The GPUs of this process that run one multi-device program together.

    ``DeviceGroup(gpus=[0, 1])`` puts every rank in this process (rank i on ``gpus[i]``).
    ``DeviceGroup.from_env()`` joins a world started by a launcher (one process per GPU).
    Every blocking step waits at most ``timeout`` seconds, then names the ranks that did not finish.

    Raises
    ------
    CudaError
        No GPU is visible (the message gives the driver's answer: no driver, a driver older than
        mdtrt's CUDA runtime, ``CUDA_VISIBLE_DEVICES``).
    InvalidArgumentError
        A GPU id that is negative, listed twice or not visible, or a timeout that is not a
        positive finite number of seconds.
    LibraryNotFoundError
        NCCL could not be loaded (the message lists every place looked at).
    """

    def __init__(self, gpus: Sequence[int] | None = None, *, timeout: float = 60.0):
        timeout = arguments.seconds(timeout, "timeout")
        if gpus is not None:
            gpus = arguments.integers(gpus, "gpus", hint="GPU ids, e.g. gpus=[0, 1] (or gpus=range(2))")
        nccl_library()  # so the C++ side also finds NCCL in the nvidia-nccl wheel
        if gpus is None:
            gpus = list(range(_core.visible_gpu_count()))
            if not gpus:
                raise no_gpu_error("on this machine, and DeviceGroup() puts one rank on each visible GPU")
        # Wrong ids are named first, on any machine; then no GPU at all (a CudaError in words).
        self._adopt(_core.DeviceGroup.create_local(gpus, timeout))

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
        CudaError
            This process sees no GPU (the message gives the driver's answer).
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
        check_id_exchange(info, id_file=id_file)  # a setting error, before NCCL or a GPU is looked for
        nccl_library()
        device = choose_device(info, _core.visible_gpu_count(), gpu)
        uid = exchange_unique_id(info, timeout=timeout, id_file=id_file)
        try:
            native = _core.DeviceGroup.create_member([device], [info.rank], info.world_size, uid, float(timeout))
        finally:
            # Joined or failed: either way no later run may find this run's id.
            release_id_file(info, uid, id_file)
        self = cls.__new__(cls)
        self._adopt(native)
        self._unique_id = uid  # tags what rank 0 shares with this run's ranks (mdtrt.build_once)
        return self

    def _adopt(self, native) -> None:
        self._native = native
        self._closed_native = None  # a weak reference to it once closed: abort() still reaches it
        self._runners: OrderedDict = OrderedDict()  # collective runners by (op, reduce, root, groups, dtype, bind)
        self._calls = KeptCalls(_MAX_CACHED_CALLS)  # one-shot collective calls by argument signature
        # The same calls (_KeptCollective) by the signature of torch CUDA tensors, as read_torch_cuda reads it.
        self._torch_calls = KeptCalls(_MAX_CACHED_CALLS)
        self._spare_outputs = SpareOutputs()  # the next outputs of the latest of those calls
        self._runner_spares = weakref.WeakSet()  # the EngineRunners' SpareOutputs: close() closes them too
        # Fixed for the group's life; read on every call (a native property read costs a call).
        self._num_local_ranks = native.num_local_ranks
        self._ranks = list(native.ranks)

    # -- what the group is ------------------------------------------------------------------
    def _live(self):
        if self._native is None:
            raise InvalidArgumentError("the DeviceGroup was closed: create a new one")
        return self

    @property
    def gpus(self) -> list[int]:
        """CUDA device index of each local rank (``gpus[i]``: local rank ``i``).

        Raises :class:`InvalidArgumentError` once the group is closed (as every property does)."""
        return list(self._live()._native.devices)

    @property
    def ranks(self) -> list[int]:
        """World rank of each local rank."""
        return list(self._live()._native.ranks)

    @property
    def world_size(self) -> int:
        """Number of ranks in the world, over all processes."""
        return self._live()._native.world_size

    @property
    def timeout(self) -> float:
        """Seconds every blocking step of this group may wait before it raises RankTimeoutError."""
        return self._live()._native.timeout

    def __len__(self) -> int:
        return self._live()._native.num_local_ranks

    @property
    def peer_access(self) -> list[list[bool]]:
        """``peer_access[a][b]``: local rank ``a``'s GPU can access local rank ``b``'s memory directly
        (NVLink or PCIe peer-to-peer), as an n x n list for the group's n local ranks."""
        n = len(self)
        return [[self._native.peer_access(a, b) for b in range(n)] for a in range(n)]

    @property
    def peer_links(self) -> list[list[str]]:
        """How each pair of the group's GPUs is connected, found once when the group was created.

        ``replication="auto"`` sends pageable host inputs of 16 MiB or more through peer copies
        only when every pair is ``"nvlink"``; otherwise (PCIe, unknown) every GPU copies from host
        memory itself.

        Returns
        -------
        list of list of str
            ``peer_links[a][b]`` for local ranks ``a`` and ``b``, an n x n list for the group's n
            local ranks: ``"self"`` on the diagonal; ``"nvlink"`` (peer access, and NVML reports
            NVLink between the two); ``"pcie"`` (peer access without NVLink); ``"none"`` (no peer
            access, see :attr:`peer_access`); ``"unknown"`` (peer access, but NVML,
            ``libnvidia-ml.so.1`` from the NVIDIA driver, is unavailable or failed for the pair:
            :attr:`peer_links_reason` says why, and ``python -m mdtrt doctor`` shows it).
            ``MDTRT_NVML_LIBRARY=/path/to/libnvidia-ml.so.1`` names the library to use.
        """
        native = self._live()._native
        n = len(self)
        return [[native.peer_link(a, b) for b in range(n)] for a in range(n)]

    @property
    def peer_links_reason(self) -> str:
        """Why some entry of :attr:`peer_links` is ``"unknown"`` (NVML not found, its error
        string); ``""`` when none is."""
        return self._live()._native.peer_links_reason

    @property
    def communicators(self) -> list[Communicator]:
        """One :class:`Communicator` (world NCCL communicator) per local rank, in local-rank order."""
        native = self._live()._native
        return [Communicator(r, d, native.comm_ptr(i), native, i) for i, (r, d) in enumerate(zip(native.ranks, native.devices))]

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Ends the group: this object, and every runner, prepared call and engine program made on
        it, refuses further use (:class:`mdtrt.MdtrtError`: "the DeviceGroup was closed").

        The rank threads, communicators and GPU memory are released once nothing holds them: at
        once when nothing else does, otherwise when the last of these goes: an ``EngineRunner`` or
        engine program made on this group (a TensorRT context keeps its communicator until the
        context is gone: TensorRT requires the communicator to outlive it), a ``Communicator`` from
        ``communicators`` or a capsule from it. Drop those to free everything now. Waits for a call
        in flight to finish (or reach its deadline). Work that stream-ordered calls queued is waited
        for (each within its deadline) when the group is released, without raising: call
        :meth:`synchronize` first to see its errors.

        Raises
        ------
        InvalidArgumentError
            Called from inside a call of this group (a finalizer that garbage collection runs
            while the call allocates its next outputs): the group is left as it was."""
        native = self._native
        if native is not None:
            native.close()  # first: a refusal (from inside a call of this group) changes nothing
            self._closed_native = weakref.ref(native)
        self._native = None
        self._runners.clear()
        self._calls.clear()
        self._torch_calls.clear()
        self._spare_outputs.close()
        for spares in list(self._runner_spares):
            spares.close()

    def free_spare_outputs(self) -> None:
        """Frees the spare outputs this group and its ``EngineRunner`` objects hold for their next
        calls, without closing anything.

        A stream-ordered call that allocates its torch outputs keeps the next call's outputs
        allocated (at most 256 MiB per GPU for the group, as much again per runner): torch tensors
        that ``torch.cuda.memory_allocated()`` counts and ``torch.cuda.empty_cache()`` does not
        return. This drops them, so their memory goes back to torch's caching allocator (and to
        the device after ``torch.cuda.empty_cache()``). No GPU work uses a spare before a call
        takes it, so nothing waits. Later calls keep spares again; pass ``out=`` / ``outputs=`` to
        have none. Nothing to do, and nothing raised, once the group is closed.
        """
        self._spare_outputs.clear()
        for spares in list(self._runner_spares):
            spares.clear()

    def synchronize(self) -> None:
        """Waits until every stream-ordered call of this group has finished on every rank (each
        within its timeout, counted from when the call returned), and raises what went wrong in
        any of them: torch does not report the failure of a stream-ordered call.

        Raises
        ------
        RankTimeoutError
            A stream-ordered call did not finish within the timeout: its communicators were
            aborted and the group is unusable (its outputs, and later ones, are not valid).
        CudaError
            A stream-ordered call failed on a GPU.
        MdtrtError
            The group is unusable for another reason (closed, aborted, an earlier timeout).
        KeyboardInterrupt
            Ctrl-C while waiting: the communicators are aborted, the group is unusable.
        """
        self._live()._native.synchronize()

    def abort(self) -> None:
        """Aborts every communicator now; the group cannot be used afterwards. TensorRT contexts
        attached to them are never destroyed after that (what TensorRT does with a context whose
        communicator was aborted is not documented): their GPU memory stays allocated until the
        process ends. Also after :meth:`close`, while something still holds the group's
        communicators (an ``EngineRunner``, a ``Communicator``): stream-ordered work queued before
        the close may still wait in them."""
        native = self._native
        if native is None and self._closed_native is not None:
            native = self._closed_native()
        if native is not None:
            native.abort()

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
                   out=None, poison_outputs: bool = False, sequential_bind: bool = False,
                   stream_ordered: bool | None = None) -> list:
        """Runs one DistCollective operation, with TensorRT's semantics, on every local rank.

        Parameters
        ----------
        op : str
            One of all_reduce, all_gather, broadcast, reduce, reduce_scatter, all_to_all, gather,
            scatter. The operation runs along the first dimension.
        inputs : list of arrays
            One array per local rank (a single array with one local rank), all of one shape and
            dtype (float32, float16, bfloat16, int32, int8, uint8, int64, float64): numpy arrays
            (``ml_dtypes.bfloat16`` for bfloat16), torch tensors (CPU or CUDA), or device arrays
            with ``__cuda_array_interface__`` / ``__dlpack__`` (used in place, read after the work
            their producer's stream already queued).
        reduce : str
            sum, prod, max, min or avg, for all_reduce, reduce and reduce_scatter.
        root : int
            World rank of the group that broadcasts, scatters, or receives reduce/gather.
        groups : list of int, optional
            Ordered world ranks taking part (position = group-local rank); default all.
        out : list of device arrays, optional
            One preallocated output per local rank, on that rank's GPU, of the output's size
            (device inputs only): written in place, nothing allocated.
        poison_outputs : bool
            Fill outputs with 0xFF bytes first (tests).
        sequential_bind : bool
            Bind ranks one after another (only to show that a collective bind then deadlocks).
        stream_ordered : bool or None
            True: return once the operation is queued on every rank; each caller stream (the
            inputs' producer streams: torch's current stream; ``out``'s streams) waits for it on
            the GPU, so work queued there afterwards sees the outputs and may overwrite the inputs.
            Needs device inputs and outputs with their streams, outputs the caller owns (torch
            tensors or ``out``). False: return when every rank has finished. None (default):
            stream-ordered for torch CUDA tensors in and out, as torch.distributed's collectives
            are; waiting otherwise (numpy, ``mdtrt.DeviceArray`` and other arrays without a
            stream). A stream-ordered call that fails or passes the group's timeout on the GPU
            (counted from when the call returns, so time spent behind work already queued on the
            stream counts) is reported by :meth:`synchronize` and by the group's next call (a
            failure on the GPU once the group's watchdog, which looks every 5 to 50 ms, has seen it), not
            by torch: reading the outputs (``out[0].cpu()``) then gives invalid data without an
            error, so call :meth:`synchronize` before trusting results where that matters. A
            watchdog aborts the communicators at the deadline, so no stream waits forever. Work
            on another torch stream must wait for the current one (``s.wait_stream(...)``; and
            ``t.record_stream(s)`` for an output dropped while ``s`` still uses it). Calls cannot
            be captured into a torch CUDA graph.

        Returns
        -------
        list
            Per local rank: numpy arrays for numpy inputs, torch tensors for torch inputs (CUDA
            outputs from torch's caching allocator), ``mdtrt.DeviceArray`` (pooled device memory,
            valid as long as it is held) for other device arrays, ``out``'s arrays when given.
            Ranks outside the group, and non-root ranks of reduce and gather, get None.

        Raises
        ------
        InvalidArgumentError
            A wrong argument type or value, shapes that do not split across the group, an ``out``
            buffer of the wrong size or GPU, or ``stream_ordered=True`` with arrays that cannot be
            ordered (host memory, no stream, outputs from mdtrt's pool): found before any rank
            enqueues anything.
        RankTimeoutError
            A rank did not finish within the group's timeout (the group is unusable after); also
            raised by the next call when an earlier stream-ordered call passed its deadline.
        CudaError, MdtrtError
            An earlier stream-ordered call failed on a GPU, or the group was aborted or closed:
            the group is unusable (the error names the earlier call; its ``rank`` is None).

        Notes
        -----
        The group keeps one prepared call per argument signature (op, reduce, root, groups, dtype,
        shape, array kind and GPUs, ``out`` given or not; the 64 most recent): a loop of calls on
        new arrays checks each call's arguments but converts and plans them once. The kept call
        holds none of the arrays. For torch CUDA tensors and options of their plain types (int
        ``root``, bool flags, a list of ints as ``groups``) those checks are one read of each
        tensor's dtype, shape, GPU, contiguity and address, matched against the signatures that
        passed every check before. ``prepare_collective`` also skips reading the arrays per call.
        A stream-ordered call that allocates its torch outputs allocates the next call's outputs of
        its signature while its rank threads check its own arguments, before they launch it (not
        before the next call's enqueue, nor after this one's on the calling thread). Such a spare
        serves only the next call of its signature (or prepared call) on the streams current at its
        allocation and in the same torch inference mode; the group holds at most 64 of them and 256
        MiB per GPU in all (as torch's allocator rounds them; each ``EngineRunner`` as many again),
        drops a call's spare with the call (a dropped prepared call, a signature's call no longer
        kept) and frees them all, its runners' too, in :meth:`free_spare_outputs` and :meth:`close`,
        or once a spare's allocation ran out of memory (it keeps none after that).
        ``torch.cuda.use_mem_pool`` is not looked at: a call inside it may return a spare allocated
        outside it, and the reverse.
        """
        return self._collective(op, inputs, reduce, root, groups, out, poison_outputs,
                                sequential_bind, stream_ordered)

    def _collective(self, op, inputs, reduce, root, groups, out, poison_outputs, sequential_bind, stream_ordered):
        """:meth:`collective`, its arguments positional: the op methods call it directly."""
        # Torch CUDA tensors and plainly typed options, as a loop of calls passes them: the call
        # kept for their signature is found from one pass over the tensors (every property the
        # general path checks, and the addresses) and run on them. Everything else, and the first
        # call of each signature, takes the general path, which checks, describes and keeps.
        torch_key = None
        if (type(root) is int and type(reduce) is str and (poison_outputs is False or poison_outputs is True)
                and (sequential_bind is False or sequential_bind is True)
                and (stream_ordered is None or stream_ordered is True or stream_ordered is False)):
            group_key = None if groups is None else _exact_ints(groups)
            if self._num_local_ranks == 1:  # a single array stands for a list of one (arguments.per_rank)
                if type(inputs) is not list and type(inputs) is not tuple:
                    inputs = [inputs]
                if out is not None and type(out) is not list and type(out) is not tuple:
                    out = [out]
            read = (read_torch_cuda(inputs, out, self._num_local_ranks)
                    if type(op) is str and (groups is None or group_key is not None) else None)
            if read is not None:
                # (read[0] covers out= too: with it, twice as long)
                torch_key = (op, reduce, root, group_key, poison_outputs, sequential_bind, stream_ordered) + read[0]
                run = self._torch_calls.get(torch_key)  # a plain get: evicted in the order kept, not used
                if run is not None:
                    return run(inputs, read[1], out)
        refs, out_refs, key = self._collective_arguments(op, inputs, reduce, root, groups, out, poison_outputs,
                                                         sequential_bind, stream_ordered)
        # One prepared call per argument signature: a loop of one-shot calls (new arrays each time,
        # as users write it) checks, converts and plans its arguments once, not per call.
        call_key = (key, poison_outputs, stream_ordered, refs[0].kind, refs[0].shape, tuple([r.device for r in refs]),
                    None if out_refs is None else tuple([o["output"].device for o in out_refs]))
        kept = self._calls.find(call_key) or self._calls.keep(
            call_key, self._new_collective_call(refs, out_refs, key, poison_outputs, stream_ordered, keep_inputs=False))
        results = kept.call.run_on([[ref] for ref in refs], out_refs)
        if torch_key is not None:  # these tensors passed every check: their signature finds this call
            out_shape = self._output_shape(key, refs[0].shape) if out_refs is None else None
            self._torch_calls.keep(torch_key, _TorchRun(kept, refs, out_refs, out_shape, list(self._native.devices),
                                                          self._spare_outputs))
        return kept.results([o["output"] for o in results])

    def prepare_collective(self, op: str, inputs, *, reduce: str = "sum", root: int = 0,
                           groups: Sequence[int] | None = None, out=None, poison_outputs: bool = False,
                           sequential_bind: bool = False, stream_ordered: bool | None = None):
        """``collective`` with its arguments checked and converted once: the returned callable runs
        the operation again on the same buffers (refill them in place between calls) and returns
        what ``collective`` would, for latency-bound loops. Without ``out``, every call returns
        new outputs (earlier ones stay valid while held). Parameters and errors as ``collective``
        (what ``stream_ordered=True`` cannot meet is raised by the first call). The call orders
        itself after the streams that were current (for torch tensors) when it was prepared, not
        when it is called."""
        refs, out_refs, key = self._collective_arguments(op, inputs, reduce, root, groups, out, poison_outputs,
                                                         sequential_bind, stream_ordered)
        kept = self._new_collective_call(refs, out_refs, key, poison_outputs, stream_ordered, keep_inputs=True)
        call, results = kept.call, kept.results
        return lambda: results([o["output"] for o in call()])

    def _collective_arguments(self, op, inputs, reduce, root, groups, out, poison_outputs, sequential_bind,
                              stream_ordered):
        """Checks a collective's arguments: (input refs, out refs or None, runner key)."""
        self._live()
        arguments.optional_flag(stream_ordered, "stream_ordered")  # passed on as given: None or bool-like
        arguments.choice(op, "op", COLLECTIVES)
        if op in _REDUCING:
            arguments.choice(reduce, "reduce", REDUCE_OPS)
        root = arguments.integer(root, "root")
        arguments.flag(poison_outputs, "poison_outputs")
        sequential_bind = arguments.flag(sequential_bind, "sequential_bind")
        n, ranks = self._num_local_ranks, self._ranks
        inputs = arguments.per_rank(inputs, op, n, "input")
        refs = [describe(x, "input of rank", r) for x, r in zip(inputs, ranks)]
        first = refs[0]
        for ref, r in zip(refs, ranks):
            if ref.dtype != first.dtype or ref.shape != first.shape:
                raise InvalidArgumentError(
                    f"every rank's input must have one shape and dtype: rank {ranks[0]} has {first.shape} "
                    f"{first.dtype}, rank {r} has {ref.shape} {ref.dtype}")
        groups = arguments.integers(groups, "groups", hint="world ranks, e.g. groups=[0, 1]") if groups is not None else []
        reduce_name = reduce if op in _REDUCING else "none"
        root = int(root) if op in _ROOTED else 0
        out_refs = None
        if out is not None:
            out = arguments.per_rank(out, "out=", n, "array")
            out_refs = [{"output": describe(o, "out of rank", r)} for o, r in zip(out, ranks)]
        key = (op, reduce_name, root, tuple(groups), first.dtype, sequential_bind)
        return refs, out_refs, key

    def _collective_runner(self, key):
        """The (native runner, per-rank "output defined" list or None) of a collective, cached."""
        cached = self._runners.get(key)
        if cached is not None:
            try:
                self._runners.move_to_end(key)
            except KeyError:  # another thread's call evicted it meanwhile: still usable by this one
                pass
            return cached
        native = self._native
        op, reduce_name, root, groups, dtype, sequential_bind = key
        n = native.num_local_ranks
        program = _core.CollectiveProgram(op, reduce_name, root, list(groups), dtype, native.world_size, n)
        runner = _core.ProgramRunner(native, [program] * n, sequential_bind)
        members = groups or range(native.world_size)
        # Outside the group, and off the root of reduce/gather, a rank's output is undefined.
        defined = [r in members and not (op in ("reduce", "gather") and r != root) for r in native.ranks]
        cached = self._runners[key] = (runner, None if all(defined) else defined)
        if len(self._runners) > _MAX_CACHED_COLLECTIVES:
            evicted = self._runners.popitem(last=False)[0]
            # Calls prepared on the evicted runner keep it (and its communicator) alive: drop them too.
            # (list() copies the keys in one step: another thread's call may change the dict meanwhile)
            for call_key in [k for k in list(self._calls) if k[0] == evicted]:
                self._calls.pop(call_key, None)
            for call_key in [k for k, run in list(self._torch_calls.items()) if run.kept.runner_key == evicted]:
                self._torch_calls.pop(call_key, None)  # (and its spares go with it)
        return cached

    def _new_collective_call(self, refs, out_refs, key, poison_outputs, stream_ordered, *, keep_inputs):
        """The _KeptCollective (PreparedCall, which ranks' outputs are defined) of a collective on these arrays."""
        native = self._native
        runner, defined = self._collective_runner(key)
        n = self._num_local_ranks
        first = refs[0]
        new_out = None
        if out_refs is None and first.kind == "torch":
            # torch in, torch out: outputs from torch's caching allocator, a fresh set per call.
            new_out = torch_output_factory([[("output", first.dtype, self._output_shape(key, first.shape))]] * n,
                                           list(native.devices))
        call = PreparedCall(runner, [[ref] for ref in refs], fetch_all=True, poison_outputs=bool(poison_outputs),
                            out=out_refs, new_out=new_out, keep_inputs=keep_inputs, output_names=("output",),
                            stream_ordered=stream_ordered, spares=self._spare_outputs)
        return _KeptCollective(call, defined, key)

    def _output_shape(self, key, shape) -> tuple:
        """The output shape of the collective of runner ``key`` on inputs of ``shape``."""
        op, groups = key[0], key[3]
        group_size = len(groups) if groups else self._native.world_size
        return tuple(_core.collective_output_shape(op, list(shape), group_size))

    def all_reduce(self, inputs, *, reduce: str = "sum", groups=None, out=None, poison_outputs: bool = False,
                   sequential_bind: bool = False, stream_ordered: bool | None = None) -> list:
        """Element-wise ``reduce`` (sum, prod, max, min, avg) of the group's inputs, on every member.

        Every member's input has shape ``(N, ...)``; every member gets the reduction, shape
        ``(N, ...)``, same dtype.

        Parameters and errors are those of :meth:`collective` (``out``, ``poison_outputs``,
        ``sequential_bind``, ``stream_ordered`` too).
        """
        return self._collective("all_reduce", inputs, reduce, 0, groups, out, poison_outputs,
                                sequential_bind, stream_ordered)

    def all_gather(self, inputs, *, groups=None, out=None, poison_outputs: bool = False,
                   sequential_bind: bool = False, stream_ordered: bool | None = None) -> list:
        """The group's inputs concatenated along the first dimension, in group-rank order, on every member.

        Inputs of shape ``(N, ...)`` on ``G`` members give ``(G * N, ...)`` on each.

        Parameters and errors are those of :meth:`collective` (``out``, ``poison_outputs``,
        ``sequential_bind``, ``stream_ordered`` too).
        """
        return self._collective("all_gather", inputs, "sum", 0, groups, out, poison_outputs,
                                sequential_bind, stream_ordered)

    def broadcast(self, inputs, *, root: int = 0, groups=None, out=None, poison_outputs: bool = False,
                  sequential_bind: bool = False, stream_ordered: bool | None = None) -> list:
        """World rank ``root``'s input, shape ``(N, ...)``, on every member of the group.

        Parameters and errors are those of :meth:`collective` (``out``, ``poison_outputs``,
        ``sequential_bind``, ``stream_ordered`` too).
        """
        return self._collective("broadcast", inputs, "sum", root, groups, out, poison_outputs,
                                sequential_bind, stream_ordered)

    def reduce(self, inputs, *, reduce: str = "sum", root: int = 0, groups=None, out=None, poison_outputs: bool = False,
               sequential_bind: bool = False, stream_ordered: bool | None = None) -> list:
        """Element-wise ``reduce`` of the group's inputs, on world rank ``root`` only.

        Inputs of shape ``(N, ...)``; ``root`` gets ``(N, ...)``, the other members None.

        Parameters and errors are those of :meth:`collective` (``out``, ``poison_outputs``,
        ``sequential_bind``, ``stream_ordered`` too).
        """
        return self._collective("reduce", inputs, reduce, root, groups, out, poison_outputs,
                                sequential_bind, stream_ordered)

    def reduce_scatter(self, inputs, *, reduce: str = "sum", groups=None, out=None, poison_outputs: bool = False,
                       sequential_bind: bool = False, stream_ordered: bool | None = None) -> list:
        """Element-wise ``reduce`` of the group's inputs, split along the first dimension.

        Inputs of shape ``(N, ...)`` with ``N`` divisible by the group size ``G``: group rank ``i``
        gets rows ``i * N / G`` to ``(i + 1) * N / G`` of the reduction, shape ``(N / G, ...)``.

        Parameters and errors are those of :meth:`collective` (``out``, ``poison_outputs``,
        ``sequential_bind``, ``stream_ordered`` too).
        """
        return self._collective("reduce_scatter", inputs, reduce, 0, groups, out, poison_outputs,
                                sequential_bind, stream_ordered)

    def all_to_all(self, inputs, *, groups=None, out=None, poison_outputs: bool = False,
                   sequential_bind: bool = False, stream_ordered: bool | None = None) -> list:
        """Chunk exchange: group rank ``i`` gets chunk ``i`` of every member's input, in group-rank order.

        Inputs of shape ``(N, ...)`` with ``N`` divisible by the group size ``G`` (chunks of
        ``N / G`` rows); every member gets ``(N, ...)``.

        Parameters and errors are those of :meth:`collective` (``out``, ``poison_outputs``,
        ``sequential_bind``, ``stream_ordered`` too).
        """
        return self._collective("all_to_all", inputs, "sum", 0, groups, out, poison_outputs,
                                sequential_bind, stream_ordered)

    def gather(self, inputs, *, root: int = 0, groups=None, out=None, poison_outputs: bool = False,
               sequential_bind: bool = False, stream_ordered: bool | None = None) -> list:
        """The group's inputs concatenated along the first dimension, in group-rank order, on ``root`` only.

        Inputs of shape ``(N, ...)`` on ``G`` members; ``root`` gets ``(G * N, ...)``, the others None.

        Parameters and errors are those of :meth:`collective` (``out``, ``poison_outputs``,
        ``sequential_bind``, ``stream_ordered`` too).
        """
        return self._collective("gather", inputs, "sum", root, groups, out, poison_outputs,
                                sequential_bind, stream_ordered)

    def scatter(self, inputs, *, root: int = 0, groups=None, out=None, poison_outputs: bool = False,
                sequential_bind: bool = False, stream_ordered: bool | None = None) -> list:
        """World rank ``root``'s input split along the first dimension: group rank ``i`` gets chunk ``i``.

        ``root``'s input has shape ``(N, ...)`` with ``N`` divisible by the group size ``G``; every
        member gets ``(N / G, ...)`` (the other members' inputs give only shape and dtype).

        Parameters and errors are those of :meth:`collective` (``out``, ``poison_outputs``,
        ``sequential_bind``, ``stream_ordered`` too).
        """
        return self._collective("scatter", inputs, "sum", root, groups, out, poison_outputs,
                                sequential_bind, stream_ordered)
