"""EngineRunner.infer's fast path for torch CUDA tensors (EngineRunner._torch_calls), against a stub
of the native runner and stand-ins for torch CUDA tensors, so it is tested on any machine: a
signature found again runs what the general path would run (the same addresses, streams, output
buffers, stream ordering, and the same returned arrays), and anything the general path checks is
never passed by it."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import numpy as np
import pytest

import mdtrt
from mdtrt import _core, arrays, prepared_call
from mdtrt.device_group import DeviceGroup
from mdtrt.runner import EngineRunner

torch = pytest.importorskip("torch")
from fast_path_fakes import (  # noqa: E402 (needs torch)
    FakeCuda, Native, OneRankNative, failing_runs, fake_torch, recorded_addressed, runs_as_prepared)
from addressed_stub import addressed_run  # noqa: E402

# The stub engine: inputs "a" and "b" (float32, two dimensions); outputs "z" (b's shape) and "y"
# (a's shape), in that order, as a native result lists them.
INPUTS = [("a", "float32", (-1, -1)), ("b", "float32", (-1, -1))]


def nbytes(shape):
    count = 4
    for d in shape:
        count *= d
    return count


class StubCall:
    """A native prepared call: each run checks its outputs as the native one does (known names,
    sizes, each rank's GPU) and records what it got, nested per rank as run_at takes it."""

    arrays_may_be_in_use = False

    def __init__(self, log, specs, prepared_outputs=(), input_counts=None):
        self.log, self.specs = log, specs  # specs: per rank, [(name, dtype, shape)]
        self.input_counts = [len(INPUTS)] * len(specs) if input_counts is None else input_counts  # per rank
        # The outputs given when it was prepared (OutputArgs per rank): a run without outputs of its
        # own writes into them, as the native PreparedInfer's options keep them.
        self.prepared_outputs = list(prepared_outputs)

    def run_at(self, addresses, outputs, stream_ordered=False):
        for rank, given in enumerate(outputs):
            sizes = {name: nbytes(shape) for name, _, shape in self.specs[rank]}
            for name, ptr, size, device, stream in given:
                if name not in sizes:
                    raise mdtrt.InvalidArgumentError(f"the program has no output named '{name}'")
                if size != sizes[name] or device != rank:
                    raise mdtrt.InvalidArgumentError(f"output '{name}' of rank {rank}: {size} bytes on GPU {device}, "
                                                     f"needs {sizes[name]} bytes on GPU {rank}")
        if stream_ordered:  # as each native rank checks: every output given, none from the pool
            for rank, specs in enumerate(self.specs):
                given = {o[0] for o in outputs[rank]} if rank < len(outputs) else set()
                for name in [name for name, _, _ in specs if name not in given][:1]:
                    raise mdtrt.InvalidArgumentError(f"a stream-ordered call writes only into outputs the caller "
                                                     f"owns; output '{name}' of rank {rank} would come from the pool")
        self.log.append((addresses, outputs, stream_ordered))
        results = []
        for rank, specs in enumerate(self.specs):
            given = {o[0] for o in outputs[rank]} if outputs else set()
            results.append(SimpleNamespace(outputs=list(specs), host=[],
                                           device=[None if name in given else ("pooled", rank, name, shape)
                                                   for name, _, shape in specs]))
        return results

    def __call__(self, outputs=None, stream_ordered=False):
        """A run of a prepared call (EngineRunner.prepare) on the arrays it was prepared with,
        into ``outputs`` (OutputArg lists per rank) or, without them, the outputs given when it
        was prepared."""
        given = [[(o.name, o.ptr, o.nbytes, o.device, o.stream) for o in rank]
                 for rank in (self.prepared_outputs if outputs is None else outputs)]
        return self.run_at([[] for _ in self.specs], given, stream_ordered)

    def run_stream_ordered(self):
        """As the native one: a stream-ordered run into the outputs given when it was prepared
        (checked as every run's are); returns None."""
        self(None, True)

    def addressed(self, names, nbytes, devices, stream_ordered=False):
        """As the native one (addressed_stub: its checks, at making and per run): a run with these
        outputs' names, sizes and GPUs fixed, called with only the flat addresses (run_flat, looked
        up at each run, records it)."""
        return addressed_run(lambda *args: self.run_flat(*args), self.input_counts, names, nbytes, devices,
                             stream_ordered)

    def run_flat(self, pointers, streams, names, nbytes, devices, stream_ordered=False):
        """As the native binding: flat lists, each rank's inputs in turn, then each rank's outputs."""
        m, n = len(names), len(self.specs)
        assert len(nbytes) == len(devices) == n * m and len(pointers) == len(streams)
        k = (len(pointers) - n * m) // n
        base = n * k
        self.run_at([[(pointers[i * k + j], streams[i * k + j]) for j in range(k)] for i in range(n)],
                    [[(names[j], pointers[base + i * m + j], nbytes[i * m + j], devices[i * m + j],
                       streams[base + i * m + j]) for j in range(m)] for i in range(n)], stream_ordered)


class StubRunner:
    """A native runner of the stub engine: prepare checks each rank's inputs as the native plan
    does (dtype, dimensions) and records them."""

    cuda_graphs = False
    graph_fallback = ""

    def __init__(self, log):
        self.log, self.prepared = log, []

    def input_specs(self, local):
        return INPUTS

    def prepare(self, inputs, replication, poison, fetch, on_device, timeout, outputs):
        specs = []
        for rank, args in enumerate(inputs):
            for (name, _, _), arg in zip(INPUTS, args):
                if arg.dtype != "float32" or len(arg.shape) != 2:
                    raise mdtrt.InvalidArgumentError(f"input '{name}' of rank {rank}: dtype {arg.dtype}, shape "
                                                     f"{arg.shape}; the engine takes float32 of 2 dimensions")
            specs.append([("z", "float32", tuple(args[1].shape)), ("y", "float32", tuple(args[0].shape))])
        self.prepared.append(([(a.device, a.dtype, a.shape) for args in inputs for a in args], replication, poison,
                              timeout))
        return StubCall(self.log, specs, outputs, [len(args) for args in inputs])


@pytest.fixture
def stubs(monkeypatch):
    """(make_runner, log, ...): EngineRunners of 2 ranks on the stub native runner."""
    log, runners = [], []

    def native_runner(group, programs, sequential):
        runners.append(StubRunner(log))
        return runners[-1]

    monkeypatch.setattr(_core, "ProgramRunner", native_runner)
    monkeypatch.setattr(_core, "RankProgram", StubRunner)  # EngineRunner(program=) checks the type
    fakes = fake_torch(monkeypatch)
    # The first call of a signature without outputs= returns pooled outputs: stand-ins here.
    monkeypatch.setattr(prepared_call, "wrap_device_output",
                        lambda buffer, dtype, shape, like: ("pooled", buffer[1], buffer[2], tuple(shape)))

    def make_runner(native=Native, **kw):
        group = DeviceGroup.__new__(DeviceGroup)
        group._adopt(native())
        return EngineRunner(group, program=StubRunner(log), **kw)

    return SimpleNamespace(make_runner=make_runner, log=log, runners=runners, allocated=fakes.allocated, how=fakes.how)


def inputs_of(base, per_rank, shape_a=(4, 3), shape_b=(2, 5), device=None, **kw):
    """The engine's inputs at addresses from ``base``: one dict (on GPU ``device``, default 0) or one per rank."""
    if not per_rank:
        d = 0 if device is None else device
        return {"a": FakeCuda(shape_a, d, base, **kw), "b": FakeCuda(shape_b, d, base + 0x100, **kw)}
    return [{"a": FakeCuda(shape_a, r if device is None else device, base + 0x1000 * r, **kw),
             "b": FakeCuda(shape_b, r if device is None else device, base + 0x1000 * r + 0x100, **kw)}
            for r in range(2)]


def outputs_of(base, order=("y", "z"), shapes=None, **kw):
    shapes = shapes or {"y": (4, 3), "z": (2, 5)}
    return {name: [FakeCuda(shapes[name], r, base + 0x1000 * r + 0x100 * j, **kw) for r in range(2)]
            for j, name in enumerate(order)}


def label(x, given):
    """What a returned array is: one of the given outputs (by name and rank), or a new one."""
    for name, tensors in (given or {}).items():
        for rank, t in enumerate(tensors):
            if x is t:
                return ("given", name, rank)
    if isinstance(x, FakeCuda):
        return ("allocated", tuple(x.shape), x.dtype, x.device_index, x.ptr)
    return x


def run_series(stubs, per_rank, with_outputs, options, fast, device=None, order=("y", "z")):
    """Four calls of one signature on new tensors each: what each returned and each run got."""
    with pytest.MonkeyPatch.context() as patch:
        if not fast:  # the general path on every call
            patch.setattr("mdtrt.runner.read_torch_cuda", lambda *args: None)
        runner = stubs.make_runner()
        del stubs.log[:]
        del stubs.allocated[:]
        returned = []
        for step in range(4):
            inputs = inputs_of(0x100000 * (step + 1), per_rank, device=device)
            given = outputs_of(0x10000000 + 0x100000 * step, order) if with_outputs else None
            got = runner.infer(inputs, outputs=given, **options)
            per = got if options.get("all_ranks") else [got]
            returned.append([[(name, label(x, given)) for name, x in rank.items()] for rank in per])
    return returned, list(stubs.log), runner


OPTIONS = [{}, {"all_ranks": True}, {"poison_outputs": True}, {"replication": "peer"}, {"timeout": 5},
           {"timeout": 2.5, "all_ranks": True}, {"stream_ordered": False}, {"stream_ordered": True},
           {"replication": "host", "poison_outputs": False, "all_ranks": False, "stream_ordered": None}]


@pytest.mark.parametrize("options", OPTIONS, ids=[str(o) for o in OPTIONS])
@pytest.mark.parametrize("with_outputs", [True, False], ids=["outputs", "allocated"])
@pytest.mark.parametrize("per_rank", [False, True], ids=["shared", "per_rank"])
def test_fast_path_runs_what_the_general_path_runs(stubs, per_rank, with_outputs, options):
    """Shared and per-rank inputs (two of them), two outputs given or allocated, every option:
    from the second call of a signature on, the fast path gives the native run the same
    addresses, streams, output buffers and stream ordering as the general path, and returns the
    same arrays (the given ones, or outputs allocated alike), in the same order."""
    slow = run_series(stubs, per_rank, with_outputs, options, False)
    fast = run_series(stubs, per_rank, with_outputs, options, True)
    assert fast[0] == slow[0] and fast[1] == slow[1]
    runner = fast[2]
    assert len(runner._torch_calls) == 1 and len(runner._calls) == 1
    assert [len(r.prepared) for r in stubs.runners] == [1, 1]  # each runner: planned once
    prepared = stubs.runners[-1].prepared[0]
    assert prepared[1] == options.get("replication", "auto") and prepared[2] == options.get("poison_outputs", False)
    addresses, outputs, ordered = stubs.log[-1]
    if per_rank:
        assert addresses == [[(0x400000, 100), (0x400100, 100)], [(0x401000, 101), (0x401100, 101)]]
    else:  # one dict: the same tensors (on GPU 0) named on every rank, replicated natively
        assert addresses == [[(0x400000, 100), (0x400100, 100)]] * 2
    assert [[o[0] for o in rank] for rank in outputs] == ([["y", "z"]] * 2 if with_outputs else [["z", "y"]] * 2)
    assert [[(o[3], o[4]) for o in rank] for rank in outputs] == [[(0, 100)] * 2, [(1, 101)] * 2]
    assert ordered is (options.get("stream_ordered") is not False)
    # returned in the order the native result lists the outputs, as the general path returns them
    assert [name for name, _ in fast[0][-1][0]] == ["z", "y"]


def test_outputs_in_another_order_and_a_single_gpu_input_are_passed_alike(stubs):
    """outputs= naming the outputs in the native order, and one dict whose tensors live on GPU 1
    (device-input replication from that GPU): the fast path passes what the general path does."""
    for kw in ({"order": ("z", "y")}, {"device": 1}, {"device": 1, "order": ("z", "y")}):
        for with_outputs in (True, False):
            slow = run_series(stubs, False, with_outputs, {"all_ranks": True}, False, **kw)
            fast = run_series(stubs, False, with_outputs, {"all_ranks": True}, True, **kw)
            assert fast[0] == slow[0] and fast[1] == slow[1]
            assert len(fast[2]._torch_calls) == 1
    assert stubs.log[-1][0] == [[(0x400000, 101), (0x400100, 101)]] * 2  # GPU 1's stream on every rank


def test_one_local_rank_takes_single_output_tensors_on_the_fast_path(stubs):
    """With one local rank a single tensor stands for a list of one in outputs=: such calls find
    their kept call too, and pass what the general path passes."""
    def series(fast):
        with pytest.MonkeyPatch.context() as patch:
            if not fast:
                patch.setattr("mdtrt.runner.read_torch_cuda", lambda *args: None)
            runner = stubs.make_runner(OneRankNative)
            del stubs.log[:]
            for step in range(3):
                given = {name: ts[0] for name, ts in outputs_of(0x200000 + 0x10000 * step).items()}
                got = runner.infer(inputs_of(0x1000 * (step + 1), False), outputs=given)
                assert got == {"z": given["z"], "y": given["y"]} and list(got) == ["z", "y"]
                runner.infer([inputs_of(0x1000 * (step + 1), False)], outputs={n: [t] for n, t in given.items()})
        return list(stubs.log), runner

    slow, (fast, runner) = series(False)[0], series(True)
    assert fast == slow and len(runner._torch_calls) == 2
    assert fast[-1][0] == [[(0x3000, 100), (0x3100, 100)]]


def test_the_first_call_of_a_signature_takes_the_general_path(stubs):
    runner = stubs.make_runner()
    runner.infer(inputs_of(0x1000, False))
    assert len(runner._torch_calls) == 1
    runner.infer(inputs_of(0x1000, False, shape_a=(8, 3)))  # another shape: another signature
    runner.infer(inputs_of(0x1000, True))  # one dict per rank: another signature
    runner.infer(inputs_of(0x1000, False), outputs=outputs_of(0x2000))  # outputs= given
    runner.infer(inputs_of(0x1000, False), outputs=outputs_of(0x2000, ("z", "y")))  # in another order
    runner.infer(inputs_of(0x1000, False), stream_ordered=False)
    runner.infer(inputs_of(0x1000, False), timeout=3)
    assert len(runner._torch_calls) == 7 and len(runner._calls) == 7
    runner.replication = "peer"  # the runner's default changed: calls without replication= follow it
    runner.infer(inputs_of(0x1000, False))
    assert stubs.runners[0].prepared[-1][1] == "peer" and len(runner._torch_calls) == 8


def test_a_kept_signature_makes_its_addressed_run_once(stubs, monkeypatch):
    """The fast path fixes a signature's outputs (names, sizes, GPUs) and stream ordering once, in
    the native addressed run it keeps, not per call; each call passes its own addresses."""
    made = recorded_addressed(monkeypatch, StubCall)
    runner = stubs.make_runner()
    for step in range(4):
        runner.infer(inputs_of(0x100000 * (step + 1), True))
        runner.infer(inputs_of(0x100000 * (step + 1), True), outputs=outputs_of(0x10000000 + 0x100000 * step))
    # One per signature: allocated outputs in the native order, given ones in the order given.
    assert made == [(("z", "y"), [40, 48, 40, 48], [0, 0, 1, 1], True),
                    (("y", "z"), [48, 40, 48, 40], [0, 0, 1, 1], True)]
    addresses, outputs, ordered = stubs.log[-1]
    assert addresses == [[(0x400000, 100), (0x400100, 100)], [(0x401000, 101), (0x401100, 101)]] and ordered
    assert outputs == [[("y", 0x10300000, 48, 0, 100), ("z", 0x10300100, 40, 0, 100)],
                       [("y", 0x10301000, 48, 1, 101), ("z", 0x10301100, 40, 1, 101)]]


def test_outputs_given_for_some_outputs_only_take_the_general_path(stubs):
    """outputs= naming some of the outputs: the others come back pooled, as the general path
    returns them; such calls are not kept for the fast path."""
    runner = stubs.make_runner()
    for _ in range(3):
        given = {"y": outputs_of(0x2000)["y"]}
        got = runner.infer(inputs_of(0x1000, False), outputs=given)
        assert got["y"] is given["y"][0] and got["z"] == ("pooled", 0, "z", (2, 5))
    assert len(runner._torch_calls) == 0 and len(runner._calls) == 1


def bad_variants():
    """(name, inputs, kwargs, twin) of calls that must fail, and the kwargs of their good twin
    (whose signature the fast path then keeps): the same pointers, options equal to the bad ones."""
    good = 0x1000
    out = {"outputs": outputs_of(0x20000)}
    shared = inputs_of(good, False)
    return [
        ("another dtype", {"a": shared["a"], "b": FakeCuda((2, 5), 0, good + 0x100, torch.int32)}, {}, {}),
        ("another number of dimensions", {"a": FakeCuda((12,), 0, good), "b": shared["b"]}, {}, {}),
        ("an unsupported dtype", inputs_of(good, False, dtype=torch.complex64), {}, {}),
        ("non-contiguous input", {"a": FakeCuda((4, 3), 0, good, contiguous=False), "b": shared["b"]}, {}, {}),
        ("a missing input", {"a": shared["a"]}, {}, {}),
        ("an extra input", dict(shared, c=FakeCuda((1, 1), 0, 0x7000)), {}, {}),
        ("another input name", {"a": shared["a"], "c": shared["b"]}, {}, {}),
        ("a numpy input mixed in", {"a": shared["a"], "b": np.ones((2, 5), np.float32)}, {}, {}),
        ("a CPU tensor mixed in", {"a": shared["a"], "b": torch.ones(2, 5)}, {}, {}),
        ("one dict per rank, one missing", [inputs_of(good, False)], {}, {}),
        ("per rank, a missing input on rank 1", [inputs_of(good, False), {"a": shared["a"]}], {}, {}),
        ("outputs of another size", shared, {"outputs": outputs_of(0x20000, shapes={"y": (2, 3), "z": (2, 5)})}, out),
        ("outputs of another dtype size", shared, {"outputs": outputs_of(0x20000, dtype=torch.float16)}, out),
        ("outputs on the other GPU", shared,
         {"outputs": {name: ts[::-1] for name, ts in outputs_of(0x20000).items()}}, out),
        ("outputs non-contiguous", shared, {"outputs": outputs_of(0x20000, contiguous=False)}, out),
        ("outputs one rank short", shared, {"outputs": {n: ts[:1] for n, ts in outputs_of(0x20000).items()}}, out),
        ("outputs with a numpy array", shared,
         {"outputs": dict(outputs_of(0x20000), y=[np.ones((4, 3), np.float32)] * 2)}, out),
        ("outputs naming an unknown output", shared, {"outputs": dict(outputs_of(0x20000), w=outputs_of(0x30000)["y"])},
         out),
        ("outputs not a dict", shared, {"outputs": [outputs_of(0x20000)["y"]]}, out),
        ("all_ranks 1", shared, {"all_ranks": 1}, {"all_ranks": True}),
        ("poison_outputs 0", shared, {"poison_outputs": 0}, {"poison_outputs": False}),
        ("stream_ordered 0", shared, {"stream_ordered": 0}, {"stream_ordered": False}),
        ("timeout True", shared, {"timeout": True}, {"timeout": 1}),
        ("timeout 0", shared, {"timeout": 0}, {}),
        ("timeout nan", shared, {"timeout": float("nan")}, {}),
        ("an unknown replication", shared, {"replication": "fast"}, {}),
        ("an unhashable replication", shared, {"replication": ["host"]}, {}),
    ]


# What each bad variant's refusal says (on a fresh runner): the comparison below is only worth as
# much as the first refusal, so that one must be the check the variant is about.
REFUSALS = {
    "another dtype": "input 'b' of rank 0: dtype int32, shape (2, 5); the engine takes float32",
    "another number of dimensions": "input 'a' of rank 0: dtype float32, shape (12,); the engine takes float32 of 2 dimensions",
    "an unsupported dtype": "dtype torch.complex64 is not supported",
    "non-contiguous input": "input 'a' is a non-contiguous torch tensor",
    "a missing input": "missing ['b'], unexpected []",
    "an extra input": "missing [], unexpected ['c']",
    "another input name": "missing ['b'], unexpected ['c']",
    "a numpy input mixed in": "mix of host and device inputs",
    "a CPU tensor mixed in": "mix of host and device inputs",
    "one dict per rank, one missing": "a list of inputs needs one dict per local rank: got 1 for 2",
    "per rank, a missing input on rank 1": "missing ['b'], unexpected []",
    "outputs of another size": "output 'y' of rank 0: 24 bytes on GPU 0, needs 48 bytes",
    "outputs of another dtype size": "output 'y' of rank 0: 24 bytes on GPU 0, needs 48 bytes",
    "outputs on the other GPU": "output 'y' of rank 0: 48 bytes on GPU 1, needs 48 bytes on GPU 0",
    "outputs non-contiguous": "output 'y' is a non-contiguous torch tensor",
    "outputs one rank short": "outputs['y'] needs one array per local rank: got 1 for 2",
    "outputs with a numpy array": "preallocated outputs must be device arrays",
    "outputs naming an unknown output": "the program has no output named 'w'",
    "outputs not a dict": "outputs must be a dict of output name to a list of device arrays",
    "all_ranks 1": "all_ranks must be True or False, got 1 (int)",
    "poison_outputs 0": "poison_outputs must be True or False, got 0 (int)",
    "stream_ordered 0": "stream_ordered must be True, False or None, got 0 (int)",
    "timeout True": "timeout must be a positive, finite number of seconds, got True (bool)",
    "timeout 0": "timeout must be a positive, finite number of seconds, got 0 (int)",
    "timeout nan": "timeout must be a positive, finite number of seconds, got nan (float)",
    "an unknown replication": "replication is 'fast'; it must be one of: auto, host, peer, broadcast",
    "an unhashable replication": "replication is ['host'] (list); it must be one of: auto, host, peer, broadcast",
}


@pytest.mark.parametrize("name, inputs, kwargs, twin", bad_variants(), ids=[v[0] for v in bad_variants()])
def test_a_kept_signature_never_passes_what_the_first_call_refuses(stubs, name, inputs, kwargs, twin):
    """A call whose tensors share the pointers of a signature the fast path keeps, but differ in
    dtype, dimensions, contiguity, GPU, names or kinds, or whose options equal a kept key's but are
    of a type the checks refuse (True == 1), fails with the error the same call gets on a fresh
    runner, and runs nothing."""
    with pytest.raises(mdtrt.InvalidArgumentError) as fresh:
        stubs.make_runner().infer(inputs, **kwargs)
    assert REFUSALS[name] in str(fresh.value), fresh.value
    runner = stubs.make_runner()
    for _ in range(3):
        runner.infer(inputs_of(0x1000, False), **twin)
    assert len(runner._torch_calls) == 1
    runs = len(stubs.log)
    with pytest.raises(type(fresh.value)) as kept:
        runner.infer(inputs, **kwargs)
    assert str(kept.value) == str(fresh.value)
    assert len(stubs.log) == runs  # nothing ran
    runner.infer(inputs_of(0x1000, False), **twin)  # and the runner keeps working
    assert len(stubs.log) == runs + 1


def test_same_addresses_of_another_signature_are_planned_as_what_they_are(stubs):
    """Tensors at a kept signature's addresses but of another shape or GPU (an input on another
    GPU is copied to the rank's: allowed) are planned for what they are, by the general path, and
    then kept under their own signature."""
    runner = stubs.make_runner()
    for _ in range(2):
        runner.infer(inputs_of(0x1000, True))
    variants = [inputs_of(0x1000, True, shape_a=(2, 6)), inputs_of(0x1000, True, device=1),
                inputs_of(0x1000, False, device=1)]
    for inputs in variants * 2:
        got = runner.infer(inputs, all_ranks=True)
        # on each rank's GPU, wherever its inputs are: pooled on a signature's first call, then allocated
        assert [g["y"][1] if type(g["y"]) is tuple else g["y"].device_index for g in got] == [0, 1]
    planned = [p[0] for p in stubs.runners[0].prepared]
    assert planned == [[(0, "float32", (4, 3)), (0, "float32", (2, 5)), (1, "float32", (4, 3)), (1, "float32", (2, 5))],
                       [(0, "float32", (2, 6)), (0, "float32", (2, 5)), (1, "float32", (2, 6)), (1, "float32", (2, 5))],
                       [(1, "float32", (4, 3)), (1, "float32", (2, 5)), (1, "float32", (4, 3)), (1, "float32", (2, 5))],
                       [(1, "float32", (4, 3)), (1, "float32", (2, 5)), (1, "float32", (4, 3)), (1, "float32", (2, 5))]]
    assert len(runner._torch_calls) == 4


def test_outputs_are_allocated_once_the_shapes_are_known_and_made_from_the_inputs(stubs):
    """Without outputs=: the first call of a signature returns pooled outputs and learns the
    shapes; every later call gets new torch outputs on each rank's GPU (empty_like of the rank's
    first input where the shape and GPU match, else torch.empty), handed to the run."""
    runner = stubs.make_runner()
    first = runner.infer(inputs_of(0x1000, False), all_ranks=True)
    assert first[1] == {"z": ("pooled", 1, "z", (2, 5)), "y": ("pooled", 1, "y", (4, 3))}
    got = [runner.infer(inputs_of(0x1000, False), all_ranks=True) for _ in range(3)]
    assert len({id(t) for outs in got for rank in outs for t in rank.values()}) == 12
    for outs in got:
        assert [[(n, tuple(t.shape), t.device_index) for n, t in rank.items()] for rank in outs] == [
            [("z", (2, 5), r), ("y", (4, 3), r)] for r in range(2)]
    _, outputs, ordered = stubs.log[-1]
    assert outputs == [[(n, t.ptr, nbytes(t.shape), r, 100 + r) for n, t in rank.items()]
                       for r, rank in enumerate(got[-1])]
    assert ordered is True  # torch in and out: stream-ordered by default
    # y has the shape of a (the rank's first input): empty_like on rank 0, whose a is on its GPU
    assert stubs.how[-4:] == ["empty", "empty_like", "empty", "empty"]


def test_fast_path_keeps_no_tensor_alive(stubs):
    runner = stubs.make_runner()
    inputs, given = inputs_of(0x1000, True), outputs_of(0x2000)
    for _ in range(2):
        runner.infer(inputs, outputs=given)
        runner.infer(inputs)
    alive = [weakref.ref(t) for d in inputs for t in d.values()] + [weakref.ref(t) for ts in given.values() for t in ts]
    del inputs, given
    stubs.allocated.clear()
    gc.collect()
    assert all(ref() is None for ref in alive)
    assert len(runner._torch_calls) == 2


def test_a_closed_group_refuses_the_fast_path_as_the_general_path(stubs):
    runner = stubs.make_runner()
    for _ in range(2):
        runner.infer(inputs_of(0x1000, False))
    runner.group.close()
    with pytest.raises(mdtrt.InvalidArgumentError, match="the DeviceGroup was closed"):
        runner.infer(inputs_of(0x1000, False))
    with pytest.raises(mdtrt.InvalidArgumentError, match="the DeviceGroup was closed"):
        runner.infer(inputs_of(0x1000, True))  # a first call: the general path


def test_cuda_graph_fallback_warns_on_the_fast_path(stubs):
    """A runner with cuda_graph=True whose graphs were switched off during a fast-path call warns
    once, as after a general-path call."""
    runner = stubs.make_runner(cuda_graph=True)
    for _ in range(2):
        runner.infer(inputs_of(0x1000, False))
    runner._native.graph_fallback = "capture failed on rank 1"
    with pytest.warns(RuntimeWarning, match="capture failed on rank 1"):
        runner.infer(inputs_of(0x1000, False))
    assert len(runner._torch_calls) == 1


@pytest.mark.parametrize("in_use", [True, False])
@pytest.mark.parametrize("with_outputs", [True, False], ids=["outputs", "allocated"])
def test_failed_fast_run_holds_its_tensors_while_work_may_use_them(stubs, monkeypatch, in_use, with_outputs):
    """A fast-path run that raised with work of it possibly still queued (a rank given up on, the
    group broken) keeps its tensors, inputs and outputs (given or allocated), for the life of the
    process, as the general path does; one that left nothing behind keeps nothing."""
    fail = failing_runs(monkeypatch, StubCall, "rank(s) 1 did not finish 'infer'")
    runner = stubs.make_runner()
    for _ in range(2):  # the general path makes the kept call, the fast path runs from then on
        runner.infer(inputs_of(0x1000, True), outputs=outputs_of(0x2000) if with_outputs else None)
    runs = len(stubs.log)
    inputs, given = inputs_of(0x3000, True), outputs_of(0x4000) if with_outputs else None
    runner._spare_outputs.clear()  # (the spare the call before allocated would serve it: this run allocates its own)
    del stubs.allocated[:]
    alive = [weakref.ref(t) for d in inputs for t in d.values()]
    alive += [weakref.ref(t) for ts in given.values() for t in ts] if with_outputs else []
    fail.append(True)
    monkeypatch.setattr(StubCall, "arrays_may_be_in_use", in_use)
    held_before = len(prepared_call._HELD_FOR_UNFINISHED_WORK)
    with pytest.raises(mdtrt.RankTimeoutError, match=r"rank\(s\) 1 did not finish 'infer'"):
        runner.infer(inputs, outputs=given)
    assert len(stubs.log) == runs  # it failed in the fast path's native run
    spare = []
    if not with_outputs:  # its own outputs, then the next call's, allocated while its ranks ran
        assert len(stubs.allocated) == 8
        alive += [weakref.ref(t) for t in stubs.allocated[:4]]
        spare = [weakref.ref(t) for t in stubs.allocated[4:]]
        del stubs.allocated[:]
    del inputs, given
    gc.collect()
    assert all((ref() is not None) == in_use for ref in alive)
    assert all(ref() is None for ref in spare) and not runner._spare_outputs._kept  # a failed call keeps no spare
    assert len(prepared_call._HELD_FOR_UNFINISHED_WORK) == held_before + (1 if in_use else 0)


@pytest.mark.parametrize("entry", ["infer", "prepare"])
def test_a_loop_runs_on_outputs_allocated_while_the_call_before_ran(stubs, monkeypatch, entry):
    """Once the output shapes are known, a stream-ordered call without outputs= allocates the next
    call's outputs after its own work is queued (SpareOutputs); the next call runs on them and
    returns them, unless torch's current streams changed meanwhile. Every call returns outputs of
    its own, never ones another call returned."""
    runner = stubs.make_runner()
    inputs = inputs_of(0x1000, True)
    call = runner.prepare(inputs, all_ranks=True) if entry == "prepare" else (
        lambda: runner.infer(inputs, all_ranks=True))
    got = [call() for _ in range(2)]  # pooled outputs (the shapes are learnt), then torch's
    for _ in range(3):
        spare = stubs.allocated[-4:]  # y and z on each rank, allocated after the call before ran
        got.append(call())
        assert [t for rank in got[-1] for t in rank.values()] == spare
        _, outputs, ordered = stubs.log[-1]
        assert ordered is True and [ptr for rank in outputs for _, ptr, _, _, _ in rank] == [t.ptr for t in spare]
    assert len({id(t) for outs in got[1:] for rank in outs for t in rank.values()}) == 4 * (len(got) - 1)
    monkeypatch.setattr(arrays, "_STREAM_GETTER", [lambda device: 200 + device])
    spare = stubs.allocated[-4:]
    got = call()
    assert not {id(t) for rank in got for t in rank.values()} & {id(t) for t in spare}
    _, outputs, _ = stubs.log[-1]
    assert [stream for rank in outputs for _, _, _, _, stream in rank] == [200, 200, 201, 201]


def test_a_runner_dropped_frees_its_spares_and_calls_at_once(stubs):
    """The spares hold no reference to the calls they were made for: an EngineRunner dropped frees
    its spare outputs and its kept and prepared calls (their native calls, which hold the engine's
    contexts) as its last reference goes, not at a later cyclic collection."""
    runner = stubs.make_runner()
    inputs = inputs_of(0x1000, True)
    prepared = runner.prepare(inputs, all_ranks=True)
    for _ in range(3):
        runner.infer(inputs, all_ranks=True)
        prepared()
    assert len(runner._spare_outputs._kept) == 2
    natives = [weakref.ref(call._call) for call in runner._calls.values()]
    spares = [weakref.ref(ref.owner) for outputs, _ in list(runner._spare_outputs._kept.values())
              for given in outputs for ref in given.values()]
    assert natives and len(spares) == 8
    del stubs.allocated[:]
    gc.disable()
    try:
        del runner, prepared
        assert [ref() for ref in natives + spares] == [None] * (len(natives) + len(spares))
    finally:
        gc.enable()


def test_free_spare_outputs_drops_the_runners_spares_and_the_runner_goes_on(stubs):
    """group.free_spare_outputs() hands a runner's spares back to torch's allocator (no reference to
    them is left) without closing anything: the next calls run, on new outputs, and keep a spare
    again."""
    runner = stubs.make_runner()
    inputs = inputs_of(0x1000, True)
    for _ in range(3):
        runner.infer(inputs, all_ranks=True)
    assert len(runner._spare_outputs._kept) == 1
    spares = [weakref.ref(ref.owner) for outputs, _ in list(runner._spare_outputs._kept.values())
              for given in outputs for ref in given.values()]
    del stubs.allocated[:]
    runner.group.free_spare_outputs()
    assert len(runner._spare_outputs._kept) == 0 and [ref() for ref in spares] == [None] * len(spares)
    for _ in range(2):
        got = runner.infer(inputs, all_ranks=True)
        assert len(got) == 2
    assert len(runner._spare_outputs._kept) == 1
    runner.group.close()
    runner.group.free_spare_outputs()  # nothing held, nothing raised


def test_group_close_drops_the_runners_spares(stubs, monkeypatch):
    """group.close() frees the spares of the EngineRunners made on it (they cannot run any more),
    also the one a call still running as the group closes allocated while its ranks ran."""
    closing = []
    real = StubCall.run_flat

    def run_flat(self, *args):  # once asked, the group closes while this run is in flight
        if closing:
            closing[0].close()
        return real(self, *args)

    monkeypatch.setattr(StubCall, "run_flat", run_flat)
    runner = stubs.make_runner()
    inputs = inputs_of(0x1000, True)
    for _ in range(3):
        runner.infer(inputs, all_ranks=True)
    assert len(runner._spare_outputs._kept) == 1
    closing.append(runner.group)
    before = len(stubs.allocated)
    got = runner.infer(inputs, all_ranks=True)
    assert len(got) == 2 and len(stubs.allocated) == before + 4  # it ran on the spare and made the next...
    assert len(runner._spare_outputs._kept) == 0  # ...which the closed group dropped


@pytest.mark.parametrize("entry", ["infer", "prepare"])
def test_a_spare_made_in_inference_mode_serves_only_calls_in_it(stubs, entry):
    """Tensors allocated in torch's inference mode are inference tensors: a spare made there
    serves the next call in inference mode only."""
    runner = stubs.make_runner()
    inputs = inputs_of(0x1000, True)
    call = runner.prepare(inputs, all_ranks=True) if entry == "prepare" else (
        lambda: runner.infer(inputs, all_ranks=True))
    with torch.inference_mode():
        for _ in range(3):
            call()
        made_inside = stubs.allocated[-4:]
    got = call()
    assert not {id(t) for rank in got for t in rank.values()} & {id(t) for t in made_inside}
    with torch.inference_mode():
        assert [t for rank in call() for t in rank.values()] == made_inside


def test_prepare_with_outputs_runs_as_prepared_once_the_names_are_known(stubs):
    """EngineRunner.prepare(outputs=) on torch tensors: the first run learns the output names
    (waiting: until then nothing says that every output is given); every later stream-ordered run
    is the native call as prepared, into the same outputs, and returns them (nothing of the
    native result read)."""
    runner = stubs.make_runner()
    given = outputs_of(0x2000)
    call = runner.prepare(inputs_of(0x1000, True), outputs=given, all_ranks=True)
    calls = []
    real = StubCall.run_stream_ordered

    def counted(self):
        calls.append(self)
        return real(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StubCall, "run_stream_ordered", counted)
        for step in range(3):
            got = call()
            assert [{name: label(x, given) for name, x in rank.items()} for rank in got] == [
                {name: ("given", name, r) for name in ("y", "z")} for r in range(2)]
            _, outputs, ordered = stubs.log[-1]
            assert ordered is (step > 0)
            assert [sorted((name, ptr) for name, ptr, _, _, _ in rank) for rank in outputs] == [
                sorted((name, given[name][r].ptr) for name in ("y", "z")) for r in range(2)]
            assert len(calls) == step  # the first run went the general way


@pytest.mark.parametrize("entry", ["infer", "prepare"])
@pytest.mark.parametrize("per_rank", [False, True])
def test_outputs_for_some_outputs_wait_for_the_pooled_others(stubs, entry, per_rank):
    """torch tensors in and outputs= naming some of the engine's outputs: the others come from
    mdtrt's pool, which no caller stream follows, so every call waits (a stream-ordered one is
    refused natively) and returns the pooled ones; never run as prepared."""
    runner = stubs.make_runner()
    given = {"y": outputs_of(0x2000)["y"]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StubCall, "run_stream_ordered", lambda self: pytest.fail("ran as prepared"))
        call = runner.prepare(inputs_of(0x1000, per_rank), outputs=given, all_ranks=True) if entry == "prepare" else None
        for _ in range(3):
            got = call() if call else runner.infer(inputs_of(0x1000, per_rank), outputs=given, all_ranks=True)
            assert [{name: label(x, given) for name, x in rank.items()} for rank in got] == [
                {"z": ("pooled", r, "z", (2, 5)), "y": ("given", "y", r)} for r in range(2)]
            assert stubs.log[-1][2] is False
    with pytest.raises(mdtrt.InvalidArgumentError, match="output 'z' of rank 0 would come from the pool"):
        runner.infer(inputs_of(0x1000, per_rank), outputs=given, stream_ordered=True)


@pytest.mark.parametrize("all_ranks", [False, True])
@pytest.mark.parametrize("stream_ordered", [None, True, False])
def test_prepare_with_outputs_returns_what_the_general_run_returns(stubs, all_ranks, stream_ordered):
    """EngineRunner.prepare(outputs= every output) run as prepared returns what the general run
    returns (the given tensors themselves, rank 0's dict without all_ranks) and the native runs
    get the same outputs and stream ordering."""
    got = {}
    for as_prepared in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            runs = runs_as_prepared(patch, StubCall, as_prepared)
            runner = stubs.make_runner()
            given = outputs_of(0x2000, order=("y", "z"))
            del stubs.log[:]
            call = runner.prepare(inputs_of(0x1000, True), outputs=given, all_ranks=all_ranks,
                                  stream_ordered=stream_ordered)
            returned = []
            for _ in range(3):
                out = call()
                returned.append([{name: label(x, given) for name, x in rank.items()}
                                 for rank in (out if all_ranks else [out])])
            got[as_prepared] = returned, list(stubs.log), len(runs)
    assert got[True][:2] == got[False][:2]
    assert got[True][0] == [[{name: ("given", name, r) for name in ("z", "y")}
                             for r in range(2 if all_ranks else 1)]] * 3
    assert [list(rank) for rank in got[True][0][0]] == [["z", "y"]] * (2 if all_ranks else 1)  # the program's order
    assert got[True][2] == (0 if stream_ordered is False else 2) and got[False][2] == 0
    assert [ordered for _, _, ordered in got[True][1]] == [stream_ordered is True] + [stream_ordered is not False] * 2
