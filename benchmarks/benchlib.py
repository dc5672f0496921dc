"""Shared pieces of the benchmark scripts: sizes, nccl-tests' bandwidth conventions, timing
statistics, subprocesses with deadlines and the machine description.

Importing this module needs neither a GPU, torch nor mdtrt (CI imports every script and runs
``--help``); the GPU-side imports happen inside the functions that use them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

# NVLink multicast (NVLS) stays off on the shared machines: set before anything loads NCCL, and
# handed to every process we start.
os.environ["NCCL_NVLS_ENABLE"] = "0"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "reduce", "reduce_scatter", "all_to_all", "gather", "scatter")
DTYPE = "float16"
ITEMSIZE = 2

QUICK_SIZES = (1 * KiB, 64 * KiB, 1 * MiB, 64 * MiB, 256 * MiB)
# Rows of the BENCHMARKS.md tables; the plots show every measured size.
TABLE_SIZES = (1 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB)
# Sizes from which the bandwidth targets apply ("large" inputs).
LARGE_BYTES = 64 * MiB
# The latency target is read at the smallest size.
SMALL_BYTES = 1 * KiB


def full_sizes(step: int = 2, lo: int = 1 * KiB, hi: int = 1 * GiB) -> list[int]:
    """Geometric sizes lo, lo*step, ... up to hi, inclusive."""
    sizes, s = [], lo
    while s <= hi:
        sizes.append(s)
        s *= step
    return sizes


def parse_size(text: str) -> int:
    """'1K', '64KiB', '1M', '256MiB', '1G', '4096' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 1K, 64M, 1G)")
    return int(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB}[m.group(2).upper()]


def parse_sizes(text: str) -> list[int]:
    return sorted({parse_size(part) for part in text.split(",") if part.strip()})


def format_size(nbytes: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{int(nbytes // scale)} {unit}"
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def parse_gpus(text: str) -> list[int]:
    gpus = [int(x) for x in text.split(",") if x.strip()]
    if len(gpus) != len(set(gpus)) or any(g < 0 for g in gpus):
        raise ValueError(f"--gpus takes distinct non-negative ids, got {text!r}")
    return gpus


# -- nccl-tests' conventions (doc/PERFORMANCE.md and src/<op>.cu of NVIDIA/nccl-tests) ----------
# S, the "size" nccl-tests prints, is the larger of a rank's send and receive buffers: the whole
# output for all_gather and gather, the whole input for reduce_scatter and scatter.

def bus_factor(op: str, n: int) -> float:
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("broadcast", "reduce"):
        return 1.0
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        return (n - 1) / n
    raise ValueError(f"unknown collective {op!r}")


def buffer_elements(op: str, size_bytes: int, n: int, itemsize: int = ITEMSIZE) -> tuple[int, int]:
    """(input, output) elements per rank of `op` whose nccl-tests size is `size_bytes`."""
    total = size_bytes // itemsize
    if total % n:
        raise ValueError(f"{size_bytes} bytes of {itemsize}-byte elements do not split over {n} ranks")
    if op in ("all_gather", "gather"):
        return total // n, total
    if op in ("reduce_scatter", "scatter"):
        return total, total // n
    return total, total


def algbw_gbps(size_bytes: float, seconds: float) -> float:
    return size_bytes / seconds / 1e9


def busbw_gbps(op: str, size_bytes: float, seconds: float, n: int) -> float:
    return algbw_gbps(size_bytes, seconds) * bus_factor(op, n)


def point(op: str | None, size_bytes: int, seconds: float, n: int, **extra) -> dict:
    """One measured size of one series: time in microseconds and both bandwidths (GB/s)."""
    p = {"size": int(size_bytes), "time_us": seconds * 1e6, "algbw_gbps": algbw_gbps(size_bytes, seconds)}
    if op is not None:
        p["busbw_gbps"] = busbw_gbps(op, size_bytes, seconds, n)
    p.update(extra)
    return p


# -- timing -------------------------------------------------------------------------------------

def summarize(seconds: Sequence[float]) -> dict:
    """Median (what we compare), mean, min and the 10th/90th percentiles, in microseconds."""
    xs = sorted(seconds)
    if not xs:
        return {}

    def pct(q: float) -> float:
        return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] * 1e6

    return {"median_us": statistics.median(xs) * 1e6, "mean_us": statistics.fmean(xs) * 1e6, "min_us": xs[0] * 1e6,
            "p10_us": pct(0.1), "p90_us": pct(0.9), "iterations": len(xs)}


def iterations_for(estimate_s: float, target_s: float, lo: int, hi: int) -> int:
    """Enough iterations to spend about `target_s`, within [lo, hi]."""
    if estimate_s <= 0:
        return hi
    return int(max(lo, min(hi, target_s / estimate_s)))


def time_calls(fn, iterations: int) -> list[float]:
    """Seconds of each of `iterations` calls of `fn` (a host-synchronous call)."""
    times = []
    clock = time.perf_counter
    for _ in range(iterations):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def time_interleaved(calls: dict, counts: dict, rounds: int) -> dict:
    """Seconds of each call of each of `calls` ({key: fn}), ``counts[key]`` calls of each spread
    over `rounds` slices (at least one call per slice), and each slice starting one key later than
    the one before: drift, and the position in a slice, hit every key alike (a fixed order let one
    mode of the same code measure 3-8% slower than another, 2x H200). {key: [seconds, ...]}."""
    keys = list(calls)
    times: dict = {key: [] for key in keys}
    for r in range(rounds):
        start = r % len(keys)
        for key in keys[start:] + keys[:start]:
            times[key] += time_calls(calls[key], max(1, counts[key] // rounds))
    return times


def gpu_sync(torch, gpus):
    """A function that waits until every GPU in `gpus` has finished its queued work."""
    def sync():
        for g in gpus:
            torch.cuda.synchronize(g)
    return sync


def synced(fn, sync):
    """`fn` then `sync()`: a stream-ordered call (it returns once queued) timed until the GPUs
    finished it, the host-synchronous pattern of the raw references (``op; synchronize``)."""
    def call():
        fn()
        sync()
    return call


def time_back_to_back(fn, sync, iterations: int, rounds: int = 3) -> list[float]:
    """Seconds per call of `fn` called `iterations` times back to back, then `sync()` (which waits
    for the GPUs), in `rounds` measurements: the throughput of stream-ordered calls, as
    nccl-tests and the raw back-to-back series measure it (no host round trip per call)."""
    per_call = []
    clock = time.perf_counter
    for _ in range(rounds):
        sync()
        start = clock()
        for _ in range(iterations):
            fn()
        sync()
        per_call.append((clock() - start) / iterations)
    return per_call


def readiness(gpus: list[int], torch_needed: bool = True, minimum: int = 1) -> str | None:
    """Why a benchmark cannot run on this machine (one sentence), or None.

    Parameters
    ----------
    gpus : list of int
        The GPU ids the benchmark would use.
    torch_needed : bool
        The benchmark uses PyTorch (CUDA tensors, CUDA events, torch.distributed as the reference).
    minimum : int
        The fewest GPUs it runs on.
    """
    import importlib.util

    if torch_needed and importlib.util.find_spec("torch") is None:
        return ("needs PyTorch with CUDA (pip install torch, or pip install '.[bench]'): the benchmarks pass torch "
                "CUDA tensors and time with CUDA events")
    try:
        from mdtrt import _core
    except ImportError as error:
        return f"needs mdtrt installed ({error})"
    count = _core.visible_gpu_count()
    if count < max(minimum, len(gpus)) or any(g >= count for g in gpus):
        return (f"needs {max(minimum, len(gpus))} CUDA GPUs ({gpus}); {count} visible "
                "(`python -m mdtrt doctor` says why)")
    return None


def exit_unless_ready(name: str, gpus: list[int], torch_needed: bool = True, minimum: int = 1) -> None:
    """Exits with status 2 and one line on stderr when :func:`readiness` names a reason."""
    reason = readiness(gpus, torch_needed, minimum)
    if reason:
        print(f"{name}: cannot run: {reason}", file=sys.stderr)
        raise SystemExit(2)


class Deadline:
    """A wall-clock budget shared by the steps of a benchmark."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


# -- processes ----------------------------------------------------------------------------------

def nccl_wheel_lib_dirs() -> list[str]:
    try:
        from mdtrt.nccl import wheel_library_dirs

        return wheel_library_dirs()
    except Exception:  # noqa: BLE001 - mdtrt missing: the loader's own search applies
        return []


def subprocess_env(**extra: str) -> dict[str, str]:
    """Our environment with NVLS off, no launcher variables left over, and the NCCL of the
    nvidia-nccl wheel on the loader path (so C++ programs use the NCCL that Python uses)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRT_")}
    env["NCCL_NVLS_ENABLE"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    libs = nccl_wheel_lib_dirs()
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env.update(extra)
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we created for this child only
    except (ProcessLookupError, PermissionError):
        pass


def run_command(cmd: Sequence[str], timeout: float, env: dict | None = None, cwd: str | None = None) -> dict:
    """Runs `cmd` to completion or kills it (and its children) after `timeout` seconds."""
    start = time.monotonic()
    try:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env or subprocess_env(), cwd=cwd, start_new_session=True)
    except OSError as error:
        return {"cmd": list(cmd), "rc": None, "stdout": "", "stderr": str(error), "timed_out": False, "seconds": 0.0}
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate(timeout=30)
        timed_out = True
    return {"cmd": list(cmd), "rc": proc.returncode, "stdout": out, "stderr": err, "timed_out": timed_out,
            "seconds": time.monotonic() - start}


def run_parallel(cmds: Sequence[Sequence[str]], timeout: float, envs: Sequence[dict]) -> list[dict]:
    """Starts every command at once (the ranks of one world) and waits for all, `timeout` in total.
    When one fails or the time is up, the others are killed: they would wait for it forever."""
    start = time.monotonic()
    procs = [subprocess.Popen(list(c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                              start_new_session=True) for c, e in zip(cmds, envs)]
    deadline = start + timeout
    timed_out = False
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            timed_out = True
            break
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(2.0)  # let the others print their own error first
            break
        time.sleep(0.05)
    results = []
    for cmd, p in zip(cmds, procs):
        if p.poll() is None:
            _kill_group(p)
        out, err = p.communicate(timeout=30)
        results.append({"cmd": list(cmd), "rc": p.returncode, "stdout": out, "stderr": err, "timed_out": timed_out,
                        "seconds": time.monotonic() - start})
    return results


def tail(text: str | None, lines: int = 15) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


# -- results ------------------------------------------------------------------------------------

def write_json(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _nvidia_smi(*args: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    r = run_command([exe, *args], timeout=30)
    return r["stdout"] if r["rc"] == 0 else None


def machine_info(gpus: Iterable[int] | None = None) -> dict:
    """What the numbers were measured on. Every field is what this machine reports, or None."""
    info: dict = {"date": utc_now(), "hostname": platform.node(), "python": platform.python_version(),
                  "gpus_used": list(gpus) if gpus is not None else None}
    query = _nvidia_smi("--query-gpu=index,name,driver_version,memory.total,pci.bus_id", "--format=csv,noheader")
    if query:
        rows = [[c.strip() for c in line.split(",")] for line in query.strip().splitlines()]
        info["gpu_list"] = [{"index": r[0], "name": r[1], "memory": r[3], "pci_bus_id": r[4]} for r in rows if len(r) >= 5]
        info["gpu_names"] = sorted({r[1] for r in rows if len(r) >= 2})
        info["gpu_count"] = len(rows)
        info["driver"] = rows[0][2] if rows and len(rows[0]) > 2 else None
    header = _nvidia_smi()
    m = re.search(r"CUDA Version:\s*([\d.]+)", header or "")
    info["cuda_driver_api"] = m.group(1) if m else None
    info["topology"] = _nvidia_smi("topo", "-m")
    info["nvlink_status"] = _nvidia_smi("nvlink", "-s")
    try:
        import mdtrt
        from mdtrt import _core

        info["mdtrt_version"] = mdtrt.__version__
        info["mdtrt_build"] = mdtrt.build_info()
        cuda = dict(_core.query_cuda())
        info["cuda_runtime"] = _cuda_version_text(cuda.get("runtime_version"))
        info["cuda_driver"] = _cuda_version_text(cuda.get("driver_version"))
        info.setdefault("gpu_count", len(cuda.get("gpus", [])))
        try:
            lib = mdtrt.nccl_library()
            info["nccl_version"], info["nccl_path"] = lib.version, lib.path
        except Exception as error:  # noqa: BLE001 - recorded, not fatal
            info["nccl_version"], info["nccl_error"] = None, str(error)
    except Exception as error:  # noqa: BLE001
        info["mdtrt_error"] = f"{type(error).__name__}: {error}"
    try:
        import torch

        info["torch_version"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        try:
            v = torch.cuda.nccl.version()
            info["torch_nccl_version"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # noqa: BLE001
            info["torch_nccl_version"] = None
    except ImportError:
        info["torch_version"] = None
    return info


def _cuda_version_text(code) -> str | None:
    if not code:
        return None
    code = int(code)
    return f"{code // 1000}.{(code % 1000) // 10}"


# -- argument types ----------------------------------------------------------------------------
# argparse calls these on the text of an option; an ArgumentTypeError becomes the one-line
# "argument --NAME: MESSAGE" error with exit status 2, before any GPU work starts. The checks
# that keep the text (sizes, GPU ids, names, paths) return it unchanged so that scripts which
# forward options to another script (run_all.py) still hand on what the user typed.

def _number(text: str, convert, what: str, minimum, strict: bool):
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or value != value or (value <= minimum if strict else value < minimum):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (iterations, rounds, repeats, heads, ...)."""
    return _number(text, int, "a positive integer", 0, strict=True)


def positive_float(text: str) -> float:
    """argparse type: a finite number of seconds > 0 (timeouts, budgets)."""
    value = _number(text, float, "a positive number of seconds", 0.0, strict=True)
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def positive_size(text: str) -> int:
    """argparse type: one size in bytes > 0, as parse_size reads it ('1K', '64M', '4096')."""
    try:
        value = parse_size(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a size in bytes > 0 such as 1K, 64M or 1G, got {text!r}")
    return value


def size_list(text: str) -> str:
    """argparse type: comma-separated sizes > 0 ('1K,64M,1G'); at least one. Returns the text."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected comma-separated sizes such as 1K,64M,1G, got nothing")
    for part in text.split(","):
        if part.strip():
            positive_size(part)
    return text


def optional_size_list(text: str) -> str:
    """argparse type: like size_list, but the empty text (meaning "none") is accepted."""
    return size_list(text) if text.strip() else text


def positive_int_list(text: str) -> str:
    """argparse type: comma-separated integers >= 1 ('8192,56320'); at least one. Returns the text."""
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated positive integers, got nothing")
    for part in parts:
        positive_int(part)
    return text


def gpu_ids(text: str) -> str:
    """argparse type: distinct non-negative GPU ids, comma-separated ('0,1'). Returns the text."""
    try:
        gpus = parse_gpus(text)
    except ValueError:
        gpus = []
    if not gpus:
        raise argparse.ArgumentTypeError(f"expected distinct non-negative GPU ids such as 0,1, got {text!r}")
    return text


def name_list(choices: Sequence[str]):
    """argparse type for comma-separated names, each one of ``choices``. Returns the text."""
    def check(text: str) -> str:
        names = [n for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n.strip() not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"expected names from {','.join(choices)}, got {text!r}")
        return text
    return check


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_file(text: str) -> str:
    """argparse type: a file path that can be written: not a folder, and its nearest existing
    parent folder writable (write_json creates missing folders). Returns the text."""
    path = Path(text).expanduser().absolute()
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file to write, got the folder {text!r}")
    parent = _nearest_existing(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"expected a writable file, {text!r} is not writable")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"expected a writable file path, cannot create files under {str(parent)!r}")
    return text


def output_dir(text: str) -> str:
    """argparse type: a folder that exists and is writable, or can be created. Returns the text."""
    path = Path(text).expanduser().absolute()
    if not text or (path.exists() and not path.is_dir()):
        raise argparse.ArgumentTypeError(f"expected a folder, {text!r} is a file")
    base = _nearest_existing(path)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"expected a writable folder, cannot write under {str(base)!r}")
    return text


def input_dir(text: str) -> str:
    """argparse type: an existing folder. Returns the text."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"expected an existing folder, got {text!r}")
    return text


def input_file(text: str) -> str:
    """argparse type: an existing, readable file. Returns the text."""
    path = Path(text).expanduser()
    if not path.is_file() or not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"expected an existing readable file, got {text!r}")
    return text


def add_common_arguments(parser, *, out_default: str) -> None:
    """--out (result JSON), --gpus and --quick, checked at parsing time."""
    parser.add_argument("--out", type=output_file, default=out_default,
                        help=f"result JSON to write (default {out_default})")
    parser.add_argument("--gpus", type=gpu_ids, default="0,1", help="GPU ids, comma-separated (default 0,1)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and iterations (about a quarter of the time)")


def this_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def python_command(script: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(this_dir(), script), *args]


if __name__ == "__main__":
    # A library, not a benchmark: say so (and where the benchmarks are) instead of doing nothing.
    print(__doc__.strip() + "\n\nIt runs nothing itself: `python benchmarks/run_all.py --help` lists the benchmarks.")
