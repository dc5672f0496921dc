"""PreparedCall: one ProgramRunner call checked, converted and planned once, run again on the same
buffers (used by ProgramRunner.prepare and DeviceGroup's collectives)."""

from __future__ import annotations

import functools
import operator
import sys
import threading
import weakref
from collections import OrderedDict
from typing import Sequence

from . import arguments
from .arrays import (ArrayRef, host_output, torch_current_streams, torch_inference_mode, torch_output_factory,
                     wrap_device_output)
from .errors import InvalidArgumentError


# The arrays of failed runs whose work may still read or write them after the run raised (a rank
# given up on, its task having ignored the abort past the grace; kernels a blocking call queued
# before its group broke at a deadline or on a GPU failure, which aborting the communicators does
# not end): kept for the life of the process, so that torch's caching allocator never hands their
# memory to someone else under that work. Only calls of a group that cannot be used any more add
# to it.
_HELD_FOR_UNFINISHED_WORK: list = []


class KeptCalls(OrderedDict):
    """The prepared calls the one-shot entry points keep, one per argument signature: the ``limit``
    most recently used."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def find(self, key):
        """The call kept under ``key`` (now the most recently used), or None."""
        call = self.get(key)
        if call is not None:
            try:
                self.move_to_end(key)
            except KeyError:  # another thread's call dropped it meanwhile: still usable by this one
                pass
        return call

    def keep(self, key, call):
        """Keeps ``call`` under ``key``, dropping the least recently used beyond ``limit``; returns it."""
        self[key] = call
        if len(self) > self.limit:
            self.popitem(last=False)
        return call


# Spares (see SpareOutputs) are kept for outputs of at most this many bytes per GPU, all together:
# past it, one allocation (a few microseconds) is under 0.5% of a call (at NVLink speed), and
# spares that large are memory the caller may need.
SPARE_OUTPUTS_MAX_BYTES = 256 << 20
# And at most this many (kinds of call and sets of streams): a loop alternates a few.
SPARE_OUTPUTS_MAX_COUNT = 64
# torch's caching allocator hands out blocks of a multiple of this many bytes, at least one.
_TORCH_BLOCK_BYTES = 512


def spare_bytes(per_rank_nbytes) -> int:
    """The most bytes of torch's caching allocator that one rank's outputs take (``per_rank_nbytes``:
    each local rank's outputs' sizes in bytes; every local rank is on a GPU of its own), as
    :meth:`SpareOutputs.keep_new` counts them: each output a multiple of 512 bytes, at least 512."""
    most = 0
    for sizes in per_rank_nbytes:
        total = 0
        for nbytes in sizes:
            total += max(_TORCH_BLOCK_BYTES, -(-nbytes // _TORCH_BLOCK_BYTES) * _TORCH_BLOCK_BYTES)
        most = max(most, total)
    return most


def _drop_spares_of(spares_ref, key) -> None:
    """Called when the owner of ``key`` (see SpareOutputs.key_for) went: its spares go too."""
    spares = spares_ref()
    if spares is not None:
        spares.forget(key)


class SpareOutputs:
    """The outputs a stream-ordered call allocates for the next call of its kind while its rank
    threads check its own arguments (the native run calls back for it, ``while_ranks_run``; no
    rank launches before it returned, since a torch allocation may synchronize GPUs joined by peer
    access, which must not come between two ranks' NCCL launches): the allocation (torch's caching
    allocator, a few microseconds per tensor) then overlaps the hand-off to the ranks instead of
    coming after the call, so a loop of ``y = group.all_reduce(x)`` pays little for it.

    One set per kind of call (its ``owner``: a signature's kept call or a prepared call, named by
    :meth:`key_for`), set of current streams and torch inference mode; at most
    ``SPARE_OUTPUTS_MAX_BYTES`` per GPU (as torch's allocator rounds them) and
    ``SPARE_OUTPUTS_MAX_COUNT`` sets in all, the least recently kept dropped first (a loop that
    alternates a few calls keeps a spare for each). One thread at a time allocates a spare (a
    thread that finds another one at it keeps none this time), so threads together stay within
    the limits.

    A spare is used only by a call whose outputs' streams are the ones current when it was
    allocated, since torch hands each block out in the order of the stream current at
    allocation (threads with streams of their own keep a spare each), and only in the inference
    mode it was allocated in (an inference tensor cannot be changed in place outside it). The
    spares hold no owner: an owner's go when it goes (a dropped prepared call, a signature's call
    evicted). None are kept after :meth:`close`, nor once an allocation failed: out of memory,
    torch's allocator frees its cached blocks first (cudaFree waits for the GPU) and counts an
    out-of-memory event, which trying again after every call would repeat.
    """

    __slots__ = ("_kept", "_keeping", "_off", "__weakref__")

    def __init__(self):
        self._kept: OrderedDict = OrderedDict()  # (owner's key, streams, inference mode) -> (outputs, bytes)
        # Held by the one thread adding a spare, never waited for: taking, forgetting and closing
        # only remove (each one dict step under the GIL), so the limits hold while it allocates.
        self._keeping = threading.Lock()
        self._off = False  # closed, or an allocation failed: none kept from now on

    def key_for(self, owner) -> weakref.ref:
        """What ``owner`` (a call, made once) passes to :meth:`take` and :meth:`keep_new`: a weak
        reference, so that the spares keep no owner (nor its runner, inputs, communicators) alive
        and go with it."""
        return weakref.ref(owner, functools.partial(_drop_spares_of, weakref.ref(self)))

    def take(self, key, streams):
        """The spare allocated for the owner of ``key`` on ``streams`` (the output GPUs' current
        streams now) in the current inference mode, or None. The spare is taken away: two threads
        never get the same one."""
        if not self._kept:
            return None
        spare = self._kept.pop((key, tuple(streams), torch_inference_mode()), None)  # one step under the GIL
        return None if spare is None else spare[0]

    def keep_new(self, key, streams, nbytes: int, allocate, *args) -> None:
        """Keeps ``allocate(*args)`` (outputs of ``nbytes`` on one GPU at most, as :func:`spare_bytes`
        counts them, allocated on ``streams``) for the next call of the owner of ``key``, dropping
        the least recently kept spares past the limits. Nothing when it alone is past them, while
        another thread allocates a spare, or after :meth:`close`. When the allocation fails (out of
        memory), every spare goes and none is kept from then on (the next call allocates its own
        and reports what still fails).

        Raises
        ------
        BaseException
            Whatever ``allocate`` raised other than torch's out-of-memory error (KeyboardInterrupt,
            an Exception of an application's SIGINT handler): the call that runs this is cancelled
            with it (see :meth:`PreparedCall.addressed`); nothing is kept."""
        if nbytes > SPARE_OUTPUTS_MAX_BYTES or self._off or not self._keeping.acquire(False):
            return
        kept = self._kept
        try:
            try:
                while kept and (len(kept) >= SPARE_OUTPUTS_MAX_COUNT
                                or sum(map(_BYTES, kept.values())) + nbytes > SPARE_OUTPUTS_MAX_BYTES):
                    kept.popitem(last=False)
            except KeyError:  # another thread took the last one meanwhile
                pass
            try:
                outputs = allocate(*args)
            except Exception as error:
                # Out of memory: this call's outputs are fine, only no spare. Anything else escapes
                # (cancelling the call that runs this): an application's SIGINT handler may raise an
                # Exception of its own here (Ctrl-C), which must reach it, as every wait gives it back.
                if not _out_of_memory(error):
                    raise
                self.close()
                return
            where = (key, tuple(streams), torch_inference_mode())
            kept[where] = (outputs, nbytes)
            if self._off:  # close() ran meanwhile (it sets the flag, then drops what is kept)
                kept.pop(where, None)
        finally:
            self._keeping.release()

    def forget(self, key) -> None:
        """Drops the spares of the owner of ``key``."""
        for where in [where for where in list(self._kept) if where[0] is key]:
            self._kept.pop(where, None)

    def clear(self) -> None:
        """Drops every spare (their memory goes back to torch's caching allocator)."""
        self._kept.clear()

    def close(self) -> None:
        """Drops every spare and keeps none from now on (also none of a call still running)."""
        self._off = True
        self._kept.clear()


_BYTES = operator.itemgetter(1)  # a spare's bytes per GPU, of its (outputs, bytes)


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is torch's out-of-memory error (the spares' allocations are torch's, so
    torch is imported when one fails)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def names_every_output(given, names) -> bool:
    """Whether ``given`` (a mapping keyed by output name: one rank's outputs) holds every output
    in ``names`` (the program's) and no other."""
    return len(given) == len(names) and all(name in given for name in names)


def _templates(per_rank_refs):
    """What ``new_out`` gets for a run on these inputs: with torch inputs, each rank's first (an
    output of its shape, dtype and GPU then comes from ``torch.empty_like``, which costs about half
    of ``torch.empty`` with a device); else None."""
    first = per_rank_refs[0]
    return [refs[0].owner if refs else None for refs in per_rank_refs] if first and first[0].kind == "torch" else None


class PreparedCall:
    """A ProgramRunner call whose arguments were checked, converted and planned once (the native
    ``PreparedInfer``): calling it runs the program again on the same buffers (their current
    contents), with no per-call argument work. Device arrays are ordered with the streams that were
    current when the call was prepared.

    Parameters
    ----------
    runner : _core.ProgramRunner
        The native runner whose ``prepare`` plans the call.
    per_rank_refs : list of list of ArrayRef
        Each local rank's inputs, in the program's input order (the same list object on every rank
        for a replicated input). All on the host or all on devices.
    fetch_all : bool
        With host inputs, copy every rank's outputs back (else the ranks in ``fetch_ranks``).
    poison_outputs : bool, optional
        Fill the outputs with 0xFF bytes (NaN for floats, -1 for ints) before each run, so that an
        output the program did not write shows.
    replication : str, optional
        How an input every rank needs reaches every GPU
        (:data:`mdtrt.vocabulary.REPLICATION_MODES`; default "auto").
    timeout : float, optional
        Seconds each call may take; None or 0: the device group's timeout.
    fetch_ranks : sequence of int, optional
        With host inputs and ``fetch_all`` False, the ranks whose outputs come back (default [0]).
    out : list of dict of str to ArrayRef, optional
        Preallocated device outputs, one ``{name: ArrayRef}`` per rank; each call writes into them
        and returns their owners.
    new_out : callable, optional
        Without ``out`` and with device inputs: returns fresh ``[{name: ArrayRef}]`` per rank for
        every call (outputs the caller keeps); called with the run's torch inputs, one per rank, as
        templates (or None: no torch inputs), as :func:`mdtrt.arrays.torch_output_factory` takes them.
    torch_devices : list of int, optional
        Each rank's CUDA device; with torch CUDA inputs only, outputs then come from torch's
        caching allocator once their shapes are known.
    spec_cache : dict, optional
        Output (name, dtype, shape) lists per rank, keyed by the inputs' dtypes and shapes; shared
        between calls so that later ones allocate torch outputs from the first call.
    keep_inputs : bool, optional
        False for a call kept per argument signature and run only through :meth:`run_on` (it must
        not keep the first call's arrays, inputs or ``out``, alive); ``__call__`` then has no arrays
        to run on.
    output_names : sequence of str, optional
        Every output of the program, when known in advance (a collective's one "output"): a call
        whose outputs are all given (``out`` or ``new_out``) then returns them without reading the
        native result.
    stream_ordered : bool or None, optional
        True: each run returns once its work is queued on every rank, and every caller stream of
        the run (the inputs' producer streams, the outputs' streams) waits for it on the GPU
        (needs device inputs and outputs with their streams, every output given; an engine's
        torch outputs are given from the second run of a signature on, once their shapes are
        known: its first run waits). False: each run returns when every rank has finished. None
        (default): stream-ordered when every input and output of the run is a torch CUDA tensor
        and every output of the program is given, as torch.distributed's collectives are (outputs
        given by the caller before the program's are known, an engine's first run, wait).
    spares : SpareOutputs, optional
        Where a stream-ordered run whose outputs ``new_out`` allocates keeps the next run's (its
        group's or runner's, shared by their calls); None: none kept.

    Raises
    ------
    InvalidArgumentError
        Host and device inputs mixed; ``out`` given with host inputs, or holding host arrays; or
        the native runner refused the arguments (names, dtypes, shapes).
    """

    def __init__(self, runner, per_rank_refs: list[list[ArrayRef]], *, fetch_all: bool, poison_outputs: bool = False,
                 replication: str = "auto", timeout: float | None = None, fetch_ranks: Sequence[int] | None = None,
                 out: list[dict[str, ArrayRef]] | None = None, new_out=None,
                 torch_devices: list[int] | None = None, spec_cache: dict | None = None, keep_inputs: bool = True,
                 output_names: Sequence[str] | None = None, stream_ordered: bool | None = None,
                 spares: SpareOutputs | None = None):
        # One pass over the inputs; a replicated input list is the same object on every rank.
        on_device = on_host = False
        all_torch = True
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
                    all_torch = all_torch and ref.kind == "torch"
            native_inputs.append(native)
        if on_device and on_host:
            raise InvalidArgumentError("mix of host and device inputs: pass all numpy arrays or all device arrays")
        if out is not None and not on_device:
            raise InvalidArgumentError("preallocated outputs are for device inputs; with numpy inputs outputs come back as numpy")
        if out is not None and any(ref.device < 0 for given in out for ref in given.values()):
            raise InvalidArgumentError("preallocated outputs must be device arrays")
        n = len(per_rank_refs)
        fetch = [] if on_device else (list(range(n)) if fetch_all else list(fetch_ranks or [0]))
        # Checked and planned once, natively; calling it repeats the call (positional arguments:
        # pybind11 matches keywords noticeably slower).
        self._call = runner.prepare(native_inputs, replication, poison_outputs, fetch, on_device, float(timeout or 0.0),
                                    [[ref.as_output(name) for name, ref in given.items()] for given in out] if out else [])
        # Keeps the arrays alive as long as the call can run; a reusable call (run_on only) must not
        # keep the arrays of the call that made it.
        self._refs = per_rank_refs if keep_inputs else None
        self._likes = _templates(per_rank_refs) if keep_inputs else None  # for new_out, on every call
        self._out = out if keep_inputs else None  # a kept call gets each call's outputs in run_on
        # The given outputs as the native call takes them, for stream-ordered runs (converted once).
        self._out_native = [[ref.as_output(name) for name, ref in given.items()] for given in self._out or ()]
        # new_out(): fresh output buffers for every call ([{name: ArrayRef}] per rank), for outputs
        # the caller keeps (torch's caching allocator instead of the runner's pool).
        self._new_out = new_out if out is None and on_device else None
        self._on_device = on_device
        self._stream_ordered = stream_ordered
        self._torch_inputs = on_device and all_torch
        self._flat_inputs = None  # the inputs' (pointers, streams) as an addressed run takes them, read once
        self._addressed = None  # the addressed run into outputs from new_out (their sizes and GPUs), once made
        self._output_names = tuple(output_names) if output_names is not None else None
        self._spares = spares
        self._as_prepared = None  # see _runs_as_prepared: None until the output names are known
        self._spare_key = spares.key_for(self) if spares is not None else None
        self._spare_devices = None  # the GPU of each allocated output (flat), once a spare was kept
        self._spare_bytes = 0  # the most bytes of allocated outputs on one GPU (spare_bytes)
        # Torch inputs whose output shapes are not known in advance (engines): the first call takes
        # pooled outputs and records the shapes in spec_cache (keyed by the inputs' dtypes and
        # shapes, which determine them); from then on, outputs come from torch's allocator.
        self._torch_devices = None
        if (self._new_out is None and out is None and on_device and torch_devices is not None
                and all(ref.kind == "torch" for refs in per_rank_refs for ref in refs)):
            self._torch_devices = list(torch_devices)
            self._spec_cache = spec_cache if spec_cache is not None else {}
            self._spec_key = tuple(tuple((ref.dtype, ref.shape) for ref in refs) for refs in per_rank_refs)
            specs = self._spec_cache.get(self._spec_key)
            if specs is not None:
                self._new_out = torch_output_factory(specs, self._torch_devices)

    def __call__(self) -> list[dict]:
        """Run the prepared call once.

        Returns
        -------
        list of dict of str to array
            One ``{output name: array}`` per rank: the caller's preallocated outputs, device outputs
            (DeviceArray or torch CUDA tensors like the inputs), or host outputs (numpy arrays, or
            torch CPU tensors like the inputs) for the fetched ranks; empty dicts for ranks not fetched.

        Raises
        ------
        InvalidArgumentError
            A preallocated output names an output the program does not have, has another size in
            bytes or lives on another GPU than the rank needs, or is a null pointer.
        MdtrtError
            A subclass from the native call: RankTimeoutError (a rank did not finish within the
            timeout), CudaError, NcclError or TensorRTError, with the rank and the call.
        """
        if self._refs is None:
            raise InvalidArgumentError("this call is run with run_on(arrays): it keeps no arrays of its own")
        if self._new_out is None and self._runs_as_prepared():
            # Into the outputs given when it was prepared, every one named, stream-ordered: the
            # native call runs as prepared (no arguments, a kept plan) and returns nothing to read.
            try:
                self._call.run_stream_ordered()
            except BaseException:
                self.hold_if_in_use(self._refs, self._out)
                raise
            names = self._output_names
            return [{name: given[name].owner for name in names} for given in self._out]
        out = self._new_outputs() if self._new_out is not None else self._out
        ordered = self.stream_ordered_for(out)
        names = self._output_names
        if self._new_out is not None and ordered and names is not None:
            # Outputs allocated for this run (torch's allocator), every one of them named: the
            # addressed native run, which returns nothing to read, as one-shot calls on torch
            # tensors run (new_out gives outputs of the same sizes and GPUs on every run).
            flat = self._flat_inputs
            if flat is None:
                flat = self._flat_inputs = ([ref.ptr for refs in self._refs for ref in refs],
                                            [ref.stream for refs in self._refs for ref in refs])
            pointers, streams = list(flat[0]), list(flat[1])
            try:
                for given in out:  # loops: a comprehension's set-up costs more for a few outputs
                    for name in names:
                        ref = given[name]
                        pointers.append(ref.ptr)
                        streams.append(ref.stream)
            except KeyError:
                pointers = None  # outputs other than the named ones: the general run below says so
            if pointers is not None and all(len(given) == len(names) for given in out):
                run = self._addressed
                if run is None:
                    run = self._addressed = self.addressed(names, [given[name].nbytes for given in out for name in names],
                                                           [given[name].device for given in out for name in names],
                                                           True)
                try:  # the next run's outputs are made while the ranks check this one
                    run(pointers, streams, lambda: self._keep_spare(out))
                except BaseException:
                    self.hold_if_in_use(self._refs, out)
                    if self._spares is not None:
                        self._spares.forget(self._spare_key)  # a failed run keeps no spare
                    raise
                return [{name: given[name].owner for name in names} for given in out]
        try:
            if self._new_out is None and not ordered:
                results = self._call()  # outputs, if any, were given when the call was prepared
            else:
                native_out = (self._out_native if self._new_out is None else
                              [[ref.as_output(name) for name, ref in given.items()] for given in out])
                results = self._call(native_out, True) if ordered else self._call(native_out)
        except BaseException:
            self.hold_if_in_use(self._refs, out)
            raise
        if ordered and self._new_out is not None and out:
            self._keep_spare(out)
        return self._wrap(results, self._refs, out)

    def _runs_as_prepared(self) -> bool:
        """Whether a run writes only into the ``out`` given when the call was prepared, holding
        every output of the program, and is stream-ordered (decided once the output names are
        known: from the start for a collective, after the first run for an engine)."""
        known = self._as_prepared
        if known is None:
            names = self._output_names
            out = self._out
            if names is None or not out:
                return False
            known = self._as_prepared = (self.stream_ordered_for(out) and
                                         all(names_every_output(given, names) for given in out))
        return known

    def _new_outputs(self) -> list:
        """This run's outputs from ``new_out``: the spare the previous run kept, when it was
        allocated on the streams current now (see SpareOutputs), else new ones."""
        devices = self._spare_devices
        if devices is not None:
            out = self._spares.take(self._spare_key, torch_current_streams(devices))
            if out is not None:
                return out
        return self._new_out(self._likes)

    def _keep_spare(self, out) -> None:
        """While the ranks check a stream-ordered run on outputs from ``new_out`` (``out``):
        allocates the next run's."""
        if self._spares is None:
            return
        if self._spare_devices is None:
            # Both worked out before either is set, the devices (which say "done") last: a Ctrl-C
            # in here leaves both to the next run, never the devices without the bytes (its
            # spares would then count as 0 bytes against SPARE_OUTPUTS_MAX_BYTES).
            devices = [ref.device for given in out for ref in given.values()]
            self._spare_bytes = spare_bytes([[ref.nbytes for ref in given.values()] for given in out])
            self._spare_devices = devices
        self._spares.keep_new(self._spare_key, torch_current_streams(self._spare_devices), self._spare_bytes,
                              self._new_out, self._likes)

    def hold_if_in_use(self, arrays, out) -> None:
        """After a run raised: keeps its arrays (any objects that own them: ArrayRefs, tensors)
        forever when work of it may still use them (see ``_HELD_FOR_UNFINISHED_WORK``)."""
        if self._call.arrays_may_be_in_use:
            _HELD_FOR_UNFINISHED_WORK.append((arrays, out))

    def addressed(self, names, nbytes, devices, stream_ordered: bool):
        """The native call's run on other arrays with every output given, whose outputs' names,
        sizes and GPUs and stream ordering are fixed: :meth:`run_on` for a caller that reads the
        addresses itself and asks :meth:`stream_ordered_for` once.

        Parameters
        ----------
        names : sequence of str
            Each rank's outputs (the same on every rank), every output of the program.
        nbytes, devices : sequence of int
            Each output's size in bytes and CUDA device, rank by rank in the order of ``names``.
        stream_ordered : bool
            Whether its runs are stream-ordered (as :meth:`stream_ordered_for` says).

        Returns
        -------
        callable
            ``run(pointers, streams, while_ranks_run=None)``: flat lists of each rank's input
            pointers and streams in turn (the same number on every rank), then each rank's outputs'
            in turn, in the order of ``names``; ``while_ranks_run``, a callable without arguments,
            is called on this thread while the rank threads check the run, which none launches
            before it returned (the next call's outputs are allocated there; it must not wait for
            the ranks nor call into the group). Whatever escapes it (KeyboardInterrupt, an
            Exception of an application's SIGINT handler: :meth:`SpareOutputs.keep_new` drops only
            torch's out-of-memory error) cancels the run, no rank launching, and is raised once
            the ranks returned, with a rank's own error as its ``__context__`` when one failed its
            checks too; returns None. A caller that catches its error must call
            :meth:`hold_if_in_use` with the arrays, as :meth:`run_on` does.

        Raises
        ------
        InvalidArgumentError
            Lists that do not fit the call (a size and a GPU per output and rank), when made; at a
            run, as :meth:`run_on` (and lists of other lengths than the call's arrays).
        """
        return self._call.addressed(names, nbytes, devices, stream_ordered)

    @property
    def output_names(self) -> tuple | None:
        """Every output of the program, in the order of its results: given (``output_names``) or
        learnt from the first run; None before."""
        return self._output_names

    @property
    def torch_outputs(self) -> tuple | None:
        """``(new_out, specs)`` of a call on torch inputs whose outputs come from torch's caching
        allocator once their shapes are known (see ``spec_cache``): the function that allocates
        them (as ``new_out`` is called) and each rank's (name, dtype, shape) list. None while the
        shapes are unknown, and for other calls."""
        if self._torch_devices is None or self._new_out is None:
            return None
        return self._new_out, self._spec_cache[self._spec_key]

    def stream_ordered_for(self, out) -> bool:
        """Whether a run with these outputs (``out``, or what ``new_out`` gives) is stream-ordered
        (see ``stream_ordered``)."""
        if self._stream_ordered is not None:
            if self._stream_ordered and not out and self._torch_devices is not None:
                return False  # torch outputs of an engine: the first run learns their shapes, waiting
            return self._stream_ordered  # True without outputs given: the native call says what is missing
        if not out or not self._torch_inputs:
            return False
        names = self._output_names
        if names is None and self._new_out is None:
            return False  # outputs the caller gives, the program's not known yet: may leave some to the pool
        for given in out:  # a loop: a generator's set-up costs more than these few checks
            if names is not None and len(given) != len(names):
                return False  # the others would come from mdtrt's pool, which no caller stream follows
            for ref in given.values():
                if ref.kind != "torch":
                    return False
        return True

    def run_on(self, per_rank_refs: list[list[ArrayRef]], out: list[dict[str, ArrayRef]] | None = None) -> list[dict]:
        """The same call on other arrays of the same kinds, dtypes, shapes and devices (what the
        one-shot entry points do with the call they keep per argument signature).

        Parameters
        ----------
        per_rank_refs : list of list of ArrayRef
            As for the constructor; the caller made sure they match the ones the call was made for.
        out : list of dict of str to ArrayRef, optional
            Preallocated outputs for this call; given if and only if the call was made with ``out``.

        Returns
        -------
        list of dict
            As ``__call__``.

        Raises
        ------
        InvalidArgumentError, MdtrtError
            As ``__call__``.
        """
        addresses = [[(ref.ptr, ref.stream) for ref in refs] for refs in per_rank_refs]
        if out is None and self._new_out is not None:
            out = self._new_out(_templates(per_rank_refs))
        outputs = ([[(name, ref.ptr, ref.nbytes, ref.device, ref.stream) for name, ref in given.items()] for given in out]
                   if out else [])
        try:
            results = (self._call.run_at(addresses, outputs, True) if self.stream_ordered_for(out)
                       else self._call.run_at(addresses, outputs))
        except BaseException:
            self.hold_if_in_use(per_rank_refs, out)
            raise
        names = self._output_names
        if out and names is not None and all(len(given) == len(names) for given in out):
            try:  # every output was given: nothing of the native result is needed
                return [{name: given[name].owner for name in names} for given in out]
            except KeyError:
                pass
        return self._wrap(results, per_rank_refs, out)

    def _wrap(self, results, refs, out) -> list[dict]:
        on_device = self._on_device
        if self._torch_devices is not None and self._new_out is None:
            specs = [list(res.outputs) for res in results]
            self._spec_cache[self._spec_key] = specs
            self._new_out = torch_output_factory(specs, self._torch_devices)
        if self._output_names is None and results:
            # Learnt once (the program's outputs are the same for every call): later calls whose
            # outputs are all given skip reading the native result.
            first = [name for name, _, _ in results[0].outputs]
            if all([name for name, _, _ in res.outputs] == first for res in results[1:]):
                self._output_names = tuple(first)
        outputs = []
        for i, res in enumerate(results):
            named = {}
            like = refs[i][0] if refs[i] else None
            host = None if on_device else res.host
            for k, (name, dtype, shape) in enumerate(res.outputs):
                if out and name in out[i]:
                    named[name] = out[i][name].owner
                elif on_device:
                    named[name] = wrap_device_output(res.device[k], dtype, shape, like)
                elif host:
                    named[name] = host_output(host[k], dtype, shape, like)
            outputs.append(named)
        return outputs
