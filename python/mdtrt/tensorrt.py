"""The TensorRT backend: which TensorRT mdtrt uses, building engines, loading them on ranks.

TensorRT is never imported nor linked: the C++ core (csrc/trt) opens ``libnvinfer.so.11`` at run
time, in this order, first success wins:

1. ``MDTRT_TENSORRT_LIBRARY`` (a path; if set and unusable, that is an error)
2. ``libnvinfer.so.11`` through the dynamic loader (``LD_LIBRARY_PATH``, the system)
3. the ``tensorrt_libs`` wheel's folder (``pip install tensorrt-cu13``)
4. the lean runtime ``libnvinfer_lean.so.11`` through the loader, then in the
   ``tensorrt_lean_libs`` wheel's folder (``pip install tensorrt-lean-cu13-libs``): it runs engines, it
   cannot build them, and it loads only plans built version-compatible
   (``version_compatible=True``); such a plan that embeds the lean runtime (the default; not with
   ``exclude_lean_runtime=True``) also needs ``allow_host_code=True`` where it is loaded

The ONNX parser (``libnvonnxparser.so.11``) is found the same way, with ``MDTRT_ONNXPARSER_LIBRARY``.
TensorRT's own log goes to the ``mdtrt.tensorrt`` logger after each call.

TensorRT 11 networks are strongly typed: an engine's precision is the model's own types (export
the ONNX model in float16 for a float16 engine); there are no fp16/bf16 builder switches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

from . import _core, arguments
from ._progress import stderr_is_terminal
from .errors import InvalidArgumentError, LibraryNotFoundError, MdtrtError
from .libraries import LoadAttempt, attempts_from, package_dirs

log = logging.getLogger("mdtrt.tensorrt")

# nvinfer1::ILogger::Severity -> logging level
_LEVELS = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO, 4: logging.DEBUG}

ProgressCallback = Callable[[str, str, str, int, int], Any]


@dataclasses.dataclass(frozen=True)
class TensorRTLibrary:
    """The loaded TensorRT: ``path``, ``version`` ("11.4.0"), ``found_by`` (the rule that found
    it), ``lean`` (the lean runtime: runs engines, cannot build them) and ``attempts`` (every
    candidate tried, in order, with the loader's message)."""

    path: str
    version: str
    found_by: str
    lean: bool
    attempts: tuple[LoadAttempt, ...]
    version_code: int = 0
    header_version: str = ""  # the TensorRT headers mdtrt was compiled against


def backend_compiled_in() -> bool:
    """Whether this mdtrt was built with TensorRT headers (see ``mdtrt.build_info()``)."""
    return bool(_core.build_info()["tensorrt_backend"])


#: How to get the backend: the headers must be given to the same pip command that builds mdtrt
#: (``pip install ".[lean]"`` alone rebuilds mdtrt, and without them drops the backend), with the
#: extra of the TensorRT wanted: the full TensorRT (``tensorrt``) builds and runs engines.
_REBUILD = ('rebuild mdtrt with TensorRT 11 headers in one command, from its source folder: '
            'TensorRT_INCLUDE_DIR=<TensorRT include folder> pip install ".[test,tensorrt]" (or TensorRT_ROOT='
            f'<TensorRT SDK folder>), with the full TensorRT ({_core.TENSORRT_FULL_FROM_NVIDIA_INDEX})')
#: The rebuild advice for anything but building engines (running them, the doctor).
REBUILD_WITH_BACKEND = (_REBUILD + ', which builds and runs engines; or ".[test,lean]" for the lean runtime from '
                        "PyPI, which only runs prebuilt version-compatible engines")
#: The rebuild advice for the builders: the lean runtime cannot build.
REBUILD_TO_BUILD_ENGINES = _REBUILD + ": building engines needs it (the lean runtime cannot build)"


def _require_backend(*, building: bool = False) -> None:
    info = _core.build_info()
    if not info["tensorrt_backend"]:
        raise LibraryNotFoundError(
            f"mdtrt was built without the TensorRT backend: {info['tensorrt_reason']}; "
            f"{REBUILD_TO_BUILD_ENGINES if building else REBUILD_WITH_BACKEND}",
            call="TensorRT backend",
        )


def wheel_library_dirs() -> tuple[list[str], list[str]]:
    """(full, lean): library folders of the installed ``tensorrt_libs`` and ``tensorrt_lean_libs`` wheels."""
    return package_dirs("tensorrt_libs"), package_dirs("tensorrt_lean_libs")


def _severity_for(level: int) -> int:
    if level <= logging.DEBUG:
        return 4
    if level <= logging.INFO:
        return 3
    if level <= logging.WARNING:
        return 2
    if level <= logging.ERROR:
        return 1
    return 0


def _drain_log() -> None:
    for severity, text in _core.tensorrt_drain_log():
        log.log(_LEVELS.get(severity, logging.INFO), "%s", text)


@contextlib.contextmanager
def _tensorrt_call() -> Iterator[None]:
    """Queues TensorRT's messages at the logger's level during the call and hands them to logging after."""
    _require_backend()
    _core.tensorrt_set_log_severity(_severity_for(log.getEffectiveLevel()))
    try:
        yield
    finally:
        _drain_log()


_nccl_checked = False
_lean_noted = False

LEAN_RUNTIME_NOTE = (
    "only the TensorRT lean runtime was found ({path}): it cannot build engines, and it loads only plans "
    "built version-compatible (build_*_engine(..., version_compatible=True), BuilderFlag::kVERSION_COMPATIBLE) "
    "by this or an older TensorRT 11; a version-compatible plan that embeds the lean runtime also needs "
    "allow_host_code=True (IRuntime::setEngineHostCodeAllowed). Other plans are refused when loaded.")


def _load_nccl_first() -> None:
    """NCCL goes in before TensorRT (RTLD_GLOBAL), so that TensorRT's own dlopen of libnccl.so.2
    binds to the NCCL whose communicators mdtrt hands it. Single-device engines need no NCCL."""
    global _nccl_checked
    if _nccl_checked:
        return
    _nccl_checked = True
    from .nccl import nccl_library

    try:
        nccl_library()
    except MdtrtError as error:
        log.warning("NCCL was not found, so engines with multi-device layers will not run: %s", error)


def tensorrt_library() -> TensorRTLibrary:
    """Find and open TensorRT (once per process) and say which library it is.

    Raises :class:`mdtrt.LibraryNotFoundError` listing every attempt and what to install when none
    works, or saying how to rebuild when the backend is not compiled in.
    """
    return _open_tensorrt(require_builder=False)


def _open_tensorrt(require_builder: bool) -> TensorRTLibrary:
    """:func:`tensorrt_library`; ``require_builder``: the lean runtime is refused, in the native
    search's words (it cannot build), and the rebuild advice is the builders'."""
    _require_backend(building=require_builder)
    _load_nccl_first()
    full, lean = wheel_library_dirs()
    with _tensorrt_call():
        info = _core.load_tensorrt(full, lean, require_builder)
    lib = _library_from(info)
    global _lean_noted
    if lib.lean and not _lean_noted:
        _lean_noted = True  # said once, up front, before any plan fails to load
        log.warning(LEAN_RUNTIME_NOTE.format(path=lib.path))
    return lib


def _library_from(info: Mapping[str, Any]) -> TensorRTLibrary:
    attempts = attempts_from(info["attempts"])
    return TensorRTLibrary(info["path"], info["version"], info["found_by"], info["lean"], attempts,
                           info["version_code"], info["header_version"])


_PROBE = "import json, mdtrt.tensorrt as t; print(json.dumps(t._library_report_here()))"


def library_report(timeout: float = 120.0) -> dict:
    """For ``python -m mdtrt doctor`` and pre-flight checks: never raises. Keys: library_found, path,
    version, found_by, lean, error, attempts (every candidate tried, found or not) and onnx_parser
    (found, path, found_by, note, error: TensorRT's ONNX parser, which ``build_engine_from_onnx``
    needs; looked for once TensorRT itself is found). Runs the
    library search also when the backend is not compiled in (discovery is in every build): which
    TensorRT a rebuilt mdtrt would use.

    The library is opened in a child process: a vendor library that crashes while loading (seen
    once with a TensorRT lean runtime on a GPU machine) then becomes a reported reason instead of
    taking the caller down.
    """
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _empty_report(f"loading TensorRT did not finish within {timeout:g} s")
    if out.returncode != 0:
        how = f"signal {-out.returncode}" if out.returncode < 0 else f"exit status {out.returncode}"
        tail = out.stderr.strip().splitlines()[-3:]
        return _empty_report(f"loading TensorRT crashed the probe process ({how})" + (": " + " | ".join(tail) if tail else "")
                             + "; set MDTRT_TENSORRT_LIBRARY to another libnvinfer.so.11 or report this")
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return _empty_report(f"the TensorRT probe printed no report: {out.stdout[-200:]!r}")


def _empty_report(error: str) -> dict:
    return {"library_found": False, "path": None, "version": None, "found_by": None, "lean": None, "error": error,
            "attempts": [], "onnx_parser": _empty_parser_report("not looked for: " + error if error else None)}


#: Why the ONNX parser was not looked for when TensorRT itself was not found.
PARSER_NOT_LOOKED_FOR = "not looked for: no TensorRT library was found (the full TensorRT ships the parser)"


def _empty_parser_report(error: str | None) -> dict:
    return {"found": False, "path": None, "found_by": None, "note": None, "error": error}


def _onnx_parser_report() -> dict:
    """Where TensorRT's ONNX parser (build_engine_from_onnx) is found, or why not; never raises."""
    report = _empty_parser_report(None)
    try:
        info = _core.load_onnx_parser(wheel_library_dirs()[0])
    except Exception as error:  # noqa: BLE001 - the doctor reports, it does not fail
        report["error"] = str(error)
    else:
        report.update(found=True, path=info["path"], found_by=info["found_by"], note=info["note"] or None)
    return report


def _library_report_here() -> dict:
    """library_report() in this process (what the probe child runs)."""
    report: dict[str, Any] = _empty_report("")
    backend = _core.build_info()["tensorrt_backend"]
    try:
        if backend:
            lib = tensorrt_library()
        else:
            lib = _library_from(_core.testing.load_tensorrt(*wheel_library_dirs()))
    except Exception as error:  # noqa: BLE001 - the doctor reports, it does not fail
        report["error"] = str(error)
        report["attempts"] = [dataclasses.asdict(a) for a in attempts_from(_core.tensorrt_failed_attempts())]
        report["onnx_parser"] = _empty_parser_report(PARSER_NOT_LOOKED_FOR)
        return report
    report.update(library_found=True, path=lib.path, version=lib.version, found_by=lib.found_by, lean=lib.lean,
                  attempts=[dataclasses.asdict(a) for a in lib.attempts])
    report["onnx_parser"] = (_onnx_parser_report() if backend else
                             _empty_parser_report("not looked for: this build has no TensorRT backend"))
    return report


def _builder_library() -> TensorRTLibrary:
    return _open_tensorrt(require_builder=True)


class _TqdmProgress:
    """TensorRT build phases as tqdm bars, nested phases below their parent. Called with the GIL
    held from the building thread; a KeyboardInterrupt raised here cancels the build."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bars: dict[str, Any] = {}
        self._depth: dict[str, int] = {}

    def __call__(self, event: str, phase: str, parent: str, step: int, nb_steps: int) -> bool:
        if event == "start":
            depth = self._depth.get(parent, -1) + 1 if parent else 0
            self._depth[phase] = depth
            if nb_steps > 0:
                self._bars[phase] = self._tqdm(total=nb_steps, desc=f"TensorRT: {phase}", position=depth,
                                               leave=depth == 0, unit="step", dynamic_ncols=True)
        elif event == "step":
            bar = self._bars.get(phase)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
        else:
            self._depth.pop(phase, None)
            bar = self._bars.pop(phase, None)
            if bar is not None:
                bar.close()
        return True

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


@contextlib.contextmanager
def _progress(progress: bool | ProgressCallback | None) -> Iterator[Any]:
    if progress is True:
        # Off a terminal the C++ line log (a line per step of each top-level phase) says the same
        # as the bars (see _progress.py).
        if not stderr_is_terminal():
            yield True
            return
        try:
            bars = _TqdmProgress()
        except ImportError:
            yield True  # the C++ line log
            return
        try:
            yield bars
        finally:
            bars.close()
    elif progress in (False, None):
        yield None
    elif callable(progress):
        yield progress
    else:
        raise InvalidArgumentError("progress must be True, False or a callable(event, phase, parent, step, nb_steps)")


def _nonnegative(name: str, value: int | None) -> int:
    if value is None:
        return 0
    if int(value) < 0:
        raise InvalidArgumentError(f"{name} must be a number of bytes >= 0, got {value}")
    return int(value)


def _device(device: int | None) -> int:
    if device is None:
        return -1
    if isinstance(device, bool) or not hasattr(device, "__index__") or int(device) < 0:
        raise InvalidArgumentError(f"device must be a GPU id >= 0 (or None for the current GPU), got {device!r}")
    return int(device)


def _lean_flags(version_compatible: bool, exclude_lean_runtime: bool) -> tuple[bool, bool]:
    if exclude_lean_runtime and not version_compatible:
        raise InvalidArgumentError("exclude_lean_runtime=True applies to version-compatible plans only (TensorRT "
                                   "ignores it otherwise): pass version_compatible=True too")
    return bool(version_compatible), bool(exclude_lean_runtime)


def build_dist_collective_engine(op: str, *, reduce: str = "sum", root: int = 0, groups: Sequence[int] | None = None,
                                 nb_ranks: int, dtype: str = "float32", shape: Sequence[int], transpose: bool = False,
                                 progress: bool | ProgressCallback = True, timing_cache: str | os.PathLike | None = None,
                                 workspace: int | None = None, device: int | None = None,
                                 version_compatible: bool = False, exclude_lean_runtime: bool = False) -> bytes:
    """Build an engine whose network is one DistCollective layer: input "input" (``dtype``,
    ``shape``) -> ``op`` over ``nb_ranks`` ranks -> output "output".

    Parameters
    ----------
    op : str
        all_reduce, all_gather, broadcast, reduce, reduce_scatter, all_to_all, gather, scatter.
    reduce : str
        For the reducing ops: sum, prod, max, min, avg.
    root : int
        A world rank (ops with a root).
    groups : sequence of int, optional
        The ordered world ranks taking part (None: all). The layer's rank count (``setNbRanks``) is
        ``nb_ranks``, except for a grouped all_gather or reduce_scatter, where it is the group's
        size: TensorRT documents that it sets those two ops' output shape (first dimension times,
        resp. divided by, the rank count). The built network's output shape is checked against
        :func:`mdtrt.reference` 's and a difference is refused with both shapes.
    transpose : bool
        Wrap the layer in transposes of a 2-D input, as NVIDIA's sampleDistCollective does, so the
        collective splits and joins along the second dimension.
    progress : bool or callable
        True for progress bars on a terminal (tqdm; where stderr is no terminal, or tqdm is
        missing, a line per step of each top-level phase on stderr), False for none, or
        ``callable(event, phase, parent, step, nb_steps)`` (return False to cancel).
    timing_cache : path, optional
        A file read before and written after the build (written through a temporary file unique to
        this process, then renamed).
    device : int, optional
        The GPU to build on (made current for the build; TensorRT tunes for the current GPU). None:
        the current GPU. Under a launcher, pass this rank's GPU (``group.gpus[0]``).
    version_compatible : bool
        ``BuilderFlag::kVERSION_COMPATIBLE``: a plan the lean runtime (and later TensorRT 11
        releases) can load.
    exclude_lean_runtime : bool
        ``BuilderFlag::kEXCLUDE_LEAN_RUNTIME``: leave the lean runtime out of a version-compatible
        plan (for one shipped beside it). Needs ``version_compatible=True``.

    Returns
    -------
    bytes
        The serialized plan.

    Raises
    ------
    InvalidArgumentError
        Bad arguments (before TensorRT is needed), or a ``device`` this machine does not have.
    LibraryNotFoundError
        No TensorRT, or only the lean runtime.
    TensorRTError
        TensorRT refused the network or the build, with TensorRT's message.
    """
    device = _device(device)
    flags = _lean_flags(version_compatible, exclude_lean_runtime)
    _builder_library()
    with _progress(progress) as callback, _tensorrt_call():
        return _core.tensorrt_build_dist_collective(
            op, reduce, int(root), [int(g) for g in (groups or [])], int(nb_ranks), dtype, [int(d) for d in shape],
            bool(transpose), callback, _nonnegative("workspace", workspace),
            os.fspath(timing_cache) if timing_cache else "", device, *flags)


def _onnx_model(model: Any) -> tuple[bytes, str]:
    """(serialized model, path for external weights or "")."""
    if isinstance(model, (str, os.PathLike)):
        path = os.path.abspath(arguments.input_file(model, "ONNX model file", "give the path of an .onnx file, "
                                                    "an onnx.ModelProto or the model's bytes"))
        with open(path, "rb") as f:
            return f.read(), path
    if hasattr(model, "SerializeToString"):  # onnx.ModelProto, without importing onnx here
        try:
            return model.SerializeToString(), ""
        except ValueError as error:  # protobuf's 2 GiB limit
            raise InvalidArgumentError(
                f"the ONNX model cannot be serialized ({error}); save it with external data and pass the path") from None
    try:
        return bytes(memoryview(model)), ""
    except TypeError:
        raise InvalidArgumentError(
            f"model of type {type(model).__name__} is neither a path, bytes nor an onnx.ModelProto") from None


def _profile(name: str, value: Any) -> tuple[list[int], list[int], list[int]]:
    def dims(shape: Any) -> list[int]:
        return [int(d) for d in shape]

    try:
        items = list(value)
        if items and all(isinstance(d, (int,)) or hasattr(d, "__index__") for d in items):
            fixed = dims(items)  # one shape: min = opt = max
            return fixed, fixed, fixed
        if len(items) != 3:
            raise ValueError
        return dims(items[0]), dims(items[1]), dims(items[2])
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"profile of {name!r} must be (min_shape, opt_shape, max_shape) or one shape, got {value!r}") from None


def build_engine_from_onnx(model: Any, *, profiles: Mapping[str, Any] | None = None,
                           progress: bool | ProgressCallback = True, timing_cache: str | os.PathLike | None = None,
                           workspace: int | None = None, fp16: bool | None = None, bf16: bool | None = None,
                           device: int | None = None, version_compatible: bool = False,
                           exclude_lean_runtime: bool = False) -> bytes:
    """Build a serialized engine from an ONNX model with TensorRT's ONNX parser.

    Parameters
    ----------
    model : path, bytes or onnx.ModelProto
        The model (a path keeps external weight files beside it reachable).
    profiles : dict, optional
        ``{input: (min, opt, max)}`` shapes (or one shape for all three) for every input with
        dynamic dimensions.
    workspace : int, optional
        Limit of TensorRT's workspace pool, in bytes.
    fp16, bf16 : bool, optional
        Refused when true: TensorRT 11 networks are strongly typed, so the engine computes in the
        model's own types and has no precision switch (TensorRT 11 release notes); convert the
        model to float16/bfloat16 instead. False or None is accepted.
    progress, timing_cache, device, version_compatible, exclude_lean_runtime
        As for :func:`build_dist_collective_engine`.

    Returns
    -------
    bytes
        The serialized plan.

    Raises
    ------
    InvalidArgumentError
        Bad arguments (profiles, workspace, the model argument, ``fp16``/``bf16`` true), or a
        ``device`` this machine does not have.
    LibraryNotFoundError
        No TensorRT builder (none, or only the lean runtime), or no ONNX parser.
    TensorRTError
        The parser refused the model (its errors listed, with node names) or the build failed.
    """
    device = _device(device)
    flags = _lean_flags(version_compatible, exclude_lean_runtime)
    if fp16 or bf16:
        # A switch that silently did nothing would build a float32 engine for a user who asked for fp16.
        raise InvalidArgumentError(
            f"{'fp16' if fp16 else 'bf16'}=True: TensorRT 11 builds strongly typed networks, so the engine computes "
            "in the model's own types and there is no precision switch; convert the ONNX model to "
            f"{'float16' if fp16 else 'bfloat16'} (e.g. polygraphy convert --fp-to-fp16) and build that")
    data, path = _onnx_model(model)
    shapes = {str(name): _profile(name, value) for name, value in (profiles or {}).items()}
    full, _ = wheel_library_dirs()
    _builder_library()
    with _progress(progress) as callback, _tensorrt_call():
        return _core.tensorrt_build_from_onnx(data, path, shapes, callback, _nonnegative("workspace", workspace),
                                              os.fspath(timing_cache) if timing_cache else "", full, device, *flags)


def engine_program(engines: Sequence[Any], multi_device: bool = True, allow_host_code: bool = False):
    """The native program running ``engines[i]`` on local rank ``i``, for ``EngineRunner(program=)``.

    Parameters
    ----------
    engines : sequence of buffers
        One serialized plan per local rank (bytes or any buffer); the same object for a shared
        engine is kept once.
    multi_device : bool
        False runs a single-device engine without a communicator; a multi-device engine whose
        ``setCommunicator`` TensorRT refuses raises when bound.
    allow_host_code : bool
        Let TensorRT load plans that carry host code (``IRuntime::setEngineHostCodeAllowed``:
        version-compatible plans that embed the lean runtime); off by default, as in TensorRT,
        since it runs code from the plan.

    Returns
    -------
    _core.EngineProgram
        Bound once, by one runner on one group: its TensorRT contexts are attached to that group's
        communicator, and keep it alive until they are gone. A second runner raises
        :class:`mdtrt.InvalidArgumentError`: make one program per runner.

    Raises
    ------
    InvalidArgumentError
        An engine that is not a buffer, or an empty one.
    LibraryNotFoundError
        No TensorRT runtime could be loaded.
    """
    tensorrt_library()
    blobs = []
    for e in engines:
        if not isinstance(e, (bytes, bytearray, memoryview)):
            try:
                e = memoryview(e)
            except TypeError:
                raise InvalidArgumentError(f"an engine of type {type(e).__name__} is not a buffer") from None
        blobs.append(e)
    with _tensorrt_call():
        return _core.EngineProgram(blobs, multi_device=multi_device, allow_host_code=bool(allow_host_code))


def check_engine(engine: Any, device: int = 0, allow_host_code: bool = False) -> list[dict]:
    """Deserialize a plan on one GPU, without a DeviceGroup, and list its IO tensors.

    Parameters
    ----------
    engine : bytes, buffer or path
        The serialized plan, or a plan file.
    device : int
        The CUDA device to deserialize on.
    allow_host_code : bool
        As for :func:`engine_program`.

    Returns
    -------
    list of dict
        One per IO tensor: name, is_input, dtype, shape (-1 for dynamic dimensions), profile_min,
        profile_max.

    Raises
    ------
    TensorRTError
        With TensorRT's message, when the plan does not load on this TensorRT and GPU.
    LibraryNotFoundError
        No TensorRT runtime could be loaded.
    OSError
        A plan file that cannot be read.
    """
    if isinstance(engine, (str, os.PathLike)):
        with open(os.fspath(engine), "rb") as f:
            engine = f.read()
    tensorrt_library()
    with _tensorrt_call():
        return [dict(t) for t in _core.tensorrt_inspect_engine(engine, int(device), bool(allow_host_code))]


__all__ = [
    "TensorRTLibrary",
    "LoadAttempt",
    "backend_compiled_in",
    "tensorrt_library",
    "library_report",
    "wheel_library_dirs",
    "build_dist_collective_engine",
    "build_engine_from_onnx",
    "engine_program",
    "check_engine",
]
