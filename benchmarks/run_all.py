#!/usr/bin/env python3
"""Runs the mdtrt benchmarks in one go and writes results.json plus PNG plots:

  1. bench_collectives.py  the eight collectives, ours against raw NCCL (bus bandwidth, latency):
                           prepare_collective(out=), collective(out=) and the default group.<op>(x)
                           at every size; every entry point (with and without out=, numpy and
                           device arrays in) at --entry-sizes
  2. bench_fanout.py       EngineRunner.infer/prepare overhead, with and without outputs=, on 1 and
                           2 GPUs against a bare loop
  3. bench_replication.py  host input to every GPU: host / peer / broadcast / auto
  4. bench_bringup.py      DeviceGroup creation: in one process against the file-exchange path
  5. bench_context_parallel.py (with --context-parallel, or --only context_parallel) attention's
     allgather_kv / ulysses / ring patterns, 1 GPU against N, sequence 8192 to 131072

Each benchmark runs in its own process with a deadline (a hang or crash costs only that
benchmark); the whole run stays under --budget seconds (default: 355, quick 110).

    python benchmarks/run_all.py --out results/ [--quick] [--gpus 0,1] [--nccl-tests-dir DIR]
    python benchmarks/report.py results/results.json --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

BENCHMARKS = ("collectives", "fanout", "replication", "bringup", "context_parallel")
# Run unless --only names others; context_parallel (minutes of attention) only when asked for.
DEFAULT_BENCHMARKS = ("collectives", "fanout", "replication", "bringup")
# Seconds per benchmark process (full, quick): caps, not expected durations; the run's budget
# caps them again.
PROCESS_LIMITS = {"collectives": (215, 65), "fanout": (30, 15), "replication": (75, 28), "bringup": (45, 22),
                  "context_parallel": (300, 120)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=bl.output_dir, default="results", help="folder for results.json, the plots and each benchmark's JSON")
    p.add_argument("--quick", action="store_true", help="sizes 1K,64K,1M,64M,256M and fewer iterations (~1.5 min)")
    p.add_argument("--gpus", type=bl.gpu_ids, default="0,1", help="GPU ids, comma-separated (default 0,1)")
    p.add_argument("--nccl-tests-dir", type=bl.input_dir, default=None, help="folder with nccl-tests' *_perf binaries (optional reference)")
    p.add_argument("--only", type=bl.name_list(BENCHMARKS), default=None,
                   help=f"benchmarks to run, from {','.join(BENCHMARKS)} (default: {','.join(DEFAULT_BENCHMARKS)})")
    p.add_argument("--context-parallel", action="store_true",
                   help="also run bench_context_parallel.py (adds up to 300 s, quick 120 s, to the default budget; "
                        "an explicit --budget covers it too)")
    p.add_argument("--entry-sizes", type=bl.optional_size_list, default="1K,64M",
                   help="sizes at which the collectives benchmark measures every entry point (default 1K,64M)")
    p.add_argument("--budget", type=bl.positive_float, default=None, help="seconds for the whole run (default 355, quick 110; with --context-parallel 655, quick 230)")
    p.add_argument("--markdown", type=bl.output_file, default=None, help="also write this BENCHMARKS.md (same as report.py)")
    return p


def bench_command(name: str, args, part_path: str, limit: float) -> list[str]:
    cmd = bl.python_command(f"bench_{name}.py", "--out", part_path, "--gpus", args.gpus)
    if args.quick:
        cmd.append("--quick")
    if name == "collectives":
        cmd += ["--timeout", str(int(limit - 12)), "--entry-sizes", args.entry_sizes]  # leaves time to write its JSON
        if args.nccl_tests_dir:
            cmd += ["--nccl-tests-dir", args.nccl_tests_dir]
    elif name == "replication":
        cmd += ["--timeout", str(int(limit - 8))]
    elif name == "bringup" and not args.quick:
        cmd.append("--torch-reference")
    elif name == "context_parallel":
        cmd += ["--timeout", str(int(limit - 20))]  # leaves time to write its JSON
    return cmd


def selected_benchmarks(args) -> list[str]:
    """The benchmarks this run runs, in order (--only, else the defaults; --context-parallel adds one)."""
    selected = [b for b in (args.only.split(",") if args.only else DEFAULT_BENCHMARKS) if b]
    if args.context_parallel and "context_parallel" not in selected:
        selected.append("context_parallel")
    return selected


def check_machine(args) -> None:
    """Exits with status 2 and one line when this machine cannot run the selected benchmarks (no
    torch, too few GPUs), before anything starts."""
    selected = selected_benchmarks(args)
    # bring-up alone needs torch only for its torch.distributed reference (full mode).
    torch_needed = any(b != "bringup" for b in selected) or not args.quick
    minimum = 2 if any(b in ("collectives", "context_parallel") for b in selected) else 1
    bl.exit_unless_ready("run_all", bl.parse_gpus(args.gpus), torch_needed=torch_needed, minimum=minimum)


def run(args) -> dict:
    out_dir = os.path.abspath(args.out)
    parts_dir = os.path.join(out_dir, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    selected = selected_benchmarks(args)
    extra = PROCESS_LIMITS["context_parallel"][1 if args.quick else 0] if "context_parallel" in selected else 0
    budget = bl.Deadline(args.budget or (110 if args.quick else 355) + extra)
    gpus = bl.parse_gpus(args.gpus)
    unknown = [b for b in selected if b not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    results: dict = {"command": " ".join(["python", "benchmarks/run_all.py", *sys.argv[1:]]), "quick": args.quick,
                     "started": bl.utc_now(), "gpus": gpus, "durations_s": {}, "runs": {}}
    results["machine"] = bl.machine_info(gpus)
    bl.write_json(os.path.join(out_dir, "results.json"), results)
    for name in selected:
        limit = min(PROCESS_LIMITS[name][1 if args.quick else 0], budget.left() - 8)
        if limit < 10:
            results[name] = {"error": "not run: the run's time budget was spent"}
            continue
        part = os.path.join(parts_dir, f"{name}.json")
        if os.path.exists(part):
            os.remove(part)
        print(f"[run_all] {name} (at most {limit:.0f} s) ...", flush=True)
        start = time.monotonic()
        r = bl.run_command(bench_command(name, args, part, limit), timeout=limit)
        results["durations_s"][name] = time.monotonic() - start
        results["runs"][name] = {"rc": r["rc"], "timed_out": r["timed_out"], "stdout": bl.tail(r["stdout"], 8),
                                 "stderr": bl.tail(r["stderr"], 25)}
        if os.path.exists(part):
            results[name] = bl.read_json(part)  # partial results survive a timeout
            if r["rc"] != 0:
                results[name]["incomplete"] = (f"timed out after {limit:.0f} s" if r["timed_out"]
                                               else f"exit status {r['rc']}: {bl.tail(r['stderr'], 3)}")
        else:
            results[name] = {"error": (f"timed out after {limit:.0f} s" if r["timed_out"] else
                                       f"exit status {r['rc']}: {bl.tail(r['stderr'], 3)}")}
        print(f"[run_all] {name}: {'ok' if r['rc'] == 0 else results[name].get('error') or results[name].get('incomplete')}"
              f" ({results['durations_s'][name]:.1f} s)", flush=True)
        bl.write_json(os.path.join(out_dir, "results.json"), results)
    try:
        import plots

        results["plots"] = plots.render_all(results, out_dir)
    except ImportError as error:
        results["plots"] = {}
        results["plots_error"] = f"no plots: {error} (pip install matplotlib, then report.py --render-plots)"
    results["finished"] = bl.utc_now()
    bl.write_json(os.path.join(out_dir, "results.json"), results)
    return results


def print_summary(results: dict) -> None:
    import report

    print("\nTargets:")
    for v in report.evaluate_targets(results):
        print(f"  [{ {True: 'met', False: 'MISSED', None: 'n/a'}[v['met']]:>6}] {v['target']}: {v['value']}"
              + (f" -- {v['why']}" if v["why"] and v["met"] is not True else ""))
    print(f"Durations: " + ", ".join(f"{k} {v:.0f} s" for k, v in results.get("durations_s", {}).items()))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_machine(args)
    started = time.monotonic()
    results = run(args)
    out_dir = os.path.abspath(args.out)
    print_summary(results)
    if args.markdown:
        import report

        with open(args.markdown, "w") as f:
            f.write(report.render_markdown(results, args.markdown, os.path.join(out_dir, "results.json")))
        print(f"wrote {args.markdown}")
    print(f"wrote {os.path.join(out_dir, 'results.json')} and {len(results.get('plots') or {})} plots "
          f"in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
