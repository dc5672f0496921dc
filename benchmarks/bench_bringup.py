#!/usr/bin/env python3
"""Bring-up: time to a ready group of N GPUs.

* ``in_process``: ``mdtrt.DeviceGroup(gpus=[...])`` in this process (one thread and one NCCL
  communicator per GPU). The first creation also pays CUDA context creation and NCCL loading
  (``cold``); later ones show the group itself (``warm``).
* ``file_exchange``: one process per GPU, NVIDIA's launch convention (TRT_MY_RANK,
  TRT_WORLD_SIZE, TRT_NCCL_ID_FILE): rank 0 writes the NCCL id to a file, the others read it,
  ``DeviceGroup.from_env()``. Reported both as the from_env call alone (slowest rank) and as wall
  time from starting the processes to every rank ready (interpreter, import, CUDA, NCCL).
* ``torch_distributed`` (optional, --torch-reference): init_process_group("nccl") with an eager
  communicator plus one all_reduce, one process per GPU, the same two times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_T_START = time.time()  # as early as possible: the worker's start, for the wall time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(p, out_default="results/bringup.json")
    p.add_argument("--repeats", type=bl.positive_int, default=None, help="repetitions of each path (default: 4, quick 2)")
    p.add_argument("--torch-reference", action="store_true", help="also time torch.distributed bring-up")
    p.add_argument("--worker", choices=("mdtrt", "torch"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--gpu", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rendezvous", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def worker(args) -> None:
    t_import = time.time()
    if args.worker == "mdtrt":
        import mdtrt

        t0 = time.time()
        group = mdtrt.DeviceGroup.from_env(gpu=args.gpu, id_file=args.rendezvous, timeout=60)
        t1 = time.time()
        ready = {"group_s": t1 - t0, "ready": t1}
        group.close()
    else:
        import datetime

        import torch
        import torch.distributed as dist

        t0 = time.time()
        device = torch.device(f"cuda:{args.gpu}")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"file://{args.rendezvous}", rank=args.rank,
                                world_size=args.world, timeout=datetime.timedelta(seconds=60), device_id=device)
        x = torch.ones(1, device=device)
        dist.all_reduce(x)
        torch.cuda.synchronize(device)
        t1 = time.time()
        ready = {"group_s": t1 - t0, "ready": t1}
        dist.destroy_process_group()
    with open(args.result, "w") as f:
        json.dump({"rank": args.rank, "start": _T_START, "import_s": t0 - t_import, **ready}, f)


def multi_process(kind: str, gpus: list[int], repeats: int, timeout: float) -> dict:
    n = len(gpus)
    runs, errors = [], []
    for rep in range(repeats):
        with tempfile.TemporaryDirectory(prefix="mdtrt_bringup_") as tmp:
            rendezvous = os.path.join(tmp, "nccl_id" if kind == "mdtrt" else "init")
            cmds, envs = [], []
            for r in range(n):
                cmds.append(bl.python_command("bench_bringup.py", "--worker", kind, "--rank", str(r), "--world", str(n),
                                              "--gpu", str(gpus[r]), "--rendezvous", rendezvous,
                                              "--result", os.path.join(tmp, f"rank{r}.json")))
                envs.append(bl.subprocess_env(TRT_MY_RANK=str(r), TRT_WORLD_SIZE=str(n)) if kind == "mdtrt"
                            else bl.subprocess_env())
            spawned = time.time()
            procs = bl.run_parallel(cmds, timeout, envs)
            ranks = []
            for r in range(n):
                path = os.path.join(tmp, f"rank{r}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        ranks.append(json.load(f))
            if len(ranks) != n:
                errors.append({"repeat": rep, "stderr": [bl.tail(p["stderr"], 6) for p in procs if p["rc"] != 0],
                               "timed_out": any(p["timed_out"] for p in procs)})
                continue
            runs.append({"group_s": max(x["group_s"] for x in ranks),
                         "wall_s": max(x["ready"] for x in ranks) - spawned,
                         "import_s": max(x["import_s"] for x in ranks)})
    out = {"repeats": repeats, "runs": runs}
    if errors:
        out["errors"] = errors
    if runs:
        import statistics

        out["group_median_s"] = statistics.median(r["group_s"] for r in runs)
        out["wall_median_s"] = statistics.median(r["wall_s"] for r in runs)
    return out


def run(args) -> dict:
    import statistics

    gpus = bl.parse_gpus(args.gpus)
    repeats = args.repeats or (2 if args.quick else 4)
    result = {"benchmark": "bringup", "gpus": gpus, "world_size": len(gpus), "quick": args.quick,
              "started": bl.utc_now()}
    t0 = time.time()
    import mdtrt

    import_s = time.time() - t0
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        group = mdtrt.DeviceGroup(gpus=gpus, timeout=60)
        times.append(time.perf_counter() - start)
        group.close()
    result["in_process"] = {"import_s": import_s, "cold_s": times[0], "warm_s": times[1:],
                            "warm_median_s": statistics.median(times[1:]),
                            "method": "mdtrt.DeviceGroup(gpus=...) in this process; cold = first in the process"}
    result["file_exchange"] = {"method": "one process per GPU, TRT_MY_RANK/TRT_WORLD_SIZE + NCCL id file, "
                                         "DeviceGroup.from_env()",
                               **multi_process("mdtrt", gpus, repeats, 60)}
    if args.torch_reference:
        result["torch_distributed"] = {"method": "one process per GPU, init_process_group('nccl', file://, device_id) "
                                                 "+ one all_reduce",
                                       **multi_process("torch", gpus, max(1, repeats // 2), 90)}
    else:
        result["torch_distributed"] = {"available": False, "reason": "not run (no --torch-reference)"}
    result["finished"] = bl.utc_now()
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    bl.exit_unless_ready("bench_bringup", bl.parse_gpus(args.gpus), torch_needed=args.torch_reference)
    result = run(args)
    bl.write_json(args.out, result)
    fx = result["file_exchange"]
    print(f"bringup: in-process cold {result['in_process']['cold_s']:.2f} s, warm {result['in_process']['warm_median_s']:.3f} s; "
          f"file exchange from_env {fx.get('group_median_s', float('nan')):.2f} s, wall "
          f"{fx.get('wall_median_s', float('nan')):.2f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
