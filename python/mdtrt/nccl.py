"""Which NCCL mdtrt uses, and how it was found (the search itself is in C++: csrc/nccl)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from . import _core
from .libraries import LoadAttempt, attempts_from


@dataclasses.dataclass(frozen=True)
class NcclLibrary:
    """The loaded NCCL: ``path``, ``version`` ("2.28.9"), ``found_by`` (the rule that found it)
    and ``attempts`` (every candidate tried, in order, with the loader's message)."""

    path: str
    version: str
    version_code: int
    found_by: str
    attempts: tuple[LoadAttempt, ...]


def wheel_library_dirs() -> list[str]:
    """Library folders of the installed ``nvidia-nccl-cu13`` (or -cu12) wheel, if any."""
    dirs = []
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        lib = os.path.join(location, "lib")
        if os.path.isfile(os.path.join(lib, "libnccl.so.2")):
            dirs.append(lib)
    return dirs


def nccl_library() -> NcclLibrary:
    """Find and open NCCL (once per process) and say which library it is.

    Raises :class:`mdtrt.errors.LibraryNotFoundError` listing every attempt when none works.
    """
    info = _core.load_nccl(wheel_library_dirs())
    attempts = attempts_from(info["attempts"])
    return NcclLibrary(info["path"], info["version"], info["version_code"], info["found_by"], attempts)
