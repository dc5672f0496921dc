"""PNG plots of results.json: bus bandwidth against size per collective (ours, raw, the other
references, and the measured link limit), small-size latency, replication bandwidth, fan-out.
Needs matplotlib (pip install matplotlib, or pip install '.[bench]' in mdtrt's source folder); draws off-screen."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

SERIES_STYLE = {"ours": ("ours (prepare_collective, per call)", "C0", "o-"),
                "ours_call": ("ours (collective(), per call)", "C5", "v-"),
                "ours_default": ("ours (default: group.<op>(x), no out=)", "C6", "P-"),
                "ours_batched": ("ours (prepare_collective, back to back)", "C7", "o:"),
                "ours_default_batched": ("ours (default group.<op>(x), back to back)", "C8", "P:"),
                "raw_percall": ("raw NCCL (torch, per call)", "C1", "s--"),
                "raw_batched": ("raw NCCL (torch, back to back)", "C2", "^:"),
                "sample": ("sample_dist_collective --backend nccl", "C3", "D"),
                "nccl_tests": ("nccl-tests", "C4", "x-.")}



def _save_op_grid(plt, fig, axes, used: int, title: str, out_dir: str, name: str) -> str:
    """Hides the unused panels of a one-panel-per-op grid, adds the shared legend and title, saves."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _size_axis(ax) -> None:
    ax.set_xscale("log", base=2)
    ticks = [t for t in (bl.KiB, 16 * bl.KiB, 256 * bl.KiB, 4 * bl.MiB, 64 * bl.MiB, bl.GiB)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([bl.format_size(t).replace(" ", "") for t in ticks], fontsize=7)
    ax.grid(True, which="both", alpha=0.3)


def plot_collectives(coll: dict, out_dir: str) -> dict:
    from report import collective_series

    plt = _pyplot()
    ops = coll.get("ops") or []
    if not ops:
        return {}
    files = {}
    link = (coll.get("link_limit") or {}).get("peer_copy_gbps")
    cols = 4
    rows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        s = collective_series(coll, op)
        for key, (label, color, style) in SERIES_STYLE.items():
            pts = sorted(s[key].items())
            if pts:
                ax.plot([k for k, _ in pts], [p["busbw_gbps"] for _, p in pts], style, color=color, label=label,
                        markersize=3)
        if link:
            ax.axhline(link, color="k", linewidth=1, alpha=0.7, label=f"peer copy (measured) {link:.0f} GB/s")
        _size_axis(ax)
        ax.set_title(op, fontsize=10)
        ax.set_ylabel("bus bandwidth (GB/s)", fontsize=8)
    files["collectives_busbw"] = _save_op_grid(
        plt, fig, axes, len(ops), f"Bus bandwidth vs size, {coll.get('world_size')} GPUs, {coll.get('dtype')}",
        out_dir, "collectives_busbw.png")

    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        s = collective_series(coll, op)
        for key in ("ours", "ours_call", "ours_default", "raw_percall", "raw_batched"):
            label, color, style = SERIES_STYLE[key]
            pts = [(k, p) for k, p in sorted(s[key].items()) if k <= 4 * bl.MiB]
            if pts:
                ax.plot([k for k, _ in pts], [p["time_us"] for _, p in pts], style, color=color, label=label, markersize=3)
        _size_axis(ax)
        ax.set_title(op, fontsize=10)
        ax.set_ylabel("time per op (us)", fontsize=8)
    files["collectives_latency"] = _save_op_grid(plt, fig, axes, len(ops), "Latency at small sizes (median)",
                                                 out_dir, "collectives_latency.png")
    return files


def plot_replication(repl: dict, out_dir: str) -> dict:
    points = [p for p in (repl or {}).get("points") or [] if "pinned" in p]
    if not points:
        return {}
    plt = _pyplot()
    sizes = [p["size"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, kind in zip(axes, ("pinned", "pageable")):
        for mode, style in (("host", "o-"), ("peer", "s-"), ("broadcast", "^-"), ("auto", "k.--")):
            ax.plot(sizes, [p[kind][mode]["gbps"] for p in points], style, label=mode, markersize=4)
        ax.plot(sizes, [p["device_input"]["gbps"] for p in points], "v-", color="C5", label="device input (peer)")
        ax.plot(sizes, [p["peer_copy_gbps"] for p in points], "-", color="k", alpha=0.6, label="peer copy (measured)")
        ax.plot(sizes, [p["h2d_pinned_gbps"] for p in points], "-", color="C7", label="pinned H2D (measured)")
        ax.plot(sizes, [p["h2d_pageable_gbps"] for p in points], ":", color="C7", label="pageable H2D (measured)")
        _size_axis(ax)
        ax.set_yscale("log")
        ax.set_title(f"{kind} host input")
        ax.set_ylabel("input bytes / call time (GB/s)")
    axes[1].legend(fontsize=7)
    fig.suptitle("Input replication to every GPU")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "replication.png"), dpi=110)
    plt.close(fig)
    return {"replication": "replication.png"}


def plot_fanout(fan: dict, out_dir: str) -> dict:
    if not fan or not fan.get("runner"):
        return {}
    plt = _pyplot()
    # The references on each N: the bare C++ loop, the bare launch from Python with the runner's
    # synchronize (what the targets are over) and the same copies through torch (older results:
    # fewer of them).
    bare = fan.get("bare_by_gpus") or {"1": fan["bare"]}
    launches = fan.get("bare_launch_by_gpus") or {}
    torch_loops = fan.get("torch_loop_by_gpus") or ({"1": fan["torch_loop"]} if fan.get("torch_loop") else {})
    labels, values, colors = [], [], []
    for name, loops, color in (("bare C++ loop", bare, "C7"), ("bare launch\n+ Python sync", launches, "C9"),
                               ("torch loop", torch_loops, "C8")):
        for n in sorted(loops, key=int):
            labels.append(f"{name}\nN={n}")
            values.append(loops[n]["median_us"])
            colors.append(color)
    # The default calls (no outputs=) beside the ones with preallocated outputs.
    for key, label, color in (("runner", "infer(outputs=)", "C0"), ("runner_default", "infer()", "C6"),
                              ("prepared", "prepare(outputs=)()", "C1"), ("prepared_default", "prepare()()", "C3")):
        for n in sorted(fan.get(key) or {}, key=int):
            labels.append(f"{label}\nN={n}")
            values.append(fan[key][n]["median_us"])
            colors.append(color)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 3.8))
    bars = ax.bar(labels, values, color=colors)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    reference, what = (launches, "bare launch") if launches else (bare, "bare")
    widest = max(reference, key=int)
    ax.axhline(reference[widest]["median_us"] + 15, color="r", linestyle="--", linewidth=1,
               label=f"{what} N={widest} + 15 us (infer target)")
    ax.axhline(reference[widest]["median_us"] + 10, color="m", linestyle=":", linewidth=1,
               label=f"{what} N={widest} + 10 us (prepare target)")
    ax.set_ylabel("median time per call (us)")
    ax.legend(fontsize=8)
    ax.set_title(f"Fan-out overhead, {bl.format_size(fan.get('nbytes', 0))} copy per GPU")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fanout.png"), dpi=110)
    plt.close(fig)
    return {"fanout": "fanout.png"}


def plot_context_parallel(cp: dict, out_dir: str) -> dict:
    """Speedup over one GPU against sequence length, one line per strategy."""
    points = cp.get("points") or []
    if not points:
        return {}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for index, name in enumerate(cp.get("config", {}).get("strategies") or []):
        xs = [p["sequence"] for p in points if "speedup" in p["strategies"].get(name, {})]
        ys = [p["strategies"][name]["speedup"] for p in points if "speedup" in p["strategies"].get(name, {})]
        if xs:
            ax.plot(xs, ys, "o-", color=f"C{index}", label=name)
    ranks = len(cp.get("config", {}).get("gpus") or [2])
    ax.axhline(ranks, color="k", linestyle=":", linewidth=1, label=f"ideal ({ranks}x)")
    ax.axhline(1.9 * ranks / 2, color="r", linestyle="--", linewidth=1, label="target at 56320 (1.9x on 2 GPUs)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel(f"speedup over one GPU ({ranks} GPUs)")
    ax.legend(fontsize=8)
    ax.set_title(f"Context-parallel attention, {cp.get('config', {}).get('heads')} heads x "
                 f"{cp.get('config', {}).get('head_dim')}, float16")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "context_parallel_speedup.png"), dpi=110)
    plt.close(fig)
    return {"context_parallel_speedup": "context_parallel_speedup.png"}


def render_all(results: dict, out_dir: str) -> dict:
    """Draws every plot the results allow; returns {name: file relative to out_dir}."""
    files = {}
    for key, fn in (("collectives", plot_collectives), ("replication", plot_replication), ("fanout", plot_fanout),
                    ("context_parallel", plot_context_parallel)):
        part = results.get(key)
        if isinstance(part, dict) and not part.get("error"):
            try:
                files.update(fn(part, out_dir))
            except Exception as error:  # noqa: BLE001 - one broken plot must not lose the others
                files[f"{key}_error"] = None
                print(f"plot {key} failed: {type(error).__name__}: {error}", file=sys.stderr)
    return {k: v for k, v in files.items() if v}


if __name__ == "__main__":
    sys.exit("plots.py is a module: draw the plots with "
             "`python benchmarks/report.py results/results.json --markdown BENCHMARKS.md --render-plots`")
