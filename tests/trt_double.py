"""The TensorRT test double (tests/tensorrt_double): building it, and reading and writing its plans.

``build_double()`` builds ``libnvinfer_double.so.11`` once (CMake, cached by a hash of its sources
and the headers' path) against the TensorRT headers mdtrt was compiled with, and returns its path.
The ``trt_double`` fixture of conftest.py puts that path in ``MDTRT_TENSORRT_LIBRARY``.

``read_plan(data)`` parses a plan the double built, a dict with these keys:

- ``tensors``: every tensor, ``{"name", "dtype", "dims"}`` (dtype as TensorRT spells it: FLOAT,
  HALF, BF16, INT32, INT8, UINT8, INT64, BOOL; dims with -1 for dynamic dimensions, resolved from
  the declared inputs)
- ``inputs``: ``{"name", "dtype", "dims", "min", "opt", "max"}`` (optimization profile 0)
- ``layers``: in order, ``{"index", "type", "name", "input", "output", "nb_ranks"}`` (input and
  output are tensor names), plus for ``type == "shuffle"``: ``first_transpose`` and
  ``second_transpose`` (lists, [] for none), ``reshape`` (list or None), ``zero_is_placeholder``;
  for ``type == "dist_collective"``: ``op`` (all_reduce, all_gather, broadcast, reduce,
  reduce_scatter, all_to_all, gather, scatter), ``reduce`` (sum, prod, max, min, avg, none),
  ``root`` (as given; -1 for none) and ``groups`` (list of world ranks, [] for all)
- ``outputs``: ``{"name", "dtype", "dims"}`` in markOutput order
- ``ranks``: the communicator size the plan needs (0: no multi-device layer); ``ranks_exact``:
  True when the size must be exactly ``ranks`` (some layer spans every rank), False when it must
  be at least ``ranks`` (every multi-device layer names its group)
- ``builder``: ``{"flags": int, "flag_names": [TensorRT's BuilderFlag names], "workspace": bytes,
  "timing_cache": bool, "name": the network's name}``

``write_plan(plan)`` is the inverse, for plans no mdtrt builder makes (a single-device network:
mdtrt builds those from ONNX, and the double has no ONNX parser).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote

SOURCE = Path(__file__).resolve().parent / "tensorrt_double"
REPO = Path(__file__).resolve().parent.parent
MAGIC = "MDTRT-TENSORRT-DOUBLE-PLAN 1"
LIBRARY_NAME = "libnvinfer_double.so.11"


class DoubleBuildError(RuntimeError):
    """The double could not be configured or built (the output of CMake is in the message)."""


def without_backend() -> str:
    """The skip reason of a test that needs mdtrt's TensorRT backend, with why this build lacks it
    (``build_info()["tensorrt_reason"]``); "" when the backend is compiled in."""
    from mdtrt import _core

    info = _core.build_info()
    return "" if info["tensorrt_backend"] else f"mdtrt was built without the TensorRT backend ({info['tensorrt_reason']})"


def header_dir() -> str | None:
    """The TensorRT include directory to build the double against: the one mdtrt's extension was
    built with (``build_info()["tensorrt_include_dir"]``), else ``TensorRT_INCLUDE_DIR``, else
    ``../shared/tensorrt/include`` beside the repository; None when none has ``NvInferImpl.h``."""
    candidates = []
    try:
        from mdtrt import _core

        candidates.append(_core.build_info().get("tensorrt_include_dir", ""))
    except ImportError:
        pass
    candidates += [os.environ.get("TensorRT_INCLUDE_DIR", ""), str(REPO.parent / "shared" / "tensorrt" / "include")]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "NvInferImpl.h")):
            return os.path.abspath(c)
    return None


def cmake_command() -> list[str]:
    """cmake (PATH, else the cmake Python package) and, when ninja is there (PATH or the ninja
    Python package), the Ninja generator: the tests then need no make. Raises DoubleBuildError
    when there is no cmake."""
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as cmake_package  # the PyPI package

            cmake = os.path.join(cmake_package.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            raise DoubleBuildError("cmake was not found (PATH or the cmake Python package)") from None
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_package

            ninja = os.path.join(ninja_package.BIN_DIR, "ninja")
        except ImportError:
            pass
    if ninja and os.path.isfile(ninja):
        return [cmake, "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    return [cmake]


def _fingerprint(include: str, configure: list[str]) -> str:
    digest = hashlib.sha256("\0".join([include, *configure]).encode())
    for path in sorted(SOURCE.iterdir()) + [REPO / "csrc" / "nccl" / "nccl_api.h"]:
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build_double(build_root: str | os.PathLike | None = None) -> str:
    """Builds the double (once per source version; later calls reuse it) and returns the path of
    ``libnvinfer_double.so.11``. ``build_root``: where the build folders go (default
    ``$MDTRT_TEST_BUILD_DIR`` or the temporary directory). Raises :class:`DoubleBuildError` with
    CMake's output when it does not build, and when no TensorRT headers are found."""
    include = header_dir()
    if include is None:
        raise DoubleBuildError("no TensorRT 11 headers found (build_info, TensorRT_INCLUDE_DIR, ../shared/tensorrt/include)")
    configure = cmake_command()
    root = Path(build_root or os.environ.get("MDTRT_TEST_BUILD_DIR") or tempfile.gettempdir())
    build = root / f"mdtrt-tensorrt-double-{_fingerprint(include, configure)}"
    library = build / LIBRARY_NAME
    build.mkdir(parents=True, exist_ok=True)
    with open(build / ".lock", "w") as lock:  # concurrent sessions build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.is_file():
            return str(library)
        steps = [
            [*configure, "-S", str(SOURCE), "-B", str(build), f"-DTensorRT_INCLUDE_DIR={include}",
             f"-DPython3_EXECUTABLE={sys.executable}", f"-DPython_EXECUTABLE={sys.executable}"],
            [configure[0], "--build", str(build), "--parallel", "2"],
        ]
        for step in steps:
            out = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                raise DoubleBuildError(f"building the TensorRT test double failed: {' '.join(step)}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
        if not library.is_file():
            raise DoubleBuildError(f"the build finished without {library}")
    return str(library)


def _ints(text: str) -> list[int]:
    return [] if text in ("-", "") else [int(v) for v in text.split(",")]


def _name(text: str) -> str:
    return "" if text == "%" else unquote(text)


def read_plan(data: bytes) -> dict:
    """Parses a plan of the double (see the module docstring for the keys). Raises ValueError for
    bytes that are not one."""
    text = bytes(data).decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines[0] != MAGIC:
        raise ValueError(f"not a plan of the TensorRT test double (first line {lines[0][:60]!r}, expected {MAGIC!r})")
    tensors, inputs, layers, outputs = [], [], [], []
    plan: dict = {"version": 1}
    for line in lines[1:]:
        if not line:
            continue
        kind, *tokens = line.split(" ")
        kv = dict(t.split("=", 1) for t in tokens)
        if kind == "tensor":
            tensors.append({"name": _name(kv["name"]), "dtype": kv["dtype"], "dims": _ints(kv["dims"])})
        elif kind == "input":
            t = tensors[int(kv["tensor"])]
            inputs.append(dict(t, min=_ints(kv["min"]), opt=_ints(kv["opt"]), max=_ints(kv["max"])))
        elif kind == "layer":
            layer = {"index": int(kv["index"]), "type": kv["type"], "name": _name(kv["name"]),
                     "input": tensors[int(kv["inputs"])]["name"], "output": tensors[int(kv["outputs"])]["name"],
                     "nb_ranks": int(kv["nb_ranks"])}
            if kv["type"] == "shuffle":
                layer.update(first_transpose=_ints(kv["first_transpose"]), second_transpose=_ints(kv["second_transpose"]),
                             reshape=None if kv["reshape"] == "none" else _ints(kv["reshape"]),
                             zero_is_placeholder=kv["zero_is_placeholder"] == "1")
            elif kv["type"] == "dist_collective":
                layer.update(op=kv["op"], reduce=kv["reduce"], root=int(kv["root"]), groups=_ints(kv["groups"]))
            layers.append(layer)
        elif kind == "output":
            outputs.append(dict(tensors[int(kv["tensor"])]))
        elif kind == "ranks":
            plan.update(ranks=int(kv["value"]), ranks_exact=kv["exact"] == "1")
        elif kind == "builder":
            names = _name(kv["flag_names"])
            plan["builder"] = {"flags": int(kv["flags"]), "flag_names": names.split(",") if names else [],
                               "workspace": int(kv["workspace"]), "timing_cache": kv["timing_cache"] == "1",
                               "name": _name(kv["name"])}
        else:
            raise ValueError(f"unknown record {kind!r} in the plan")
    plan.update(tensors=tensors, inputs=inputs, layers=layers, outputs=outputs)
    return plan


def _list(values) -> str:
    return ",".join(str(int(v)) for v in values) if values else "-"


def _quote(name: str) -> str:
    return quote(name, safe="_.-:/()") or "%"


def write_plan(plan: dict) -> bytes:
    """The bytes of a plan given as ``read_plan`` returns it (``tensors``, ``inputs`` with
    min/opt/max, ``layers``, ``outputs``, ``ranks``; ``ranks_exact`` and ``builder`` optional)."""
    index = {t["name"]: i for i, t in enumerate(plan["tensors"])}
    lines = [MAGIC]
    for i, t in enumerate(plan["tensors"]):
        lines.append(f"tensor index={i} name={_quote(t['name'])} dtype={t['dtype']} dims={_list(t['dims'])}")
    for t in plan["inputs"]:
        lines.append(f"input tensor={index[t['name']]} min={_list(t['min'])} opt={_list(t['opt'])} max={_list(t['max'])}")
    for i, layer in enumerate(plan["layers"]):
        line = (f"layer index={i} type={layer['type']} name={_quote(layer['name'])} inputs={index[layer['input']]} "
                f"outputs={index[layer['output']]} nb_ranks={layer.get('nb_ranks', 1)}")
        if layer["type"] == "shuffle":
            reshape = layer.get("reshape")
            line += (f" first_transpose={_list(layer.get('first_transpose', []))}"
                     f" reshape={'none' if reshape is None else _list(reshape)}"
                     f" zero_is_placeholder={int(layer.get('zero_is_placeholder', True))}"
                     f" second_transpose={_list(layer.get('second_transpose', []))}")
        elif layer["type"] == "dist_collective":
            line += (f" op={layer['op']} reduce={layer['reduce']} root={layer['root']} groups={_list(layer['groups'])}")
        lines.append(line)
    for t in plan["outputs"]:
        lines.append(f"output tensor={index[t['name']]}")
    lines.append(f"ranks value={plan.get('ranks', 0)} exact={int(plan.get('ranks_exact', True))}")
    b = plan.get("builder", {})
    lines.append(f"builder flags={b.get('flags', 0)} flag_names={_quote(','.join(b.get('flag_names', [])))} "
                 f"workspace={b.get('workspace', 0)} timing_cache={int(b.get('timing_cache', False))} name={_quote(b.get('name', ''))}")
    return ("\n".join(lines) + "\n").encode()
