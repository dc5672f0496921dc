"""Which NCCL mdtrt uses, and how it was found (the search itself is in C++: csrc/nccl)."""

from __future__ import annotations

import dataclasses
import os

from . import _core
from .libraries import LoadAttempt, attempts_from, package_dirs


@dataclasses.dataclass(frozen=True)
class NcclLibrary:
    """The loaded NCCL and how it was found.

    Attributes
    ----------
    path : str
        The library file that was opened (``libnccl.so.2``).
    version : str
        "major.minor.patch", e.g. "2.28.9".
    version_code : int
        ``ncclGetVersion``'s integer, NCCL's ``NCCL_VERSION_CODE`` convention:
        major * 10000 + minor * 100 + patch (22809 for 2.28.9).
    found_by : str
        The search rule that found it (e.g. "extra directory" for the pip wheel's folder).
    attempts : tuple of LoadAttempt
        Every candidate tried, in order, with the loader's message.
    package : str or None
        The pip package whose folder held it (e.g. "nvidia-nccl-cu13"); None when found otherwise.
    """

    path: str
    version: str
    version_code: int
    found_by: str
    attempts: tuple[LoadAttempt, ...]
    package: str | None = None


_WHEELS = ("nvidia-nccl-cu13", "nvidia-nccl-cu12")


def wheel_library_dirs() -> list[str]:
    """Library folders of the installed ``nvidia-nccl-cu13`` (or -cu12) wheel.

    Returns
    -------
    list of str
        Each ``nvidia/nccl/lib`` folder that holds ``libnccl.so.2``; empty without the wheel.
    """
    dirs = []
    for location in package_dirs("nvidia.nccl"):
        lib = os.path.join(location, "lib")
        if os.path.isfile(os.path.join(lib, "libnccl.so.2")):
            dirs.append(lib)
    return dirs


def wheel_package(library_dir: str) -> str | None:
    """The installed pip package (nvidia-nccl-cu13 or -cu12) whose files include ``library_dir``.

    Parameters
    ----------
    library_dir : str
        A folder, compared after resolving symbolic links.

    Returns
    -------
    str or None
        The distribution name, or None when no installed NCCL wheel owns the folder.
    """
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
    """Every NCCL library mapped into this process (by mdtrt or any other library).

    Returns
    -------
    list of dict
        One dict per mapped copy: ``path`` (str), ``version`` ("2.28.9") and ``version_code``
        (int, major * 10000 + minor * 100 + patch).
    """
    return [dict(c) for c in _core.nccl_loaded_copies()]


def nccl_library() -> NcclLibrary:
    """Find and open NCCL (once per process) and say which library it is.

    The search (csrc/nccl/nccl_library.h) tries, first success wins: ``MDTRT_NCCL_LIBRARY`` (a
    path), a NCCL another library already loaded into the process, ``libnccl.so.2`` and
    ``libnccl.so`` through the dynamic loader, then the installed NCCL wheel's folders
    (:func:`wheel_library_dirs`).

    Returns
    -------
    NcclLibrary

    Raises
    ------
    LibraryNotFoundError
        No candidate loaded (or none had the symbols and version mdtrt needs), ``MDTRT_NCCL_LIBRARY``
        is set and does not load, or another NCCL file is already loaded into the process (one
        process holds one NCCL, shared with TensorRT); the message lists every attempt.
    """
    info = _core.load_nccl(wheel_library_dirs())
    attempts = attempts_from(info["attempts"])
    package = wheel_package(os.path.dirname(info["path"])) if info["found_by"] == "extra directory" else None
    return NcclLibrary(info["path"], info["version"], info["version_code"], info["found_by"], attempts, package)
