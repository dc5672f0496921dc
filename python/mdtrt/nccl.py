"""Which NCCL mdtrt uses, and how it was found (the search itself is in C++: csrc/nccl)."""

from __future__ import annotations

import dataclasses
import os

from . import _core
from .libraries import LoadAttempt, attempts_from, package_dirs


@dataclasses.dataclass(frozen=True)
class NcclLibrary:
    """The loaded NCCL: ``path``, ``version`` ("2.28.9"), ``found_by`` (the rule that found it),
    ``attempts`` (every candidate tried, in order, with the loader's message) and ``package``: the
    pip package whose folder held it (e.g. "nvidia-nccl-cu13"), None when found otherwise."""

    path: str
    version: str
    version_code: int
    found_by: str
    attempts: tuple[LoadAttempt, ...]
    package: str | None = None


_WHEELS = ("nvidia-nccl-cu13", "nvidia-nccl-cu12")


def wheel_library_dirs() -> list[str]:
    """Library folders of the installed ``nvidia-nccl-cu13`` (or -cu12) wheel, if any."""
    dirs = []
    for location in package_dirs("nvidia.nccl"):
        lib = os.path.join(location, "lib")
        if os.path.isfile(os.path.join(lib, "libnccl.so.2")):
            dirs.append(lib)
    return dirs


def wheel_package(library_dir: str) -> str | None:
    """The installed pip package (nvidia-nccl-cu13 or -cu12) whose files include ``library_dir``."""
    from importlib import metadata

    for name in _WHEELS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if os.path.realpath(str(dist.locate_file("nvidia/nccl/lib"))) == os.path.realpath(library_dir):
            return name
    return None


def loaded_copies() -> list[dict]:
    """Every NCCL library mapped into this process (by mdtrt or any other library): path and version."""
    return [dict(c) for c in _core.nccl_loaded_copies()]


def nccl_library() -> NcclLibrary:
    """Find and open NCCL (once per process) and say which library it is.

    Raises :class:`mdtrt.errors.LibraryNotFoundError` listing every attempt when none works.
    """
    info = _core.load_nccl(wheel_library_dirs())
    attempts = attempts_from(info["attempts"])
    package = wheel_package(os.path.dirname(info["path"])) if info["found_by"] == "extra directory" else None
    return NcclLibrary(info["path"], info["version"], info["version_code"], info["found_by"], attempts, package)
