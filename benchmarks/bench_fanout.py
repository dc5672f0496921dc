#!/usr/bin/env python3
"""Fan-out overhead: EngineRunner.infer of a trivial program (a 1 KiB device-to-device copy) on
N = 1 and N = 2 GPUs, against the same work without mdtrt on the same N GPUs.

``added_us`` (what the targets read) is the difference of the medians against the bare launch:
the same copies queued by one C++ call from Python (``testing.BareCopies.launch``: cudaMemcpyAsync
on a stream of each GPU), timed with the same Python synchronize as the runner's calls. It is what
the runner adds per call: its Python argument handling, handing the call to one thread per GPU and
waiting for all of them; the synchronize from Python is the caller's, paid with or without mdtrt.
``added_over_bare_loop_us`` is the difference against a bare C++ loop (one thread, no Python: the
copies, then cudaStreamSynchronize of each), which also counts the Python synchronize;
``added_over_one_gpu_us`` the difference against the one-GPU bare loop (what the first runs
reported: it also counts the second GPU's copy and synchronize, which any fan-out pays).

Series per N: ``infer(inputs, outputs=...)`` and ``prepare(inputs, outputs=...)()`` (preallocated
torch CUDA tensors, one per rank: no call allocates), the default calls without ``outputs=``
(``infer(inputs)``, ``prepare(inputs)()``: torch outputs from torch's caching allocator, once the
first call of the signature, in the warm-up, learnt their shapes), and ``infer`` with a numpy input
(replicated to every GPU, rank 0's output copied back). Each round runs the bare loops, then every
Python series interleaved in slices that each start one series later, so that clock or load drift
and the order hit every series alike.
``torch_loop_by_gpus``: the same copies through torch on the same N GPUs (``copy_`` per GPU), timed
with the same Python synchronize as the runner's calls: what a user's own loop costs.
Calls on torch tensors are stream-ordered (they return once queued): each is timed with a
``torch.cuda.synchronize`` of every GPU of the call after it, like the loops it is compared with.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(p, out_default="results/fanout.json")
    p.add_argument("--nbytes", type=bl.positive_size, default=bl.KiB, help="bytes copied per call (default 1K)")
    p.add_argument("--iterations", type=bl.positive_int, default=None, help="calls per round (default: 1000, quick 300)")
    p.add_argument("--rounds", type=bl.positive_int, default=None, help="alternating rounds (default: 3, quick 2)")
    return p


# Result keys and what each measures.
SERIES = {"runner": "EngineRunner.infer(inputs, outputs=...)",
          "prepared": "EngineRunner.prepare(inputs, outputs=...)()",
          "runner_default": "EngineRunner.infer(inputs) (torch outputs from torch's allocator)",
          "prepared_default": "EngineRunner.prepare(inputs)() (torch outputs from torch's allocator)",
          "runner_numpy": "EngineRunner.infer({'input': numpy}) (replicated in, rank 0's output back to numpy)"}


def make_test_program(name: str, dtype: str):
    """mdtrt._core.testing.CopyProgram or SinkProgram for `dtype`."""
    from mdtrt._core import testing

    return getattr(testing, name)(dtype)


def run(args) -> dict:
    import numpy as np
    import torch

    import mdtrt
    from mdtrt._core import testing

    gpus = bl.parse_gpus(args.gpus)
    iterations = args.iterations or (300 if args.quick else 1000)
    rounds = args.rounds or (2 if args.quick else 3)
    elems = args.nbytes // bl.ITEMSIZE
    counts = [1] + ([len(gpus)] if len(gpus) > 1 else [])
    setups = {}
    for n in counts:
        group = mdtrt.DeviceGroup(gpus=gpus[:n], timeout=60)
        runner = mdtrt.EngineRunner(group, program=make_test_program("CopyProgram", bl.DTYPE))
        inputs = [{"input": torch.ones(elems, dtype=torch.float16, device=f"cuda:{g}")} for g in gpus[:n]]
        outputs = {"output": [torch.empty(elems, dtype=torch.float16, device=f"cuda:{g}") for g in gpus[:n]]}

        host = np.ones(elems, dtype=np.float16)

        # torch in and out: stream-ordered (returns once queued); timed until every GPU is done.
        sync = bl.gpu_sync(torch, gpus[:n])
        calls = {"runner": bl.synced(lambda runner=runner, inputs=inputs, outputs=outputs:
                                     runner.infer(inputs, outputs=outputs), sync),
                 # the same call, arguments converted once
                 "prepared": bl.synced(runner.prepare(inputs, outputs=outputs), sync),
                 "runner_default": bl.synced(lambda runner=runner, inputs=inputs: runner.infer(inputs), sync),
                 "prepared_default": bl.synced(runner.prepare(inputs), sync),
                 "runner_numpy": lambda runner=runner, host=host: runner.infer({"input": host})}
        for fn in calls.values():
            bl.time_calls(fn, 50)  # warm-up: first call binds, caches and pools settle
        setups[n] = (group, calls)

    def torch_loop(n):
        """The same copies through torch on the first n GPUs, timed with the same synchronize as the
        runner's calls (torch.cuda.synchronize of each GPU, from Python)."""
        xs = [torch.ones(elems, dtype=torch.float16, device=f"cuda:{g}") for g in gpus[:n]]
        ys = [torch.empty_like(x) for x in xs]
        sync = bl.gpu_sync(torch, gpus[:n])

        def call():
            for x, y in zip(xs, ys):
                y.copy_(x)
            sync()
        return call

    def bare_launch(n):
        """The same copies on the first n GPUs queued by one C++ call, then the same synchronize."""
        copies = testing.BareCopies(gpus[:n], args.nbytes)
        return bl.synced(copies.launch, bl.gpu_sync(torch, gpus[:n]))

    torch_loops = {n: torch_loop(n) for n in counts}
    bare_launches = {n: bare_launch(n) for n in counts}
    for n in counts:
        bl.time_calls(torch_loops[n], 50)
        bl.time_calls(bare_launches[n], 50)
        testing.bare_copy_loop(gpus[:n], args.nbytes, 50)

    samples: dict = {**{("torch", n): [] for n in counts}, **{("bare", n): [] for n in counts},
                     **{("bare_launch", n): [] for n in counts},
                     **{(key, n): [] for n in counts for key in SERIES}}
    timed = {**{("torch", n): torch_loops[n] for n in counts},
             **{("bare_launch", n): bare_launches[n] for n in counts},
             **{(key, n): setups[n][1][key] for n in counts for key in SERIES}}
    for _ in range(rounds):
        for n in counts:
            samples[("bare", n)] += [us * 1e-6 for us in testing.bare_copy_loop(gpus[:n], args.nbytes, iterations)]
        # As many slices as series, each starting one series later: every series is timed in every
        # position, so that drift and order hit them alike (as in the collective and replication
        # benchmarks; fixed blocks of 1000 calls left each series its own stretch of the run).
        for key, times in bl.time_interleaved(timed, dict.fromkeys(timed, iterations), len(timed)).items():
            samples[key] += times
    for group, _ in setups.values():
        group.close()

    bare_by_n = {n: bl.summarize(samples[("bare", n)]) for n in counts}
    launch_by_n = {n: bl.summarize(samples[("bare_launch", n)]) for n in counts}
    bare = bare_by_n[1]
    result = {"benchmark": "fanout", "gpus": gpus, "nbytes": args.nbytes, "iterations": iterations, "rounds": rounds,
              "quick": args.quick, "started": bl.utc_now(),
              "bare": {"method": "C++ loop: cudaMemcpyAsync D2D + cudaStreamSynchronize, one thread, "
                                 f"GPU {gpus[0]}", **bare},
              "bare_by_gpus": {str(n): {"method": "C++ loop, one thread: cudaMemcpyAsync D2D on each GPU's stream, "
                                                  "then cudaStreamSynchronize of each", "gpus": gpus[:n], **stats}
                               for n, stats in bare_by_n.items()},
              "bare_launch_by_gpus": {str(n): {"method": "the same copies queued by one C++ call from Python "
                                                         "(testing.BareCopies.launch), then torch.cuda.synchronize "
                                                         "of each GPU, as the runner's calls are timed",
                                               "gpus": gpus[:n], **stats}
                                      for n, stats in launch_by_n.items()},
              "torch_loop_by_gpus": {str(n): {"method": "Python loop: tensor.copy_ on each GPU, then "
                                                        "torch.cuda.synchronize of each (the runner's calls are timed "
                                                        "with the same synchronize)", "gpus": gpus[:n],
                                              **bl.summarize(samples[("torch", n)])} for n in counts},
              "methods": dict(SERIES)}
    for key in SERIES:
        result[key] = {}
        for n in counts:
            stats = bl.summarize(samples[(key, n)])
            result[key][str(n)] = {"gpus": gpus[:n], **stats,
                                   "added_us": stats["median_us"] - launch_by_n[n]["median_us"],
                                   "added_over_bare_loop_us": stats["median_us"] - bare_by_n[n]["median_us"],
                                   "added_over_one_gpu_us": stats["median_us"] - bare["median_us"]}
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bl.exit_unless_ready("bench_fanout", bl.parse_gpus(args.gpus))
    result = run(args)
    bl.write_json(args.out, result)
    added = ", ".join(f"N={n}: +{r['added_us']:.1f} us (prepared +{result['prepared'][n]['added_us']:.1f} us)"
                      for n, r in result["runner"].items())
    launch = result["bare_launch_by_gpus"][max(result["bare_launch_by_gpus"], key=int)]["median_us"]
    print(f"fanout: bare loop {result['bare']['median_us']:.1f} us/call, bare launch + Python synchronize "
          f"{launch:.1f}; {added}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
