"""What stops CUDA on this machine, in words: shared by ``python -m mdtrt doctor`` and the errors
raised where a group finds no GPU."""

from __future__ import annotations

import os

from . import _core
from .errors import CudaError


def cuda_version(code: int) -> str:
    """CUDA's version code (1000 * major + 10 * minor, 0 when absent) as ``major.minor`` or ``none``."""
    return f"{code // 1000}.{(code % 1000) // 10}" if code else "none"


def cuda_problem(cuda: dict) -> str | None:
    """What stops CUDA, in words, from ``_core.query_cuda()``'s dict, or None. The runtime says
    cudaErrorInsufficientDriver also when there is no driver at all (the driver version then
    reads 0)."""
    error = cuda["error"]
    if error and error.startswith("cudaErrorInsufficientDriver") and not cuda["driver_version"]:
        return "no NVIDIA driver was found (libcuda.so.1 is not there): install the NVIDIA driver, on a machine with an NVIDIA GPU"
    if error and error.startswith("cudaErrorInsufficientDriver"):
        return (f"the NVIDIA driver (CUDA {cuda_version(cuda['driver_version'])}) is older than the CUDA "
                f"{cuda_version(cuda['runtime_version'])} runtime mdtrt was built with: update the driver")
    return error or None


def no_gpu_error(where: str) -> CudaError:
    """The error for a machine (or process) that sees no GPU: ``where`` says what needed one, the
    rest why none is seen (the driver's answer, CUDA_VISIBLE_DEVICES) and where to look."""
    cuda = dict(_core.query_cuda())
    why = cuda_problem(cuda)
    if why is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = ("cudaGetDeviceCount found no device" +
               (f" with CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""))
    return CudaError(f"no CUDA GPU is visible {where}: {why} (run `python -m mdtrt doctor` for the whole report)")
