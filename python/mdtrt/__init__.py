"""mdtrt: run one TensorRT 11 engine across the GPUs of one host.

Importing mdtrt needs no GPU, no NCCL and no TensorRT: those are found at run time.
``python -m mdtrt doctor`` says what this machine can do.
"""

from __future__ import annotations

from . import _core
from . import errors
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
from .arrays import DeviceArray
from .device_group import Communicator, DeviceGroup
from .runner import EngineRunner
from .plan_sharing import build_once

# The ONNX tools import onnx/onnxruntime, which rank processes rarely need: load them on first use.
# A module that holds a public function must not carry the function's name (importing
# `mdtrt.simulate` the module would replace the function `mdtrt.simulate` on the package).
_LAZY = {
    "reference": (".reference", None),
    "shard": (".sharding", "shard"),
    "simulate": ("._simulate", "simulate"),
    "run_on_cpu": ("._simulate", "run_on_cpu"),
    "compare_outputs": (".comparison", "compare_outputs"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name, __name__)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module 'mdtrt' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The public names, the lazily imported ones included (they are not in globals() until used);
    # not `annotations` and the other names imported for the package's own use.
    return sorted(set(__all__) | {"errors", "__version__"})

__version__ = _core.build_info()["version"]


def build_info() -> dict:
    """How this mdtrt was built.

    Returns
    -------
    dict
        ``version`` (str), ``compiler`` (str), ``cuda_version`` (int, CUDART_VERSION of the headers,
        e.g. 13000), ``tensorrt_backend`` (bool: compiled with TensorRT headers),
        ``tensorrt_include_dir`` (str, "" without the backend) and ``tensorrt_reason`` (str: why the
        backend is or is not there).
    """
    return dict(_core.build_info())


__all__ = [
    "__version__",
    "DeviceGroup",
    "Communicator",
    "EngineRunner",
    "build_once",
    "reference",
    "shard",
    "simulate",
    "run_on_cpu",
    "compare_outputs",
    "DeviceArray",
    "build_info",
    "nccl_library",
    "NcclLibrary",
    *errors.__all__,
]
