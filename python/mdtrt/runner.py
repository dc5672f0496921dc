"""EngineRunner: one engine (or one engine per rank), every GPU of a DeviceGroup, one call."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Mapping, Sequence

from . import _core, arguments
from .arrays import ArrayRef, describe, read_torch_cuda, torch_current_streams
from .device_group import DeviceGroup
from .prepared_call import KeptCalls, PreparedCall, SpareOutputs, names_every_output, spare_bytes
from .vocabulary import REPLICATION_MODES
from .errors import InvalidArgumentError

# infer's prepared calls kept per argument signature (input kinds, dtypes, shapes, devices, options).
_MAX_CACHED_CALLS = 16


def _engine_bytes(engine: Any) -> bytes:
    """Serialized engine from bytes, any buffer (TensorRT's IHostMemory included) or a plan file path."""
    if isinstance(engine, (str, os.PathLike)):
        path = arguments.input_file(engine, "engine file", "give the path of a serialized TensorRT plan (the bytes "
                                    "mdtrt.tensorrt's builders return, or trtexec --saveEngine writes), or its bytes")
        with open(path, "rb") as f:
            return f.read()
    try:
        return bytes(memoryview(engine))
    except TypeError:
        raise InvalidArgumentError(
            f"engine of type {type(engine).__name__} is neither bytes, a buffer, nor a plan file path") from None


class _TorchInfer:
    """A kept infer call run on torch CUDA tensors of one signature (as ``EngineRunner._read_torch``
    reads it) without an ArrayRef per tensor: made from the first call of that signature that
    passed the general path's checks and ran, whose arrays (not kept) give what every call of the
    signature shares (devices, output names and sizes, stream ordering).

    Parameters
    ----------
    call : PreparedCall
        The call kept for the signature; it ran once, so its output names are known.
    per_rank : list of list of ArrayRef
        That call's inputs, per local rank.
    out : list of dict or None
        That call's ``outputs`` (``{name: ArrayRef}`` per rank, in the order ``outputs`` named
        them), None when they come from torch's caching allocator (``call.torch_outputs``).
    shared : bool
        One input dict for every rank: the tensors read are the ``k`` inputs once, not per rank.
    all_ranks : bool
        Return every rank's outputs, not only the first rank's.
    rank_devices : list of int
        Each local rank's CUDA device (where allocated outputs go).
    spares : SpareOutputs
        The runner's, shared by its kept calls: allocated outputs come from there when it has this call's.

    The tensors of a call are read in this order: the inputs (once if shared, else each rank's in
    turn, in the engine's order), then each output of ``outputs`` with its tensor per rank.
    """

    __slots__ = ("call", "_run", "_order", "_devices", "_names", "_nbytes", "_out_devices", "_ordered",
                 "_allocate", "_likes", "_results", "_rank_devices", "_spares", "_spare_key", "_spare_bytes",
                 "__weakref__")

    def __init__(self, call, per_rank, out, shared, all_ranks, rank_devices, spares):
        n, k = len(per_rank), len(per_rank[0])
        self.call = call
        self._rank_devices = list(rank_devices)
        self._spares = spares
        self._spare_key = spares.key_for(self)  # its spares go when this call goes (evicted)
        inputs = list(range(k)) * n if shared else list(range(n * k))  # read index of each rank's inputs
        read = k if shared else n * k  # inputs read
        refs = list(per_rank[0]) if shared else [ref for refs in per_rank for ref in refs]
        results = call.output_names
        if out is None:  # allocated: each rank's outputs in the order of their specs
            self._allocate, specs = call.torch_outputs
            self._likes = None if k == 0 else [0] * n if shared else [i * k for i in range(n)]
            out = [{name: ArrayRef(0, device, dtype, tuple(shape), None, "torch") for name, dtype, shape in rank}
                   for rank, device in zip(specs, rank_devices)]
            self._names = tuple(out[0])
            self._order = inputs
            self._results = None
        else:  # given: read name by name, each with a tensor per rank; the run wants them rank by rank
            self._allocate = self._likes = None
            self._names = tuple(out[0])
            m = len(self._names)
            self._order = inputs + [read + j * n + i for i in range(n) for j in range(m)]
            self._results = [[(name, read + self._names.index(name) * n + i) for name in results]
                             for i in range(n if all_ranks else 1)]
        self._devices = [refs[i].device for i in inputs]
        outs = [ref for given in out for ref in given.values()]
        if self._allocate is None:
            self._devices += [ref.device for ref in outs]
        if self._order == list(range(len(self._order))):
            self._order = None  # the run takes the pointers as read
        self._nbytes = [ref.nbytes for ref in outs]
        self._spare_bytes = spare_bytes([[ref.nbytes for ref in given.values()] for given in out])
        self._out_devices = [ref.device for ref in outs]
        self._ordered = call.stream_ordered_for(out)
        self._run = call.addressed(self._names, self._nbytes, self._out_devices, self._ordered)

    def __call__(self, tensors, pointers, all_ranks):
        """Runs the call on ``tensors`` (as read) at ``pointers`` (their data pointers); returns
        as :meth:`EngineRunner.infer`."""
        if self._order is not None:
            pointers = [pointers[i] for i in self._order]
        streams = torch_current_streams(self._devices)
        out = keep_spare = None
        if self._allocate is not None:  # torch outputs, as the PreparedCall's new_out allocates them
            likes = None if self._likes is None else [tensors[i] for i in self._likes]
            allocated_on = torch_current_streams(self._rank_devices)
            out = self._spares.take(self._spare_key, allocated_on) or self._allocate(likes)
            for given in out:  # loops: a comprehension's set-up costs more for a few outputs
                for ref in given.values():
                    pointers.append(ref.ptr)
                    streams.append(ref.stream)
            if self._ordered:  # the next call's outputs, made while the ranks check this one
                keep_spare = lambda: self._spares.keep_new(self._spare_key, allocated_on, self._spare_bytes,  # noqa: E731
                                                           self._allocate, likes)
        try:
            self._run(pointers, streams, keep_spare)
        except BaseException:
            self.call.hold_if_in_use(tensors, out)  # work of the failed run may still use them
            if keep_spare is not None:
                self._spares.forget(self._spare_key)  # a failed call keeps no spare
            raise
        if out is not None:
            if not all_ranks:
                return {name: ref.owner for name, ref in out[0].items()}
            return [{name: ref.owner for name, ref in given.items()} for given in out]
        if not all_ranks:
            return {name: tensors[i] for name, i in self._results[0]}
        return [{name: tensors[i] for name, i in rank} for rank in self._results]


class EngineRunner:
    """Runs a multi-device TensorRT engine on every GPU of ``group``.

    Each rank deserializes the engine on its own thread and attaches the group's world
    communicator with ``setCommunicator`` on all ranks at once (one after another deadlocks). A rank
    whose ``setCommunicator`` fails raises an error naming it: such an engine's collectives would
    silently do nothing.

    Parameters
    ----------
    group : DeviceGroup
        The GPUs to run on (one rank each).
    engine : bytes, buffer or path, optional
        Serialized bytes, a buffer (``IHostMemory``) or a plan file path, shared by every rank.
    engines : sequence, optional
        One engine per local rank instead (weight-sharded engines).
    program : _core.RankProgram, optional
        A native program run through the same path (tests, benchmarks); an engine program
        (``mdtrt.tensorrt.engine_program``) runs in one runner only, a second raises
        :class:`mdtrt.InvalidArgumentError`.
    multi_device : bool
        Attach the world communicator to each rank's context (engines with DistCollective layers);
        False runs a single-device engine on every rank independently.
    replication : str
        How an input every rank needs reaches every GPU: auto, host, peer or broadcast
        (:data:`mdtrt.vocabulary.REPLICATION_MODES`); a call's ``replication=`` overrides it.
        ``auto`` is the fastest measured on 2x H200 with NVLink (BENCHMARKS.md, section 3): host,
        except peer for a pageable (not pinned) input of 16 MiB or more where every GPU pair is
        joined by NVLink (:attr:`DeviceGroup.peer_links`; PCIe or unknown links take host).
        :attr:`last_replication` says what a call used. With one GPU in the group (or in this
        process, under a launcher) nothing is replicated: every mode is accepted, so that the same
        code runs on any number of GPUs, and :attr:`last_replication` says host.
    sequential_bind : bool
        Bind ranks one after another (only to show that a collective bind then deadlocks).
    cuda_graph : bool
        Each rank captures the engine's enqueue into a CUDA graph the second time it runs on the
        same buffers and shapes, and replays it from then on (one launch instead of one per kernel,
        for small latency-bound engines); new buffers or shapes are run uncaptured once, then
        captured again. Pair it with ``prepare()`` or ``outputs=`` so the buffers stay the same.
        Input shapes are set on TensorRT only when they change. When a capture fails on any rank,
        no rank has launched anything yet: every rank runs that call without graphs, the runner
        stays without them from then on, and one ``RuntimeWarning`` says why.
    allow_host_code : bool
        Let TensorRT load plans carrying host code (version-compatible plans that embed the lean
        runtime; ``IRuntime::setEngineHostCodeAllowed``). Off by default, as in TensorRT: it runs
        code from the plan file.

    Raises
    ------
    InvalidArgumentError
        Arguments of the wrong type or value (the group first, then the engine), or an engine
        program already used by another runner.
    TensorRTError
        An engine this TensorRT and GPU cannot load, or a rank whose ``setCommunicator`` failed.
    RankTimeoutError
        A rank did not finish binding within the group's timeout.

    Notes
    -----
    The runner keeps what it runs on alive; once ``group.close()`` was called, every call raises
    :class:`mdtrt.MdtrtError` ("the DeviceGroup was closed").
    """

    _cuda_graph = False
    _graph_warned = False

    def __init__(self, group: DeviceGroup, engine: Any = None, *, engines: Sequence[Any] | None = None,
                 program: Any = None, multi_device: bool = True, replication: str = "auto",
                 sequential_bind: bool = False, cuda_graph: bool = False, allow_host_code: bool = False):
        if not isinstance(group, DeviceGroup):
            hint = (": the first argument is the DeviceGroup, the engine comes second, "
                    "EngineRunner(group, engine)") if isinstance(group, (str, bytes, os.PathLike)) else ""
            raise InvalidArgumentError(f"group must be a mdtrt.DeviceGroup, got {type(group).__name__}{hint}")
        self.group = group
        native_group = group._live()._native
        n = len(group)
        if sum(x is not None for x in (engine, engines, program)) != 1:
            raise InvalidArgumentError("give exactly one of engine=, engines= (one per rank) or program=")
        arguments.choice(replication, "replication", REPLICATION_MODES)
        if program is not None and not isinstance(program, _core.RankProgram):
            raise arguments.fail("program", "a native program (mdtrt._core.RankProgram)", program)
        multi_device = arguments.flag(multi_device, "multi_device")
        sequential_bind = arguments.flag(sequential_bind, "sequential_bind")
        cuda_graph = arguments.flag(cuda_graph, "cuda_graph")
        self.replication = replication
        if program is None:
            from . import tensorrt

            if engines is not None:
                if isinstance(engines, (str, bytes, os.PathLike)) or not isinstance(engines, Sequence):
                    raise arguments.fail("engines", f"a list of {n} engines (one per local rank)", engines)
                if len(engines) != n:
                    raise InvalidArgumentError(f"engines= needs one engine per local rank: got {len(engines)} for {n}")
                blobs = [_engine_bytes(e) for e in engines]
            else:
                blob = _engine_bytes(engine)
                blobs = [blob] * n
            program = tensorrt.engine_program(blobs, multi_device=multi_device, allow_host_code=allow_host_code)
        self.program = program
        self._native = _core.ProgramRunner(native_group, [program] * n, sequential_bind)
        self._native.cuda_graphs = self._cuda_graph = bool(cuda_graph)
        self._inputs = [spec for spec in self._native.input_specs(0)]
        self._input_names = tuple(name for name, _, _ in self._inputs)
        # Output (name, dtype, shape) per rank by the inputs' dtypes and shapes, learnt from calls:
        # torch callers' outputs then come from torch's caching allocator (see PreparedCall).
        self._output_specs: dict = {}
        self._devices = group.gpus
        self._calls = KeptCalls(_MAX_CACHED_CALLS)  # infer's prepared calls, one per argument signature
        # The same calls (_TorchInfer) by the signature of torch CUDA tensors, as _read_torch reads it.
        self._torch_calls = KeptCalls(_MAX_CACHED_CALLS)
        self._spare_outputs = SpareOutputs()  # the next outputs of the latest of those calls
        group._runner_spares.add(self._spare_outputs)  # group.close() drops them

    @property
    def input_names(self) -> list[str]:
        """The engine's input tensor names, in the engine's order (the keys ``infer`` takes)."""
        return [name for name, _, _ in self._inputs]

    @property
    def graph_captures(self) -> list[int]:
        """Per local rank, how many CUDA graphs were captured so far (``cuda_graph=True``)."""
        return list(self._native.graph_captures)

    @property
    def graph_fallback(self) -> str:
        """Why CUDA graphs were switched off ("" while they were not): see ``cuda_graph``."""
        return self._native.graph_fallback

    def _warn_graph_fallback(self) -> None:
        if not self._graph_warned and self._native.graph_fallback:
            self._graph_warned = True
            warnings.warn(f"EngineRunner(cuda_graph=True): {self._native.graph_fallback}", RuntimeWarning,
                          stacklevel=3)

    @property
    def last_replication(self) -> str:
        """How the last call's replicated inputs travelled: host, peer or broadcast.

        Under ``replication="auto"`` the inputs of one call may travel differently (a pageable one of
        16 MiB or more by peer where every GPU pair is NVLink, the others by host); this is then the
        mode of the last of them."""
        return self._native.last_replication

    def _refs(self, inputs: Mapping[str, Any]) -> list:
        names = self._input_names
        if len(inputs) == len(names):
            try:  # the common case, checked by looking every name up once
                return [describe(inputs[name], f"input '{name}'") for name in names]
            except KeyError:
                pass
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        raise InvalidArgumentError(
            f"inputs do not match the engine: missing {missing}, unexpected {extra}; the engine takes {list(names)}")

    def infer(self, inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, all_ranks: bool = False,
              poison_outputs: bool = False, replication: str | None = None, timeout: float | None = None,
              outputs: Mapping[str, Sequence[Any]] | None = None,
              stream_ordered: bool | None = None):
        """Runs the engine once on every rank.

        Parameters
        ----------
        inputs : dict or list of dict
            Input name to array, given to every rank (a host array is replicated to every GPU; a
            device array is used in place on its own GPU and copied peer-to-peer to the others),
            or one such dict per local rank. Arrays as in ``DeviceGroup.collective``; addresses
            that are not 256-byte aligned (sliced views) are copied through an aligned buffer.
        all_ranks : bool
            Return every local rank's outputs, not only the first rank's.
        poison_outputs : bool
            Fill outputs with 0xFF bytes before the engine runs (tests).
        replication : str, optional
            auto, host, peer or broadcast: how a host input reaches every GPU (default: the runner's).
        timeout : float, optional
            Seconds for this call (default: the group's timeout).
        outputs : dict, optional
            Output name to one preallocated device array per local rank, written in place.
        stream_ordered : bool or None, optional
            True: return once the engine is queued on every rank; the caller streams (torch's
            current stream of each GPU involved, ``outputs``' streams) wait for it on the GPU.
            Needs device inputs and outputs with their streams and every output given (``outputs``,
            or torch tensors, which a runner allocates once it knows the output shapes: without
            ``outputs``, the first call of an input signature waits and returns pooled outputs).
            False: return when every rank has finished. None (default): stream-ordered when every
            input and output is a torch CUDA tensor (``outputs`` naming some of the engine's
            outputs leaves the others to the pool: such a call waits, and so does the first call
            of an input signature with ``outputs``, which learns the engine's output names). Errors on the GPU and passed deadlines
            (counted from when the call returns) surface in ``group.synchronize()`` and the
            group's next call, not in torch: see ``DeviceGroup.collective``.

        Returns
        -------
        dict or list of dict
            Output name to array: numpy for numpy inputs, torch tensors for torch inputs, else
            ``mdtrt.DeviceArray`` (pooled device memory, valid as long as it is held). A
            stream-ordered call allocates the next call's torch outputs once its own work is
            queued, as :meth:`DeviceGroup.collective` does (Notes there).

        Raises
        ------
        InvalidArgumentError
            Wrong argument types, unknown or missing input names, dtypes the engine does not take,
            an ``outputs`` buffer of the wrong size or GPU, ``stream_ordered=True`` with arrays that
            cannot be ordered: found before any rank enqueues.
        TensorRTError, RankTimeoutError
            The engine failed on a rank; a rank did not finish within the timeout.
        CudaError, RankTimeoutError, MdtrtError
            An earlier stream-ordered call of the group failed or passed its deadline, or the group
            was aborted or closed: the group is unusable.

        Notes
        -----
        The runner keeps one prepared call per argument signature (each input's kind, dtype, shape
        and GPU, one dict or one per rank, and the options; the 16 most recent): a loop of calls on
        new arrays checks each call's arguments but converts and plans them once. The kept call
        holds none of the arrays. For contiguous torch CUDA tensors (inputs in a ``dict`` or a
        list or tuple of one per rank with exactly the engine's names, ``outputs`` a ``dict`` of
        lists or tuples naming every output) and options of their plain types (bool flags, a str
        ``replication``, an int or float ``timeout``), those checks are one read of each tensor's
        dtype, shape, GPU, contiguity and address, matched against the signatures that passed
        every check and ran before (without ``outputs``: once a call learnt the output shapes).
        ``prepare`` also skips reading the arrays per call.
        """
        # Torch CUDA tensors and plainly typed options, as a loop of calls passes them: the call kept
        # for their signature is found from one pass over the tensors (every property the general
        # path checks, and the addresses) and run on them. Everything else, and the first call of
        # each signature, takes the general path, which checks, describes and keeps.
        torch_key = None
        mode = replication or self.replication
        if ((all_ranks is False or all_ranks is True) and (poison_outputs is False or poison_outputs is True)
                and (stream_ordered is None or stream_ordered is True or stream_ordered is False)
                and type(mode) is str and (timeout is None or type(timeout) is float or type(timeout) is int)):
            read = self._read_torch(inputs, outputs)
            if read is not None:
                torch_key = (all_ranks, poison_outputs, mode, timeout, stream_ordered) + read[0]
                run = self._torch_calls.get(torch_key)  # a plain get: evicted in the order kept, not used
                if run is not None:
                    if self.group._native is None:
                        self.group._live()  # closed: the general path's error
                    if not self._cuda_graph:
                        return run(read[1], read[2], all_ranks)
                    try:
                        return run(read[1], read[2], all_ranks)
                    finally:
                        self._warn_graph_fallback()
        per_rank, shared, all_ranks, poison_outputs, mode, timeout, out = self._call_arguments(
            inputs, all_ranks, poison_outputs, replication, timeout, outputs)
        stream_ordered = arguments.optional_flag(stream_ordered, "stream_ordered")
        # One prepared call per argument signature: a loop of infer calls on new arrays checks,
        # converts and plans its arguments once, not per call.
        signature = tuple(tuple((r.kind, r.dtype, r.shape, r.device) for r in refs)
                          for refs in (per_rank[:1] if shared else per_rank))
        key = (signature, shared, all_ranks, poison_outputs, mode, timeout, stream_ordered,
               None if out is None else tuple(tuple((name, ref.device) for name, ref in given.items()) for given in out))
        call = self._calls.find(key) or self._calls.keep(
            key, self._new_call(per_rank, all_ranks, poison_outputs, mode, timeout, out, stream_ordered,
                                keep_inputs=False))
        try:
            results = call.run_on(per_rank, out)
        finally:
            if self._cuda_graph:
                self._warn_graph_fallback()
        if torch_key is not None and self._runs_fast(call, out):
            # These tensors passed every check and ran: their signature finds this call from now on.
            self._torch_calls.keep(torch_key, _TorchInfer(call, per_rank, out, shared, all_ranks, self._devices,
                                                              self._spare_outputs))
        return results if all_ranks else results[0]

    def _read_torch(self, inputs, outputs) -> tuple | None:
        """One pass over infer's tensors when all are contiguous torch CUDA tensors in plain dicts
        and lists (``inputs``: one dict or one per rank with exactly the engine's names;
        ``outputs``: a dict of one list or tuple per output, a tensor per rank):
        ``(signature, tensors, pointers)``, the tensors in the order :class:`_TorchInfer` reads
        them. None otherwise: those arguments take the general path, which checks them."""
        names = self._input_names
        n = len(self._devices)
        tensors = []
        try:
            if type(inputs) is dict:
                if len(inputs) != len(names):
                    return None
                for name in names:  # loops: a comprehension's set-up costs more for a few tensors
                    tensors.append(inputs[name])
            elif (type(inputs) is list or type(inputs) is tuple) and len(inputs) == n:
                for given in inputs:
                    if type(given) is not dict or len(given) != len(names):
                        return None
                    for name in names:
                        tensors.append(given[name])
            else:
                return None
        except KeyError:
            return None
        out_names = None
        if outputs is not None:
            if type(outputs) is not dict:
                return None
            out_names = tuple(outputs)
            for arrays in outputs.values():
                if type(arrays) is not list and type(arrays) is not tuple:
                    if n != 1:
                        return None
                    arrays = (arrays,)  # one local rank: a single array stands for a list of one
                elif len(arrays) != n:
                    return None
                tensors += arrays
        read = read_torch_cuda(tensors, None, len(tensors))
        if read is None:
            return None
        return (type(inputs) is dict, out_names) + read[0], tensors, read[1]

    @staticmethod
    def _runs_fast(call: PreparedCall, out) -> bool:
        """Whether ``call``, having run, can run on the fast path: every output known by name and
        given (``outputs``) or allocated from torch's caching allocator."""
        names = call.output_names
        if not names:
            return False
        if out is None:
            return call.torch_outputs is not None
        return names_every_output(out[0], names)

    def prepare(self, inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, all_ranks: bool = False,
                poison_outputs: bool = False, replication: str | None = None, timeout: float | None = None,
                outputs: Mapping[str, Sequence[Any]] | None = None,
                stream_ordered: bool | None = None):
        """The same call as ``infer`` with its arguments checked and converted once, for
        latency-bound loops.

        Parameters
        ----------
        inputs, all_ranks, poison_outputs, replication, timeout, outputs, stream_ordered
            As for :meth:`infer`.

        Returns
        -------
        callable
            Called with no arguments, it runs the engine again on the same buffers (refill them in
            place between calls) and returns what ``infer`` would.

        Raises
        ------
        InvalidArgumentError
            As ``infer`` does, when preparing (before any rank runs anything); what
            ``stream_ordered=True`` cannot meet, at the first call.

        Notes
        -----
        The prepared call orders itself after the streams that were current (for torch tensors)
        when it was prepared, not when it is called.
        """
        per_rank, _, all_ranks, poison_outputs, mode, timeout, out = self._call_arguments(
            inputs, all_ranks, poison_outputs, replication, timeout, outputs)
        stream_ordered = arguments.optional_flag(stream_ordered, "stream_ordered")
        call = self._new_call(per_rank, all_ranks, poison_outputs, mode, timeout, out, stream_ordered,
                              keep_inputs=True)
        if self._cuda_graph:
            graphed = call

            def call():
                try:
                    return graphed()
                finally:
                    self._warn_graph_fallback()
        if all_ranks:
            return call
        return lambda: call()[0]

    def _call_arguments(self, inputs, all_ranks, poison_outputs, replication, timeout, outputs):
        """Checks infer's arguments: (per-rank input refs, one dict shared by every rank, all_ranks,
        poison_outputs, replication mode, timeout, per-rank output refs or None)."""
        n = len(self.group)
        all_ranks = arguments.flag(all_ranks, "all_ranks")
        poison_outputs = arguments.flag(poison_outputs, "poison_outputs")
        if timeout is not None:
            timeout = arguments.seconds(timeout, "timeout")
        shared = type(inputs) is dict or isinstance(inputs, Mapping)
        if shared:
            refs = self._refs(inputs)
            per_rank = [refs] * n
        else:
            if not isinstance(inputs, (list, tuple)) or not all(type(d) is dict or isinstance(d, Mapping)
                                                                for d in inputs):
                raise arguments.fail("inputs", "a dict of input name to array, or a list of such dicts (one per "
                                     "local rank)", inputs)
            if len(inputs) != n:
                raise InvalidArgumentError(f"a list of inputs needs one dict per local rank: got {len(inputs)} for {n}")
            per_rank = [self._refs(d) for d in inputs]
        mode = replication or self.replication
        arguments.choice(mode, "replication", REPLICATION_MODES)
        out = None
        if outputs is not None:
            if not isinstance(outputs, Mapping):
                raise arguments.fail("outputs", "a dict of output name to a list of device arrays (one per local "
                                     "rank)", outputs)
            out = [{} for _ in range(n)]
            for name, arrays in outputs.items():
                arrays = arguments.per_rank(arrays, f"outputs['{name}']", n, "array")
                for i, a in enumerate(arrays):
                    out[i][name] = describe(a, f"output '{name}'")
        return per_rank, shared, all_ranks, poison_outputs, mode, timeout, out

    def _new_call(self, per_rank, all_ranks, poison_outputs, mode, timeout, out, stream_ordered, *, keep_inputs):
        return PreparedCall(self._native, per_rank, fetch_all=all_ranks, poison_outputs=poison_outputs,
                            replication=mode, timeout=timeout, out=out, torch_devices=self._devices,
                            spec_cache=self._output_specs, keep_inputs=keep_inputs, stream_ordered=stream_ordered,
                            spares=self._spare_outputs)

    def time_infer(self, inputs, iterations: int = 20, warmup: int = 3, **kw) -> list[float]:
        """Wall-clock time of complete ``infer`` calls: each returns once every rank has finished
        (``stream_ordered=False`` unless ``**kw`` says otherwise; a stream-ordered call would be
        timed until it is queued only), and, with numpy inputs, once the outputs are back.

        Parameters
        ----------
        inputs
            As for :meth:`infer`; ``**kw`` are passed to it too.
        iterations : int
            Timed calls (at least 1).
        warmup : int
            Untimed calls first (at least 0).

        Returns
        -------
        list of float
            Milliseconds of each timed call, in call order.

        Raises
        ------
        InvalidArgumentError
            ``iterations`` or ``warmup`` out of range, or what ``infer`` raises.
        """
        iterations = arguments.integer(iterations, "iterations", minimum=1)
        warmup = arguments.integer(warmup, "warmup", minimum=0)
        kw.setdefault("stream_ordered", False)  # complete calls: a stream-ordered one returns when queued
        for _ in range(warmup):
            self.infer(inputs, **kw)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            self.infer(inputs, **kw)
            times.append((time.perf_counter() - start) * 1e3)
        return times
