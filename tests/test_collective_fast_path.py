"""The one-shot collectives' fast path for torch CUDA tensors (DeviceGroup._torch_calls), against
a stub of the native runner and stand-ins for torch CUDA tensors, so it is tested on any machine:
a signature found again runs what the general path would run, and anything the general path
checks (shape, dtype, contiguity, device, out= size, argument types) is never passed by it."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest

import mdtrt
from mdtrt import _core, arrays, prepared_call
from mdtrt.device_group import DeviceGroup, _TorchRun

torch = pytest.importorskip("torch")
from fast_path_fakes import (  # noqa: E402 (needs torch)
    FakeCuda, Native, OneRankNative, failing_runs, fake_torch, recorded_addressed, runs_as_prepared)
from addressed_stub import addressed_run, ranks_running  # noqa: E402


class StubCall:
    """A native prepared call: run_at records its arguments and checks the outputs' sizes and
    devices, as the native one does on every run."""

    arrays_may_be_in_use = False  # a run that raised left no work behind (see test_failed_fast_run_...)

    def __init__(self, log, out_nbytes, ranks=2, prepared_outputs=()):
        self.log, self.out_nbytes, self.ranks = log, out_nbytes, ranks
        # The outputs given when it was prepared (OutputArgs per rank): a run without outputs of its
        # own writes into them, as the native PreparedInfer's options keep them.
        self.prepared_outputs = [[(o.name, o.ptr, o.nbytes, o.device, o.stream) for o in rank]
                                 for rank in prepared_outputs]

    def run_at(self, addresses, outputs, stream_ordered=False):
        self.check_outputs(outputs)
        self.log.append((addresses, outputs, stream_ordered))
        return [SimpleNamespace(outputs=[("output", "float32", (0,))], host=[], device=[]) for _ in addresses]

    def __call__(self, outputs=None, stream_ordered=False):
        """A run of a prepared call (prepare_collective) on the arrays it was prepared with, into
        ``outputs`` (OutputArgs per rank) or, without them, the outputs given when it was prepared;
        logged as ("prepared", outputs as run_at's tuples, stream_ordered)."""
        given = (self.prepared_outputs if outputs is None else
                 [[(o.name, o.ptr, o.nbytes, o.device, o.stream) for o in rank] for rank in outputs])
        self.check_outputs(given)
        self.log.append(("prepared", given, stream_ordered))
        return [SimpleNamespace(outputs=[("output", "float32", (0,))], host=[], device=[]) for _ in range(self.ranks)]

    def run_stream_ordered(self):
        """As the native one: a stream-ordered run into the outputs given when it was prepared,
        checked as every run's are; returns None."""
        self(None, True)

    def check_outputs(self, outputs):
        for rank, given in enumerate(outputs):
            for name, ptr, nbytes, device, stream in given:
                if nbytes != self.out_nbytes or device != rank:
                    raise mdtrt.InvalidArgumentError(f"out of rank {rank}: {nbytes} bytes on GPU {device}, "
                                                     f"needs {self.out_nbytes} bytes on GPU {rank}")

    def addressed(self, names, nbytes, devices, stream_ordered=False):
        """As the native one (addressed_stub: its checks, at making and per run): a run with these
        outputs' names, sizes and GPUs fixed, called with only the flat addresses (run_flat, looked
        up at each run, records it)."""
        return addressed_run(lambda *args: self.run_flat(*args), [1] * self.ranks, names, nbytes, devices,
                             stream_ordered)

    def run_flat(self, pointers, streams, names, nbytes, devices, stream_ordered=False):
        """As the native one: run_at from flat lists (a collective's: one input and one output per rank)."""
        n = len(nbytes)
        assert list(names) == ["output"]
        assert len(pointers) == len(streams) == 2 * n and len(devices) == n
        self.run_at([[(pointers[i], streams[i])] for i in range(n)],
                    [[("output", pointers[n + i], nbytes[i], devices[i], streams[n + i])] for i in range(n)],
                    stream_ordered)


class StubRunner:
    """A native runner: prepare records each rank's input (GPU, dtype, shape) as planned."""

    def __init__(self, log, program):
        self.log, self.program, self.prepared = log, program, []

    def prepare(self, inputs, replication, poison, fetch, on_device, timeout, outputs):
        self.prepared.append([(a.device, a.dtype, a.shape) for args in inputs for a in args])
        op, groups, shape, dtype = self.program[0], self.program[3], list(inputs[0][0].shape), inputs[0][0].dtype
        out_shape = _core.collective_output_shape(op, shape, len(groups) or 2)
        count = 1
        for d in out_shape:
            count *= d
        return StubCall(self.log, count * arrays.ITEMSIZE[dtype], len(inputs), outputs)


@pytest.fixture
def stubs(monkeypatch):
    """(make_group, log): groups of 2 ranks on the stub runner; log gets every run's arguments."""
    log = []
    runners = []

    def program(op, reduce, root, groups, dtype, world, n):
        return (op, reduce, root, groups, dtype)

    def runner(native, programs, sequential):
        runners.append(StubRunner(log, programs[0]))
        return runners[-1]

    monkeypatch.setattr(_core, "CollectiveProgram", program)
    monkeypatch.setattr(_core, "ProgramRunner", runner)
    fakes = fake_torch(monkeypatch)

    def make_group(native=Native):
        group = DeviceGroup.__new__(DeviceGroup)
        group._adopt(native())
        return group

    return SimpleNamespace(make_group=make_group, log=log, runners=runners, allocated=fakes.allocated, how=fakes.how)


def tensors(base, shape=(4, 3), **kw):
    return [FakeCuda(shape, rank, base + 0x100 * rank, **kw) for rank in range(2)]


CASES = [
    ("all_reduce", {}, False),
    ("all_reduce", {"reduce": "max"}, True),
    ("all_gather", {}, False),
    ("all_gather", {"groups": [0, 1]}, True),
    ("broadcast", {"root": 1}, True),
    ("reduce", {"root": 1}, False),
    ("reduce_scatter", {}, False),
    ("all_to_all", {"stream_ordered": False}, False),
    ("gather", {"root": 0}, False),
    ("scatter", {"root": 1, "stream_ordered": True}, False),
]


def run_series(stubs, op, options, with_out, fast: bool):
    """Four calls of one signature on new tensors each: what each returned and each run got."""
    with pytest.MonkeyPatch.context() as patch:
        if not fast:  # the general path on every call
            patch.setattr("mdtrt.device_group.read_torch_cuda", lambda *args: None)
        group = stubs.make_group()
        del stubs.log[:]
        del stubs.allocated[:]
        returned = []
        for step in range(4):
            xs = tensors(0x10000 * (step + 1))
            if with_out:
                rows = 8 if op in ("all_gather", "gather") else 2 if op in ("reduce_scatter", "scatter") else 4
                outs = tensors(0x200000 + 0x10000 * step, shape=(rows, 3))
                got = getattr(group, op)(xs, out=outs, **options)
                returned.append([None if g is None else ("out", outs.index(g)) for g in got])
            else:
                got = getattr(group, op)(xs, **options)
                returned.append([None if g is None else (tuple(g.shape), g.dtype, g.device_index, g.ptr)
                                 for g in got])
    return returned, list(stubs.log), group


@pytest.mark.parametrize("op, options, with_out", CASES + [(op, opts, not out) for op, opts, out in CASES])
def test_fast_path_runs_what_the_general_path_runs(stubs, op, options, with_out):
    """Every op, with and without out=, with options: the fast path (from the second call of a
    signature on) gives the native run the same addresses, streams, output buffers and stream
    ordering as the general path does, and returns the same arrays (None where the general path
    returns None)."""
    slow = run_series(stubs, op, options, with_out, False)
    fast = run_series(stubs, op, options, with_out, True)
    assert fast[0] == slow[0] and fast[1] == slow[1]
    group = fast[2]
    assert len(group._torch_calls) == 1 and len(group._calls) == 1
    assert [len(r.prepared) for r in stubs.runners] == [1, 1]  # each group: planned once
    addresses, outputs, _ = stubs.log[-1]
    assert addresses == [[(0x40000, 100)], [(0x40100, 101)]]  # this call's tensors, each rank's stream
    assert [o[0][3] for o in outputs] == [0, 1]


def test_the_first_call_of_a_signature_takes_the_general_path(stubs):
    group = stubs.make_group()
    group.all_reduce(tensors(0x1000))
    assert len(group._torch_calls) == 1
    group.all_reduce(tensors(0x1000, shape=(8, 3)))  # another shape: another signature, checked
    group.all_reduce(tensors(0x1000), out=tensors(0x2000))  # out= given: another signature
    group.all_reduce(tensors(0x1000), stream_ordered=False)
    group.all_reduce(tensors(0x1000), groups=[0, 1])
    assert len(group._torch_calls) == 5


def test_a_kept_signature_makes_its_addressed_run_once(stubs, monkeypatch):
    """The fast path fixes a signature's outputs (name, sizes, GPUs) and stream ordering once, in
    the native addressed run it keeps, not per call; each call passes its own addresses."""
    made = recorded_addressed(monkeypatch, StubCall)
    group = stubs.make_group()
    for step in range(4):
        group.all_reduce(tensors(0x10000 * (step + 1)))
        group.all_reduce(tensors(0x10000 * (step + 1)), out=tensors(0x200000 + 0x1000 * step))
    assert made == [(("output",), [48, 48], [0, 1], True)] * 2  # one per signature (out= given or not)
    addresses, outputs, ordered = stubs.log[-1]
    assert addresses == [[(0x40000, 100)], [(0x40100, 101)]] and ordered is True
    assert outputs == [[("output", 0x203000, 48, 0, 100)], [("output", 0x203100, 48, 1, 101)]]


def bad_variants():
    """(name, inputs, kwargs) of calls that must fail, and the kwargs of their good twin (whose
    signature the fast path then keeps): the same pointers, options equal to the bad ones."""
    good = 0x1000
    out = {"out": tensors(0x2000)}
    return [
        ("another shape on one rank", [FakeCuda((4, 3), 0, good), FakeCuda((2, 6), 1, good + 0x100)], {}, {}),
        ("another dtype on one rank", [FakeCuda((4, 3), 0, good), FakeCuda((4, 3), 1, good + 0x100, torch.int32)],
         {}, {}),
        ("an unsupported dtype", tensors(good, dtype=torch.complex64), {}, {}),
        ("non-contiguous (strides)", [FakeCuda((4, 3), 0, good), FakeCuda((4, 3), 1, good + 0x100, contiguous=False)],
         {}, {}),
        ("out= of another size", tensors(good), {"out": tensors(0x2000, shape=(2, 3))}, out),
        ("out= of another dtype size", tensors(good), {"out": tensors(0x2000, dtype=torch.float16)}, out),
        ("out= on the other GPU", tensors(good), {"out": [FakeCuda((4, 3), 1, 0x2000), FakeCuda((4, 3), 0, 0x2100)]},
         out),
        ("out= non-contiguous", tensors(good), {"out": tensors(0x2000, contiguous=False)}, out),
        ("one input too few", tensors(good)[:1], {}, {}),
        ("root a bool", tensors(good), {"root": True, "op": "broadcast"}, {"root": 1, "op": "broadcast"}),
        ("root a float", tensors(good), {"root": 0.0, "op": "broadcast"}, {"root": 0, "op": "broadcast"}),
        ("groups with a bool", tensors(good), {"groups": [True, 0]}, {"groups": [1, 0]}),
        ("poison_outputs 1", tensors(good), {"poison_outputs": 1}, {"poison_outputs": True}),
        ("sequential_bind 0", tensors(good), {"sequential_bind": 0}, {"sequential_bind": False}),
        ("stream_ordered 0", tensors(good), {"stream_ordered": 0}, {"stream_ordered": False}),
        ("an unknown op", tensors(good), {"op": "allreduce"}, {}),
        ("an unhashable op", tensors(good), {"op": ["all_reduce"]}, {}),
        ("an unknown reduce", tensors(good), {"reduce": "mean"}, {"reduce": "sum"}),
        ("an unhashable reduce", tensors(good), {"reduce": ["sum"]}, {"reduce": "sum"}),
    ]


def call(group, inputs, kwargs):
    kwargs = dict(kwargs)
    op = kwargs.pop("op", "all_reduce")
    return group.collective(op, inputs, **kwargs)


# What each bad variant's refusal says (on a fresh group): the comparison below is only worth as
# much as the first refusal, so that one must be the check the variant is about.
REFUSALS = {
    "another shape on one rank": "must have one shape and dtype: rank 0 has (4, 3) float32, rank 1 has (2, 6) float32",
    "another dtype on one rank": "must have one shape and dtype: rank 0 has (4, 3) float32, rank 1 has (4, 3) int32",
    "an unsupported dtype": "dtype torch.complex64 is not supported",
    "non-contiguous (strides)": "input of rank 1 is a non-contiguous torch tensor",
    "out= of another size": "out of rank 0: 24 bytes on GPU 0, needs 48 bytes",
    "out= of another dtype size": "out of rank 0: 24 bytes on GPU 0, needs 48 bytes",
    "out= on the other GPU": "out of rank 0: 48 bytes on GPU 1, needs 48 bytes on GPU 0",
    "out= non-contiguous": "out of rank 0 is a non-contiguous torch tensor",
    "one input too few": "all_reduce needs one input per local rank: got 1 for 2",
    "root a bool": "root must be an integer, got True (bool)",
    "root a float": "root must be an integer, got 0.0 (float)",
    "groups with a bool": "element 0 is True (bool)",
    "poison_outputs 1": "poison_outputs must be True or False, got 1 (int)",
    "sequential_bind 0": "sequential_bind must be True or False, got 0 (int)",
    "stream_ordered 0": "stream_ordered must be True, False or None, got 0 (int)",
    "an unknown op": "op is 'allreduce' (did you mean 'all_reduce'?); it must be one of: all_reduce",
    "an unhashable op": "op is ['all_reduce'] (list); it must be one of: all_reduce",
    "an unknown reduce": "reduce is 'mean'; it must be one of: sum, prod, max, min, avg",
    "an unhashable reduce": "reduce is ['sum'] (list); it must be one of: sum",
}


@pytest.mark.parametrize("name, inputs, kwargs, twin", bad_variants(), ids=[v[0] for v in bad_variants()])
def test_a_kept_signature_never_passes_what_the_first_call_refuses(stubs, name, inputs, kwargs, twin):
    """A call whose tensors share the pointers of a signature the fast path keeps, but differ in
    shape, dtype, contiguity or GPU, or whose options equal a kept key's but are of a type the
    checks refuse (True == 1, 0.0 == 0), fails with the error the same call gets on a fresh group."""
    with pytest.raises(mdtrt.InvalidArgumentError) as fresh:
        call(stubs.make_group(), inputs, kwargs)
    assert REFUSALS[name] in str(fresh.value), fresh.value
    group = stubs.make_group()
    for _ in range(3):
        call(group, tensors(0x1000), twin)
    assert len(group._torch_calls) == 1
    runs = len(stubs.log)
    with pytest.raises(type(fresh.value)) as kept:
        call(group, inputs, kwargs)
    assert str(kept.value) == str(fresh.value)
    assert len(stubs.log) == runs  # nothing ran
    call(group, tensors(0x1000), twin)  # and the group keeps working
    assert len(stubs.log) == runs + 1


def test_same_addresses_of_another_signature_are_planned_as_what_they_are(stubs):
    """Tensors at a kept signature's addresses but of another shape, dtype or GPU (inputs on
    another GPU are copied to the rank's: allowed) are planned for what they are, by the general
    path, and then kept under their own signature."""
    group = stubs.make_group()
    for _ in range(2):
        group.all_reduce(tensors(0x1000))
    variants = [[FakeCuda((12,), r, 0x1000 + 0x100 * r) for r in range(2)],
                [FakeCuda((4, 3), r, 0x1000 + 0x100 * r, torch.int32) for r in range(2)],
                [FakeCuda((4, 3), 1, 0x1000), FakeCuda((4, 3), 0, 0x1100)]]
    for xs in variants * 2:
        outs = group.all_reduce(xs)
        assert [o.device_index for o in outs] == [0, 1]  # on each rank's GPU, wherever its input is
        assert [o[0][3] for o in stubs.log[-1][1]] == [0, 1]
    for _ in range(2):  # likewise for outputs of another shape than the inputs
        assert [o.device_index for o in group.all_gather(variants[-1])] == [0, 1]
    planned = sorted(p for runner in stubs.runners for p in runner.prepared)  # each once
    assert planned == sorted([[(0, "float32", (4, 3)), (1, "float32", (4, 3))],
                              [(0, "float32", (12,)), (1, "float32", (12,))],
                              [(0, "int32", (4, 3)), (1, "int32", (4, 3))],
                              [(1, "float32", (4, 3)), (0, "float32", (4, 3))],
                              [(1, "float32", (4, 3)), (0, "float32", (4, 3))]])  # and all_gather's
    assert len(group._torch_calls) == 5


def test_a_host_tensor_or_other_array_is_not_taken_for_a_kept_cuda_signature(stubs):
    """A CPU tensor (get_device -1) or a non-torch array with the same dtype and shape falls back
    to the general path: it runs as what it is, never at the kept call's device addresses."""
    group = stubs.make_group()
    for _ in range(2):
        group.all_reduce(tensors(0x1000))
    cpu = [torch.ones(4, 3), torch.ones(4, 3)]
    with pytest.raises(mdtrt.InvalidArgumentError, match="preallocated outputs must be device arrays"):
        group.all_reduce(tensors(0x1000), out=cpu)
    assert arrays.read_torch_cuda(cpu, None, 2) is None
    assert arrays.read_torch_cuda([FakeCuda((4, 3), r, 0x1000, is_cuda=False) for r in range(2)], None, 2) is None
    assert arrays.read_torch_cuda(tuple(tensors(0x1000)), None, 2) is not None
    assert arrays.read_torch_cuda(tensors(0x1000)[0], None, 1) is None  # a single tensor: the general path


def test_fast_path_keeps_no_tensor_alive_and_goes_with_its_runner(stubs, monkeypatch):
    group = stubs.make_group()
    xs, outs = tensors(0x1000), tensors(0x2000)
    for _ in range(2):
        group.all_reduce(xs, out=outs)
        group.all_reduce(xs)
    alive = [weakref.ref(t) for t in xs + outs]
    del xs, outs
    stubs.allocated.clear()
    gc.collect()
    assert all(ref() is None for ref in alive)
    assert len(group._torch_calls) == 2
    monkeypatch.setattr("mdtrt.device_group._MAX_CACHED_COLLECTIVES", 1)
    group.all_gather(tensors(0x1000))  # a new runner evicts all_reduce's, and its calls
    assert len(group._torch_calls) == 1 and len(group._calls) == 1
    group.close()
    assert len(group._torch_calls) == 0
    with pytest.raises(mdtrt.InvalidArgumentError, match="closed"):
        group.all_gather(tensors(0x1000))


def test_torch_outputs_come_from_the_allocator_on_every_call(stubs):
    """Without out=, every call of a kept signature gets new outputs, shaped by the op, on each
    rank's GPU, and hands their addresses to the run."""
    group = stubs.make_group()
    got = [group.all_gather(tensors(0x1000)) for _ in range(3)]
    assert len({id(t) for outs in got for t in outs}) == 6
    for outs in got:
        assert [(tuple(t.shape), t.device_index) for t in outs] == [((8, 3), 0), ((8, 3), 1)]
    _, outputs, ordered = stubs.log[-1]
    assert outputs == [[("output", t.ptr, 96, r, 100 + r)] for r, t in enumerate(got[-1])]
    assert ordered is True  # torch in and out: stream-ordered by default


def test_outputs_are_made_from_the_inputs_where_they_can(stubs):
    """Outputs of the inputs' shape come from torch.empty_like, of another shape from
    new_empty (each about half of torch.empty with a device), on every entry point; inputs on
    another GPU than their rank's give torch.empty on the rank's GPU."""
    group = stubs.make_group()
    xs = tensors(0x1000)

    def how(call) -> set:  # how the call's allocations (its outputs, the next call's spare) were made
        start = len(stubs.how)
        call()
        assert len(stubs.how) > start
        return set(stubs.how[start:])

    for fast in (False, True):  # first calls: general path; then the fast path
        assert how(lambda: group.all_reduce(xs)) == {"empty_like"}
        assert how(lambda: group.all_gather(xs)) == ({"new_empty"} if fast else {"empty"})
        assert how(lambda: group.prepare_collective("all_reduce", xs)()) == {"empty_like"}
        assert how(lambda: group.all_reduce([xs[1], xs[0]])) == {"empty"}


def test_one_local_rank_takes_a_single_tensor_on_the_fast_path(stubs):
    """With one local rank (a process of a launched world) a single tensor stands for a list of
    one, in and as out=: such calls find their kept call too, and return a list of one."""
    group = stubs.make_group(OneRankNative)
    x, o = FakeCuda((4, 3), 0, 0x1000), FakeCuda((4, 3), 0, 0x2000)
    for _ in range(3):
        assert group.all_reduce(x, out=o) == [o]
        got = group.all_reduce(x)
        assert len(got) == 1 and tuple(got[0].shape) == (4, 3)
        assert group.all_reduce([x], out=(o,)) == [o]
    assert len(group._torch_calls) == 2 and [len(r.prepared) for r in stubs.runners] == [2]
    assert stubs.log[-1][0] == [[(0x1000, 100)]]
    with pytest.raises(mdtrt.InvalidArgumentError, match="non-contiguous"):
        group.all_reduce(FakeCuda((4, 3), 0, 0x1000, contiguous=False))


@pytest.mark.parametrize("in_use", [True, False])
def test_failed_fast_run_holds_its_tensors_while_work_may_use_them(stubs, monkeypatch, in_use):
    """A fast-path run that raised with work of it possibly still queued (a rank given up on, the
    group broken) keeps its tensors for the life of the process, as the general path does; one
    that left nothing behind keeps nothing."""
    from mdtrt import prepared_call

    fail = failing_runs(monkeypatch, StubCall, "rank(s) 1 did not finish 'all_reduce'")
    group = stubs.make_group()
    group.all_reduce(tensors(0x1000), out=tensors(0x2000))  # the general path makes the kept call
    group.all_reduce(tensors(0x1000), out=tensors(0x2000))  # the fast path from then on
    runs = len(stubs.log)
    xs, outs = tensors(0x3000), tensors(0x4000)
    alive = [weakref.ref(t) for t in xs + outs]
    fail.append(True)
    monkeypatch.setattr(StubCall, "arrays_may_be_in_use", in_use)
    held_before = len(prepared_call._HELD_FOR_UNFINISHED_WORK)
    with pytest.raises(mdtrt.RankTimeoutError, match=r"rank\(s\) 1 did not finish 'all_reduce'"):
        group.all_reduce(xs, out=outs)
    assert len(stubs.log) == runs  # it failed in the fast path's native run
    del xs, outs
    gc.collect()
    assert all((ref() is not None) == in_use for ref in alive)
    assert len(prepared_call._HELD_FOR_UNFINISHED_WORK) == held_before + (1 if in_use else 0)


def outputs_run_on(stubs) -> list:
    """The output addresses of the latest run, one per rank."""
    _, outputs, _ = stubs.log[-1]
    return [given[0][1] for given in outputs]


def test_a_loop_runs_on_outputs_allocated_while_the_call_before_ran(stubs):
    """A stream-ordered default call allocates the next call's outputs once its own work is queued
    (SpareOutputs): the next call of its signature runs on them and returns them; every call still
    returns outputs of its own (never one another call returned), one allocation per rank and call."""
    group = stubs.make_group()
    xs = tensors(0x1000)
    got = [group.all_reduce(xs) for _ in range(2)]  # general path, then the fast path's first run
    for _ in range(3):
        spare = stubs.allocated[-2:]  # allocated after the call before had run
        before = len(stubs.allocated)
        got.append(group.all_reduce(xs))
        assert got[-1] == spare and outputs_run_on(stubs) == [t.ptr for t in spare]
        assert len(stubs.allocated) == before + 2  # the next call's spare, nothing for this one
    assert len({id(t) for outs in got for t in outs}) == 2 * len(got)


def test_a_spare_serves_only_its_own_signature_on_the_streams_it_was_made_on(stubs, monkeypatch):
    """Alternating signatures keep a spare each; a call under other current streams (torch hands a
    block out in its allocation stream's order) does not take the spare made on the old ones, and
    keeps one of its own."""
    group = stubs.make_group()
    xs = tensors(0x1000)
    for _ in range(2):  # both signatures reach the fast path
        group.all_reduce(xs)
        group.all_gather(xs)
    for op, shape in (("all_reduce", (4, 3)), ("all_gather", (8, 3))):
        spare = [t for t in stubs.allocated if tuple(t.shape) == shape][-2:]
        assert getattr(group, op)(xs) == spare
    spare = stubs.allocated[-2:]  # all_gather's, on streams 100 and 101
    monkeypatch.setattr(arrays, "_STREAM_GETTER", [lambda device: 200 + device])
    got = group.all_gather(xs)
    assert got != spare and not any(t.ptr in outputs_run_on(stubs) for t in spare)
    _, outputs, _ = stubs.log[-1]
    assert [given[0][4] for given in outputs] == [200, 201]
    on_200 = stubs.allocated[-2:]
    assert group.all_gather(xs) == on_200
    monkeypatch.setattr(arrays, "_STREAM_GETTER", [lambda device: 100 + device])
    assert group.all_gather(xs) == spare  # each set of streams (a thread's, say) keeps its own


def test_no_spare_for_a_waiting_call_a_large_output_or_a_failed_allocation(stubs, monkeypatch):
    """A call that returns once its work has finished keeps no spare (there is nothing to overlap);
    neither does one whose outputs are past SPARE_OUTPUTS_MAX_BYTES per GPU (all spares together),
    nor one whose spare allocation fails: the call itself still returns its outputs. Sizes count
    as torch's caching allocator takes them: multiples of 512 bytes."""
    group = stubs.make_group()
    xs = tensors(0x1000, shape=(4, 48))
    for _ in range(3):
        group.all_reduce(xs, stream_ordered=False)
    assert len(group._spare_outputs._kept) == 0
    monkeypatch.setattr(prepared_call, "SPARE_OUTPUTS_MAX_BYTES", 1024)  # one all_reduce output (768 bytes)
    for _ in range(2):
        group.all_gather(xs)  # 1536 bytes
        group.all_reduce(xs)
    assert [nbytes for _, nbytes in group._spare_outputs._kept.values()] == [1024]
    monkeypatch.setattr(prepared_call, "SPARE_OUTPUTS_MAX_BYTES", 2500)
    group.all_reduce(xs)
    group.all_gather(xs)  # its spare pushes all_reduce's out
    assert [nbytes for _, nbytes in group._spare_outputs._kept.values()] == [1536]
    group._spare_outputs.clear()
    real = _TorchRun._new_outputs
    calls = []

    def new_outputs(self, inputs):  # the call's own outputs come, its spare's do not
        calls.append(None)
        if len(calls) % 2 == 0:
            raise torch.OutOfMemoryError("no memory")
        return real(self, inputs)

    monkeypatch.setattr(_TorchRun, "_new_outputs", new_outputs)
    other = tensors(0x5000, shape=(2, 6))
    for _ in range(3):
        outs = group.all_reduce(other)
        assert [t.ptr for t in outs] == outputs_run_on(stubs) and len(group._spare_outputs._kept) == 0


def test_an_applications_own_interrupt_while_a_spare_is_made_reaches_it_and_spares_go_on(stubs, monkeypatch):
    """An application's SIGINT handler may raise an Exception of its own (not KeyboardInterrupt)
    wherever Python runs, also while a spare is allocated inside the call: it reaches the caller
    (the call cancelled), as from every wait, instead of being taken for an allocation failure
    (which would drop it and keep no spare from then on)."""

    class Stop(Exception):  # what such a handler raises
        pass

    armed = []
    real = _TorchRun._new_outputs

    def new_outputs(self, inputs):
        if armed and ranks_running():
            del armed[:]
            raise Stop("interrupted")
        return real(self, inputs)

    monkeypatch.setattr(_TorchRun, "_new_outputs", new_outputs)
    group = stubs.make_group()
    xs = tensors(0x1000)
    for _ in range(2):
        group.all_reduce(xs)
    runs = len(stubs.log)
    armed.append(True)
    with pytest.raises(Stop):
        group.all_reduce(xs)
    assert len(stubs.log) == runs  # cancelled
    for _ in range(2):
        outs = group.all_reduce(xs)
        assert [t.ptr for t in outs] == outputs_run_on(stubs)
    assert len(group._spare_outputs._kept) == 1  # spares were not switched off


def test_calls_into_preallocated_outputs_keep_no_spare(stubs):
    """README: to hold no spare outputs, pass out= (one-shot and prepared calls alike); the same
    call without out= keeps one (the control)."""
    group = stubs.make_group()
    xs, outs = tensors(0x1000, shape=(4, 48)), tensors(0x3000, shape=(4, 48))
    for _ in range(3):
        group.all_reduce(xs, out=outs)
        group.collective("all_gather", xs, out=tensors(0x5000, shape=(8, 48)))
    call = group.prepare_collective("all_reduce", xs, out=outs)
    for _ in range(2):
        call()
    assert len(group._spare_outputs._kept) == 0
    for _ in range(2):  # the first call of a signature plans it; the next one runs as kept
        group.all_reduce(xs)
    assert len(group._spare_outputs._kept) == 1


def test_free_spare_outputs_drops_the_groups_spares_and_the_group_goes_on(stubs):
    group = stubs.make_group()
    xs = tensors(0x1000, shape=(4, 48))
    for _ in range(2):
        group.all_reduce(xs)
        group.all_gather(xs)
    assert len(group._spare_outputs._kept) == 2
    group.free_spare_outputs()
    assert len(group._spare_outputs._kept) == 0
    outs = group.all_reduce(xs)  # a call after it allocates its own outputs, and keeps a spare again
    assert [t.ptr for t in outs] == outputs_run_on(stubs) and len(group._spare_outputs._kept) == 1


def test_close_and_eviction_drop_the_spares(stubs, monkeypatch):
    group = stubs.make_group()
    xs = tensors(0x1000)
    for _ in range(2):
        group.all_reduce(xs)
    assert len(group._spare_outputs._kept) == 1
    monkeypatch.setattr("mdtrt.device_group._MAX_CACHED_COLLECTIVES", 1)
    group.all_gather(xs)  # a new runner evicts all_reduce's calls, and the spares
    assert len(group._spare_outputs._kept) == 0
    group.all_gather(xs)
    assert len(group._spare_outputs._kept) == 1
    group.close()
    assert len(group._spare_outputs._kept) == 0


def test_a_prepared_call_without_out_runs_on_the_spare_of_its_run_before(stubs, monkeypatch):
    group = stubs.make_group()
    call = group.prepare_collective("all_gather", tensors(0x1000))
    got = [call()]
    for _ in range(3):
        spare = stubs.allocated[-2:]
        got.append(call())
        assert got[-1] == spare
        _, outputs, _ = stubs.log[-1]
        assert [given[0][1] for given in outputs] == [t.ptr for t in spare]
    assert len({id(t) for outs in got for t in outs}) == 2 * len(got)
    monkeypatch.setattr(arrays, "_STREAM_GETTER", [lambda device: 300 + device])
    spare = stubs.allocated[-2:]
    assert call() != spare
    _, outputs, _ = stubs.log[-1]
    assert [given[0][4] for given in outputs] == [300, 301]


def spare_tensors(spares) -> list:
    """Every tensor a SpareOutputs holds (a fast-path run's: (tensors, addresses); a prepared
    call's: one {name: ArrayRef} per rank)."""
    found = []
    for outputs, _ in list(spares._kept.values()):
        if type(outputs) is tuple:
            found += outputs[0]
        else:
            found += [ref.owner for given in outputs for ref in given.values()]
    return found


def test_a_group_dropped_without_close_frees_its_spares_and_calls_at_once(stubs):
    """The spares hold no reference to the calls they were made for: a group dropped without
    close() frees its spare outputs and its prepared calls (their native calls, which hold its
    runners and communicators) as its last reference goes, not at a later cyclic collection."""
    group = stubs.make_group()
    xs = tensors(0x1000)
    for _ in range(3):
        group.all_reduce(xs)
    assert len(group._spare_outputs._kept) == 1
    natives = [weakref.ref(kept.call._call) for kept in group._calls.values()]
    spares = [weakref.ref(t) for t in spare_tensors(group._spare_outputs)]
    assert natives and len(spares) == 2
    del stubs.allocated[:]
    gc.disable()
    try:
        del group
        assert [ref() for ref in natives + spares] == [None] * (len(natives) + len(spares))
    finally:
        gc.enable()


def test_a_dropped_prepared_call_frees_its_inputs_and_its_spare(stubs):
    """A prepared call without out= keeps a spare after each call; dropping the call frees it
    and the inputs the call held, at once, while the group lives on."""
    group = stubs.make_group()
    xs = tensors(0x1000)
    call = group.prepare_collective("all_gather", xs)
    call()
    call()
    assert len(group._spare_outputs._kept) == 1
    inputs = [weakref.ref(x) for x in xs]
    spares = [weakref.ref(t) for t in spare_tensors(group._spare_outputs)]
    del stubs.allocated[:]
    gc.disable()
    try:
        del xs, call
        assert len(group._spare_outputs._kept) == 0
        assert [ref() for ref in inputs + spares] == [None] * 4
    finally:
        gc.enable()


def test_the_spares_of_an_evicted_signature_go_with_it(stubs):
    """A signature's kept fast-path call evicted (past the kept calls' limit) never runs again:
    its spare goes with it, and the spares left are those of the calls still kept."""
    group = stubs.make_group()
    group._torch_calls.limit = 2
    gc.disable()
    try:
        for rows in (4, 6, 8):  # three signatures, two kept: the third evicts the first
            xs = tensors(0x1000 * rows, shape=(rows, 3))
            for _ in range(2):
                group.all_reduce(xs)
        assert len(group._spare_outputs._kept) == 2
        kept_runs = set(map(id, group._torch_calls.values()))
        assert {id(key[0]()) for key in group._spare_outputs._kept} == kept_runs
    finally:
        gc.enable()


def test_a_call_running_while_the_group_closes_keeps_no_spare(stubs, monkeypatch):
    """close() in another thread while a call runs (close waits for it): the call still returns
    its outputs, but the spare it allocated while its ranks ran is not kept by the closed group;
    for the op methods and prepared calls alike."""
    closing = []
    real = StubCall.run_flat

    def run_flat(self, *args):  # once asked, the group closes while this run is in flight
        if closing:
            group.close()
        return real(self, *args)

    monkeypatch.setattr(StubCall, "run_flat", run_flat)
    group = stubs.make_group()
    xs = tensors(0x1000)
    group.all_reduce(xs)  # the general path: the next call takes the fast path
    call = group.prepare_collective("all_gather", xs)
    closing.append(True)
    for run in (lambda: group.all_reduce(xs), call):
        before = len(stubs.allocated)
        outs = run()
        assert [t.ptr for t in outs] == outputs_run_on(stubs)
        assert len(stubs.allocated) > before  # a spare was made while its ranks ran...
        assert len(group._spare_outputs._kept) == 0  # ...which the closed group does not keep
        assert len(group._spare_outputs._kept) == 0


def test_close_refused_inside_a_call_of_the_group_leaves_the_group_as_it_was(stubs, monkeypatch):
    """close() from inside a call of the same group (a finalizer that garbage collection runs while
    the call allocates its next outputs) is refused natively, since the thread holds the group's
    locks: the Python side must stay as it was (not closed on one side and open on the other), so
    that later calls still run and keep spares, and a close() after the call closes it."""

    class RefusingNative(Native):
        closed = False

        def close(self):  # as the native close(): RankRuntime::throw_if_calling_back
            if ranks_running():
                raise mdtrt.InvalidArgumentError("called from inside a call of this device group")
            RefusingNative.closed = True

    refused = []
    real_new = _TorchRun._new_outputs

    def new_outputs(self, inputs):
        if ranks_running() and not refused:
            try:
                group.close()
            except mdtrt.InvalidArgumentError as error:
                refused.append(error)
        return real_new(self, inputs)

    monkeypatch.setattr(_TorchRun, "_new_outputs", new_outputs)
    group = stubs.make_group(RefusingNative)
    xs = tensors(0x1000)
    for _ in range(2):
        group.all_reduce(xs)  # the general path, then the fast path: its spare's allocation closes
    assert len(refused) == 1 and not RefusingNative.closed
    outs = group.all_reduce(xs)
    assert [t.ptr for t in outs] == outputs_run_on(stubs)
    assert len(group._spare_outputs._kept) == 1
    group.close()
    assert RefusingNative.closed and len(group._spare_outputs._kept) == 0
    with pytest.raises(mdtrt.InvalidArgumentError, match="closed"):
        group.all_reduce(xs)


def test_abort_after_close_still_aborts_while_something_holds_the_native_group(stubs):
    """close() ends the Python object, but an EngineRunner or a Communicator may keep the native
    group (and stream-ordered work queued in its communicators) alive: abort() after close() still
    aborts it then, and does nothing once the native group is gone."""

    class AbortableNative(Native):
        aborted = 0

        def abort(self):
            AbortableNative.aborted += 1

    group = stubs.make_group(AbortableNative)
    holder = group._native  # what a runner holds
    group.close()
    group.abort()
    assert AbortableNative.aborted == 1
    del holder
    gc.collect()
    group.abort()  # nothing left to abort
    assert AbortableNative.aborted == 1


def test_a_spare_made_in_inference_mode_serves_only_calls_in_it(stubs):
    """Tensors allocated in torch's inference mode are inference tensors (not changed in place nor
    saved for backward outside it): a spare made there serves the next call there only, and one
    made outside serves calls outside."""
    group = stubs.make_group()
    xs = tensors(0x1000)
    with torch.inference_mode():
        for _ in range(2):
            group.all_reduce(xs)
        made_inside = stubs.allocated[-2:]
    got = group.all_reduce(xs)
    assert not {id(t) for t in got} & {id(t) for t in made_inside}
    made_outside = stubs.allocated[-2:]
    assert group.all_reduce(xs) == made_outside
    with torch.inference_mode():
        assert group.all_reduce(xs) == made_inside
    call = group.prepare_collective("all_gather", xs)
    call()
    with torch.inference_mode():
        made_inside = stubs.allocated[-2:]
        assert not {id(t) for t in call()} & {id(t) for t in made_inside}


def test_spares_are_counted_as_torch_allocates_them_and_in_number(stubs, monkeypatch):
    """A small output takes a 512-byte block of torch's caching allocator: the limit counts those,
    and at most SPARE_OUTPUTS_MAX_COUNT spares are kept (0-byte outputs too)."""
    group = stubs.make_group()
    monkeypatch.setattr(prepared_call, "SPARE_OUTPUTS_MAX_BYTES", 1024)
    for rows in (2, 4, 6):  # 24 to 72 bytes per rank: 512 each
        xs = tensors(0x1000 * rows, shape=(rows, 3))
        for _ in range(2):
            group.all_reduce(xs)
    assert [nbytes for _, nbytes in group._spare_outputs._kept.values()] == [512, 512]
    monkeypatch.setattr(prepared_call, "SPARE_OUTPUTS_MAX_BYTES", 1 << 30)
    monkeypatch.setattr(prepared_call, "SPARE_OUTPUTS_MAX_COUNT", 3)
    for rows in (8, 10, 12, 14):
        xs = tensors(0x1000 * rows, shape=(rows, 3))
        for _ in range(2):
            group.all_reduce(xs)
    assert len(group._spare_outputs._kept) == 3


def test_ctrl_c_while_a_spare_is_made_cancels_the_call_and_spares_go_on(stubs, monkeypatch):
    """KeyboardInterrupt while the spare is allocated (Ctrl-C in while_ranks_run): the call does
    not run (natively its ranks are let go before any launches, so none can wait for a peer that
    never comes), the interrupt is raised, the spare is not kept, and later calls run and keep
    spares again (the one-thread-at-a-time lock was let go)."""
    interrupt = []
    real_new = _TorchRun._new_outputs

    def new_outputs(self, inputs):
        if interrupt and ranks_running():
            del interrupt[:]
            raise KeyboardInterrupt
        return real_new(self, inputs)

    monkeypatch.setattr(_TorchRun, "_new_outputs", new_outputs)
    group = stubs.make_group()
    xs = tensors(0x1000)
    group.all_reduce(xs)  # the general path
    group.all_reduce(xs)  # the fast path: keeps a spare
    assert len(group._spare_outputs._kept) == 1
    runs = len(stubs.log)
    interrupt.append("armed")
    with pytest.raises(KeyboardInterrupt):
        group.all_reduce(xs)
    assert len(stubs.log) == runs  # it did not run
    assert len(group._spare_outputs._kept) == 0  # its spare, interrupted, is not kept
    outs = group.all_reduce(xs)
    assert [t.ptr for t in outs] == outputs_run_on(stubs)
    assert len(group._spare_outputs._kept) == 1  # spares are kept again


def test_ctrl_c_while_a_prepared_call_sizes_its_first_spare_leaves_its_spares_counted(stubs, monkeypatch):
    """KeyboardInterrupt while a prepared call works out the bytes of its spares (Ctrl-C in
    while_ranks_run, at its first spare, inside spare_bytes' loops): the next runs count them again,
    so they are held to SPARE_OUTPUTS_MAX_BYTES, not kept as 0 bytes past it."""
    interrupt = []
    real = prepared_call.spare_bytes

    def spare_bytes(per_rank_nbytes):
        if interrupt and ranks_running():
            del interrupt[:]
            raise KeyboardInterrupt
        return real(per_rank_nbytes)

    monkeypatch.setattr(prepared_call, "spare_bytes", spare_bytes)
    group = stubs.make_group()
    call = group.prepare_collective("all_gather", tensors(0x1000, shape=(4, 48)))  # 1536 bytes per rank
    interrupt.append("armed")
    with pytest.raises(KeyboardInterrupt):
        call()
    call()
    assert [nbytes for _, nbytes in group._spare_outputs._kept.values()] == [1536]
    group.free_spare_outputs()
    monkeypatch.setattr(prepared_call, "SPARE_OUTPUTS_MAX_BYTES", 1024)
    for _ in range(2):
        call()
    assert len(group._spare_outputs._kept) == 0


def test_after_a_spare_fails_to_allocate_the_group_keeps_none(stubs, monkeypatch):
    """Out of memory for a spare: torch's allocator first frees its cached blocks (cudaFree waits
    for the GPU) and counts an out-of-memory event, so trying again after every call would make
    each call wait for the GPU. The group drops its spares then and allocates none from then on;
    the calls still run on outputs of their own."""
    failing, allocations = [], []
    real_new = _TorchRun._new_outputs

    def new_outputs(self, inputs):  # once armed, the spare's allocation (while the ranks run) fails, once
        allocations.append(None)
        if failing and ranks_running():
            del failing[:]
            raise torch.OutOfMemoryError("out of memory")
        return real_new(self, inputs)

    monkeypatch.setattr(_TorchRun, "_new_outputs", new_outputs)
    group = stubs.make_group()
    ys = tensors(0x3000, shape=(2, 6))
    for _ in range(2):
        group.all_gather(ys)
    assert len(group._spare_outputs._kept) == 1  # another signature's spare
    xs = tensors(0x1000)
    group.all_reduce(xs)  # the general path
    failing.append("armed")
    group.all_reduce(xs)  # its spare's allocation fails
    assert len(group._spare_outputs._kept) == 0
    for op, inputs in (("all_reduce", xs), ("all_gather", ys)) * 2:
        del allocations[:]
        outs = getattr(group, op)(inputs)
        assert [t.ptr for t in outs] == outputs_run_on(stubs)
        assert len(allocations) == 1 and len(group._spare_outputs._kept) == 0  # its own outputs, no spare tried


def run_prepared(stubs, make, op, options, steps=3):
    """``steps`` runs of one prepare_collective(out=) call on the group ``make()`` gives, once as it
    runs and once with every run on the general path (``self._call(outputs, ...)``, then the
    native result read back): what each returned (the given outputs by rank, or None), what each
    native run got, and how many runs went as prepared (run_stream_ordered)."""
    got = {}
    for as_prepared in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            native_runs = runs_as_prepared(patch, StubCall, as_prepared)
            group = make()
            n = group._num_local_ranks
            xs = tensors(0x1000)[:n]
            rows = {"all_gather": 8, "gather": 8, "reduce_scatter": 2, "scatter": 2}.get(op, 4)
            if options.get("groups") == [1]:
                rows = {"all_gather": 4, "gather": 4}.get(op, 4)
            outs = tensors(0x200000, shape=(rows, 3))[:n]
            del stubs.log[:]
            call = group.prepare_collective(op, xs, out=outs, **options)
            returned = []
            for _ in range(steps):
                returned.append([None if g is None else ("out", next(r for r, o in enumerate(outs) if o is g))
                                 for g in call()])
            got[as_prepared] = (returned, list(stubs.log), len(native_runs))
    return got


@pytest.mark.parametrize("op, options", [
    ("all_reduce", {}), ("all_gather", {}), ("broadcast", {"root": 1}), ("reduce", {"root": 1}),
    ("reduce", {"root": 0, "stream_ordered": True}), ("gather", {"root": 0}), ("scatter", {"root": 1}),
    ("reduce_scatter", {"poison_outputs": True}), ("all_to_all", {}), ("all_reduce", {"groups": [1]}),
    ("all_gather", {"groups": [1], "stream_ordered": True}), ("all_reduce", {"stream_ordered": False}),
])
@pytest.mark.parametrize("ranks", [2, 1])
def test_a_prepared_call_into_its_outputs_runs_as_prepared(stubs, op, options, ranks):
    """prepare_collective(out=) on torch tensors: each stream-ordered run is the native call as
    prepared (run_stream_ordered: no arguments, nothing read back) and returns what the general
    run returns: the given outputs themselves, None for a rank whose output is undefined (off the
    root of reduce and gather, outside ``groups``), one per local rank (a group of one local
    rank too); the native runs write into the outputs given at prepare time. A waiting run
    (stream_ordered=False) runs the prepared call as before."""
    got = run_prepared(stubs, lambda: stubs.make_group(OneRankNative if ranks == 1 else Native), op, options)
    assert got[True][:2] == got[False][:2]
    returned, log, as_prepared = got[True]
    n = ranks
    world = [0, 1][:n]
    undefined = {r for r in world if (op in ("reduce", "gather") and r != options.get("root", 0))
                 or r not in options.get("groups", [0, 1])}
    assert returned == [[None if r in undefined else ("out", r) for r in world]] * 3
    ordered = options.get("stream_ordered") is not False
    assert as_prepared == (3 if ordered else 0) and got[False][2] == 0
    assert [(label, ordered_run) for label, _, ordered_run in log] == [("prepared", ordered)] * 3
    assert all(outputs == [[("output", 0x200000 + 0x100 * r, outputs[r][0][2], r, 100 + r)] for r in world]
               for _, outputs, _ in log)


def test_a_prepared_call_that_cannot_run_raises_on_every_run(stubs, monkeypatch):
    """An out= the native run refuses (another size than the collective's output) is refused by
    every run as prepared, each one asking the native call again (nothing of a refusal kept)."""
    attempts = []
    real = StubCall.run_stream_ordered
    monkeypatch.setattr(StubCall, "run_stream_ordered", lambda self: real(attempts.append(self) or self))
    group = stubs.make_group()
    call = group.prepare_collective("all_gather", tensors(0x1000), out=tensors(0x2000))  # needs (8, 3)
    for _ in range(3):
        with pytest.raises(mdtrt.InvalidArgumentError, match="out of rank 0: 48 bytes on GPU 0, needs 96 bytes"):
            call()
    assert stubs.log == [] and len(attempts) == 3
