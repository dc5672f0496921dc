#!/usr/bin/env python3
"""Turns results.json (written by run_all.py) into BENCHMARKS.md: the machine, the date, a table
per benchmark (a readable subset of sizes; the plots show them all), the plots, and the verdict on
each target with its margin, and the reason where one is missed.

    python benchmarks/report.py results/results.json --markdown BENCHMARKS.md [--render-plots]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

# The issues' targets (#16).
BUSBW_RATIO_MIN = 0.97       # ours / raw bus bandwidth at >= 64 MiB, prepared and default calls
ADDED_LATENCY_MAX_US = 10.0  # ours - raw at 1 KiB, through prepare_collective(), collective() and the op methods
DEFAULT_ADDED_MAX_US = 10.0  # the default call (no out=) - the out= call, at 1 KiB
DEFAULT_SLOWDOWN_MAX = 1.03  # the default call / the out= call, at >= 64 MiB
FANOUT_INFER_MAX_US = 15.0   # EngineRunner.infer on 2 GPUs - bare launch, same synchronize
FANOUT_PREPARE_MAX_US = 10.0  # EngineRunner.prepare()() on 2 GPUs - bare launch, same synchronize
PEER_RATIO_MIN = 0.90        # replication / its bound (device input: peer copy; host input: one H2D copy), large inputs
AUTO_SLOWDOWN_MAX = 1.05     # auto / best of host, peer, broadcast
CP_SPEEDUP_MIN = 1.9         # best context-parallel strategy on 2 GPUs at CP_SEQUENCE
CP_SEQUENCE = 56320
NVLINK_H200_NOMINAL = "NVLink 4, 18 links per H200: 900 GB/s total per GPU (both directions), 450 GB/s each way (NVIDIA's figure)"
NA = "n/a"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=bl.input_file, help="results.json written by run_all.py")
    p.add_argument("--markdown", type=bl.output_file, default="BENCHMARKS.md", help="markdown file to write (default BENCHMARKS.md)")
    p.add_argument("--render-plots", action="store_true",
                   help="(re)draw the PNG plots next to results.json first (needs matplotlib)")
    return p


# -- reading results ----------------------------------------------------------------------------

def by_size(points) -> dict:
    return {int(p["size"]): p for p in points or []}


def collective_series(coll: dict, op: str) -> dict:
    """Every series of one op, each as {size: point}."""
    raw = coll.get("raw") or {}
    return {"ours": by_size(((coll.get("ours") or {}).get("series") or {}).get(op)),
            "ours_call": by_size(((coll.get("ours_call") or {}).get("series") or {}).get(op)),
            "ours_default": by_size(((coll.get("ours_default") or {}).get("series") or {}).get(op)),
            "ours_batched": by_size(((coll.get("ours_batched") or {}).get("series") or {}).get(op)),
            "ours_default_batched": by_size(((coll.get("ours_default_batched") or {}).get("series") or {}).get(op)),
            "raw_percall": by_size((raw.get("raw_percall") or {}).get(op)),
            "raw_batched": by_size((raw.get("raw_batched") or {}).get(op)),
            "sample": by_size(((coll.get("sample") or {}).get("series") or {}).get(op)),
            "nccl_tests": by_size(((coll.get("nccl_tests") or {}).get("series") or {}).get(op))}


def table_sizes(sizes) -> list[int]:
    sizes = sorted(set(sizes))
    subset = [s for s in sizes if s in bl.TABLE_SIZES]
    return subset or sizes[:: max(1, len(sizes) // 7)]


def fmt(x, digits: int = 1, suffix: str = "") -> str:
    if x is None:
        return NA
    return f"{x:,.{digits}f}{suffix}"


def pct(x) -> str:
    return NA if x is None else f"{100 * x:.1f}%"


def yes_no(met) -> str:
    return {True: "yes", False: "**no**", None: NA}[met]


def _cell(value) -> str:
    # Error texts carry newlines and pipes, which would break the table.
    return " ".join(str(value).split()).replace("|", "\\|")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- targets ------------------------------------------------------------------------------------

def evaluate_targets(results: dict) -> list[dict]:
    """One entry per target: what, the measured value, met (True/False/None = not measured),
    the margin and, for a miss, why."""
    verdicts = []
    coll = results.get("collectives") or {}
    fanout = results.get("fanout") or {}
    repl = results.get("replication") or {}

    # Per op: 1a. bus bandwidth at >= 64 MiB (prepared and default calls), 1b. added latency at
    # 1 KiB (prepared, collective(), the op method), 1c. the default call against the out= call.
    for op in coll.get("ops") or []:
        s = collective_series(coll, op)
        for key, how, raw_key in (("ours", "", "raw_percall"),
                                  ("ours_default", " via the default call", "raw_percall"),
                                  ("ours_batched", ", calls back to back (stream-ordered)", "raw_batched"),
                                  ("ours_default_batched", " via the default call, back to back (stream-ordered)",
                                   "raw_batched")):
            if key != "ours" and not s[key]:
                continue  # results from before the series existed
            verdicts.append(_busbw_verdict(coll, op, s, key, how, raw_key))
        for key, how in (("ours", "prepare_collective()"), ("ours_call", "collective()"),
                         ("ours_default", f"group.{op}(x)")):
            if key != "ours" and not s[key]:
                continue  # results from before the series existed
            small = min(s[key]) if s[key] else None
            target = f"{op} via {how}: <= 10 us added latency at {bl.format_size(small or bl.SMALL_BYTES)}"
            if small is not None and small in s["raw_percall"]:
                added = s[key][small]["time_us"] - s["raw_percall"][small]["time_us"]
                met = added <= ADDED_LATENCY_MAX_US
                verdicts.append({"benchmark": "collectives", "target": target, "value": f"{added:+.1f} us", "met": met,
                                 "margin": f"{ADDED_LATENCY_MAX_US - added:+.1f} us",
                                 "why": "" if met else _latency_why(results, added, key)})
            else:
                verdicts.append({"benchmark": "collectives", "target": target, "value": "not measured", "met": None,
                                 "margin": NA, "why": (coll.get("raw") or {}).get("reason", "no common size")})
        if s["ours_default"] and s["ours_call"]:
            verdicts += _default_vs_out_verdicts(op, s)
        if s["ours_default_batched"] and s["ours_batched"]:
            verdicts += _default_vs_out_verdicts(op, s, "ours_default_batched", "ours_batched",
                                                 " back to back (stream-ordered)", small_too=False)

    if not coll.get("ops"):
        verdicts.append({"benchmark": "collectives", "target": "bus bandwidth >= 97% of raw at >= 64 MiB; <= 10 us "
                         "added latency at 1 KiB", "value": "not measured", "met": None, "margin": NA,
                         "why": coll.get("error", "not run")})

    # 2. fan-out on 2 GPUs: infer() and prepare()(), with outputs= and without (the default).
    for key, how, limit in (("runner", "EngineRunner.infer(outputs=)", FANOUT_INFER_MAX_US),
                            ("prepared", "EngineRunner.prepare(outputs=)()", FANOUT_PREPARE_MAX_US),
                            ("runner_default", "EngineRunner.infer()", FANOUT_INFER_MAX_US),
                            ("prepared_default", "EngineRunner.prepare()()", FANOUT_PREPARE_MAX_US)):
        widest = max(((int(k), v) for k, v in (fanout.get(key) or {}).items()), default=(0, None))
        target = (f"{how} on N={max(widest[0], 2)}: <= {limit:.0f} us added per call"
                  + (" (over the same copies launched from Python, same synchronize)"
                     if fanout.get("bare_launch_by_gpus") else " (over the bare C++ loop)"))
        if widest[1] is not None and widest[0] >= 2:
            added = widest[1]["added_us"]
            met = added <= limit
            verdicts.append({"benchmark": "fanout", "target": target, "value": f"{added:+.1f} us", "met": met,
                             "margin": f"{limit - added:+.1f} us", "why": "" if met else _fanout_why(fanout, key, limit)})
        elif key == "runner" or fanout.get(key):
            verdicts.append({"benchmark": "fanout", "target": target, "value": "not measured", "met": None,
                             "margin": NA, "why": fanout.get("error", "")})

    # 3a. replication bandwidth vs peer copy (large inputs), 3b. auto never > 5% slower than the best.
    points = [p for p in repl.get("points") or [] if "device_input" in p]
    large = [p for p in points if p["size"] >= bl.LARGE_BYTES]
    if large:
        for key, how in (("device_input", ""), ("device_input_batched", ", calls back to back (stream-ordered)")):
            measured = [p for p in large if key in p]
            if not measured:
                continue  # results from before the back-to-back series existed
            worst = min(measured, key=lambda p: p[key]["gbps"] / p["peer_copy_gbps"])
            ratio = worst[key]["gbps"] / worst["peer_copy_gbps"]
            verdicts.append({"benchmark": "replication",
                             "target": f"device input to every GPU{how}: >= 90% of peer copy bandwidth (>= 64 MiB)",
                             "value": f"worst {pct(ratio)} at {bl.format_size(worst['size'])}",
                             "met": ratio >= PEER_RATIO_MIN, "margin": f"{100 * (ratio - PEER_RATIO_MIN):+.1f} points",
                             "why": "" if ratio >= PEER_RATIO_MIN else
                             f"{worst[key]['gbps']:.1f} GB/s against {worst['peer_copy_gbps']:.1f} GB/s peer copy; "
                             f"a call takes {worst[key]['median_us']:.0f} us"})
        # A host input crosses PCIe at least once (peer copy, 372-395 GB/s over NVLink, is no bound for it): its
        # bound is one host-to-device copy of the same kind of host memory, measured in the same run.
        for kind in ("pinned", "pageable"):
            h2d_key = f"h2d_{kind}_gbps"
            best = min(large, key=lambda p: max(p[kind][m]["gbps"] for m in ("host", "peer", "broadcast")) / p[h2d_key])
            mode = max(("host", "peer", "broadcast"), key=lambda m: best[kind][m]["gbps"])
            gbps, h2d = best[kind][mode]["gbps"], best[h2d_key]
            ratio = gbps / h2d
            verdicts.append({"benchmark": "replication",
                             "target": f"{kind} host input to every GPU: >= 90% of one {kind} host-to-device copy's "
                                       f"bandwidth (>= 64 MiB)",
                             "value": f"worst {pct(ratio)} at {bl.format_size(best['size'])} ({mode})",
                             "met": ratio >= PEER_RATIO_MIN, "margin": f"{100 * (ratio - PEER_RATIO_MIN):+.1f} points",
                             "why": "" if ratio >= PEER_RATIO_MIN else
                             f"{gbps:.1f} GB/s against {h2d:.1f} GB/s for one {kind} host-to-device copy"})
    else:
        verdicts.append({"benchmark": "replication", "target": ">= 90% of peer copy bandwidth for large inputs",
                         "value": "not measured", "met": None, "margin": NA, "why": repl.get("error", "")})
    if points:
        worst = None
        for p in points:
            for kind in ("pageable", "pinned"):
                best_mode = min(("host", "peer", "broadcast"), key=lambda m: p[kind][m]["median_us"])
                slowdown = p[kind]["auto"]["median_us"] / p[kind][best_mode]["median_us"]
                if worst is None or slowdown > worst[0]:
                    worst = (slowdown, p["size"], kind, best_mode, p[kind]["auto_choice"])
        slowdown, size, kind, best_mode, chosen = worst
        met = slowdown <= AUTO_SLOWDOWN_MAX
        verdicts.append({"benchmark": "replication", "target": "auto never > 5% slower than the best of host/peer/broadcast",
                         "value": f"worst {100 * (slowdown - 1):+.1f}% ({kind}, {bl.format_size(size)})", "met": met,
                         "margin": f"{100 * (AUTO_SLOWDOWN_MAX - slowdown):+.1f} points",
                         "why": "" if met else f"auto chose {chosen} where {best_mode} was fastest "
                                              f"({kind} input, {bl.format_size(size)})"})
    verdicts += context_parallel_targets(results.get("context_parallel"))
    return verdicts


def context_parallel_targets(cp: dict | None) -> list[dict]:
    """Best strategy >= 1.9x at sequence 56320 on 2 GPUs; ring's K/V memory per GPU below
    allgather_kv's; every strategy's output matches one GPU's. Nothing when not run."""
    if not cp:
        return []
    points = {p["sequence"]: p for p in cp.get("points") or []}
    verdicts = []
    point = points.get(CP_SEQUENCE)
    target = f"best strategy on 2 GPUs at sequence {CP_SEQUENCE}: >= {CP_SPEEDUP_MIN}x over one GPU"
    measured = {n: s for n, s in (point or {}).get("strategies", {}).items() if "speedup" in s}
    if measured:
        best = max(measured, key=lambda n: measured[n]["speedup"])
        b = measured[best]
        met = b["speedup"] >= CP_SPEEDUP_MIN
        why = "" if met else (f"{best}: {b['median_ms']:.2f} ms against {point['single']['median_ms']:.2f} ms on one GPU; "
                              f"collectives alone {b['comm_ms']:.2f} ms ({pct(b['comm_share'])} of the time)")
        verdicts.append({"benchmark": "context_parallel", "target": target, "value": f"{best} {b['speedup']:.2f}x",
                         "met": met, "margin": f"{b['speedup'] - CP_SPEEDUP_MIN:+.2f}x", "why": why})
    else:
        verdicts.append({"benchmark": "context_parallel", "target": target, "value": "not measured", "met": None,
                         "margin": NA, "why": cp.get("error") or "sequence not measured"})
    pairs = [(p["sequence"], p["strategies"].get("ring", {}), p["strategies"].get("allgather_kv", {}))
             for p in points.values()]
    pairs = [(s, r, a) for s, r, a in pairs if "kv_bytes" in r and "kv_bytes" in a]
    target = "ring: K/V bytes held per GPU below allgather_kv's (every sequence)"
    if pairs:
        worst = max(pairs, key=lambda t: t[1]["kv_bytes"] / t[2]["kv_bytes"])
        ratio = worst[1]["kv_bytes"] / worst[2]["kv_bytes"]
        verdicts.append({"benchmark": "context_parallel", "target": target,
                         "value": f"worst {pct(ratio)} of allgather_kv at {worst[0]}", "met": ratio < 1,
                         "margin": f"{100 * (1 - ratio):+.1f} points", "why": ""})
    wrong = [f"{n} at {p['sequence']}" for p in points.values() for n, s in p["strategies"].items()
             if not s.get("passed")]
    if points:
        verdicts.append({"benchmark": "context_parallel", "target": "every strategy matches the one-GPU output",
                         "value": "all match" if not wrong else f"{len(wrong)} failed", "met": not wrong,
                         "margin": NA, "why": ", ".join(wrong)})
    return verdicts


def context_parallel_section(cp: dict, plots: dict, base: str) -> str:
    title = "## 5. Context-parallel attention\n\n"
    if not cp or cp.get("error") or not cp.get("points"):
        return title + "Not measured" + (f": {cp.get('error')}" if cp and cp.get("error") else "") + ".\n"
    config = cp.get("config", {})
    rows = []
    for p in cp["points"]:
        single = p["single"]
        passes = single.get("pass_medians_ms")
        rows.append([str(p["sequence"]), "1 GPU", fmt(single["median_ms"], 2), "1.00x", "-", "-",
                     fmt(single["peak_bytes"] / bl.MiB, 0), fmt(single["kv_bytes"] / bl.MiB, 0),
                     "-" if not passes else "passes before / after the strategies: "
                     + " / ".join(fmt(x, 2) for x in passes) + " ms"])
        for name, s in p["strategies"].items():
            if "error" in s:
                rows.append([str(p["sequence"]), name, NA, NA, NA, NA, NA, NA, s["error"]])
                continue
            rows.append([str(p["sequence"]), name, fmt(s["median_ms"], 2), f"{s['speedup']:.2f}x",
                         fmt(s["comm_ms"], 2), pct(s["comm_share"]),
                         " / ".join(fmt(b / bl.MiB, 0) for b in s["peak_bytes"]), fmt(s["kv_bytes"] / bl.MiB, 0),
                         f"{'ok' if s['passed'] else '**wrong**'} ({s['max_abs_error']:.2g})"])
    skipped = "".join(f"\n- sequence {x['sequence']} skipped: {x['reason']}" for x in cp.get("skipped") or [])
    return (title + f"{len(config.get('gpus') or [])} GPUs against one, {config.get('heads')} heads x "
            f"{config.get('head_dim')}, batch {config.get('batch')}, float16, median of {config.get('iterations')} "
            f"iterations; ring in {config.get('ring_blocks')} blocks per rank's chunk; allgather_kv gathers in "
            f"{config.get('kv_head_groups', 1)} pieces of heads. {cp.get('method', '')}. "
            "Collectives: the strategy's collectives run alone (their share is of the whole pass; ring overlaps "
            "them with attention). Peak: torch's peak allocation per GPU above what was allocated before "
            "(one GPU: plus its Q, K, V). K/V: bytes of K and V buffers a rank holds. One GPU is timed before and "
            "after the strategies (its median pools both passes), so that a drifting clock does not favour either "
            "side." + skipped + "\n\n"
            + md_table(["sequence", "strategy", "median (ms)", "speedup", "collectives alone (ms)", "share",
                        "peak MiB per GPU", "K/V MiB per GPU", "vs one GPU (max abs error)"], rows) + "\n\n"
            + image(plots, "context_parallel_speedup", base))


def _busbw_verdict(coll: dict, op: str, s: dict, key: str, how: str, raw_key: str = "raw_percall") -> dict:
    """Bus bandwidth of series `key` against raw NCCL (`raw_key`: per call, or back to back),
    worst size >= 64 MiB."""
    target = f"{op}{how}: bus bandwidth >= 97% of raw NCCL{' back to back' if raw_key == 'raw_batched' else ''} at >= 64 MiB"
    large = [(size, s[key][size], s[raw_key][size]) for size in sorted(s[key])
             if size >= bl.LARGE_BYTES and size in s[raw_key]]
    if not large:
        return {"benchmark": "collectives", "target": target, "value": "not measured", "met": None, "margin": NA,
                "why": (coll.get("raw") or {}).get("reason", "no size >= 64 MiB with both series")}
    worst, size, o, r = min(((o["busbw_gbps"] / r["busbw_gbps"], size, o, r) for size, o, r in large),
                            key=lambda t: t[0])
    met = worst >= BUSBW_RATIO_MIN
    why = "" if met else (
        f"at {bl.format_size(size)} a call takes {o['time_us'] - r['time_us']:.1f} us longer than the raw op "
        f"({o['time_us']:.1f} vs {r['time_us']:.1f} us); {100 * (BUSBW_RATIO_MIN - worst):.1f} points short")
    return {"benchmark": "collectives", "target": target, "value": f"worst {pct(worst)} at {bl.format_size(size)}",
            "met": met, "margin": f"{100 * (worst - BUSBW_RATIO_MIN):+.1f} points", "why": why}


def _default_vs_out_verdicts(op: str, s: dict, default_key: str = "ours_default", out_key: str = "ours_call",
                             how: str = "", small_too: bool = True) -> list[dict]:
    """The default call (op method, no out=) against the out= call: +10 us at the smallest size
    (per call only), within 3% from 64 MiB."""
    out = []
    d, c = s[default_key], s[out_key]
    common = sorted(set(d) & set(c))
    if common and small_too:
        small = common[0]
        added = d[small]["time_us"] - c[small]["time_us"]
        met = added <= DEFAULT_ADDED_MAX_US
        out.append({"benchmark": "collectives",
                    "target": f"group.{op}(x) within +10 us of the out= call at {bl.format_size(small)}",
                    "value": f"{added:+.1f} us", "met": met, "margin": f"{DEFAULT_ADDED_MAX_US - added:+.1f} us",
                    "why": "" if met else f"{added - DEFAULT_ADDED_MAX_US:.1f} us over: the default call wraps its "
                                          "outputs and allocates the next call's (torch's caching allocator) while "
                                          "its rank threads queue it, which here took longer than they did"})
    large = [size for size in common if size >= bl.LARGE_BYTES]
    if large:
        slow, size = max((d[z]["time_us"] / c[z]["time_us"], z) for z in large)
        met = slow <= DEFAULT_SLOWDOWN_MAX
        out.append({"benchmark": "collectives", "target": f"group.{op}(x) within 3% of the out= call{how} at >= 64 MiB",
                    "value": f"worst {100 * (slow - 1):+.1f}% at {bl.format_size(size)}", "met": met,
                    "margin": f"{100 * (DEFAULT_SLOWDOWN_MAX - slow):+.1f} points",
                    "why": "" if met else f"{d[size]['time_us'] - c[size]['time_us']:.1f} us more per call at "
                                          f"{bl.format_size(size)} ({d[size]['time_us']:.1f} vs {c[size]['time_us']:.1f} us)"})
    return out


def _latency_why(results: dict, added: float, key: str = "ours") -> str:
    fanout = results.get("fanout") or {}
    series = {"ours": "prepared", "ours_call": "runner"}.get(key, "runner_default")
    fan = fanout.get(series) or {}
    n2 = fan.get("2") or fan.get(max(fan, key=int)) if fan else None
    how = {"prepared": "EngineRunner.prepare(outputs=)()", "runner": "EngineRunner.infer(outputs=)",
           "runner_default": "EngineRunner.infer()"}[series]
    extra = (f"; for comparison, the fan-out benchmark adds {n2['added_us']:.1f} us per {how} of a trivial "
             f"program on {'2' if fan.get('2') else max(fan, key=int)} GPUs" if n2 else "")
    hand_off = ("hands the op to one thread per GPU, which queue it (torch tensors: stream-ordered), and the timed "
                "synchronize waits for the GPUs")
    work = {"ours": hand_off,
            "ours_call": "checks and converts its arguments in Python, " + hand_off}.get(
        key, "checks and converts its arguments, allocates the next call's outputs, " + hand_off)
    return f"{added - ADDED_LATENCY_MAX_US:.1f} us over: each call {work}{extra}"


def _fanout_why(fanout: dict, key: str, limit: float) -> str:
    r = fanout.get(key) or {}
    one, two = r.get("1"), r.get("2")
    if one and two:
        return (f"{two['added_us'] - limit:.1f} us over; N=1 already adds {one['added_us']:.1f} us "
                f"(Python and the hand-off to a rank thread), the second GPU "
                f"{two['added_us'] - one['added_us']:.1f} us more")
    return ""


# -- markdown -----------------------------------------------------------------------------------

def machine_section(m: dict) -> str:
    names = ", ".join(m.get("gpu_names") or []) or NA
    rows = [["GPUs", f"{names} x {m.get('gpu_count', NA)} (used: {m.get('gpus_used', NA)})"],
            ["Driver", m.get("driver") or NA],
            ["CUDA", f"runtime {m.get('cuda_runtime') or NA}, driver API {m.get('cuda_driver') or m.get('cuda_driver_api') or NA}"],
            ["NCCL (mdtrt)", f"{m.get('nccl_version') or NA}" + (f" ({m['nccl_path']})" if m.get("nccl_path") else "")],
            ["PyTorch", f"{m.get('torch_version') or 'not installed'}" +
             (f" (CUDA {m.get('torch_cuda')}, NCCL {m.get('torch_nccl_version')})" if m.get("torch_version") else "")],
            ["mdtrt", m.get("mdtrt_version") or NA],
            ["Host", m.get("hostname") or NA],
            ["Date", m.get("date") or NA]]
    text = "## Machine\n\n" + md_table(["", ""], rows)
    topo = m.get("topology")
    text += "\n\nInterconnect (`nvidia-smi topo -m`):\n\n```\n" + (topo.rstrip() if topo else "not available") + "\n```\n"
    text += f"\nNominal link, for context only (the plots use the measured peer copy bandwidth): {NVLINK_H200_NOMINAL}.\n"
    return text


def summary_section(verdicts: list[dict]) -> str:
    met = sum(v["met"] is True for v in verdicts)
    missed = sum(v["met"] is False for v in verdicts)
    unmeasured = sum(v["met"] is None for v in verdicts)
    rows = [[v["benchmark"], v["target"], v["value"], yes_no(v["met"]), v["margin"], v["why"] or ""] for v in verdicts]
    return (f"## Targets\n\n{met} met, {missed} missed, {unmeasured} not measured.\n\n"
            + md_table(["benchmark", "target", "measured", "met", "margin", "why (where missed or not measured)"], rows) + "\n")


def reference_line(name: str, info: dict) -> str:
    if not info:
        return f"- {name}: not run"
    if info.get("available"):
        extra = ", ".join(f"{k} {info[k]}" for k in ("torch_version", "torch_nccl_version", "path", "dir") if info.get(k))
        return f"- {name}: {info.get('method', 'measured')}" + (f" ({extra})" if extra else "")
    return f"- {name}: not available: {info.get('reason', 'unknown')}"


def image(plots: dict, key: str, base: str) -> str:
    path = (plots or {}).get(key)
    return f"![{key}]({os.path.join(base, path)})\n" if path else ""


def collectives_section(coll: dict, plots: dict, base: str) -> str:
    if not coll or coll.get("error"):
        return "## 1. Collective bandwidth\n\nNot measured" + (f": {coll.get('error')}" if coll else "") + ".\n"
    n = coll.get("world_size", 2)
    link = coll.get("link_limit") or {}
    out = [f"## 1. Collective bandwidth\n\n{n} GPUs, {coll.get('dtype', 'float16')}, sizes as nccl-tests counts them "
           "(all_gather/gather: the whole output; reduce_scatter/scatter: the whole input). algbw = S/t; busbw = algbw x "
           f"2(n-1)/n for all_reduce, 1 for broadcast and reduce, (n-1)/n for the others. Ours and raw per call: median "
           "of host-timed calls that return when the op finished on every rank; raw back-to-back: nccl-tests' style "
           "(N ops, one synchronize). Ratio and target: ours against raw per call (the same pattern); the ratio to "
           "back-to-back is shown too.\n",
           f"Link limit (measured, this run): peer copy {fmt(link.get('peer_copy_gbps'))} GB/s "
           f"GPU{coll['gpus'][0]}->GPU{coll['gpus'][1]}, {fmt(link.get('peer_copy_reverse_gbps'))} GB/s back.\n",
           "References:\n",
           "- ours: " + ((coll.get("ours") or {}).get("method") or "not run"),
           "- collective(): " + ((coll.get("ours_call") or {}).get("method") or "not run"),
           "- default: " + ((coll.get("ours_default") or {}).get("method") or "not run"),
           reference_line("raw NCCL", coll.get("raw") or {}),
           reference_line("sample_dist_collective", coll.get("sample") or {}),
           reference_line("nccl-tests", coll.get("nccl_tests") or {}), ""]
    if (coll.get("ours") or {}).get("stopped"):
        out.append(f"Ours stopped early: {coll['ours']['stopped']}.\n")
    out.append(image(plots, "collectives_busbw", base))
    out.append(image(plots, "collectives_latency", base))
    for op in coll.get("ops") or []:
        s = collective_series(coll, op)
        rows = []
        for size in table_sizes(s["ours"]):
            o, r, b = s["ours"].get(size), s["raw_percall"].get(size), s["raw_batched"].get(size)
            c = s["ours_call"].get(size)
            d = s["ours_default"].get(size)
            ratio = o["busbw_gbps"] / r["busbw_gbps"] if o and r else None
            ratio_b = o["busbw_gbps"] / b["busbw_gbps"] if o and b else None
            added = o["time_us"] - r["time_us"] if o and r else None
            if size >= bl.LARGE_BYTES:
                target = yes_no(None if ratio is None else ratio >= BUSBW_RATIO_MIN) + " (>= 97%)"
            elif size == bl.SMALL_BYTES:
                target = yes_no(None if added is None else added <= ADDED_LATENCY_MAX_US) + " (<= 10 us)"
            else:
                target = "-"
            rows.append([bl.format_size(size), fmt(o and o["time_us"]), fmt(c and c["time_us"]), fmt(d and d["time_us"]),
                         fmt(r and r["time_us"]),
                         fmt(added, 1),
                         fmt(o and o["busbw_gbps"]), fmt(r and r["busbw_gbps"]), fmt(b and b["busbw_gbps"]), pct(ratio),
                         pct(ratio_b), target])
        out.append(f"### {op}\n")
        out.append(md_table(["size", "ours (us)", "collective() (us)", f"{op}(x) (us)", "raw (us)", "added (us)",
                             "ours busbw", "raw busbw", "raw b2b busbw", "ours/raw", "ours/raw b2b", "target met"],
                            rows) + "\n")
    out.append(entry_points_section(coll))
    out.append(percall_spread_section(coll))
    other = []
    for op in coll.get("ops") or []:
        s = collective_series(coll, op)
        for size in sorted(set(s["sample"]) | set(s["nccl_tests"])):
            sp, nt, b = s["sample"].get(size), s["nccl_tests"].get(size), s["raw_batched"].get(size)
            if size not in bl.TABLE_SIZES and not sp:
                continue
            other.append([op, bl.format_size(size), fmt(sp and sp["busbw_gbps"]), fmt(nt and nt["busbw_gbps"]),
                          fmt(b and b["busbw_gbps"]),
                          pct(sp["busbw_gbps"] / nt["busbw_gbps"] if sp and nt else None),
                          pct(sp["busbw_gbps"] / b["busbw_gbps"] if sp and b else None)])
    if other:
        out.append("### sample_dist_collective and nccl-tests (bus bandwidth, GB/s)\n")
        out.append("Both time ops back to back on the device, so they are compared with each other and with raw "
                   "back-to-back.\n")
        out.append(md_table(["op", "size", "sample --backend nccl", "nccl-tests", "raw b2b", "sample/nccl-tests",
                             "sample/raw b2b"], other) + "\n")
    return "\n".join(out)


def percall_spread_section(coll: dict) -> str:
    """p10 / median / p90 of ours and raw per call at >= 64 MiB: a median far above its p10 while
    raw's spread is narrow shows calls delayed now and then (a rank thread waking late), which the
    medians alone hide."""
    rows = []
    for op in coll.get("ops") or []:
        s = collective_series(coll, op)
        for size in table_sizes(s["ours"]):
            o, r = s["ours"].get(size), s["raw_percall"].get(size)
            if size < bl.LARGE_BYTES or not o or "p10_us" not in o:
                continue
            spread = [fmt(o.get("p10_us")), fmt(o.get("median_us")), fmt(o.get("p90_us"))]
            raw = [fmt(r.get("p10_us")), fmt(r.get("median_us")), fmt(r.get("p90_us"))] if r and "p10_us" in r else [NA] * 3
            rows.append([op, bl.format_size(size), " / ".join(spread), " / ".join(raw), fmt(o.get("iterations"), 0)])
    if not rows:
        return ""
    return ("### Per-call spread at >= 64 MiB\n\nOurs (`prepare_collective(out=)`, `call; synchronize`) and raw "
            "NCCL per call: p10 / median / p90 of the host-timed calls (us).\n\n"
            + md_table(["op", "size", "ours p10 / median / p90", "raw p10 / median / p90", "calls"], rows) + "\n")


def entry_points_section(coll: dict) -> str:
    """Every entry point at the sizes where the targets are read: median per call and the time
    added over raw NCCL per call (torch.distributed)."""
    entries = (coll.get("entry_points") or {})
    labels = entries.get("labels") or {}
    points = entries.get("points") or {}
    if not any(points.values()):
        return ""
    raw = (coll.get("raw") or {}).get("raw_percall") or {}
    sizes = sorted({p["size"] for pts in points.values() for p in pts})
    header = ["op", "entry point"] + [f"{bl.format_size(z)} (us)" for z in sizes] + \
        [f"added at {bl.format_size(z)} (us)" for z in sizes]
    rows = []
    for op, pts in points.items():
        by = {p["size"]: p for p in pts}
        raw_by = by_size(raw.get(op))
        for key, label in labels.items():
            times = [by.get(z, {}).get(key, {}).get("time_us") for z in sizes]
            added = [t - raw_by[z]["time_us"] if t is not None and z in raw_by else None for t, z in zip(times, sizes)]
            rows.append([op, f"`{label.replace('<op>', op)}`"] + [fmt(t) for t in times] + [fmt(a) for a in added])
    return ("### Every entry point\n\n" + entries.get("method", "") + ": torch CUDA tensors in unless numpy is "
            "named (numpy calls include the host copies in and out). Added: over raw NCCL per call.\n\n"
            + md_table(header, rows) + "\n")


FANOUT_ROWS = (("runner", "EngineRunner.infer(inputs, outputs=...)", FANOUT_INFER_MAX_US),
               ("prepared", "EngineRunner.prepare(inputs, outputs=...)()", FANOUT_PREPARE_MAX_US),
               ("runner_default", "EngineRunner.infer(inputs)", FANOUT_INFER_MAX_US),
               ("prepared_default", "EngineRunner.prepare(inputs)()", FANOUT_PREPARE_MAX_US),
               ("runner_numpy", "EngineRunner.infer(numpy)", None))


def fanout_section(fan: dict, plots: dict, base: str) -> str:
    if not fan or fan.get("error") or not fan.get("runner"):
        return "## 2. Fan-out overhead\n\nNot measured" + (f": {fan.get('error')}" if fan else "") + ".\n"
    bare = fan["bare"]
    rows = [["bare loop (C++, 1 GPU)", fmt(bare["median_us"]), fmt(bare.get("p10_us")), fmt(bare.get("p90_us")), "-", "reference"]]
    for n, b in sorted((fan.get("bare_by_gpus") or {}).items(), key=lambda kv: int(kv[0])):
        if int(n) > 1:
            rows.append([f"bare loop (C++, {n} GPUs)", fmt(b["median_us"]), fmt(b.get("p10_us")), fmt(b.get("p90_us")),
                         fmt(b["median_us"] - bare["median_us"], 1), f"reference for N={n}"])
    by_gpus = fan.get("bare_by_gpus") or {}
    launches = fan.get("bare_launch_by_gpus") or {}
    for n, t in sorted(launches.items(), key=lambda kv: int(kv[0])):
        rows.append([f"bare launch from Python + synchronize of each GPU ({n} GPU{'s' if int(n) > 1 else ''})",
                     fmt(t["median_us"]), fmt(t.get("p10_us")), fmt(t.get("p90_us")),
                     fmt(t["median_us"] - (by_gpus.get(n) or bare)["median_us"], 1), f"reference for N={n}"])
    torch_loops = fan.get("torch_loop_by_gpus") or ({"1": fan["torch_loop"]} if fan.get("torch_loop") else {})
    for n, t in sorted(torch_loops.items(), key=lambda kv: int(kv[0])):
        reference = (launches.get(n) or by_gpus.get(n) or bare)["median_us"]
        rows.append([f"torch copy_ + synchronize of each GPU (Python, {n} GPU{'s' if int(n) > 1 else ''})",
                     fmt(t["median_us"]), fmt(t.get("p10_us")), fmt(t.get("p90_us")),
                     fmt(t["median_us"] - reference, 1), "-"])
    for key, label, limit in FANOUT_ROWS:
        for n, r in sorted((fan.get(key) or {}).items(), key=lambda kv: int(kv[0])):
            target = (yes_no(r["added_us"] <= limit) + f" (<= {limit:.0f} us)") if limit and int(n) >= 2 else "-"
            rows.append([f"{label}, N={n}", fmt(r["median_us"]), fmt(r.get("p10_us")), fmt(r.get("p90_us")),
                         fmt(r["added_us"], 1), target])
    return ("## 2. Fan-out overhead\n\n"
            f"A trivial program (a {bl.format_size(fan.get('nbytes', 0))} device-to-device copy per GPU; torch CUDA "
            "tensors in, preallocated outputs with outputs=, torch outputs from torch's allocator without); "
            f"{fan.get('rounds')} alternating rounds of {fan.get('iterations')} calls. Added = median per call minus "
            + ("the median of the bare launch on the same N GPUs: the same copies queued by one C++ call from "
               "Python, then the synchronize of each GPU from Python that the runner's calls are timed with (the "
               "caller's, paid with or without mdtrt). The bare C++ loops (one thread, no Python: the copies, then "
               "a cudaStreamSynchronize of each) are shown for scale: the loop row's added column is over the "
               "one-GPU loop, the bare launch row's over the loop on the same GPUs (the synchronize from Python). "
               "The torch rows do the same copies through torch (a user's own loop); their added column is over "
               "the bare launch.\n\n" if launches else
               "the median of the bare loop on the same N GPUs (one thread: a copy on each GPU, then a synchronize "
               "of each); the bare rows' added column is over the one-GPU loop. The torch rows do the same copies "
               "through torch with the synchronize the runner's calls are timed with (from Python): their added "
               "time is torch's, not mdtrt's.\n\n" if fan.get("bare_by_gpus") else
               "the bare loop's median.\n\n")
            + md_table(["what", "median (us)", "p10 (us)", "p90 (us)", "added (us)", "target met"], rows) + "\n\n"
            + image(plots, "fanout", base))


def replication_section(repl: dict, plots: dict, base: str) -> str:
    points = (repl or {}).get("points") or []
    if not points:
        return "## 3. Input replication\n\nNot measured" + (f": {repl.get('error')}" if repl else "") + ".\n"
    rows = []
    for p in points:
        if p["size"] not in bl.TABLE_SIZES and len(points) > 7:
            continue
        for kind in ("pinned", "pageable"):
            k = p[kind]
            best = min(("host", "peer", "broadcast"), key=lambda m: k[m]["median_us"])
            slowdown = k["auto"]["median_us"] / k[best]["median_us"]
            rows.append([bl.format_size(p["size"]), kind, fmt(k["host"]["gbps"]), fmt(k["peer"]["gbps"]),
                         fmt(k["broadcast"]["gbps"]), f"{fmt(k['auto']['gbps'])} ({k['auto_choice']})",
                         f"{100 * (slowdown - 1):+.1f}% vs {best}",
                         yes_no(slowdown <= AUTO_SLOWDOWN_MAX),
                         pct(k[best]["gbps"] / p["peer_copy_gbps"]),  # the fastest mode moves the most GB/s
                         pct(k[best]["gbps"] / p[f"h2d_{kind}_gbps"])])
    def b2b(p):
        return (p.get("device_input_batched") or {}).get("gbps")

    dev_rows = [[bl.format_size(p["size"]), fmt(p["device_input"]["gbps"]), fmt(b2b(p)), fmt(p["peer_copy_gbps"]),
                 pct(p["device_input"]["gbps"] / p["peer_copy_gbps"]),
                 pct(b2b(p) / p["peer_copy_gbps"]) if b2b(p) else NA,
                 yes_no(p["device_input"]["gbps"] / p["peer_copy_gbps"] >= PEER_RATIO_MIN) + " (>= 90%)"
                 if p["size"] >= bl.LARGE_BYTES else "-"]
                for p in points if p["size"] in bl.TABLE_SIZES or len(points) <= 7]
    ref_rows = [[bl.format_size(p["size"]), fmt(p["peer_copy_gbps"]), fmt(p["h2d_pinned_gbps"]), fmt(p["h2d_pageable_gbps"])]
                for p in points if p["size"] in bl.TABLE_SIZES or len(points) <= 7]
    return ("## 3. Input replication\n\n"
            "One input delivered to every GPU, through `EngineRunner.infer` of a program that does nothing. Bandwidth = "
            "input bytes / median call time (each GPU receives them all). auto: the runner's own choice (in brackets), "
            "checked against the fastest of the three modes at the same size.\n\n"
            "References measured in the same run (GB/s):\n\n"
            + md_table(["size", "peer copy GPU0->GPU1", "pinned H2D", "pageable H2D"], ref_rows) + "\n\n"
            "Host inputs (GB/s):\n\n"
            + md_table(["size", "host memory", "host", "peer", "broadcast", "auto (choice)", "auto vs best",
                        "auto within 5%", "best / peer copy", "best / H2D of its kind"], rows) + "\n\n"
            "A device input on the first GPU, copied peer-to-peer to the others by the runner, per call "
            "(`call; synchronize`) and back to back (stream-ordered calls, then one synchronize):\n\n"
            + md_table(["size", "GB/s per call", "GB/s back to back", "peer copy GB/s", "ratio per call",
                        "ratio back to back", "target met (per call)"], dev_rows) + "\n\n"
            + image(plots, "replication", base))


def bringup_section(b: dict) -> str:
    if not b or b.get("error") or "in_process" not in b:
        return "## 4. Bring-up\n\nNot measured" + (f": {b.get('error')}" if b else "") + ".\n"
    ip, fx, td = b["in_process"], b.get("file_exchange") or {}, b.get("torch_distributed") or {}
    warm = ip["warm_median_s"]
    rows = [[f"DeviceGroup(gpus=...) in one process, warm (median of {len(ip['warm_s'])})", fmt(warm * 1e3), "-", "reference"],
            ["DeviceGroup(gpus=...) in one process, cold (first: CUDA contexts, NCCL load)", fmt(ip["cold_s"] * 1e3), "-",
             f"{ip['cold_s'] / warm:.1f}x"]]
    for name, info in (("file exchange: DeviceGroup.from_env(), one process per GPU", fx),
                       ("torch.distributed init + first all_reduce, one process per GPU", td)):
        if info.get("group_median_s") is not None:
            rows.append([name, fmt(info["group_median_s"] * 1e3), fmt(info["wall_median_s"] * 1e3),
                         f"{info['group_median_s'] / warm:.1f}x"])
        else:
            reason = info.get("reason") or ("failed: " + "; ".join(" ".join(e.get("stderr") or []) for e in info.get("errors", [])))
            rows.append([name, NA, NA, reason or NA])
    return ("## 4. Bring-up\n\n"
            f"Time to a ready group of {b.get('world_size')} GPUs. \"Group\" is the creation call itself (slowest rank); "
            "\"wall\" runs from starting the processes to every rank ready (interpreter, imports, CUDA, NCCL). No "
            "target: the ratio is to the warm in-process creation.\n\n"
            + md_table(["path", "group (ms)", "wall (ms)", "ratio to in-process warm"], rows) + "\n")


def render_markdown(results: dict, markdown_path: str, results_path: str | None = None) -> str:
    """The whole BENCHMARKS.md. Plot paths in results are relative to results.json's folder."""
    json_dir = os.path.dirname(os.path.abspath(results_path)) if results_path else os.getcwd()
    base = os.path.relpath(json_dir, os.path.dirname(os.path.abspath(markdown_path)) or ".")
    plots = results.get("plots") or {}
    machine = results.get("machine") or {}
    verdicts = evaluate_targets(results)
    parts = ["# mdtrt benchmarks\n",
             f"Measured {machine.get('date') or results.get('started') or NA} with `{results.get('command', 'python benchmarks/run_all.py')}`"
             f"{' (quick mode: fewer sizes and iterations)' if results.get('quick') else ''}. Every number below was "
             "measured in that one run; references that could not be measured say so.\n",
             machine_section(machine), summary_section(verdicts),
             collectives_section(results.get("collectives") or {}, plots, base),
             fanout_section(results.get("fanout") or {}, plots, base),
             replication_section(results.get("replication") or {}, plots, base),
             bringup_section(results.get("bringup") or {})]
    if results.get("context_parallel"):
        parts.append(context_parallel_section(results["context_parallel"], plots, base))
    durations = results.get("durations_s") or {}
    if durations:
        parts.append("## Run\n\n" + md_table(["benchmark", "seconds", "status"],
                                            [[k, fmt(v, 1), (results.get(k) or {}).get("error", "ok") if isinstance(results.get(k), dict) else "ok"]
                                             for k, v in durations.items()]) + "\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    results = bl.read_json(args.results)
    if args.render_plots:
        try:
            import matplotlib  # noqa: F401 - only to fail before anything is written
        except ImportError:
            print("report.py: --render-plots needs matplotlib (pip install matplotlib, or pip install '.[bench]'); "
                  "nothing was written", file=sys.stderr)
            return 2
        import plots

        drawn = plots.render_all(results, os.path.dirname(os.path.abspath(args.results)))
        # Plots drawn now replace their own entries; a plot that failed keeps the one it had.
        results["plots"] = {**(results.get("plots") or {}), **drawn}
        bl.write_json(args.results, results)
    text = render_markdown(results, args.markdown, args.results)
    with open(args.markdown, "w") as f:
        f.write(text)
    verdicts = evaluate_targets(results)
    print(f"wrote {args.markdown}: {sum(v['met'] is True for v in verdicts)} targets met, "
          f"{sum(v['met'] is False for v in verdicts)} missed, {sum(v['met'] is None for v in verdicts)} not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
