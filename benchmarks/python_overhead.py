#!/usr/bin/env python3
"""Python cost per call of the collective and EngineRunner entry points, on any machine (no GPU):
the native group and runner are stubbed (a run does nothing), so what is timed is mdtrt's Python
alone.

Entry points, on 2 ranks with 1 KiB float16 tensors (``--ranks``, ``--elements``):
``collective(op, xs, out=outs)``, ``collective(op, xs)``, ``all_reduce(xs, out=outs)``,
``all_reduce(xs)``, ``all_gather(xs)``, ``prepare_collective(op, xs, out=outs)()`` and
``prepare_collective(op, xs)()``; then an EngineRunner of a one-input, one-output program (a copy):
``infer({"input": x}, outputs=...)``, ``infer({"input": x})`` (after the first call, which learns
the output shapes), ``infer([{...} per rank], outputs=...)``, ``prepare({"input": x},
outputs=...)()`` and ``prepare({"input": x})()``.
Prints the median per call of each (microseconds); ``--profile`` then prints a cProfile of
``all_reduce(xs, out=outs)`` and of ``infer({"input": x}, outputs=...)``; ``--native-arguments``
the cost of converting the fast paths' native arguments (an addressed run's two flat lists
against ``run_at``'s nested ones), measured without a GPU: pybind11 converts every argument before
it finds that the call's ``self`` (None) is no addressed run or prepared call, then raises.

What is faked, so that the numbers are the cost of mdtrt's Python:
- The tensors are Python objects that answer what mdtrt asks of a torch CUDA tensor (dtype,
  shape, contiguity, device, data pointer) at the cost of Python attributes, a little below
  torch's own (50-100 ns a read); ``torch.empty_like``, ``torch.empty`` and ``new_empty`` make
  more of them.
- torch's current stream is a constant (``mdtrt.arrays._STREAM_GETTER``).
- ``_core.CollectiveProgram`` / ``_core.ProgramRunner``: a runner whose prepared call returns at once
  (an engine's first run answers with its output specs and a pooled output, as the native one does).
On GPUs the allocations, the stream reads and the native call come on top (bench_collectives.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="local ranks of the stubbed group (default 2)")
    p.add_argument("--elements", type=int, default=512, help="float16 elements per tensor (default 512: 1 KiB)")
    p.add_argument("--iterations", type=int, default=20000, help="timed calls per entry point (default 20000)")
    p.add_argument("--profile", action="store_true",
                   help="also print a cProfile of all_reduce(xs, out=outs) and of infer(x, outputs=)")
    p.add_argument("--native-arguments", action="store_true",
                   help="also time the conversion of an addressed run's and run_at's arguments (real extension, no GPU)")
    return p


def stub_group(count: int, elements: int = 512):
    """A DeviceGroup of ``count`` local ranks whose native parts do nothing (no GPU needed); its
    runners' programs copy float16 tensors of ``elements``."""
    from mdtrt import _core, arrays
    from mdtrt.device_group import DeviceGroup

    class Native:
        num_local_ranks = world_size = count
        devices = ranks = list(range(count))

    class Result:  # one rank's result of the copy program: what the native run answers
        outputs = [("output", "float16", (elements,))]
        host = []
        device = [None]

    results = [Result()] * count

    class PreparedStub:
        arrays_may_be_in_use = False

        def __call__(self, *args):
            return results

        def run_at(self, *args):
            return results

        def addressed(self, *args):
            def run(pointers, streams, while_ranks_run=None):
                if while_ranks_run is not None:
                    while_ranks_run()
            return run

        def run_stream_ordered(self):
            return None

    class RunnerStub:
        cuda_graphs = False

        def prepare(self, *args):
            return PreparedStub()

        def input_specs(self, local):
            return [("input", "float16", (-1,))]

    arrays._STREAM_GETTER[:] = [lambda device: 7]
    _core.CollectiveProgram = lambda *args: None
    _core.ProgramRunner = lambda *args: RunnerStub()
    _core.RankProgram = RunnerStub  # EngineRunner(program=) takes a native program: a stub one here
    group = DeviceGroup.__new__(DeviceGroup)
    group._adopt(Native())
    return group


class FakeCudaTensor:
    """What mdtrt reads of a torch CUDA tensor (torch's dtype and shape types), at the cost of
    plain Python attributes and methods: torch's own reads cost about 50-100 ns each."""

    __module__ = "torch.fake"  # mdtrt recognizes torch tensors by their module
    __slots__ = ("dtype", "shape", "device_index", "ptr")
    is_cuda = True

    def __init__(self, dtype, shape, device: int, ptr: int):
        self.dtype, self.shape, self.device_index, self.ptr = dtype, shape, device, ptr

    def is_contiguous(self):
        return True

    def get_device(self):
        return self.device_index

    def data_ptr(self):
        return self.ptr

    def new_empty(self, *sizes):
        return FakeCudaTensor(self.dtype, type(self.shape)(sizes), self.device_index, 8192)


def fake_cuda_tensors(torch, ranks: int, elements: int) -> list:
    """One float16 tensor of ``elements`` per rank, on GPU ``rank`` as far as mdtrt can tell."""
    return [FakeCudaTensor(torch.float16, torch.Size((elements,)), r, 4096 * (r + 1)) for r in range(ranks)]


def median_us(fn, iterations: int) -> float:
    for _ in range(min(2000, iterations)):
        fn()
    clock = time.perf_counter
    times = []
    for _ in range(iterations):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times) * 1e6


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        import torch
    except ImportError:  # as every benchmark: one line and status 2 when something it needs is missing
        print("python_overhead.py: cannot run: needs PyTorch (CPU build is enough: pip install torch, or "
              "pip install '.[bench]'); it stubs the CUDA tensors, not torch itself", file=sys.stderr)
        raise SystemExit(2)

    torch.empty_like = lambda x: FakeCudaTensor(x.dtype, x.shape, x.device_index, 8192)
    torch.empty = lambda shape, dtype=None, device=None: FakeCudaTensor(dtype, torch.Size(shape), device.index, 8192)
    group = stub_group(args.ranks, args.elements)
    xs = fake_cuda_tensors(torch, args.ranks, args.elements)
    outs = fake_cuda_tensors(torch, args.ranks, args.elements)
    prepared = group.prepare_collective("all_reduce", xs, out=outs)
    prepared_default = group.prepare_collective("all_reduce", xs)
    calls = {
        "collective(op, xs, out=outs)": lambda: group.collective("all_reduce", xs, out=outs),
        "collective(op, xs)": lambda: group.collective("all_reduce", xs),
        "all_reduce(xs, out=outs)": lambda: group.all_reduce(xs, out=outs),
        "all_reduce(xs)": lambda: group.all_reduce(xs),
        "all_gather(xs)": lambda: group.all_gather(xs),
        "prepare_collective(op, xs, out=outs)()": prepared,
        "prepare_collective(op, xs)()": prepared_default,
    }
    calls.update(engine_calls(group, xs, outs))
    for name, fn in calls.items():
        print(f"{name:40s} {median_us(fn, args.iterations):6.2f} us")
    if args.native_arguments:
        for name, added in native_argument_costs(args.iterations).items():
            print(f"converting {name:29s} +{added:5.2f} us")
    if args.profile:
        import cProfile
        import pstats

        for fn in (lambda: group.all_reduce(xs, out=outs), calls['infer({"input": x}, outputs=)']):
            profile = cProfile.Profile()
            profile.runcall(lambda: [fn() for _ in range(args.iterations)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)


def native_argument_costs(iterations: int) -> dict:
    """Microseconds that converting each native entry's arguments adds (2 ranks; 1 input and 1
    output per rank, then 2 and 2), over the same entry with empty lists: name -> cost. The lists
    are built per call, as the fast paths build them."""
    from mdtrt import _core

    def cost(fn) -> float:
        def attempt():
            try:
                fn()
            except TypeError:  # `self` is no native call: raised once every argument was converted
                pass
        return median_us(attempt, iterations)

    p = [0x7F0000001000 + 0x1000 * i for i in range(8)]
    addressed, run_at = _core.AddressedRun.__call__, _core.PreparedInfer.run_at
    bases = {"addressed run": cost(lambda: addressed(None, [], [])), "run_at": cost(lambda: run_at(None, [], [], True))}
    cases = {
        "addressed run, 1 in 1 out": lambda: addressed(None, p[:4], [7] * 4),
        "run_at, 1 in 1 out": lambda: run_at(
            None, [[(p[0], 7)], [(p[1], 7)]], [[("output", p[2], 1024, 0, 7)], [("output", p[3], 1024, 1, 7)]], True),
        "addressed run, 2 in 2 out": lambda: addressed(None, p, [7] * 8),
        "run_at, 2 in 2 out": lambda: run_at(
            None, [[(p[0], 7), (p[1], 7)], [(p[2], 7), (p[3], 7)]],
            [[("z", p[4], 1024, 0, 7), ("y", p[5], 1024, 0, 7)], [("z", p[6], 1024, 1, 7), ("y", p[7], 1024, 1, 7)]],
            True),
    }
    return {name: cost(fn) - bases[name.split(",")[0]] for name, fn in cases.items()}


def engine_calls(group, xs, outs) -> dict:
    """The EngineRunner entry points on a stub copy program: name -> call."""
    import mdtrt
    from mdtrt import _core, prepared_call

    # The first run of a signature without outputs= returns pooled outputs: stand-ins here.
    prepared_call.wrap_device_output = lambda buffer, dtype, shape, like: like.owner
    runner = mdtrt.EngineRunner(group, program=_core.RankProgram())
    shared, per_rank, given = {"input": xs[0]}, [{"input": x} for x in xs], {"output": outs}
    runner.infer(shared)  # the first call of a signature learns the output shapes
    runner.infer(per_rank)
    return {
        'infer({"input": x}, outputs=)': lambda: runner.infer(shared, outputs=given),
        'infer({"input": x})': lambda: runner.infer(shared),
        'infer([{"input": x}] per rank, outputs=)': lambda: runner.infer(per_rank, outputs=given),
        'infer([{"input": x}] per rank)': lambda: runner.infer(per_rank),
        'prepare({"input": x}, outputs=)()': runner.prepare(shared, outputs=given),
        'prepare({"input": x})()': runner.prepare(shared),
    }


if __name__ == "__main__":
    main()
