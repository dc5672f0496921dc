"""Exceptions raised by mdtrt.

Native errors arrive as these classes with the rank they happened on (``rank``, None when not
tied to a rank), the library call that failed (``call``) and the library's own message
(``detail``). ``str(error)`` combines all three.
"""

from __future__ import annotations


class MdtrtError(RuntimeError):
    """Base class of every mdtrt error."""

    def __init__(self, message: str, *, rank: int | None = None, call: str = "", detail: str = ""):
        super().__init__(message)
        self.rank = rank
        self.call = call
        self.detail = detail or message


class InvalidArgumentError(MdtrtError, ValueError):
    """The caller's input is wrong (GPU ids, shapes, dtypes, options)."""


class LibraryNotFoundError(MdtrtError):
    """A run-time library (NCCL, TensorRT) could not be found or loaded."""


class NcclError(MdtrtError):
    """A NCCL call failed."""


class CudaError(MdtrtError):
    """A CUDA runtime call failed."""


class TensorRTError(MdtrtError):
    """A TensorRT call failed or TensorRT refused the request."""


class RankTimeoutError(MdtrtError, TimeoutError):
    """A blocking wait passed its deadline (a rank that never arrived, a hung collective)."""


__all__ = [
    "MdtrtError",
    "InvalidArgumentError",
    "LibraryNotFoundError",
    "NcclError",
    "CudaError",
    "TensorRTError",
    "RankTimeoutError",
]
