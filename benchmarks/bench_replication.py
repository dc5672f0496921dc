#!/usr/bin/env python3
"""Input replication: one host input delivered to every GPU of the group, three ways, plus the
runner's automatic choice:

* ``host``: host to every GPU (one host-to-device copy per GPU);
* ``peer``: host to the first GPU, then peer copies to the others (chunked, overlapped);
* ``broadcast``: host to the first GPU, then an NCCL broadcast;
* ``auto``: what ``EngineRunner.infer(replication="auto")`` picks (recorded per size).

The program is ``SinkProgram`` (does nothing), so each call's time is the replication plus the
runner's fixed overhead. Host inputs are pageable (numpy) and pinned (torch pin_memory). A device
input already on the first GPU (copied peer-to-peer to the others by the runner) is measured too,
per call (``call; synchronize``) and back to back (stream-ordered calls, then one synchronize).
References of the same run and size: peer copy bandwidth (cudaMemcpyPeerAsync GPU0 -> GPU1) and
host-to-device bandwidth (pinned and pageable) of the first GPU. Bandwidth here is input bytes per
second (S / t), S = the input's size; every GPU receives S bytes.
Modes are interleaved call by call, each round starting one mode later, so that drift and the
position in a round hit each alike.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from bench_fanout import make_test_program  # noqa: E402

MODES = ("auto", "host", "peer", "broadcast")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(p, out_default="results/replication.json")
    p.add_argument("--sizes", type=bl.size_list, default=None, help="sizes, e.g. 1K,64M,1G (default: quick 1K,64K,1M,64M,256M; "
                                                 "full powers of 4 from 1K to 1G)")
    p.add_argument("--timeout", type=bl.positive_float, default=150, help="seconds for the whole benchmark (default 150)")
    return p


def probe_iterations(size: int, quick: bool) -> int:
    budget = (256 if quick else 1024) * bl.MiB
    return max(3, min(50 if quick else 100, budget // size))


def run(args) -> dict:
    import numpy as np
    import torch

    import mdtrt
    from mdtrt._core import testing

    gpus = bl.parse_gpus(args.gpus)
    if len(gpus) < 2:
        raise SystemExit("replication needs at least 2 GPUs (--gpus 0,1)")
    sizes = bl.parse_sizes(args.sizes) if args.sizes else (list(bl.QUICK_SIZES) if args.quick else bl.full_sizes(4))
    target_s = 0.15 if args.quick else 0.4  # per size and host memory kind, all modes together
    deadline = bl.Deadline(args.timeout)
    n = len(gpus)
    group = mdtrt.DeviceGroup(gpus=gpus, timeout=60)
    runner = mdtrt.EngineRunner(group, program=make_test_program("SinkProgram", bl.DTYPE))
    sink_outputs = {"output": [torch.empty(1, dtype=torch.float16, device=f"cuda:{g}") for g in gpus]}
    result = {"benchmark": "replication", "gpus": gpus, "sizes": sizes, "quick": args.quick, "started": bl.utc_now(),
              "peer_access": group.peer_access, "peer_links": group.peer_links, "points": []}
    try:
        for size in sizes:
            if deadline.passed():
                result["stopped"] = f"time budget spent before {bl.format_size(size)}"
                break
            iters = probe_iterations(size, args.quick)
            point = {"size": size,
                     "peer_copy_gbps": testing.peer_copy_bandwidth(gpus[0], gpus[1], size, iters),
                     "h2d_pinned_gbps": testing.h2d_bandwidth(gpus[0], size, iters, True),
                     "h2d_pageable_gbps": testing.h2d_bandwidth(gpus[0], size, max(3, iters // 4), False)}
            elems = size // bl.ITEMSIZE
            pageable = np.ones(elems, dtype=np.float16)
            pinned = torch.ones(elems, dtype=torch.float16).pin_memory()
            for kind, array in (("pageable", pageable), ("pinned", pinned)):
                calls = {mode: (lambda mode=mode, array=array: runner.infer({"input": array}, replication=mode))
                         for mode in MODES}
                warm = {mode: bl.time_calls(fn, 2)[1] for mode, fn in calls.items()}
                runner.infer({"input": array}, replication="auto")
                chosen = runner.last_replication
                rounds = bl.iterations_for(sum(warm.values()), target_s, 3, 200)
                times = bl.time_interleaved(calls, {mode: rounds for mode in MODES}, rounds)  # one call each per round
                point[kind] = {"auto_choice": chosen}
                for mode in MODES:
                    stats = bl.summarize(times[mode])
                    point[kind][mode] = {**stats, "gbps": bl.algbw_gbps(size, stats["median_us"] * 1e-6)}
            on_device = torch.ones(elems, dtype=torch.float16, device=f"cuda:{gpus[0]}")
            torch.cuda.synchronize(gpus[0])

            def infer_device_input():
                runner.infer({"input": on_device}, outputs=sink_outputs)

            sync = bl.gpu_sync(torch, gpus)
            device_call = bl.synced(infer_device_input, sync)  # stream-ordered: timed until done

            warm = bl.time_calls(device_call, 2)[1]
            stats = bl.summarize(bl.time_calls(device_call, bl.iterations_for(warm, target_s / 4, 3, 300)))
            point["device_input"] = {**stats, "gbps": bl.algbw_gbps(size, stats["median_us"] * 1e-6),
                                     "method": f"torch tensor on GPU {gpus[0]}, copied peer-to-peer by the runner; "
                                               "call; synchronize"}
            # The same call back to back (stream-ordered: no host round trip per call), then one synchronize.
            count = bl.iterations_for(stats["median_us"] * 1e-6, target_s / 8, 3, 200)
            per_call = bl.time_back_to_back(infer_device_input, sync, count)
            b2b = bl.summarize(per_call)
            point["device_input_batched"] = {**b2b, "gbps": bl.algbw_gbps(size, b2b["median_us"] * 1e-6),
                                             "calls_per_round": count,
                                             "method": "the same call back to back, then one synchronize, averaged"}
            result["points"].append(point)
            bl.write_json(args.out, result)
            del pageable, pinned, on_device
    finally:
        group.close()
    result["finished"] = bl.utc_now()
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bl.exit_unless_ready("bench_replication", bl.parse_gpus(args.gpus))
    result = run(args)
    bl.write_json(args.out, result)
    last = result["points"][-1] if result["points"] else None
    if last:
        print(f"replication: at {bl.format_size(last['size'])} peer copy {last['peer_copy_gbps']:.1f} GB/s, pinned H2D "
              f"{last['h2d_pinned_gbps']:.1f} GB/s, device input {last['device_input']['gbps']:.1f} GB/s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
