"""The benchmark scripts (benchmarks/) on a machine without GPUs: each imports and answers --help,
and report.py turns a synthetic results.json into BENCHMARKS.md tables with target verdicts.
The benchmarks themselves need GPUs: they are scripts, not tests."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["run_all.py", "bench_collectives.py", "bench_fanout.py", "bench_replication.py", "bench_bringup.py",
           "bench_context_parallel.py", "python_overhead.py",
           "report.py"]
OPS = ["all_reduce", "all_gather", "broadcast", "reduce", "reduce_scatter", "all_to_all", "gather", "scatter"]
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ENTRY_KEYS = ["method", "method_out", "collective", "collective_out", "prepared", "prepared_out", "method_numpy",
              "prepared_numpy"]


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH_DIR))
    try:
        yield {name: importlib.import_module(name) for name in ("benchlib", "report", "plots")}
    finally:
        sys.path.remove(str(BENCH_DIR))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    r = subprocess.run([sys.executable, str(BENCH_DIR / script), "--help"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower()


def test_the_library_module_run_as_a_script_points_to_the_benchmarks():
    r = subprocess.run([sys.executable, str(BENCH_DIR / "benchlib.py"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "run_all.py --help" in r.stdout, (r.stdout, r.stderr)


@pytest.mark.parametrize("module", [s[:-3] for s in SCRIPTS] + ["benchlib", "plots"])
def test_module_imports_without_gpu_libraries(module):
    # Importing a script must not import torch or touch CUDA: CI has neither.
    code = (f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import {module}; "
            "assert 'torch' not in sys.modules, 'imported torch at module level'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_python_overhead_runs_without_gpus():
    """python_overhead.py stubs the native group and the CUDA tensors: it runs on any machine with
    torch, and times every entry point it names (a renamed internal it patches fails here)."""
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, str(BENCH_DIR / "python_overhead.py"), "--iterations", "20"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    timed = [line for line in r.stdout.splitlines() if line.endswith(" us")]
    assert len(timed) == 13 and timed[0].startswith("collective(op, xs, out=outs)"), r.stdout
    assert timed[7].startswith('infer({"input": x}, outputs=)'), r.stdout
    assert timed[10].startswith('infer([{"input": x}] per rank)'), r.stdout


def test_nccl_tests_conventions(bench_modules):
    bl = bench_modules["benchlib"]
    assert bl.bus_factor("all_reduce", 2) == 1.0
    assert bl.bus_factor("all_reduce", 8) == pytest.approx(1.75)
    assert bl.bus_factor("broadcast", 8) == bl.bus_factor("reduce", 8) == 1.0
    for op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        assert bl.bus_factor(op, 4) == pytest.approx(0.75)
    # S is the larger buffer: the whole output of all_gather/gather, the whole input of reduce_scatter/scatter.
    assert bl.buffer_elements("all_gather", 1 * MiB, 2) == (256 * KiB, 512 * KiB)
    assert bl.buffer_elements("reduce_scatter", 1 * MiB, 2) == (512 * KiB, 256 * KiB)
    assert bl.buffer_elements("all_reduce", 1 * KiB, 2) == (512, 512)
    p = bl.point("all_reduce", 1 * GiB, 0.01, 2)
    assert p["algbw_gbps"] == pytest.approx(GiB / 0.01 / 1e9) and p["busbw_gbps"] == pytest.approx(p["algbw_gbps"])
    assert bl.parse_sizes("1K,64M,1G") == [KiB, 64 * MiB, GiB]
    assert bl.format_size(256 * MiB) == "256 MiB" and bl.full_sizes(4)[-1] == GiB and len(bl.full_sizes(2)) == 21


def test_output_parsers():
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import bench_collectives as bc
    finally:
        sys.path.remove(str(BENCH_DIR))
    sample = """[I] Rank 0 - ALL_REDUCE PASSED
Summary: backend nccl, float16, input [1, 512] per rank, world 2 ranks, random inputs (seed 1); ranks in this process: 0, 1
op              result  checked  output           median(us)   algbw(GB/s)   busbw(GB/s)
all_reduce      PASSED  2/2      [1, 512]              12.50         0.082         0.082
gather          PASSED  1/1      [1, 1024]             10.00         0.205         0.102
scatter         SKIPPED 0/0      -                         -             -             -
"""
    rows = bc.parse_sample_table(sample)
    assert [r["op"] for r in rows] == ["all_reduce", "gather"]
    assert rows[0]["time_us"] == 12.5 and rows[1]["busbw_gbps"] == pytest.approx(0.102)
    nccl_tests = """#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
        1024           512      half     sum      -1    10.51    0.10    0.10    N/A    10.20    0.10    0.10    N/A
  1073741824     536870912      half     sum      -1   3100.0  346.37  346.37    N/A   3090.0  347.49  347.49    N/A
# Avg bus bandwidth    : 173.2
"""
    rows = bc.parse_nccl_tests(nccl_tests)
    assert [r["size"] for r in rows] == [1024, GiB] and rows[1]["busbw_gbps"] == pytest.approx(346.37)


def default_time(op: str, size: int, out_call: float) -> float:
    """The default call (no out=) of the synthetic results, from the out= call's time: gather
    misses both of its targets (+30 us small, +5% large); all_reduce's default call misses only
    the latency one (+17 us over raw, +1 us over the out= call); the others are 11 us faster than
    the out= call."""
    if op == "gather":
        return out_call + 30e-6 if size < 64 * MiB else out_call * 1.05
    if op == "all_reduce":
        return out_call + 1e-6 if size < 64 * MiB else out_call - 11e-6
    return out_call - 11e-6


def synthetic_results(bl) -> dict:
    """A plausible results.json of 2 GPUs: ours meets every target except all_to_all's latency and
    the pinned host input (88% of one pinned host-to-device copy)."""
    n = 2
    peer = 370.0
    sizes = bl.full_sizes(4)

    def raw_time(op, size):
        return 15e-6 + size * bl.bus_factor(op, n) / (peer * 1e9)

    ours, calls, defaults, percall, batched, entries = {}, {}, {}, {}, {}, {}
    for op in OPS:
        extra = 25e-6 if op == "all_to_all" else 4e-6
        ours[op] = [bl.point(op, s, raw_time(op, s) + extra, n, median_us=(raw_time(op, s) + extra) * 1e6) for s in sizes]
        calls[op] = [bl.point(op, s, raw_time(op, s) + extra + 12e-6, n) for s in sizes]
        defaults[op] = [bl.point(op, s, default_time(op, s, raw_time(op, s) + extra + 12e-6), n) for s in sizes]
        entries[op] = [{"size": s, **{key: bl.point(op, s, raw_time(op, s) + (k + 1) * 1e-6, n)
                                      for k, key in enumerate(ENTRY_KEYS)}} for s in (KiB, 64 * MiB)]
        percall[op] = [bl.point(op, s, raw_time(op, s), n) for s in sizes]
        batched[op] = [bl.point(op, s, raw_time(op, s) - 5e-6, n) for s in sizes]
    collectives = {"benchmark": "collectives", "gpus": [0, 1], "world_size": n, "dtype": "float16", "sizes": sizes,
                   "ops": OPS, "link_limit": {"peer_copy_gbps": peer, "peer_copy_reverse_gbps": 368.0},
                   "ours": {"method": "DeviceGroup.prepare_collective", "series": ours},
                   "ours_call": {"method": "DeviceGroup.collective", "series": calls},
                   "ours_default": {"method": "group.<op>(x)", "series": defaults},
                   "entry_points": {"method": "every entry point", "points": entries,
                                    "labels": {key: f"label of {key} <op>" for key in ENTRY_KEYS}},
                   "raw": {"available": True, "method": "torch.distributed", "torch_version": "2.11.0",
                           "raw_percall": percall, "raw_batched": batched},
                   "sample": {"available": True, "method": "sample_dist_collective",
                              "series": {"all_reduce": [{"size": 64 * MiB, "time_us": 200.0, "algbw_gbps": 335.0,
                                                         "busbw_gbps": 335.0}]}},
                   "nccl_tests": {"available": False, "reason": "not run (no --nccl-tests-dir)"}}
    fanout = {"benchmark": "fanout", "nbytes": KiB, "iterations": 1000, "rounds": 3,
              "bare": {"median_us": 9.0, "p10_us": 8.8, "p90_us": 9.5},
              "bare_by_gpus": {"1": {"median_us": 9.0, "p10_us": 8.8, "p90_us": 9.5},
                               "2": {"median_us": 13.5, "p10_us": 13.0, "p90_us": 14.5}},
              "bare_launch_by_gpus": {"1": {"median_us": 9.0, "p10_us": 8.9, "p90_us": 9.6},
                                      "2": {"median_us": 9.0, "p10_us": 8.9, "p90_us": 9.6}},
              "torch_loop_by_gpus": {"1": {"median_us": 14.0, "p10_us": 13.0, "p90_us": 15.0},
                                     "2": {"median_us": 19.5, "p10_us": 19.0, "p90_us": 21.0}},
              "runner": {"1": {"median_us": 18.0, "added_us": 9.0}, "2": {"median_us": 34.0, "added_us": 25.0}},
              "prepared": {"1": {"median_us": 15.0, "added_us": 6.0}, "2": {"median_us": 17.0, "added_us": 8.0}},
              "runner_default": {"1": {"median_us": 19.0, "added_us": 10.0}, "2": {"median_us": 23.0, "added_us": 14.0}},
              "prepared_default": {"1": {"median_us": 17.0, "added_us": 8.0}, "2": {"median_us": 21.0, "added_us": 12.0}},
              "runner_numpy": {"1": {"median_us": 40.0, "added_us": 31.0}, "2": {"median_us": 50.0, "added_us": 41.0}}}
    points = []
    for s in bl.full_sizes(4):
        t_h2d = s / 50e9
        def mode(t):
            return {"median_us": t * 1e6, "gbps": s / t / 1e9}
        pageable = {"auto_choice": "peer" if s >= MiB else "host", "host": mode(2.2 * t_h2d + 20e-6),
                    "peer": mode(1.05 * t_h2d + 25e-6), "broadcast": mode(1.1 * t_h2d + 40e-6)}
        pageable["auto"] = dict(pageable["peer" if s >= MiB else "host"])
        pinned = {k: (dict(v) if isinstance(v, dict) else v) for k, v in pageable.items()}
        points.append({"size": s, "peer_copy_gbps": peer, "h2d_pinned_gbps": 53.0, "h2d_pageable_gbps": 20.0,
                       "pageable": pageable, "pinned": pinned,
                       "device_input": {"median_us": (s / (0.95 * peer * 1e9) + 10e-6) * 1e6,
                                        "gbps": s / (s / (0.95 * peer * 1e9) + 10e-6) / 1e9}})
    replication = {"benchmark": "replication", "gpus": [0, 1], "sizes": sizes, "points": points}
    bringup = {"benchmark": "bringup", "world_size": 2,
               "in_process": {"cold_s": 2.5, "warm_s": [0.4, 0.5, 0.45], "warm_median_s": 0.45},
               "file_exchange": {"group_median_s": 1.1, "wall_median_s": 3.2, "runs": []},
               "torch_distributed": {"available": False, "reason": "not run (no --torch-reference)"}}
    machine = {"date": "2026-05-09 12:00:00 UTC", "gpu_names": ["NVIDIA H200"], "gpu_count": 2, "gpus_used": [0, 1],
               "driver": "580.00", "cuda_runtime": "13.0", "cuda_driver": "13.0", "nccl_version": "2.28.9",
               "torch_version": "2.11.0", "torch_cuda": "13.0", "torch_nccl_version": "2.28.9",
               "topology": "\tGPU0\tGPU1\nGPU0\t X \tNV18\nGPU1\tNV18\t X \n"}
    return {"command": "python benchmarks/run_all.py --out results/", "quick": False, "machine": machine,
            "collectives": collectives, "fanout": fanout, "replication": replication, "bringup": bringup,
            "plots": {"collectives_busbw": "collectives_busbw.png", "replication": "replication.png"},
            "durations_s": {"collectives": 120.0, "fanout": 10.0, "replication": 40.0, "bringup": 30.0}}


def test_report_renders_synthetic_results(bench_modules, tmp_path):
    bl, report = bench_modules["benchlib"], bench_modules["report"]
    results = synthetic_results(bl)
    (tmp_path / "results").mkdir()
    json_path = tmp_path / "results" / "results.json"
    json_path.write_text(json.dumps(results))
    md_path = tmp_path / "BENCHMARKS.md"
    r = subprocess.run([sys.executable, str(BENCH_DIR / "report.py"), str(json_path), "--markdown", str(md_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    md = md_path.read_text()
    for heading in ("## Machine", "## Targets", "## 1. Collective bandwidth", "## 2. Fan-out overhead",
                    "## 3. Input replication", "## 4. Bring-up"):
        assert heading in md
    for op in OPS:
        assert f"### {op}\n" in md
    assert "NVIDIA H200 x 2" in md and "NV18" in md and "2.28.9" in md and "2026-05-09" in md
    # Table rows: a readable subset of sizes, with ratios and verdicts.
    assert "| 1 GiB |" in md and "| 4 KiB |" not in md.split("## 2.")[0].split("## 1.")[1]
    assert "ours/raw" in md and "target met" in md
    # Fan-out: N=2 is judged against the bare launch on 2 GPUs with the same synchronize, shown with its
    # own row beside the bare C++ loop.
    fanout_md = md.split("## 2. Fan-out overhead")[1].split("## 3.")[0]
    assert "| bare loop (C++, 2 GPUs) | 13.5 |" in fanout_md and "same N GPUs" in fanout_md
    assert ("| bare launch from Python + synchronize of each GPU (2 GPUs) | 9.0 | 8.9 | 9.6 | -4.5 | reference for N=2 |"
            in fanout_md)
    # The torch loop on the same 2 GPUs, with the runner's synchronize: its own time over the bare launch.
    assert "| torch copy_ + synchronize of each GPU (Python, 2 GPUs) | 19.5 | 19.0 | 21.0 | 10.5 | - |" in fanout_md
    # Plots referenced relative to the markdown file.
    assert "](results/collectives_busbw.png)" in md
    verdicts = {v["target"]: v for v in report.evaluate_targets(results)}
    assert verdicts["all_reduce: bus bandwidth >= 97% of raw NCCL at >= 64 MiB"]["met"] is True
    assert verdicts["all_to_all via prepare_collective(): <= 10 us added latency at 1 KiB"]["met"] is False
    assert "15.0 us over" in verdicts["all_to_all via prepare_collective(): <= 10 us added latency at 1 KiB"]["why"]
    assert verdicts["all_reduce via prepare_collective(): <= 10 us added latency at 1 KiB"]["met"] is True
    over_launch = " (over the same copies launched from Python, same synchronize)"
    infer = verdicts["EngineRunner.infer(outputs=) on N=2: <= 15 us added per call" + over_launch]
    assert infer["met"] is False and "N=1 already adds 9.0 us" in infer["why"]
    one_shot = verdicts["all_reduce via collective(): <= 10 us added latency at 1 KiB"]
    assert one_shot["met"] is False and "6.0 us over" in one_shot["why"] and "converts its arguments" in one_shot["why"]
    infer = verdicts["EngineRunner.infer(outputs=) on N=2: <= 15 us added per call" + over_launch]
    assert infer["met"] is False and "10.0 us over" in infer["why"]
    assert verdicts["EngineRunner.prepare(outputs=)() on N=2: <= 10 us added per call" + over_launch]["met"] is True
    assert verdicts["EngineRunner.infer() on N=2: <= 15 us added per call" + over_launch]["met"] is True
    prepare_default = verdicts["EngineRunner.prepare()() on N=2: <= 10 us added per call" + over_launch]
    assert prepare_default["met"] is False and "2.0 us over" in prepare_default["why"]
    # The default call: through the op method, against raw and against the out= call.
    method = verdicts["all_reduce via group.all_reduce(x): <= 10 us added latency at 1 KiB"]
    assert method["met"] is False and "7.0 us over" in method["why"] and "allocates the next call's outputs" in method["why"]
    assert verdicts["all_reduce via the default call: bus bandwidth >= 97% of raw NCCL at >= 64 MiB"]["met"] is True
    assert verdicts["group.all_reduce(x) within +10 us of the out= call at 1 KiB"]["met"] is True
    assert verdicts["group.all_reduce(x) within 3% of the out= call at >= 64 MiB"]["met"] is True
    gather_small = verdicts["group.gather(x) within +10 us of the out= call at 1 KiB"]
    assert gather_small["met"] is False and "20.0 us over" in gather_small["why"]
    gather_large = verdicts["group.gather(x) within 3% of the out= call at >= 64 MiB"]
    assert gather_large["met"] is False and gather_large["value"].startswith("worst +5.0%")
    assert verdicts["gather via the default call: bus bandwidth >= 97% of raw NCCL at >= 64 MiB"]["met"] is False
    # Host inputs against one host-to-device copy of their kind of memory (53 and 20 GB/s here), not peer copy.
    pinned = verdicts["pinned host input to every GPU: >= 90% of one pinned host-to-device copy's bandwidth (>= 64 MiB)"]
    assert pinned["met"] is False and "against 53.0 GB/s for one pinned host-to-device copy" in pinned["why"]
    assert pinned["value"].startswith("worst 88.")
    pageable = "pageable host input to every GPU: >= 90% of one pageable host-to-device copy's bandwidth (>= 64 MiB)"
    assert verdicts[pageable]["met"] is True
    assert verdicts["device input to every GPU: >= 90% of peer copy bandwidth (>= 64 MiB)"]["met"] is True
    assert verdicts["auto never > 5% slower than the best of host/peer/broadcast"]["met"] is True
    assert "**no**" in md and "| yes |" in md
    assert "not available: not run (no --nccl-tests-dir)" in md
    # Every entry point at the two sizes, the default call beside the prepared one.
    assert "### Every entry point" in md and "`label of prepared_numpy all_to_all`" in md
    assert "| 1 KiB (us) | 64 MiB (us) |" in md.replace(" | added", " |\n| added").replace("\n| added", " | added")
    assert "all_reduce(x) (us)" in md and "EngineRunner.prepare(inputs)(), N=2" in md


def test_report_judges_the_back_to_back_series(bench_modules):
    """The stream-ordered series (calls back to back) are judged against raw NCCL back to back and
    the default call against the prepared one; the device input back to back against peer copy.
    Synthetic times: all_reduce at raw speed (met), gather 10% slower than raw (missed), the
    default call 2% (met) or 6% (missed) over the out= call."""
    bl, report = bench_modules["benchlib"], bench_modules["report"]
    results = synthetic_results(bl)
    coll = results["collectives"]
    raw_b = {op: {p["size"]: p for p in pts} for op, pts in coll["raw"]["raw_batched"].items()}
    batched, default_batched = {}, {}
    for op in OPS:
        slow = 1.10 if op == "gather" else 1.0
        over = 1.06 if op == "scatter" else 1.02
        batched[op] = [bl.point(op, s, raw_b[op][s]["time_us"] * 1e-6 * slow, 2) for s in coll["sizes"]]
        default_batched[op] = [bl.point(op, s, raw_b[op][s]["time_us"] * 1e-6 * slow * over, 2) for s in coll["sizes"]]
    coll["ours_batched"] = {"method": "back to back", "series": batched}
    coll["ours_default_batched"] = {"method": "back to back", "series": default_batched}
    for p in results["replication"]["points"]:
        t = p["size"] / (0.93 * p["peer_copy_gbps"] * 1e9)
        p["device_input_batched"] = {"median_us": t * 1e6, "gbps": p["size"] / t / 1e9}
    verdicts = {v["target"]: v for v in report.evaluate_targets(results)}
    b2b = ", calls back to back (stream-ordered): bus bandwidth >= 97% of raw NCCL back to back at >= 64 MiB"
    assert verdicts["all_reduce" + b2b]["met"] is True
    gather = verdicts["gather" + b2b]
    assert gather["met"] is False and gather["value"].startswith("worst 90.9%")
    assert verdicts["group.all_reduce(x) within 3% of the out= call back to back (stream-ordered) at >= 64 MiB"][
        "met"] is True
    scatter = verdicts["group.scatter(x) within 3% of the out= call back to back (stream-ordered) at >= 64 MiB"]
    assert scatter["met"] is False and scatter["value"].startswith("worst +6.0%")
    device = verdicts["device input to every GPU, calls back to back (stream-ordered): >= 90% of peer copy "
                      "bandwidth (>= 64 MiB)"]
    assert device["met"] is True and device["value"].startswith("worst 93.0%")


def test_fanout_results_without_the_bare_launch_are_judged_over_the_bare_loop(bench_modules, tmp_path):
    """Results of runs before the bare launch existed: their added_us is over the bare C++ loop, and the
    targets say so."""
    bl, report = bench_modules["benchlib"], bench_modules["report"]
    results = synthetic_results(bl)
    del results["fanout"]["bare_launch_by_gpus"]
    verdicts = {v["target"]: v for v in report.evaluate_targets(results)}
    infer = verdicts["EngineRunner.infer(outputs=) on N=2: <= 15 us added per call (over the bare C++ loop)"]
    assert infer["met"] is False and infer["value"] == "+25.0 us"
    md = report.render_markdown(results, str(tmp_path / "BENCHMARKS.md"), str(tmp_path / "results.json"))
    assert "bare launch from Python" not in md and "| bare loop (C++, 2 GPUs) | 13.5 |" in md


def test_report_marks_missing_references(bench_modules, tmp_path):
    bl, report = bench_modules["benchlib"], bench_modules["report"]
    results = synthetic_results(bl)
    results["collectives"]["raw"] = {"available": False, "reason": "PyTorch is not installed"}
    results["fanout"] = {"error": "timed out after 30 s"}
    md = report.render_markdown(results, str(tmp_path / "BENCHMARKS.md"), str(tmp_path / "results.json"))
    verdicts = report.evaluate_targets(results)
    unmeasured = [v for v in verdicts if v["met"] is None]
    # Per op: both bandwidths and the three latencies; one for the fan-out that did not run.
    assert len(unmeasured) == 5 * len(OPS) + 1
    assert "PyTorch is not installed" in md and "timed out after 30 s" in md
    assert "n/a" in md


def test_run_all_passes_the_new_options_on(bench_modules, tmp_path):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import run_all
    finally:
        sys.path.remove(str(BENCH_DIR))
    build = str(tmp_path)  # --nccl-tests-dir must exist (checked while parsing)
    args = run_all.build_parser().parse_args(["--entry-sizes", "4K,16M", "--nccl-tests-dir", build])
    cmd = run_all.bench_command("collectives", args, "/tmp/part.json", 100)
    assert cmd[cmd.index("--entry-sizes") + 1] == "4K,16M" and cmd[cmd.index("--nccl-tests-dir") + 1] == build
    assert run_all.build_parser().parse_args([]).entry_sizes == "1K,64M"
    assert sum(run_all.PROCESS_LIMITS[b][0] for b in run_all.DEFAULT_BENCHMARKS) <= 400  # the default run stays near 6 minutes


def test_every_entry_point_is_measured_interleaved():
    """bench_collectives' entry points, against a fake group: every key the report labels has a
    call, each call reaches the group the way a user writes it, and the interleaved timing gives
    every series its own statistics."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import bench_collectives as bc
    finally:
        sys.path.remove(str(BENCH_DIR))
    seen = []

    class FakeGroup:
        def all_gather(self, inputs, out=None):
            seen.append(("method", inputs, out))

        def collective(self, op, inputs, out=None):
            seen.append(("collective", op, inputs, out))

        def prepare_collective(self, op, inputs, out=None):
            return lambda: seen.append(("prepared", op, inputs, out))

    dev, out, host = ["d0", "d1"], ["o0", "o1"], ["h0", "h1"]
    calls = bc.entry_point_calls(FakeGroup(), "all_gather", dev, out, host, lambda: seen.append("sync"))
    assert list(calls) == [key for key, _ in bc.ENTRY_POINTS] == ENTRY_KEYS
    for fn in calls.values():
        fn()
    # The torch calls (stream-ordered) are timed until the GPUs finished them; numpy calls return done.
    assert seen == [("method", dev, None), "sync", ("method", dev, out), "sync",
                    ("collective", "all_gather", dev, None), "sync", ("collective", "all_gather", dev, out), "sync",
                    ("prepared", "all_gather", dev, None), "sync", ("prepared", "all_gather", dev, out), "sync",
                    ("method", host, None), ("prepared", "all_gather", host, None)]
    policy = {"warmup": 1, "target_s": 0.01, "min_iters": 4, "max_iters": 10}
    counts = {"a": 0, "b": 0}
    stats = bc.measure_interleaved({k: (lambda k=k: counts.__setitem__(k, counts[k] + 1)) for k in counts}, policy)
    assert set(stats) == {"a", "b"} and all(st["iterations"] >= 4 for st in stats.values())
    assert counts["a"] == stats["a"]["iterations"] + 2  # plus the warm-up calls


def test_interleaved_timing_rotates_the_order(bench_modules):
    """Each slice starts one call later, so no call always follows the same one (a fixed order let
    'auto', running host's code, measure 3-8% slower than 'host' on 2x H200)."""
    order = []
    calls = {k: (lambda k=k: order.append(k)) for k in "abc"}
    times = bench_modules["benchlib"].time_interleaved(calls, {"a": 6, "b": 3, "c": 3}, 3)
    assert order == ["a", "a", "b", "c", "b", "c", "a", "a", "c", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 3, "c": 3}


def test_plots_render_synthetic_results(bench_modules, tmp_path):
    pytest.importorskip("matplotlib")
    files = bench_modules["plots"].render_all(synthetic_results(bench_modules["benchlib"]), str(tmp_path))
    assert set(files) == {"collectives_busbw", "collectives_latency", "replication", "fanout"}
    for name in files.values():
        assert (tmp_path / name).stat().st_size > 10_000


# -- options refused at parsing time --------------------------------------------------------------
# Each bad value must stop the script in argparse (exit 2, one line naming the option) before any
# GPU, torch or file work; the good values next to them must still parse.

def _parser(script):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        return importlib.import_module(script).build_parser()
    finally:
        sys.path.remove(str(BENCH_DIR))


def _not_a_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    return blocker


BAD_OPTIONS = [
    ("bench_fanout", ["--iterations", "-1"], "--iterations"),
    ("bench_fanout", ["--iterations", "0"], "--iterations"),
    ("bench_fanout", ["--iterations", "2.5"], "--iterations"),
    ("bench_fanout", ["--rounds", "0"], "--rounds"),
    ("bench_fanout", ["--nbytes", "0"], "--nbytes"),
    ("bench_fanout", ["--nbytes", "-4K"], "--nbytes"),
    ("bench_fanout", ["--gpus", "0,0"], "--gpus"),
    ("bench_fanout", ["--gpus", "0,-1"], "--gpus"),
    ("bench_fanout", ["--gpus", "a"], "--gpus"),
    ("bench_fanout", ["--gpus", ""], "--gpus"),
    ("bench_bringup", ["--repeats", "-2"], "--repeats"),
    ("bench_replication", ["--timeout", "-1"], "--timeout"),
    ("bench_replication", ["--sizes", "1K,0"], "--sizes"),
    ("bench_replication", ["--sizes", ""], "--sizes"),
    ("bench_collectives", ["--timeout", "0"], "--timeout"),
    ("bench_collectives", ["--timeout", "inf"], "--timeout"),
    ("bench_collectives", ["--sizes", "12Q"], "--sizes"),
    ("bench_collectives", ["--entry-sizes", "1K,x"], "--entry-sizes"),
    ("bench_collectives", ["--ops", "all_reduce,allreduce"], "--ops"),
    ("bench_context_parallel", ["--iterations", "0"], "--iterations"),
    ("bench_context_parallel", ["--heads", "-8"], "--heads"),
    ("bench_context_parallel", ["--head-dim", "0"], "--head-dim"),
    ("bench_context_parallel", ["--batch", "0"], "--batch"),
    ("bench_context_parallel", ["--ring-blocks", "0"], "--ring-blocks"),
    ("bench_context_parallel", ["--kv-head-groups", "0"], "--kv-head-groups"),
    ("bench_context_parallel", ["--timeout", "nan"], "--timeout"),
    ("bench_context_parallel", ["--sequences", "8192,abc"], "--sequences"),
    ("bench_context_parallel", ["--sequences", "-8192"], "--sequences"),
    ("run_all", ["--budget", "0"], "--budget"),
    ("run_all", ["--budget", "-5"], "--budget"),
    ("run_all", ["--only", "fanout,nope"], "--only"),
    ("run_all", ["--entry-sizes", "0"], "--entry-sizes"),
    ("run_all", ["--gpus", "1,1"], "--gpus"),
    ("run_all", ["--nccl-tests-dir", "/nonexistent/nccl-tests/build"], "--nccl-tests-dir"),
    ("bench_collectives", ["--nccl-tests-dir", "/nonexistent/nccl-tests/build"], "--nccl-tests-dir"),
]


@pytest.mark.parametrize("script,argv,option", BAD_OPTIONS, ids=[f"{s}{' '.join(a)}" for s, a, _ in BAD_OPTIONS])
def test_bad_numbers_and_lists_are_refused_while_parsing(script, argv, option, capsys, tmp_path):
    parser = _parser(script)
    out = ["--out", str(tmp_path / ("out" if script == "run_all" else "out.json"))]
    parser.parse_args(out)  # the default and a good --out parse: only the bad option below is refused
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(out + argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"argument {option}: expected" in lines[0], lines


@pytest.mark.parametrize("script", ["bench_fanout", "bench_collectives", "bench_replication", "bench_bringup",
                                    "bench_context_parallel"])
def test_out_file_that_cannot_be_written_is_refused(script, capsys, tmp_path):
    parser = _parser(script)
    # Missing folders are fine (write_json creates them); a folder, or a path below a file, is not.
    assert parser.parse_args(["--out", str(tmp_path / "new" / "deeper" / "r.json")]).out.endswith("r.json")
    for bad in (str(tmp_path), str(_not_a_folder(tmp_path) / "r.json")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--out", bad])
        assert exit_info.value.code == 2
        assert "argument --out: expected" in capsys.readouterr().err


def test_run_all_and_report_paths_are_checked(capsys, tmp_path):
    run_all, report = _parser("run_all"), _parser("report")
    blocker = _not_a_folder(tmp_path)
    assert run_all.parse_args(["--out", str(tmp_path / "new"), "--markdown", str(tmp_path / "B.md")]).out
    results = tmp_path / "results.json"
    results.write_text("{}")
    assert report.parse_args([str(results), "--markdown", str(tmp_path / "B.md")]).results == str(results)
    for parser, argv, option in ((run_all, ["--out", str(blocker)], "--out"),
                                 (run_all, ["--out", str(blocker / "sub")], "--out"),
                                 (run_all, ["--out", str(tmp_path / "x"), "--markdown", str(tmp_path)], "--markdown"),
                                 (report, [str(tmp_path / "missing.json")], "results"),
                                 (report, [str(tmp_path)], "results"),
                                 (report, [str(results), "--markdown", str(blocker / "B.md")], "--markdown")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
        assert f"argument {option}: expected" in capsys.readouterr().err


def test_bad_option_stops_the_script_before_any_work(tmp_path):
    # The whole script, not only its parser: exit 2 with the one-line error, nothing written.
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(BENCH_DIR / "bench_fanout.py"), "--iterations", "-3", "--out", str(out)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "argument --iterations: expected a positive integer, got '-3'" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_argument_types_accept_what_they_document(bench_modules):
    bl = bench_modules["benchlib"]
    assert bl.positive_int("7") == 7 and bl.positive_float("0.5") == 0.5 and bl.positive_size("64M") == 64 * MiB
    assert bl.size_list("1K,64M") == "1K,64M" and bl.optional_size_list("") == ""
    assert bl.gpu_ids("0,3") == "0,3" and bl.positive_int_list("256,512") == "256,512"
    assert bl.name_list(OPS)("gather,scatter") == "gather,scatter"


@pytest.mark.parametrize("script, argv", [
    ("run_all.py", ["--quick"]), ("run_all.py", ["--only", "bringup", "--quick"]), ("bench_collectives.py", []),
    ("bench_fanout.py", []), ("bench_replication.py", []), ("bench_bringup.py", []), ("bench_context_parallel.py", []),
])
def test_a_machine_that_cannot_run_a_benchmark_is_named_in_one_line(script, argv, tmp_path):
    """No GPU visible (and here possibly no torch): every benchmark stops before any work with exit
    status 2 and one line saying what is missing, never a traceback or an exit 0 with failed parts."""
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / ("results" if script == "run_all.py" else "out.json")
    r = subprocess.run([sys.executable, str(BENCH_DIR / script), *argv, "--out", str(out)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot run: needs" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert ("PyTorch" in lines[0]) or ("CUDA GPUs" in lines[0] and "0 visible" in lines[0])
    assert not (tmp_path / "results" / "results.json").exists()


def test_readiness_names_torch_then_gpus(bench_modules, monkeypatch):
    import importlib.util

    bl = bench_modules["benchlib"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert "needs PyTorch with CUDA" in bl.readiness([0, 1])
    assert "needs PyTorch" not in (bl.readiness([0, 1], torch_needed=False) or "")


def test_entry_sizes_outside_the_measured_sizes_are_refused(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH_DIR / "bench_collectives.py"), "--quick", "--entry-sizes", "4M",
                        "--out", str(tmp_path / "c.json")], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, NCCL_NVLS_ENABLE="0", CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 2 and "--entry-sizes 4 MiB not among the measured sizes" in r.stderr, r.stderr


def test_report_shows_the_per_call_spread_at_large_sizes(bench_modules):
    """The per-call spread table lists p10 / median / p90 of ours and raw at >= 64 MiB only, read
    from the series (a delayed call shows in ours' p90, not in its median)."""
    bl, report = bench_modules["benchlib"], bench_modules["report"]
    results = synthetic_results(bl)
    coll = results["collectives"]
    for op in OPS:
        for p in coll["ours"]["series"][op]:
            p.update(p10_us=p["time_us"] * 0.99, median_us=p["time_us"], p90_us=p["time_us"] * 1.4, iterations=50)
        for p in coll["raw"]["raw_percall"][op]:
            p.update(p10_us=p["time_us"] * 0.98, median_us=p["time_us"], p90_us=p["time_us"] * 1.02)
    text = report.percall_spread_section(coll)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| op")]
    large = [s for s in report.table_sizes(report.collective_series(coll, OPS[0])["ours"]) if s >= bl.LARGE_BYTES]
    assert large and len(rows) == len(OPS) * len(large)
    first = next(p for p in coll["ours"]["series"][OPS[0]] if p["size"] == large[0])
    assert report.fmt(first["p90_us"]) in rows[0] and bl.format_size(large[0]) in rows[0]
    # Without per-call percentiles (older results), no table at all.
    for op in OPS:
        for p in coll["ours"]["series"][op]:
            p.pop("p10_us")
    assert report.percall_spread_section(coll) == ""


def test_render_plots_without_matplotlib_writes_nothing(bench_modules, tmp_path):
    """--render-plots on a machine without matplotlib: one line and exit 2, the results file (and
    the plot list it carries) left as it was."""
    bl = bench_modules["benchlib"]
    try:
        import matplotlib  # noqa: F401
        pytest.skip("matplotlib is installed here")
    except ImportError:
        pass
    results = synthetic_results(bl)
    results["plots"] = {"fanout": "fanout.png"}
    json_path = tmp_path / "results.json"
    json_path.write_text(json.dumps(results))
    before = json_path.read_text()
    md_path = tmp_path / "BENCHMARKS.md"
    r = subprocess.run([sys.executable, str(BENCH_DIR / "report.py"), str(json_path), "--markdown", str(md_path),
                        "--render-plots"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs matplotlib" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert json_path.read_text() == before and not md_path.exists()


def test_python_overhead_without_torch_is_named_in_one_line(tmp_path):
    """Where torch is missing python_overhead.py stops as the GPU benchmarks do: one line, status 2
    (torch is hidden here by a sitecustomize that refuses its import)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nclass _NoTorch:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n            raise ImportError('hidden')\n"
        "sys.meta_path.insert(0, _NoTorch())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, str(BENCH_DIR / "python_overhead.py"), "--iterations", "5"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot run: needs PyTorch" in lines[0] and "Traceback" not in r.stderr, r.stderr
