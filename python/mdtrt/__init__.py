"""mdtrt: run one TensorRT 11 engine across the GPUs of one host.

Importing mdtrt needs no GPU, no NCCL and no TensorRT: those are found at run time.
``python -m mdtrt doctor`` says what this machine can do.
"""

from __future__ import annotations

from . import _core
from .errors import (
    CudaError,
    InvalidArgumentError,
    LibraryNotFoundError,
    MdtrtError,
    NcclError,
    RankTimeoutError,
    TensorRTError,
)
from .nccl import NcclLibrary, nccl_library

__version__ = _core.build_info()["version"]


def build_info() -> dict:
    """How this mdtrt was built: version, compiler, CUDA version (e.g. 13000), whether the
    TensorRT backend was compiled in and why (or why not)."""
    return dict(_core.build_info())


__all__ = [
    "__version__",
    "build_info",
    "nccl_library",
    "NcclLibrary",
    "MdtrtError",
    "InvalidArgumentError",
    "LibraryNotFoundError",
    "NcclError",
    "CudaError",
    "TensorRTError",
    "RankTimeoutError",
]
