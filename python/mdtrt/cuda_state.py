"""What stops CUDA on this machine, in words: shared by ``python -m mdtrt doctor`` and the errors
raised where a group finds no GPU."""

from __future__ import annotations

from . import _core
from .errors import CudaError


def cuda_version(code: int) -> str:
    """CUDA's version code (1000 * major + 10 * minor, 0 when absent) as ``major.minor`` or ``none``."""
    return f"{code // 1000}.{(code % 1000) // 10}" if code else "none"


def cuda_problem(cuda: dict) -> str | None:
    """What stops CUDA, in words, from ``_core.query_cuda()``'s dict (no driver, a driver older than
    mdtrt's CUDA runtime, CUDA's own error), or None; the native check says the same."""
    return _core.describe_cuda_problem(cuda["error"], cuda["driver_version"], cuda["runtime_version"]) or None


def why_no_gpu() -> str:
    """Why this process sees no GPU, and what to do: the driver's answer (no driver, one older than
    mdtrt's CUDA runtime) or CUDA_VISIBLE_DEVICES."""
    cuda = _core.query_cuda()
    return _core.describe_no_gpu(cuda["error"], cuda["driver_version"], cuda["runtime_version"])


def no_gpu_error(where: str) -> CudaError:
    """The error for a machine (or process) that sees no GPU: ``where`` says what needed one, the
    rest why none is seen (:func:`why_no_gpu`) and where to look."""
    return CudaError(f"no CUDA GPU is visible {where}: {why_no_gpu()} (run `python -m mdtrt doctor` for the whole "
                     "report)")
