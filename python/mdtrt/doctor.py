"""``python -m mdtrt doctor``: can this machine run multi-device inference, and if not, why."""

from __future__ import annotations

import json
import os
import sys

from . import _core
from .cuda_state import cuda_problem, cuda_version
from .errors import MdtrtError

DIST_COLLECTIVE_MIN_CC = (8, 0)
MULTI_DEVICE_ATTENTION_MIN_CC = (10, 0)


def _nccl_report() -> dict:
    """The same keys whether NCCL was found or not (None / [] where there is nothing to say)."""
    from .libraries import attempts_from
    from .nccl import loaded_copies, nccl_library, wheel_library_dirs

    report = {"found": False, "path": None, "version": None, "found_by": None, "package": None, "attempts": [],
              "error": None, "env_library": os.environ.get("MDTRT_NCCL_LIBRARY") or None,
              "wheel_dirs": wheel_library_dirs(), "loaded_copies": []}
    try:
        lib = nccl_library()
    except MdtrtError as error:
        report["error"] = str(error)
        report["attempts"] = [a.__dict__ for a in attempts_from(_core.nccl_failed_attempts())]
    else:
        report.update(found=True, path=lib.path, version=lib.version, found_by=lib.found_by, package=lib.package,
                      attempts=[a.__dict__ for a in lib.attempts])
    report["loaded_copies"] = loaded_copies()
    return report


def _nccl_advice(nccl: dict) -> str:
    """Why NCCL is missing and what to do, fitted to what was tried."""
    if nccl["env_library"]:
        return (f"MDTRT_NCCL_LIBRARY={nccl['env_library']} could not be used: point it at a NCCL >= 2.19 "
                "libnccl.so.2, or unset it to search the usual places")
    if "already loaded in this process" in (nccl["error"] or ""):
        return "two NCCL libraries would be in one process: " + nccl["error"].split(". ")[0]
    if nccl["wheel_dirs"]:
        return (f"the NCCL of the installed package in {nccl['wheel_dirs'][0]} could not be used (see the attempts "
                "above): reinstall it (pip install --force-reinstall nvidia-nccl-cu13)")
    return "NCCL was not found (pip install nvidia-nccl-cu13, or set MDTRT_NCCL_LIBRARY)"


def _found_by_text(nccl: dict) -> str:
    if nccl["found_by"] == "extra directory":
        package = nccl["package"] or "NCCL"
        return f"found in the {package} package's folder {os.path.dirname(nccl['path'])}"
    return f"found by {nccl['found_by']}"


_TENSORRT_KEYS = ("library_found", "path", "version", "found_by", "lean", "error", "attempts", "onnx_parser")


def _tensorrt_report(build: dict) -> dict:
    """Whether the backend is compiled in, and which TensorRT library the search finds (the search
    is compiled in every build: without the backend it says what a rebuilt mdtrt would use)."""
    from . import tensorrt as trt_backend

    report = {"compiled_in": build["tensorrt_backend"], "reason": build["tensorrt_reason"]}
    report.update({key: [] if key == "attempts" else None for key in _TENSORRT_KEYS})
    report["library_found"] = False
    report.update(trt_backend.library_report())
    if not build["tensorrt_backend"]:
        report["rebuild"] = trt_backend.REBUILD_WITH_BACKEND
    return report


def _runtime_report(local_ranks: int) -> dict:
    """The rank threads' settings from the environment for a group of ``local_ranks`` GPUs, or the
    error a group would raise."""
    report = {"local_ranks": local_ranks, "spin_us": None, "poll_us": None, "stream_priority": None, "error": None,
              "environment": {name: os.environ.get(name)
                              for name in ("MDTRT_RANK_SPIN_US", "MDTRT_RANK_POLL_US", "MDTRT_STREAM_PRIORITY")}}
    try:
        report.update(_core.rank_runtime_settings(local_ranks))
    except MdtrtError as error:
        report["error"] = str(error)
    return report


def _hanging(text: str, indent: str) -> list[str]:
    """``text``'s first line as is, the lines after it (a list of attempts, advice) indented by
    ``indent``, so that they read as part of it."""
    first, *rest = text.splitlines() or [""]
    return [first, *(indent + line for line in rest)]


def _feature(gpus: list[dict], minimum: tuple[int, int], what: str) -> dict:
    too_old = [g for g in gpus if tuple(g["compute_capability"]) < minimum]
    ok = bool(gpus) and not too_old
    if not gpus:
        detail = "no GPU"
    elif too_old:
        detail = ", ".join(f"GPU {g['index']} ({g['name']}) is sm_{g['compute_capability'][0]}{g['compute_capability'][1]}" for g in too_old)
    else:
        detail = "every GPU qualifies"
    return {"ok": ok, "needs": f"{what}: compute capability >= {minimum[0]}.{minimum[1]} on every GPU", "detail": detail}


AUTO_WITHOUT_NVLINK = ('replication="auto" copies host inputs to every GPU from host memory (its peer copies '
                       "need NVLink between every pair)")


def _one_line(text: str) -> str:
    """``text``'s lines joined by spaces, each stripped of its indent and list mark."""
    return " ".join(line.strip().removeprefix("- ") for line in text.splitlines() if line.strip())


def _peer_table(cuda: dict, nvml: dict | None) -> list[str]:
    """The peer matrix: over what each GPU reads each other's memory (``nvlink``, ``pcie``,
    ``unknown``) or ``no``; then, when NVML is unavailable and some pair has peer access, one line
    saying so and what it does to replication="auto". Reports without ``peer_links`` (older, or
    made up) show yes/no."""
    n = len(cuda["gpus"])
    links = cuda.get("peer_links")

    def cell(i, j):
        if i == j:
            return "-"
        if not cuda["peer_access"][i][j]:
            return "no"
        return links[i][j] if links else "yes"

    lines = ["Peer access, row GPU reads column GPU's memory: the link it goes over, or no"]
    lines.append("      " + " ".join(f"{j:>7}" for j in range(n)))
    for i in range(n):
        lines.append(f"  {i:>3} " + " ".join(f"{cell(i, j):>7}" for j in range(n)))
    # NVML tells the kind of a peer link: without any peer access there is nothing for it to tell.
    any_peer = any(cuda["peer_access"][i][j] for i in range(n) for j in range(n) if i != j)
    if nvml is not None and not nvml["available"] and any_peer:
        lines.append(f"  NVML unavailable, so NVLink cannot be told from PCIe: {AUTO_WITHOUT_NVLINK}. "
                     f"Why: {_one_line(nvml['error'])}")
    elif cuda.get("peer_links_reason"):
        lines.append(f"  some links are unknown, so {AUTO_WITHOUT_NVLINK}: {_one_line(cuda['peer_links_reason'])}")
    return lines


def collect() -> dict:
    """The whole report as a JSON-ready dict.

    A missing NCCL, TensorRT library, driver or GPU is reported in the dict, not raised.

    Returns
    -------
    dict
        ``mdtrt``: :func:`mdtrt.build_info`. ``nccl``: ``found`` (bool), ``path``, ``version``,
        ``found_by``, ``package``, ``attempts`` (list of dicts: rule, candidate, loaded, message),
        ``error``, ``env_library`` (``MDTRT_NCCL_LIBRARY``), ``wheel_dirs`` and ``loaded_copies``.
        ``cuda``: ``driver_version`` and ``runtime_version`` (int, CUDA's 1000 * major + 10 * minor
        convention, 0 when absent), ``gpus`` (per GPU: ``index``, ``name``, ``compute_capability``
        [major, minor], ``total_memory`` in bytes, ``pci_bus_id``), ``peer_access`` (N x N bools,
        row can read column), ``peer_links`` (N x N str: "self", "nvlink", "pcie", "none" or
        "unknown", as :attr:`mdtrt.DeviceGroup.peer_links`), ``peer_links_reason`` (why some link
        is "unknown", or ""), ``error`` and ``problem`` (in words, or None). ``nvml``: NVML (the
        driver's ``libnvidia-ml.so.1``, which tells NVLink from PCIe) as this process found it:
        ``available`` (bool), ``path``, ``found_by``, ``error`` (why not, or ""). ``tensorrt``:
        ``compiled_in``, ``reason``, ``library_found``, ``path``, ``version``, ``found_by``,
        ``lean``, ``error``, ``attempts`` (and ``rebuild`` advice without the backend).
        ``runtime``: the rank threads' settings a group of every visible GPU (``local_ranks``, at
        least 1) takes from the environment: ``spin_us`` (``MDTRT_RANK_SPIN_US``; by default 2000
        when the host has at least 2 x (local_ranks + 1) hardware threads, else 0), ``poll_us``
        (``MDTRT_RANK_POLL_US``), ``stream_priority`` (``MDTRT_STREAM_PRIORITY``),
        ``environment`` (those variables as set, or None) and ``error`` (a value a group refuses).
        ``features``: per feature ``ok``, ``needs``, ``detail`` (DistCollective needs compute
        capability >= 8.0, multi-device attention >= 10.0). ``can_run_multi_device`` (bool) and
        ``reasons`` (list of str: what stops it, or slows it). ``can_run_collectives`` (bool):
        :class:`mdtrt.DeviceGroup` and its native collectives, which need no TensorRT, can run
        (NCCL found, at least 2 GPUs, valid rank-thread settings).
    """
    build = dict(_core.build_info())
    cuda = dict(_core.query_cuda())
    gpus = [dict(g, compute_capability=list(g["compute_capability"])) for g in cuda["gpus"]]
    cuda["gpus"] = gpus
    cuda["problem"] = cuda_problem(cuda)
    report = {
        "mdtrt": build,
        "nccl": _nccl_report(),
        "cuda": cuda,
        "nvml": dict(_core.nvml_status()),
        "tensorrt": _tensorrt_report(build),
        "runtime": _runtime_report(max(1, len(gpus))),
        "features": {
            "dist_collective": _feature(gpus, DIST_COLLECTIVE_MIN_CC, "DistCollective layers"),
            "multi_device_attention": _feature(gpus, MULTI_DEVICE_ATTENTION_MIN_CC, "multi-device attention layers"),
        },
    }
    reasons = []
    if not report["nccl"]["found"]:
        reasons.append(_nccl_advice(report["nccl"]))
    if not gpus:
        reasons.append(f"no CUDA GPU is visible: {cuda['problem'] or 'cudaGetDeviceCount returned 0'}")
    elif len(gpus) < 2:
        reasons.append(f"only {len(gpus)} GPU is visible; multi-device inference needs at least 2")
    n = len(gpus)
    missing_peers = [(i, j) for i in range(n) for j in range(n) if i != j and not cuda["peer_access"][i][j]]
    if missing_peers:
        pairs = ", ".join(f"{i}->{j}" for i, j in missing_peers)
        reasons.append(f"no peer access between GPUs {pairs} (NCCL still works, through host memory, but slower)")
    if gpus and not report["features"]["dist_collective"]["ok"]:
        reasons.append("DistCollective needs compute capability >= 8.0: " + report["features"]["dist_collective"]["detail"])
    if report["runtime"]["error"]:
        reasons.append(f"device groups cannot be created: {report['runtime']['error']}")
    trt = report["tensorrt"]
    if not trt["compiled_in"]:
        reasons.append(f"the TensorRT backend is not compiled in: {trt['reason']}; {trt['rebuild']}")
    elif not trt.get("library_found"):
        reasons.append(f"the TensorRT library was not found: {trt.get('error', '')}")
    report["can_run_multi_device"] = not [r for r in reasons if not r.startswith("no peer access")]
    # What needs no TensorRT: DeviceGroup and its native collectives (NCCL, >= 2 GPUs, rank threads).
    report["can_run_collectives"] = (report["nccl"]["found"] and len(gpus) >= 2 and not report["runtime"]["error"])
    report["reasons"] = reasons
    return report


def _attempt_text(attempt: dict) -> str:
    """One place a library search tried and why it failed, as the native errors list it."""
    name, candidate = attempt["rule"], attempt["candidate"]
    where = candidate if name == candidate else f"{name}: {candidate}"
    return f"{where}: {attempt['message'].removeprefix(candidate + ': ')}"


def _tensorrt_library_lines(trt: dict) -> list[str]:
    """Which TensorRT library the search found, or every place it tried; the search runs in every
    build, and without the backend it says what a rebuilt mdtrt would use."""
    if trt.get("library_found"):
        use = "" if trt["compiled_in"] else "; a rebuilt mdtrt would use it"
        lines = [f"library {trt.get('version', '?')} at {trt.get('path', '?')} (found by {trt.get('found_by', '?')}){use}"]
        if trt.get("lean"):
            lines.append("lean runtime: engines can be run, not built; it loads only plans built "
                         "version_compatible=True (embedded lean runtime: allow_host_code=True)")
        return lines
    tried = trt.get("attempts") or []
    if trt["compiled_in"] or not tried:
        return _hanging(f"library not found: {trt.get('error', '')}", "  ")
    # Without the backend the rebuild above is the advice (its extra installs TensorRT): the places only.
    return ["library not found (a rebuilt mdtrt needs one too); tried:", *(f"  - {_attempt_text(a)}" for a in tried)]


def _onnx_parser_lines(trt: dict) -> list[str]:
    """Whether TensorRT's ONNX parser (build_engine_from_onnx) is there, or why it was not looked for."""
    from .tensorrt import PARSER_NOT_LOOKED_FOR

    parser = trt.get("onnx_parser") or {}
    if parser.get("found"):
        return [f"ONNX parser at {parser['path']} (found by {parser['found_by']})"
                + (f"; {parser['note']}" if parser.get("note") else "")]
    if trt.get("lean"):
        # The parser is only looked for with a builder, which the lean runtime lacks: it is not
        # missing, it would be of no use.
        return ["ONNX parser not looked for: build_engine_from_onnx needs the full TensorRT "
                f"({_core.TENSORRT_INSTALL_FULL}; {_core.TENSORRT_FULL_FROM_NVIDIA_INDEX}), which ships it"]
    if not trt.get("library_found"):
        return [f"ONNX parser {PARSER_NOT_LOOKED_FOR}"]
    if not trt["compiled_in"]:
        return [f"ONNX parser {parser.get('error') or 'not looked for: this build has no TensorRT backend'}"]
    return _hanging(f"ONNX parser not found (build_engine_from_onnx needs it; MDTRT_ONNXPARSER_LIBRARY=/path/to/"
                    f"libnvonnxparser.so.11 names it): {parser.get('error', '')}", "  ")


def format_text(report: dict) -> str:
    """The :func:`collect` report as the lines ``python -m mdtrt doctor`` prints.

    Parameters
    ----------
    report : dict
        As :func:`collect` returns it.

    Returns
    -------
    str
        Lines joined by newlines, no trailing newline; GPU memory in GiB.
    """
    lines = []
    b = report["mdtrt"]
    lines.append(f"mdtrt {b['version']} (built with {b['compiler']}, CUDA {cuda_version(b['cuda_version'])})")
    nccl = report["nccl"]
    lines.append("")
    if nccl["found"]:
        lines.append(f"NCCL       {nccl['version']} at {nccl['path']} ({_found_by_text(nccl)})")
    else:
        lines.append("NCCL       not found")
        lines.extend("           " + line for line in nccl["error"].splitlines())
    for copy in nccl["loaded_copies"]:
        if copy["path"] != nccl["path"]:
            lines.append(f"           loaded in this process too: NCCL {copy['version']} at {copy['path']}")
    cuda = report["cuda"]
    lines.append(f"CUDA       driver {cuda_version(cuda['driver_version'])}, runtime {cuda_version(cuda['runtime_version'])}")
    if cuda["problem"]:
        lines.append(f"           {cuda['problem']}")
    lines.append(f"GPUs       {len(cuda['gpus'])}")
    for g in cuda["gpus"]:
        cc = g["compute_capability"]
        lines.append(f"  [{g['index']}] {g['name']}  sm_{cc[0]}{cc[1]}  {g['total_memory'] / 2**30:.1f} GiB  {g['pci_bus_id']}")
    if len(cuda["gpus"]) > 1:
        lines.extend(_peer_table(cuda, report.get("nvml")))
    trt = report["tensorrt"]
    lines.append("")
    if trt["compiled_in"]:
        lines.append(f"TensorRT   backend compiled in ({trt['reason']})")
    else:
        lines.append(f"TensorRT   backend not compiled in: {trt['reason']}")
        lines.append(f"           {trt['rebuild']}")
    lines.extend("           " + line for line in _tensorrt_library_lines(trt) + _onnx_parser_lines(trt))
    rt = report.get("runtime")
    if rt:
        set_vars = ", ".join(f"{k}={v}" for k, v in rt["environment"].items() if v is not None)
        if rt["error"]:
            lines.append(f"Rank threads  {rt['error']}")
        else:
            poll = f"wake every {rt['poll_us']} us for 0.1 s" if rt["poll_us"] else "no wake-ups"
            spin = (f"spin {rt['spin_us']} us" if rt["spin_us"] else
                    "no spin (MDTRT_RANK_SPIN_US=0)" if rt["environment"]["MDTRT_RANK_SPIN_US"] else
                    f"no spin ({os.cpu_count()} hardware threads; a group of {rt['local_ranks']} "
                    f"GPU{'s' if rt['local_ranks'] > 1 else ''} spins from {2 * (rt['local_ranks'] + 1)})")
            lines.append(f"Rank threads  idle: {spin}, then {poll}; streams at {rt['stream_priority']} "
                         f"priority ({'from ' + set_vars if set_vars else 'defaults'})")
    lines.append("")
    for name, feature in report["features"].items():
        mark = "ok " if feature["ok"] else "no "
        lines.append(f"[{mark}] {feature['needs']} ({feature['detail']})")
    lines.append("")
    if report["can_run_multi_device"]:
        lines.append("This machine can run multi-device inference.")
    else:
        lines.append("This machine cannot run multi-device inference:")
    for reason in report["reasons"]:
        lines.extend(_hanging(f"  - {reason}", "    "))
    if not report["can_run_multi_device"]:
        lines.append("")
        if report.get("can_run_collectives"):
            lines.append("It can run mdtrt.DeviceGroup and its native collectives (no TensorRT needed) on its GPUs.")
        lines.append("It can still shard ONNX models (mdtrt.shard) and check them on simulated ranks on the CPU "
                     "(mdtrt.simulate, mdtrt.run_on_cpu, `python -m mdtrt attention --mode cpu`).")
    return "\n".join(lines)


def main(argv: list[str] | None = None, as_json: bool = False) -> int:
    """Prints the :func:`collect` report (as JSON when ``as_json``); ``argv`` is unused.

    Parameters
    ----------
    argv : list of str, optional
        Unused (``python -m mdtrt doctor`` parses its own options).
    as_json : bool, optional
        Print the report as indented JSON instead of text.

    Returns
    -------
    int
        0 when multi-device inference can run on this machine, else 1.
    """
    report = collect()
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_text(report))
    sys.stdout.flush()
    return 0 if report["can_run_multi_device"] else 1
