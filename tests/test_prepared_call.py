"""The per-call Python path (argument checks, conversion, output mapping) against a stub of the
native runner, so it is tested on any machine."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

import mdtrt
from mdtrt import prepared_call
from mdtrt.arrays import ArrayRef, describe
from mdtrt.errors import InvalidArgumentError
from mdtrt.prepared_call import KeptCalls, PreparedCall, SpareOutputs
from mdtrt.runner import EngineRunner

from addressed_stub import addressed_run


class StubNative:
    """Records each infer() call and answers like the extension (a RankResult per rank): host bytes
    per fetched rank."""

    def __init__(self, ranks=2):
        self.calls = []
        self.prepared = []
        self.addresses = []
        self.ordered = []  # per run: stream_ordered as the native call got it
        self.flat = []  # per addressed run: its flat lists, names, sizes, devices
        self.ranks = ranks

    def prepare(self, *args):
        """Like the extension's: the arguments once, then a call that may get other outputs, or
        run on other addresses (run_at)."""
        def call(outputs=None, stream_ordered=False):
            self.ordered.append(stream_ordered)
            return self.infer(*args[:-1], args[-1] if outputs is None else outputs)

        def run_at(addresses, outputs, stream_ordered=False):
            self.addresses.append(addresses)
            self.ordered.append(stream_ordered)
            return self.infer(*args[:-1], outputs)

        def run_flat(pointers, streams, names, nbytes, devices, stream_ordered=False):
            self.flat.append((pointers, streams, names, nbytes, devices))
            self.ordered.append(stream_ordered)

        def run_stream_ordered():
            """As the native one: stream-ordered into the outputs given when it was prepared; None."""
            call(None, True)

        call.run_at = run_at
        call.run_flat = run_flat
        # As the native one, with its checks (addressed_stub).
        call.addressed = lambda names, nbytes, devices, stream_ordered=False: addressed_run(
            run_flat, [len(rank) for rank in args[0]], names, nbytes, devices, stream_ordered)
        call.run_stream_ordered = run_stream_ordered
        call.arrays_may_be_in_use = False
        self.prepared.append(args)
        return call

    def infer(self, inputs, replication, poison, fetch, device_outputs, timeout, outputs):
        self.calls.append((inputs, replication, poison, fetch, device_outputs, timeout, outputs))
        results = []
        for rank in range(self.ranks):
            host = [np.frombuffer(np.full(4, rank + 1, np.float32).tobytes(), np.uint8).copy()] if rank in fetch else []
            results.append(SimpleNamespace(outputs=[("output", "float32", (2, 2))], host=host, device=[]))
        return results


def test_replicated_input_is_converted_once_and_reused():
    native = StubNative()
    x = np.arange(6, dtype=np.float16).reshape(2, 3)
    refs = [describe(x)]
    call = PreparedCall(native, [refs, refs], fetch_all=True)
    first, second = call(), call()
    inputs = native.calls[0][0]
    assert inputs[0] is inputs[1]  # the same converted list for both ranks
    (arg,) = inputs[0]  # typed: a _core.InputArg
    assert (arg.ptr, arg.device, arg.dtype, arg.shape, arg.stream, arg.nbytes) == (
        x.__array_interface__["data"][0], -1, "float16", (2, 3), 0, 12)  # host: no stream
    assert native.calls[0] is not native.calls[1] and native.calls[0][0] is native.calls[1][0]
    assert native.calls[0][3] == [0, 1] and native.calls[0][4] is False
    for outputs in (first, second):
        np.testing.assert_array_equal(outputs[0]["output"], np.full((2, 2), 1, np.float32))
        np.testing.assert_array_equal(outputs[1]["output"], np.full((2, 2), 2, np.float32))


def test_only_first_rank_fetched_by_default():
    native = StubNative()
    refs = [describe(np.ones(3, np.float32))]
    outputs = PreparedCall(native, [refs, refs], fetch_all=False)()
    assert native.calls[0][3] == [0]
    assert set(outputs[0]) == {"output"} and outputs[1] == {}


def test_host_outputs_need_device_inputs():
    refs = [describe(np.ones(3, np.float32))]
    with pytest.raises(mdtrt.InvalidArgumentError, match="preallocated outputs"):
        PreparedCall(StubNative(), [refs, refs], fetch_all=True, out=[{"output": refs[0]}] * 2)


def test_engine_runner_prepare_checks_names_once():
    runner = EngineRunner.__new__(EngineRunner)
    runner.group = [0, 1]  # only its length is used here
    runner._native = StubNative()
    runner._inputs = [("input", "float32", (-1,))]
    runner._input_names = ("input",)
    runner._devices = [0, 1]
    runner._output_specs = {}
    runner._calls = KeptCalls(16)
    runner._spare_outputs = SpareOutputs()
    runner.replication = "auto"
    with pytest.raises(mdtrt.InvalidArgumentError, match=r"missing \['input'\]"):
        runner.prepare({"x": np.ones(2, np.float32)})
    x = np.ones(4, np.float32)
    call = runner.prepare({"input": x})
    out = call()
    x[:] = 7  # refilled in place: the next call reads the same buffer
    call()
    assert len(runner._native.calls) == 2 and runner._native.calls[0][0] is runner._native.calls[1][0]
    assert len(runner._native.prepared) == 1  # converted and planned once
    assert runner._native.calls[0][1] == "auto"
    np.testing.assert_array_equal(out["output"], np.full((2, 2), 1, np.float32))


def test_outputs_allocated_per_call_reach_the_runner_and_come_back():
    """new_out (torch's caching allocator for torch inputs): every call gets fresh output buffers,
    handed to the native runner (as typed OutputArgs while the output names are unknown, then as
    an addressed run's flat lists, stream-ordered), and returns exactly those objects."""
    made = []

    def new_out(likes=None):
        refs = []
        for rank in range(2):
            owner = object()
            made.append(owner)
            refs.append({"output": ArrayRef(0x10000 * (len(made) + 1), rank, "float32", (2, 2), owner, "torch", 7)})
        return refs

    class DeviceStub(StubNative):
        def infer(self, inputs, replication, poison, fetch, device_outputs, timeout, outputs):
            self.calls.append((inputs, replication, poison, fetch, device_outputs, timeout, outputs))
            return [SimpleNamespace(outputs=[("output", "float32", (2, 2))], host=[], device=[]) for _ in range(self.ranks)]

    native = DeviceStub()
    x = [ArrayRef(0x1000 * (r + 1), r, "float32", (2, 2), object(), "torch", 7) for r in range(2)]
    call = PreparedCall(native, [[x[0]], [x[1]]], fetch_all=True, new_out=new_out)
    first, second, third = call(), call(), call()
    assert [o["output"] for o in first] == made[:2] and [o["output"] for o in second] == made[2:4]
    assert [o["output"] for o in third] == made[4:]
    recorded = native.calls[0][6]
    assert [[(a.name, a.ptr, a.nbytes, a.device, a.stream) for a in rank] for rank in recorded] == [
        [("output", 0x10000 * 2, 16, 0, 7)], [("output", 0x10000 * 3, 16, 1, 7)]]
    assert native.calls[0][4] is True  # device inputs: device outputs, nothing fetched
    # The first run learnt the output names: the later ones pass flat lists, inputs then outputs.
    assert len(native.calls) == 1 and native.ordered == [True, True, True]
    for (pointers, streams, names, nbytes, devices), base in zip(native.flat, (4, 6), strict=True):
        assert pointers == [0x1000, 0x2000, 0x10000 * base, 0x10000 * (base + 1)] and streams == [7, 7, 7, 7]
        assert names == ("output",) and nbytes == [16, 16] and devices == [0, 1]


def test_a_prepared_call_makes_its_addressed_run_once():
    """A prepared call whose outputs new_out allocates fixes their names, sizes and GPUs in one
    native addressed run (stream-ordered), made by its first run that knows the names, and
    passes every later run only that run's addresses."""
    made = []

    def new_out(likes=None):
        made.append([{"output": ArrayRef(0x10000 * (len(made) + 1) + 0x100 * r, r, "float32", (2, 2), object(),
                                         "torch", 7 + r)} for r in range(2)])
        return made[-1]

    native = StubNative()
    x = [ArrayRef(0x1000 * (r + 1), r, "float32", (2, 2), object(), "torch", 7 + r) for r in range(2)]
    call = PreparedCall(native, [[x[0]], [x[1]]], fetch_all=True, new_out=new_out)
    addressed = []
    native_call = call._call  # the stub's, made by the constructor
    real = native_call.addressed
    native_call.addressed = lambda *args: addressed.append(args) or real(*args)
    for _ in range(4):
        call()
    assert addressed == [(("output",), [16, 16], [0, 1], True)]
    assert len(native.calls) == 1 and native.ordered == [True] * 4
    assert [flat[0] for flat in native.flat] == [[0x1000, 0x2000, 0x10000 * k, 0x10000 * k + 0x100] for k in (2, 3, 4)]
    assert all(flat[1] == [7, 8, 7, 8] for flat in native.flat)


def test_native_rank_result_host_bytes_are_zero_copy_views_that_keep_it_alive():
    from mdtrt import _core

    result = _core.testing.rank_result([b"\x01\x02\x03", b"", b"\xff" * 8])
    assert result.outputs == [("output0", "uint8", (3,)), ("output1", "uint8", (0,)), ("output2", "uint8", (8,))]
    host = result.host
    assert result.device == []
    del result  # the arrays keep the native result alive
    np.testing.assert_array_equal(host[0], [1, 2, 3])
    assert host[1].size == 0 and host[2].dtype == np.uint8 and (host[2] == 255).all()
    assert host[0].flags.writeable  # torch.from_numpy takes it without a warning
    assert np.frombuffer(host[2].tobytes(), np.float16).shape == (4,)


class FakeTensor:
    """Stands in for a torch CUDA tensor in an ArrayRef (kind "torch")."""


def test_engine_outputs_for_torch_callers_learn_their_shapes_once(monkeypatch):
    """Torch inputs without outputs=: the first call takes the runner's pooled outputs and records
    each rank's output specs; later calls (and later prepare()s with the same input shapes) pass
    output buffers from torch's allocator instead."""
    allocations = []

    class SpecStub(StubNative):
        def infer(self, inputs, replication, poison, fetch, device_outputs, timeout, outputs):
            self.calls.append((inputs, replication, poison, fetch, device_outputs, timeout, outputs))
            return [SimpleNamespace(outputs=[("y", "float16", (3, 2))], host=[], device=[f"pooled{r}"])
                    for r in range(self.ranks)]

    import mdtrt.prepared_call as pc

    def fake_factory(specs, devices):
        def allocate(likes=None):
            refs = [{name: ArrayRef(0x1000 + len(allocations), d, dtype, shape, FakeTensor(), "torch", 7)
                     for name, dtype, shape in rank} for rank, d in zip(specs, devices, strict=True)]
            allocations.append(refs)
            return refs
        return allocate

    native = SpecStub()
    cache: dict = {}
    x = [ArrayRef(0x100 * (r + 1), r, "float16", (3, 2), FakeTensor(), "torch", 7) for r in range(2)]
    monkeypatch.setattr(pc, "torch_output_factory", fake_factory)
    monkeypatch.setattr(pc, "wrap_device_output", lambda buffer, dtype, shape, like: buffer)
    call = PreparedCall(native, [[x[0]], [x[1]]], fetch_all=True, torch_devices=[0, 1], spec_cache=cache)
    first = call()
    assert [o["y"] for o in first] == ["pooled0", "pooled1"] and native.calls[0][6] == []
    assert cache == {((("float16", (3, 2)),), (("float16", (3, 2)),)): [[("y", "float16", (3, 2))]] * 2}
    second = call()
    assert len(allocations) == 1 and [o["y"] for o in second] == [r["y"].owner for r in allocations[0]]
    # Passed as an addressed run's flat lists (the first run learnt the names), stream-ordered.
    ptr = allocations[0][0]["y"].ptr
    assert native.flat == [([0x100, 0x200, ptr, ptr], [7, 7, 7, 7], ("y",), [12, 12], [0, 1])]
    assert len(native.calls) == 1 and native.ordered == [False, True]
    again = PreparedCall(native, [[x[0]], [x[1]]], fetch_all=True, torch_devices=[0, 1], spec_cache=cache)
    again()
    assert len(allocations) == 2  # learnt once: the new call allocates from its first run


def stub_engine_runner(native):
    runner = EngineRunner.__new__(EngineRunner)
    runner.group = [0, 1]  # only its length is used here
    runner._native = native
    runner._inputs = [("input", "float32", (-1,))]
    runner._input_names = ("input",)
    runner._devices = [0, 1]
    runner._output_specs = {}
    runner._calls = KeptCalls(16)
    runner._spare_outputs = SpareOutputs()
    runner._cuda_graph = False
    runner.replication = "auto"
    return runner


def test_infer_keeps_one_prepared_call_per_signature():
    """infer on new arrays each time: prepared once per (dtype, shape, options), then run on each
    call's own addresses; the kept call holds none of the arrays."""
    import gc
    import weakref

    native = StubNative()
    runner = stub_engine_runner(native)
    xs = [np.full(4, i, np.float32) for i in range(3)]
    for x in xs:
        out = runner.infer({"input": x})
        np.testing.assert_array_equal(out["output"], np.full((2, 2), 1, np.float32))
    assert len(native.prepared) == 1
    assert [a[0][0][0] for a in native.addresses] == [x.__array_interface__["data"][0] for x in xs]
    assert all(a[0] == a[1] for a in native.addresses)  # one shared input: the same address on every rank
    runner.infer({"input": np.ones(6, np.float32)})  # another shape: another call
    runner.infer({"input": np.ones(6, np.float32)}, all_ranks=True)  # another option: another call
    assert len(native.prepared) == 3 and len(runner._calls) == 3
    alive = weakref.ref(xs[0])
    del xs, x
    gc.collect()
    assert alive() is None


def _group_on(native, monkeypatch):
    """A 2-rank DeviceGroup whose collectives run on `native` (a StubNative), without GPUs."""
    from mdtrt import _core
    from mdtrt.device_group import DeviceGroup

    class GroupNative:
        num_local_ranks, ranks, devices, world_size = 2, [0, 1], [0, 1], 2

    monkeypatch.setattr(_core, "CollectiveProgram", lambda *a: "program")
    monkeypatch.setattr(_core, "ProgramRunner", lambda *a: native)
    group = DeviceGroup.__new__(DeviceGroup)
    group._adopt(GroupNative())
    return group


def test_one_shot_collective_keeps_one_call_per_signature(monkeypatch):
    """DeviceGroup.collective on new arrays each time: one native prepare per signature, run on
    each call's addresses."""
    native = StubNative()
    group = _group_on(native, monkeypatch)
    arrays = [[np.full(4, i, np.float32), np.full(4, -i, np.float32)] for i in range(3)]
    for xs in arrays:
        outs = group.all_reduce(xs)
        assert len(outs) == 2
    assert len(native.prepared) == 1 and len(native.addresses) == 3
    assert native.addresses[-1] == [[(x.__array_interface__["data"][0], 0)] for x in arrays[-1]]
    group.all_gather(arrays[0])
    group.all_reduce([np.ones(8, np.float32)] * 2)
    assert len(native.prepared) == 3


def test_a_kept_call_holds_neither_inputs_nor_outputs():
    """A call kept per signature (keep_inputs=False) runs on each call's device arrays and outputs
    and keeps none of them alive (the first call's out= buffers included)."""
    import gc
    import weakref

    class Owner:  # stands for a device array (anything weakly referenceable)
        pass

    def device_ref(ptr, owner):
        return ArrayRef(ptr, 0, "float32", (4,), owner, "cai", 0)

    native = StubNative()
    first_in, first_out = Owner(), Owner()
    call = PreparedCall(native, [[device_ref(0x1000, first_in)]] * 2, fetch_all=True,
                        out=[{"output": device_ref(0x2000, first_out)}] * 2, keep_inputs=False, output_names=("output",))
    alive = [weakref.ref(first_in), weakref.ref(first_out)]
    del first_in, first_out
    gc.collect()
    assert all(ref() is None for ref in alive)
    with pytest.raises(mdtrt.InvalidArgumentError, match="run_on"):
        call()
    later_in, later_out = Owner(), Owner()
    got = call.run_on([[device_ref(0x3000, later_in)]] * 2, [{"output": device_ref(0x4000, later_out)}] * 2)
    assert got == [{"output": later_out}] * 2
    assert native.addresses[-1] == [[(0x3000, 0)]] * 2
    assert native.calls[-1][-1] == [[("output", 0x4000, 16, 0, 0)]] * 2  # this call's output, as a tuple


def test_out_given_as_host_arrays_is_refused_on_every_call():
    """The signature includes where out= buffers live: host arrays as out= are refused by the
    check every new call makes, also after a call with device buffers of the same signature."""
    native = StubNative()
    runner = stub_engine_runner(native)
    x = {"input": np.ones(4, np.float32)}
    for _ in range(2):
        with pytest.raises(mdtrt.InvalidArgumentError, match="preallocated outputs"):
            runner.infer(x, outputs={"output": [np.ones(4, np.float32)] * 2})


class _DeviceStub(StubNative):
    """Answers device calls: outputs named, nothing fetched."""

    def infer(self, inputs, replication, poison, fetch, device_outputs, timeout, outputs):
        self.calls.append((inputs, replication, poison, fetch, device_outputs, timeout, outputs))
        return [SimpleNamespace(outputs=[("output", "float32", (2, 2))], host=[], device=[]) for _ in range(self.ranks)]


def _refs(kind, base=0x1000, stream=7):
    return [ArrayRef(base * (r + 1), r, "float32", (2, 2), object(), kind, stream) for r in range(2)]


@pytest.mark.parametrize("in_kind, out_kind, requested, expected", [
    ("torch", "torch", None, True),    # torch in and out: stream-ordered, as torch.distributed
    ("torch", "cai", None, False),     # an output without torch's stream semantics: wait
    ("cai", "cai", None, False),
    ("torch", "torch", False, False),  # asked to wait
    ("cai", "cai", True, True),        # asked: the native call checks what it needs
])
def test_stream_ordered_decision_per_run(in_kind, out_kind, requested, expected):
    """Every run (prepared __call__, and run_on of a kept call) tells the native call whether it is
    stream-ordered: by default only when every input and output is a torch CUDA tensor."""
    native = _DeviceStub()
    x = _refs(in_kind)
    new_out = lambda likes=None: [{"output": ref} for ref in _refs(out_kind, base=0x100000)]  # noqa: E731
    call = PreparedCall(native, [[x[0]], [x[1]]], fetch_all=True, new_out=new_out, stream_ordered=requested)
    call()
    call.run_on([[r] for r in _refs(in_kind, base=0x2000)])
    assert native.ordered == [expected, expected]


@pytest.mark.parametrize("in_kind, out_kind, requested, expected", [
    ("torch", "torch", None, True),
    ("torch", "cai", None, False),
    ("cai", "cai", None, False),
    ("torch", "torch", False, False),
    ("cai", "cai", True, True),
])
@pytest.mark.parametrize("names_known", [True, False])
def test_a_call_into_its_prepared_outputs_runs_as_prepared_when_stream_ordered(in_kind, out_kind, requested,
                                                                               expected, names_known):
    """out= given when the call was prepared (every output of the program): each stream-ordered
    run is the native run_stream_ordered, into those outputs, and returns them; a waiting one the
    native call as prepared. The decision is made once the output names are known (an engine's
    first run, which learns them, waits) and stays."""
    native = _DeviceStub()
    x = _refs(in_kind)
    out = [{"output": ref} for ref in _refs(out_kind, base=0x100000)]
    call = PreparedCall(native, [[x[0]], [x[1]]], fetch_all=True, out=out, stream_ordered=requested,
                        output_names=("output",) if names_known else None)
    runs = [call() for _ in range(3)]
    assert all([o["output"] for o in got] == [given["output"].owner for given in out] for got in runs)
    first = expected and (names_known or requested is True)
    assert native.ordered == [first, expected, expected]
    for run in native.calls:  # every run into the outputs given at prepare time
        assert [[(a.name, a.ptr, a.device, a.stream) for a in rank] for rank in run[6]] == [
            [("output", 0x100000 * (r + 1), r, 7)] for r in range(2)]
    assert call._as_prepared is expected


def test_stream_ordered_needs_outputs_the_caller_gives_by_default():
    """Without outputs given (pooled device outputs), a default run waits; asked for, the native
    call gets the request (and refuses it: a pooled output cannot follow the caller's stream)."""
    class NoOutputs(_DeviceStub):
        def infer(self, *args):
            super().infer(*args)
            return [SimpleNamespace(outputs=[], host=[], device=[]) for _ in range(self.ranks)]

    native = NoOutputs()
    x = _refs("torch")
    PreparedCall(native, [[x[0]], [x[1]]], fetch_all=True)()
    PreparedCall(native, [[x[0]], [x[1]]], fetch_all=True, stream_ordered=True)()
    assert native.ordered == [False, True]


def test_one_shot_collective_keeps_a_call_per_stream_ordering(monkeypatch):
    """stream_ordered is part of a kept call's signature, and a non-boolean is refused."""
    native = StubNative()
    group = _group_on(native, monkeypatch)
    xs = [np.ones(4, np.float32), np.ones(4, np.float32)]
    group.all_reduce(xs)
    group.all_reduce(xs, stream_ordered=False)
    group.all_reduce(xs, stream_ordered=False)
    assert len(native.prepared) == 2 and native.ordered == [False, False, False]
    with pytest.raises(InvalidArgumentError, match="stream_ordered"):
        group.all_reduce(xs, stream_ordered="yes")


def test_engine_torch_outputs_first_run_waits_even_when_stream_ordering_is_asked():
    """stream_ordered=True on an engine call with torch inputs and no outputs=: its first run
    cannot be ordered (the output shapes are unknown, outputs would come from the pool), so it
    waits and learns them; later runs get torch outputs and are stream-ordered."""
    native = _DeviceStub()
    x = _refs("torch")
    call = PreparedCall(native, [[x[0]], [x[1]]], fetch_all=True, torch_devices=[0, 1], stream_ordered=True)
    assert call._new_out is None  # no output shapes known yet
    assert call.stream_ordered_for(None) is False
    assert call.stream_ordered_for([{"output": x[0]}]) is True


def test_stream_ordered_argument_accepts_none_true_false_only():
    from mdtrt import arguments

    assert [arguments.optional_flag(v, "stream_ordered") for v in (None, True, False, np.bool_(True))] == [
        None, True, False, True]
    with pytest.raises(InvalidArgumentError, match="stream_ordered must be True, False or None"):
        arguments.optional_flag("yes", "stream_ordered")


def test_time_infer_times_complete_calls(monkeypatch):
    """time_infer measures calls that return when every rank finished: it asks infer for waiting
    calls (a stream-ordered one would be timed until it is queued only), unless told otherwise."""
    runner = EngineRunner.__new__(EngineRunner)
    seen = []
    monkeypatch.setattr(runner, "infer", lambda inputs, **kw: seen.append(kw), raising=False)
    times = runner.time_infer({"input": None}, iterations=2, warmup=1)
    assert len(times) == 2 and all(t >= 0 for t in times)
    assert seen == [{"stream_ordered": False}] * 3
    seen.clear()
    runner.time_infer({"input": None}, iterations=1, warmup=0, stream_ordered=None)
    assert seen == [{"stream_ordered": None}]


class GivenUpCall:
    """A prepared native call whose runs raise as a timed-out one does; `arrays_may_be_in_use`: a
    rank was given up on in it, or the group broke with its work queued."""

    def __init__(self, abandoned):
        self.arrays_may_be_in_use = abandoned

    def __call__(self, *args):
        raise RuntimeError("rank(s) 0 did not finish 'infer'")

    def run_at(self, *args):
        raise RuntimeError("rank(s) 0 did not finish 'infer'")

    def run_stream_ordered(self):
        raise RuntimeError("rank(s) 0 did not finish 'infer'")


class GivenUpNative:
    def __init__(self, abandoned):
        self.abandoned = abandoned

    def prepare(self, *args):
        return GivenUpCall(self.abandoned)


@pytest.mark.parametrize("abandoned", [True, False])
@pytest.mark.parametrize("as_prepared", [True, False])
def test_a_failed_run_as_prepared_holds_what_the_general_run_holds(abandoned, as_prepared):
    """A prepared call into outputs given when it was prepared (torch, stream-ordered) whose run
    raised holds its inputs and outputs, the same objects, exactly when the general run would."""
    held = prepared_call._HELD_FOR_UNFINISHED_WORK
    x, out = _refs("torch"), [{"output": ref} for ref in _refs("torch", base=0x100000)]
    call = PreparedCall(GivenUpNative(abandoned), [[x[0]], [x[1]]], fetch_all=True, out=out,
                        output_names=("output",))
    if not as_prepared:
        call._as_prepared = False  # the general run: self._call(outputs, True)
    before = len(held)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="did not finish"):
            call()
    assert call._as_prepared is as_prepared  # a failed run changes nothing of the decision
    assert held[before:] == ([(call._refs, out)] * 2 if abandoned else [])
    assert all(entry[0] is call._refs and entry[1] is out for entry in held[before:])
    del held[before:]


@pytest.mark.parametrize("abandoned", [True, False])
@pytest.mark.parametrize("entry", ["call", "run_on"])
def test_arrays_of_a_run_a_rank_was_given_up_in_are_never_freed(abandoned, entry):
    """A rank given up on at a deadline may still read or write the run's arrays after the run
    raised: they are kept for the life of the process then (and only then)."""
    import gc
    import weakref

    from mdtrt import prepared_call

    native = GivenUpNative(abandoned)
    x = np.arange(8, dtype=np.float32)
    alive = weakref.ref(x)
    refs = [describe(x)]
    call = PreparedCall(native, [refs, refs], fetch_all=True)
    held_before = len(prepared_call._HELD_FOR_UNFINISHED_WORK)
    with pytest.raises(RuntimeError, match="did not finish"):
        if entry == "call":
            call()
        else:
            call.run_on([refs, refs])
    del x, refs, call
    gc.collect()
    assert (alive() is not None) == abandoned
    assert len(prepared_call._HELD_FOR_UNFINISHED_WORK) == held_before + (1 if abandoned else 0)


def test_spare_outputs_stay_within_the_limit_while_threads_allocate_at_once(monkeypatch):
    """Two threads keep spares at once (torch's allocator releases the GIL): the second, while the
    first one's allocation is under way, counts it, so together they never pass the limit; the
    first one's is kept once allocated."""
    pytest.importorskip("torch")  # the spares look at torch's inference mode
    monkeypatch.setattr(prepared_call, "SPARE_OUTPUTS_MAX_BYTES", 1 << 20)
    spares = SpareOutputs()
    entered, release = threading.Event(), threading.Event()

    def slow(tag):  # an allocation that takes a while
        entered.set()
        assert release.wait(10)
        return tag

    first, second = object(), object()  # the calls' keys
    thread = threading.Thread(target=spares.keep_new, args=(first, [1], 600 << 10, slow, "first"))
    thread.start()
    try:
        assert entered.wait(10)
        spares.keep_new(second, [1], 600 << 10, lambda tag: tag, "second")
    finally:
        release.set()
        thread.join(10)
    kept = list(spares._kept.values())
    assert sum(nbytes for _, nbytes in kept) <= 1 << 20
    assert [outputs for outputs, _ in kept] == ["first"]
    assert spares.take(first, [1]) == "first" and spares.take(first, [1]) is None
