"""What the run-time library searches (NCCL, TensorRT, its ONNX parser) report: every candidate
tried, in order, with the loader's message."""

from __future__ import annotations

import dataclasses
import importlib.util
import os


@dataclasses.dataclass(frozen=True)
class LoadAttempt:
    """One candidate a library search tried.

    Attributes
    ----------
    rule : str
        The search rule that produced it ("MDTRT_NCCL_LIBRARY", "extra directory", ...).
    candidate : str
        The name or path passed to dlopen.
    loaded : bool
        Whether it loaded and was accepted.
    message : str
        The loader's message: dlerror text, a missing symbol, a refused version, or "ok".
    """
    rule: str
    candidate: str
    loaded: bool
    message: str


def attempts_from(native) -> tuple[LoadAttempt, ...]:
    """Plain records from the extension's LoadAttempt objects.

    Parameters
    ----------
    native : iterable of _core.LoadAttempt
        Objects with ``rule``, ``candidate``, ``loaded`` and ``message`` attributes.

    Returns
    -------
    tuple of LoadAttempt
        In the order they were tried.
    """
    return tuple(LoadAttempt(a.rule, a.candidate, a.loaded, a.message) for a in native)


def package_dirs(package: str) -> list[str]:
    """Folders of an installed package, found without importing it (importing ``tensorrt_libs``
    would preload its libraries behind the loader's back).

    Parameters
    ----------
    package : str
        Dotted module name of the package (``"tensorrt_libs"``, ``"nvidia.nccl"``).

    Returns
    -------
    list of str
        Its existing folders (several for a namespace package); empty when it is not installed.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    return [os.fspath(p) for p in (spec.submodule_search_locations or []) if os.path.isdir(p)]
