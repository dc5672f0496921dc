#!/usr/bin/env python3
"""Collective bandwidth and latency: the eight ops through mdtrt.DeviceGroup against raw NCCL.

Series, all float16, sizes as nccl-tests counts them (the larger of a rank's send and receive
buffers), bandwidths as nccl-tests defines them (algbw = S/t, busbw = algbw x the op's factor):

* ``ours``: ``DeviceGroup.prepare_collective(op, inputs, out=outputs)`` called in a loop (the
  arguments checked and converted once, as a latency-bound loop would), torch CUDA tensors, one
  call timed on the host: median per call. Calls on torch tensors are stream-ordered (they return
  once queued, torch's current streams waiting for them), so every timed torch call here is
  ``call; torch.cuda.synchronize()`` on each GPU: the host-synchronous pattern ``raw_percall``
  times.
* ``ours_call``: the one-shot ``DeviceGroup.collective(op, inputs, out=outputs)``, which converts
  its arguments on every call; timed the same way, interleaved with ``ours``.
* ``ours_default``: the call a user writes first, the op method without ``out=``
  (``group.all_reduce(inputs)``): outputs come from torch's caching allocator on every call.
  Interleaved with the two above, at every size.
* ``entry_points``: at ``--entry-sizes`` (default 1 KiB and 64 MiB, where the targets are read),
  every entry point as users call it, each interleaved with the others: the op method, ``collective()``
  and ``prepare_collective()``, each with and without ``out=`` (torch CUDA tensors in), and the op
  method and ``prepare_collective()`` with numpy arrays in (host copies in and out included).
* ``ours_batched`` and ``ours_default_batched``: the prepared ``out=`` call and the op method
  called back to back (stream-ordered: no host round trip per call), then one synchronize,
  averaged: compared with ``raw_batched``.
* ``raw_percall``: torch.distributed (NCCL backend), one process per GPU, ``op; synchronize``
  timed on the host: the same host-synchronous pattern. Per iteration the slower rank counts.
* ``raw_batched``: the same processes, N ops back to back then one synchronize, averaged
  (nccl-tests' style: no host round trip per op).
* ``sample``: ``sample_dist_collective --backend nccl --op all`` (mdtrt's C++ path, CUDA-event time
  of back-to-back ops), at a few sizes.
* ``nccl_tests``: ``<op>_perf`` from ``--nccl-tests-dir``, when given.

The link limit drawn in the plots is this run's measured peer copy bandwidth GPU0 -> GPU1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

NCCL_TESTS_BINARIES = {"all_reduce": "all_reduce_perf", "all_gather": "all_gather_perf", "broadcast": "broadcast_perf",
                       "reduce": "reduce_perf", "reduce_scatter": "reduce_scatter_perf", "all_to_all": "alltoall_perf",
                       "gather": "gather_perf", "scatter": "scatter_perf"}


def timing_policy(quick: bool) -> dict:
    """How long each (op, size) is measured: about target_s, between min and max iterations."""
    if quick:
        return {"warmup": 2, "target_s": 0.04, "min_iters": 3, "max_iters": 100}
    return {"warmup": 3, "target_s": 0.12, "min_iters": 5, "max_iters": 300}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(p, out_default="results/collectives.json")
    p.add_argument("--ops", type=bl.name_list(bl.COLLECTIVES), default=",".join(bl.COLLECTIVES), help="ops to run, comma-separated (default: all eight)")
    p.add_argument("--sizes", type=bl.size_list, default=None,
                   help="sizes, e.g. 1K,64M,1G (default: quick 1K,64K,1M,64M,256M; full powers of 2 from 1K to 1G)")
    p.add_argument("--nccl-tests-dir", type=bl.input_dir, default=None, help="folder with nccl-tests' *_perf binaries (optional)")
    p.add_argument("--no-raw", action="store_true", help="skip the torch.distributed reference")
    p.add_argument("--no-sample", action="store_true", help="skip sample_dist_collective")
    p.add_argument("--entry-sizes", type=bl.optional_size_list, default="1K,64M",
                   help="sizes at which every entry point is measured (default 1K,64M; empty: none)")
    p.add_argument("--timeout", type=bl.positive_float, default=300, help="seconds for the whole benchmark (default 300)")
    # A rank of the raw reference (started by this script itself).
    p.add_argument("--raw-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def default_sizes(quick: bool) -> list[int]:
    return list(bl.QUICK_SIZES) if quick else bl.full_sizes(2)


def sample_sizes(sizes: list[int], quick: bool) -> list[int]:
    """The sample checks every output on the host: run it at a few sizes only."""
    wanted = (bl.SMALL_BYTES, bl.LARGE_BYTES) if quick else (bl.SMALL_BYTES, 1 * bl.MiB, bl.LARGE_BYTES)
    return [s for s in wanted if s in sizes] or sizes[:1]


# -- ours ---------------------------------------------------------------------------------------

# Entry points measured at --entry-sizes: (key, label). "method" is group.<op>(...), torch CUDA
# tensors in unless the key says numpy.
ENTRY_POINTS = (("method", "group.<op>(x)"), ("method_out", "group.<op>(x, out=o)"),
                ("collective", "collective(op, x)"), ("collective_out", "collective(op, x, out=o)"),
                ("prepared", "prepare_collective(op, x)()"), ("prepared_out", "prepare_collective(op, x, out=o)()"),
                ("method_numpy", "group.<op>(numpy)"), ("prepared_numpy", "prepare_collective(op, numpy)()"))


# mdtrt's series in results.json: key, how it was measured.
OURS_SERIES = (
    ("ours", "mdtrt.DeviceGroup.prepare_collective(out=...) called in a loop, torch CUDA tensors, host-timed per "
             "call (call; synchronize)"),
    ("ours_call", "mdtrt.DeviceGroup.collective(out=...) (arguments converted on every call), host-timed per call "
                  "(call; synchronize)"),
    ("ours_default", "group.<op>(inputs) without out= (the default call: outputs from torch's caching allocator), "
                     "host-timed per call (call; synchronize)"),
    ("ours_batched", "prepare_collective(out=...) called back to back (stream-ordered), then one synchronize, "
                     "averaged"),
    ("ours_default_batched", "group.<op>(inputs) without out= called back to back (stream-ordered), then one "
                             "synchronize, averaged"),
)


def entry_point_calls(group, op: str, inputs, outputs, host_inputs, sync) -> dict:
    """Every entry point of one (op, size), as a user writes it; the torch calls (stream-ordered)
    followed by `sync` (numpy calls return with their results)."""
    method = getattr(group, op)
    return {"method": bl.synced(lambda: method(inputs), sync),
            "method_out": bl.synced(lambda: method(inputs, out=outputs), sync),
            "collective": bl.synced(lambda: group.collective(op, inputs), sync),
            "collective_out": bl.synced(lambda: group.collective(op, inputs, out=outputs), sync),
            "prepared": bl.synced(group.prepare_collective(op, inputs), sync),
            "prepared_out": bl.synced(group.prepare_collective(op, inputs, out=outputs), sync),
            "method_numpy": lambda: method(host_inputs),
            "prepared_numpy": group.prepare_collective(op, host_inputs)}


def measure_interleaved(calls: dict, policy: dict, rounds: int = 6) -> dict:
    """Median per call of each of `calls`, measured in `rounds` interleaved slices, each starting
    one call later (bl.time_interleaved); {key: stats}."""
    share = policy["target_s"] * 2 / len(calls)  # the time two series took before a third was added
    iters = {}
    for key, fn in calls.items():
        warm = min(bl.time_calls(fn, policy["warmup"] + 1)[1:])  # the first builds the op's runner
        iters[key] = bl.iterations_for(warm, share, policy["min_iters"], policy["max_iters"])
    return {key: bl.summarize(t) for key, t in bl.time_interleaved(calls, iters, rounds).items()}


def measure_ours(gpus: list[int], ops: list[str], sizes: list[int], policy: dict, deadline: bl.Deadline,
                 save, entry_sizes: list[int] = ()) -> dict:
    import numpy as np
    import torch

    import mdtrt
    from mdtrt import _core

    n = len(gpus)
    series: dict = {op: [] for op in ops}
    call_series: dict = {op: [] for op in ops}
    default_series: dict = {op: [] for op in ops}
    batched_series: dict = {op: [] for op in ops}
    default_batched_series: dict = {op: [] for op in ops}
    entries: dict = {op: [] for op in ops}
    group = mdtrt.DeviceGroup(gpus=gpus, timeout=60)

    sync = bl.gpu_sync(torch, gpus)

    def partial(stopped=None):
        out = {"ours": series, "ours_call": call_series, "ours_default": default_series,
               "ours_batched": batched_series, "ours_default_batched": default_batched_series,
               "entry_points": entries}
        if stopped:
            out["stopped"] = stopped
        return out

    try:
        for op in ops:
            for size in sizes:
                if deadline.passed():
                    return partial(f"time budget spent before {op} {bl.format_size(size)}")
                in_elems, _ = bl.buffer_elements(op, size, n)
                out_shape = list(_core.collective_output_shape(op, [in_elems], n))
                inputs = [torch.ones(in_elems, dtype=torch.float16, device=f"cuda:{g}") for g in gpus]
                outputs = [torch.empty(out_shape, dtype=torch.float16, device=f"cuda:{g}") for g in gpus]
                for g in gpus:
                    torch.cuda.synchronize(g)
                method = getattr(group, op)
                prepared = group.prepare_collective(op, inputs, reduce="sum", root=0, out=outputs)
                one_shot = lambda: group.collective(op, inputs, reduce="sum", root=0, out=outputs)  # noqa: E731
                calls = {"ours": bl.synced(prepared, sync), "ours_call": bl.synced(one_shot, sync),
                         "ours_default": bl.synced(lambda: method(inputs), sync)}
                stats = measure_interleaved(calls, policy)
                for key, target in (("ours", series), ("ours_call", call_series), ("ours_default", default_series)):
                    target[op].append(bl.point(op, size, stats[key]["median_us"] * 1e-6, n, **stats[key]))
                # Back to back: the throughput of stream-ordered calls, against raw_batched.
                for fn, key, target in ((prepared, "ours", batched_series),
                                        (lambda: method(inputs), "ours_default", default_batched_series)):
                    count = bl.iterations_for(stats[key]["median_us"] * 1e-6, policy["target_s"] / 4,
                                              policy["min_iters"], policy["max_iters"])
                    per_call = bl.time_back_to_back(fn, sync, count)
                    st = bl.summarize(per_call)
                    target[op].append(bl.point(op, size, st["median_us"] * 1e-6, n, iterations=count * len(per_call)))
                if size in entry_sizes and not deadline.passed():
                    host = [np.ones(in_elems, dtype=np.float16) for _ in gpus]
                    stats = measure_interleaved(entry_point_calls(group, op, inputs, outputs, host, sync), policy)
                    entries[op].append({"size": size, **{key: bl.point(op, size, st["median_us"] * 1e-6, n, **st)
                                                          for key, st in stats.items()}})
                    del host
                del inputs, outputs, calls
            save(partial())
    finally:
        group.close()
        torch.cuda.empty_cache()
    return partial()


def measure_link_limit(gpus: list[int], quick: bool) -> dict:
    from mdtrt._core import testing

    nbytes = 256 * bl.MiB
    iters = 5 if quick else 20
    out = {"nbytes": nbytes, "iterations": iters,
           "peer_copy_gbps": testing.peer_copy_bandwidth(gpus[0], gpus[1], nbytes, iters),
           "peer_copy_reverse_gbps": testing.peer_copy_bandwidth(gpus[1], gpus[0], nbytes, iters),
           "source": f"cudaMemcpyPeerAsync GPU{gpus[0]} -> GPU{gpus[1]}, {bl.format_size(nbytes)}, this run"}
    return out


# -- raw NCCL through torch.distributed ---------------------------------------------------------

def raw_worker(spec_path: str, rank: int) -> None:
    """One rank of the reference: runs every (op, size) of the spec, writes its times after each op."""
    import datetime

    import torch
    import torch.distributed as dist

    with open(spec_path) as f:
        spec = json.load(f)
    gpus, ops, sizes, policy = spec["gpus"], spec["ops"], spec["sizes"], spec["policy"]
    n = len(gpus)
    device = torch.device(f"cuda:{gpus[rank]}")
    torch.cuda.set_device(device)
    t0 = time.perf_counter()
    dist.init_process_group("nccl", init_method=f"file://{spec['init_file']}", rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=spec["nccl_timeout_s"]), device_id=device)
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)
    torch.cuda.synchronize(device)
    result = {"rank": rank, "gpu": gpus[rank], "init_s": time.perf_counter() - t0, "torch": torch.__version__,
              "ops": {}}
    try:
        v = torch.cuda.nccl.version()
        result["nccl_version"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001
        result["nccl_version"] = None
    out_path = spec["out_prefix"] + f"{rank}.json"

    def sync():
        torch.cuda.synchronize(device)

    for op in ops:
        per_op = []
        for size in sizes:
            in_elems, out_elems = bl.buffer_elements(op, size, n)
            x = torch.ones(in_elems, dtype=torch.float16, device=device)
            y = torch.empty(out_elems, dtype=torch.float16, device=device)
            if op == "all_reduce":
                fn = lambda: dist.all_reduce(x)  # noqa: E731
            elif op == "all_gather":
                fn = lambda: dist.all_gather_into_tensor(y, x)  # noqa: E731
            elif op == "broadcast":
                fn = lambda: dist.broadcast(x, src=0)  # noqa: E731
            elif op == "reduce":
                fn = lambda: dist.reduce(x, dst=0)  # noqa: E731
            elif op == "reduce_scatter":
                fn = lambda: dist.reduce_scatter_tensor(y, x)  # noqa: E731
            elif op == "all_to_all":
                fn = lambda: dist.all_to_all_single(y, x)  # noqa: E731
            elif op == "gather":
                chunks = list(y.chunk(n)) if rank == 0 else None
                fn = lambda: dist.gather(x, gather_list=chunks, dst=0)  # noqa: E731
            elif op == "scatter":
                chunks = list(x.chunk(n)) if rank == 0 else None
                fn = lambda: dist.scatter(y, scatter_list=chunks, src=0)  # noqa: E731
            else:
                raise ValueError(op)

            def call():
                fn()
                sync()

            warm = bl.time_calls(call, policy["warmup"] + 1)[1:]
            # Every rank must run the same count: agree on the slowest rank's estimate.
            est = torch.tensor([min(warm)], dtype=torch.float64, device=device)
            dist.all_reduce(est, op=dist.ReduceOp.MAX)
            iters = bl.iterations_for(float(est.item()), policy["target_s"], policy["min_iters"], policy["max_iters"])
            percall = bl.time_calls(call, iters)
            dist.barrier(device_ids=[device.index])
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            batched = (time.perf_counter() - start) / iters
            per_op.append({"size": size, "percall_s": percall, "batched_s": batched})
            del x, y
        result["ops"][op] = per_op
        bl.write_json(out_path, result)
    dist.destroy_process_group()


def combine_raw(rank_results: list[dict], n: int) -> dict:
    """Per iteration the slower rank counts (the op is done when both are); then the median."""
    series: dict = {"raw_percall": {}, "raw_batched": {}}
    ops = set.intersection(*(set(r["ops"]) for r in rank_results)) if rank_results else set()
    for op in ops:
        per_rank = [{p["size"]: p for p in r["ops"][op]} for r in rank_results]
        sizes = sorted(set.intersection(*(set(m) for m in per_rank)))
        percall, batched = [], []
        for size in sizes:
            runs = [m[size]["percall_s"] for m in per_rank]
            slowest = [max(ts) for ts in zip(*runs)]
            stats = bl.summarize(slowest)
            percall.append(bl.point(op, size, stats["median_us"] * 1e-6, n, **stats))
            b = max(m[size]["batched_s"] for m in per_rank)
            batched.append(bl.point(op, size, b, n, iterations=len(slowest)))
        series["raw_percall"][op] = percall
        series["raw_batched"][op] = batched
    return series


def measure_raw(gpus: list[int], ops: list[str], sizes: list[int], policy: dict, timeout: float) -> dict:
    try:
        import torch  # noqa: F401
        import torch.distributed as dist

        if not dist.is_nccl_available():
            return {"available": False, "reason": "torch.distributed has no NCCL backend"}
    except ImportError:
        return {"available": False, "reason": "PyTorch is not installed (a direct-NCCL C++ reference is not built)"}
    n = len(gpus)
    with tempfile.TemporaryDirectory(prefix="mdtrt_raw_") as tmp:
        spec = {"gpus": gpus, "ops": ops, "sizes": sizes, "policy": policy, "init_file": os.path.join(tmp, "init"),
                "out_prefix": os.path.join(tmp, "rank"), "nccl_timeout_s": max(30, int(timeout))}
        spec_path = os.path.join(tmp, "spec.json")
        bl.write_json(spec_path, spec)
        cmds = [bl.python_command("bench_collectives.py", "--raw-worker", spec_path, "--rank", str(r)) for r in range(n)]
        runs = bl.run_parallel(cmds, timeout, [bl.subprocess_env()] * n)
        results = []
        for r in range(n):
            path = spec["out_prefix"] + f"{r}.json"
            if os.path.exists(path):
                results.append(bl.read_json(path))
    failed = [r for r in runs if r["rc"] != 0]
    info = {"available": bool(results) and len(results) == n, "method": "torch.distributed, NCCL backend, one process per GPU"}
    if failed:
        info["errors"] = [{"rc": r["rc"], "timed_out": r["timed_out"], "stderr": bl.tail(r["stderr"])} for r in failed]
    if not info["available"]:
        info["reason"] = "the torch.distributed workers wrote no results" + (
            f": {bl.tail(failed[0]['stderr'], 5)}" if failed else "")
        return info
    info.update({"torch_version": results[0].get("torch"), "torch_nccl_version": results[0].get("nccl_version"),
                 "init_s": max(r["init_s"] for r in results)})
    info.update(combine_raw(results, n))
    return info


# -- sample_dist_collective ---------------------------------------------------------------------

def find_sample() -> str | None:
    return shutil.which("sample_dist_collective") or os.environ.get("MDTRT_SAMPLE_DIST_COLLECTIVE")


def parse_sample_table(text: str) -> list[dict]:
    """Rows of the sample's summary table: op, result, checked, output shape, median(us), algbw, busbw.
    The shape may contain spaces: the op and result come first, the three numbers last."""
    rows = []
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) < 6 or tokens[0] not in bl.COLLECTIVES or tokens[1] not in ("PASSED", "FAILED", "SKIPPED"):
            continue
        try:
            median_us, algbw, busbw = (float(t) for t in tokens[-3:])
        except ValueError:
            continue  # "-": not timed
        rows.append({"op": tokens[0], "result": tokens[1], "time_us": median_us, "algbw_gbps": algbw,
                     "busbw_gbps": busbw})
    return rows


def measure_sample(gpus: list[int], sizes: list[int], quick: bool, timeout_each: float, deadline: bl.Deadline) -> dict:
    exe = find_sample()
    if not exe:
        return {"available": False, "reason": "sample_dist_collective is not on PATH (nor MDTRT_SAMPLE_DIST_COLLECTIVE)"}
    n = len(gpus)
    series: dict = {}
    runs = []
    for size in sizes:
        if deadline.left() < 10:
            runs.append({"size": size, "skipped": "time budget spent"})
            continue
        cols = size // bl.ITEMSIZE  # rows x cols per rank = S for most ops; all_gather/gather get n x that
        cmd = [exe, "--backend", "nccl", "--op", "all", "--gpus", ",".join(map(str, gpus)), "--rows", "1", "--cols",
               str(cols), "--dtype", "float16", "--iters", "10" if quick else "20", "--warmup", "3", "--timeout", "60"]
        r = bl.run_command(cmd, timeout=min(timeout_each, deadline.left()))
        rows = parse_sample_table(r["stdout"])
        runs.append({"size": size, "cmd": " ".join(cmd), "rc": r["rc"], "timed_out": r["timed_out"],
                     "seconds": r["seconds"], "rows": len(rows), "stderr": bl.tail(r["stderr"], 5)})
        for row in rows:
            op_size = size * n if row["op"] in ("all_gather", "gather") else size
            series.setdefault(row["op"], []).append(
                {"size": op_size, "time_us": row["time_us"], "algbw_gbps": row["algbw_gbps"],
                 "busbw_gbps": row["busbw_gbps"], "result": row["result"]})
    for op in series:
        series[op].sort(key=lambda p: p["size"])
    return {"available": bool(series), "path": exe, "runs": runs, "series": series,
            "method": "sample_dist_collective --backend nccl --op all: CUDA-event median of back-to-back ops",
            **({} if series else {"reason": "the sample printed no timed rows (see runs)"})}


# -- nccl-tests ---------------------------------------------------------------------------------

def parse_nccl_tests(text: str) -> list[dict]:
    """Out-of-place columns of nccl-tests' table: size count type redop root time algbw busbw #wrong ..."""
    rows = []
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) < 8 or not tokens[0].isdigit() or not tokens[1].isdigit():
            continue
        try:
            size = int(tokens[0])
            time_us, algbw, busbw = float(tokens[5]), float(tokens[6]), float(tokens[7])
        except ValueError:
            continue
        rows.append({"size": size, "time_us": time_us, "algbw_gbps": algbw, "busbw_gbps": busbw})
    return rows


def measure_nccl_tests(directory: str | None, gpus: list[int], ops: list[str], sizes: list[int], quick: bool,
                       deadline: bl.Deadline) -> dict:
    if not directory:
        return {"available": False, "reason": "not run (no --nccl-tests-dir)"}
    env = bl.subprocess_env(CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)))
    series, runs = {}, []
    for op in ops:
        exe = os.path.join(directory, NCCL_TESTS_BINARIES[op])
        if not os.access(exe, os.X_OK):
            runs.append({"op": op, "missing": exe})
            continue
        if deadline.left() < 10:
            runs.append({"op": op, "skipped": "time budget spent"})
            continue
        step = 4 if quick else 2
        cmd = [exe, "-b", str(min(sizes)), "-e", str(max(sizes)), "-f", str(step), "-g", str(len(gpus)), "-d", "half",
               "-n", "10" if quick else "20", "-w", "3", "-c", "0"]
        r = bl.run_command(cmd, timeout=min(90, deadline.left()), env=env)
        rows = parse_nccl_tests(r["stdout"])
        runs.append({"op": op, "cmd": " ".join(cmd), "rc": r["rc"], "timed_out": r["timed_out"], "rows": len(rows),
                     "stderr": bl.tail(r["stderr"], 5)})
        if rows:
            series[op] = rows
    return {"available": bool(series), "dir": directory, "runs": runs, "series": series,
            "method": "nccl-tests <op>_perf -g N -d half -c 0: out-of-place, average of back-to-back ops",
            **({} if series else {"reason": "no nccl-tests binary produced a table (see runs)"})}


# -- main ---------------------------------------------------------------------------------------

def measured_sizes(args) -> tuple[list[int], list[int]]:
    """(sizes, entry sizes) in bytes, from --sizes (default: the mode's) and --entry-sizes."""
    sizes = bl.parse_sizes(args.sizes) if args.sizes else default_sizes(args.quick)
    return sizes, bl.parse_sizes(args.entry_sizes) if args.entry_sizes else []


def run(args) -> dict:
    gpus = bl.parse_gpus(args.gpus)
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in bl.COLLECTIVES]
    if unknown:
        raise SystemExit(f"unknown ops {unknown}; choose from {', '.join(bl.COLLECTIVES)}")
    sizes, entry_sizes = measured_sizes(args)
    policy = timing_policy(args.quick)
    deadline = bl.Deadline(args.timeout)
    n = len(gpus)
    result: dict = {"benchmark": "collectives", "gpus": gpus, "world_size": n, "dtype": bl.DTYPE, "sizes": sizes,
                    "ops": ops, "quick": args.quick, "policy": policy, "started": bl.utc_now()}

    def save(ours_partial=None):
        if ours_partial is not None:
            for key, method in OURS_SERIES:
                result[key] = {"method": method, "series": ours_partial[key]}
            result["entry_points"] = {"method": "every entry point as users call it, interleaved, host-timed per call",
                                      "labels": dict(ENTRY_POINTS), "points": ours_partial["entry_points"]}
            if ours_partial.get("stopped"):
                result["ours"]["stopped"] = ours_partial["stopped"]
        bl.write_json(args.out, result)

    if n < 2:
        raise SystemExit("collectives need at least 2 GPUs (--gpus 0,1)")
    result["link_limit"] = measure_link_limit(gpus, args.quick)
    save()
    # Budget: ours and raw each get a share; the sample and nccl-tests what remains.
    ours = measure_ours(gpus, ops, sizes, policy, bl.Deadline(min(deadline.left(), args.timeout * 0.45)), save,
                        [s for s in entry_sizes if s in sizes])
    save(ours)
    # nccl-tests next (about 30 s for the eight ops), so that the raw-NCCL reference is not the one
    # a tight budget drops; then torch.distributed and the sample share what is left.
    result["nccl_tests"] = measure_nccl_tests(args.nccl_tests_dir, gpus, ops, sizes, args.quick,
                                              bl.Deadline(min(deadline.left() - 30, 75)))
    save()
    if args.no_raw:
        result["raw"] = {"available": False, "reason": "not run (--no-raw)"}
    else:
        # Ours is usually done well inside its share; leave the sample about 15 s.
        reserve = 5 if args.no_sample else 15
        result["raw"] = measure_raw(gpus, ops, sizes, policy, timeout=max(20, deadline.left() - reserve))
    save()
    if args.no_sample:
        result["sample"] = {"available": False, "reason": "not run (--no-sample)"}
    else:
        result["sample"] = measure_sample(gpus, sample_sizes(sizes, args.quick), args.quick, 60, deadline)
    result["finished"] = bl.utc_now()
    save()
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.raw_worker:
        raw_worker(args.raw_worker, args.rank)
        return 0
    sizes, entry_sizes = measured_sizes(args)
    outside = [s for s in entry_sizes if s not in sizes]
    if outside:
        build_parser().error(f"--entry-sizes {', '.join(bl.format_size(s) for s in outside)} not among the measured "
                             f"sizes ({', '.join(bl.format_size(s) for s in sizes)}): add them to --sizes or pick from "
                             "these")
    bl.exit_unless_ready("bench_collectives", bl.parse_gpus(args.gpus), minimum=2)
    result = run(args)
    link = result["link_limit"]["peer_copy_gbps"]
    print(f"collectives: peer copy {link:.1f} GB/s; raw reference: "
          f"{'yes' if result['raw'].get('available') else result['raw'].get('reason')}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
