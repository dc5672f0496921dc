"""Moving arrays between Python and the rank threads.

Host arrays are numpy arrays. Device arrays are PyTorch CUDA tensors, anything with
``__cuda_array_interface__`` (CuPy, Numba, ...) or with ``__dlpack__`` (JAX, ...); they are used in
place (zero-copy), and ordered after the work their producer's stream already queued.
"""

from __future__ import annotations

import ctypes
import dataclasses
from typing import Any

import numpy as np

from . import _core
from .errors import InvalidArgumentError

_LEGACY_DEFAULT_STREAM = 1  # a device's legacy default stream, as CUDA array interfaces and DLPack name it

# Bytes per element, from the one dtype table of the native core (csrc/runtime/dtype.cpp).
ITEMSIZE: dict[str, int] = dict(_core.dtype_sizes())

# __cuda_array_interface__ typestr (without byte order) -> name, from numpy's own spelling of each
# dtype of the core's table (bfloat16 has no typestr).
_TYPESTR = {np.dtype(name).str[1:]: name for name in ITEMSIZE if name != "bfloat16"}


def _bfloat16_dtype():
    try:
        import ml_dtypes
    except ImportError as error:
        raise InvalidArgumentError(
            "bfloat16 host arrays need the ml_dtypes package (pip install ml_dtypes)") from error
    return np.dtype(ml_dtypes.bfloat16)


_DTYPE_OBJECTS: dict = {}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of mdtrt's dtype ``name`` (``ml_dtypes.bfloat16`` for "bfloat16").

    Parameters
    ----------
    name : str
        One of :data:`mdtrt.vocabulary.DTYPES`.

    Returns
    -------
    numpy.dtype
        Cached per name.

    Raises
    ------
    InvalidArgumentError
        "bfloat16" without the ml_dtypes package installed.
    """
    dtype = _DTYPE_OBJECTS.get(name)
    if dtype is None:
        dtype = _DTYPE_OBJECTS[name] = _bfloat16_dtype() if name == "bfloat16" else np.dtype(name)
    return dtype


def dtype_name(dtype: Any) -> str:
    """mdtrt's name of a numpy, ml_dtypes or torch dtype.

    Parameters
    ----------
    dtype : numpy.dtype, ml_dtypes type or torch.dtype
        Read through ``str(dtype)`` (``torch.float16`` -> "float16"), so torch is not imported.

    Returns
    -------
    str
        One of :data:`mdtrt.vocabulary.DTYPES` ("float32", "float16", "bfloat16", "int32", ...).

    Raises
    ------
    InvalidArgumentError
        The dtype is not in the native core's dtype table; the message lists the supported names.
    """
    name = str(dtype).rsplit(".", 1)[-1]
    if name in ITEMSIZE:
        return name
    raise InvalidArgumentError(f"dtype {dtype} is not supported (use {', '.join(ITEMSIZE)})")


def _dtype_name_of(dtype: Any, what: str, which: Any) -> str:
    """:func:`dtype_name`, its error naming the array (``what`` and ``which`` as :func:`describe`
    takes them) and how to convert it."""
    try:
        return dtype_name(dtype)
    except InvalidArgumentError as error:
        name = what if which is None else f"{what} {which}"
        raise InvalidArgumentError(f"{name}: {error}: convert it first, e.g. numpy's x.astype(numpy.float32) "
                                   "or torch's x.to(torch.float32)") from None


@dataclasses.dataclass(slots=True)
class ArrayRef:
    """A view of one array passed to mdtrt: where it lives and what it is. Holds the object alive.

    Attributes
    ----------
    ptr : int
        Address of the first element (host or device memory).
    device : int
        CUDA device index, -1 for host memory.
    dtype : str
        mdtrt's dtype name (:data:`mdtrt.vocabulary.DTYPES`).
    shape : tuple of int
        Elements per dimension; the data is C-contiguous.
    owner : object
        What keeps the memory alive (the array itself, or it and a DLPack capsule).
    kind : str
        "numpy", "torch" (CUDA), "torch_cpu", "cai" (``__cuda_array_interface__``) or "dlpack".
    stream : int
        The producer's CUDA stream handle on ``device`` (1: the legacy default stream, as CUDA array
        interface v3 and DLPack name it); 0 when no ordering is needed (host memory).
    """

    ptr: int
    device: int  # -1 for host memory
    dtype: str
    shape: tuple[int, ...]
    owner: Any
    kind: str  # "numpy", "torch" (CUDA), "torch_cpu", "cai", "dlpack"
    stream: int = 0  # producer's stream on `device` (1: its legacy default stream), 0 when no ordering is needed

    def as_native(self):
        """The typed input of the native runner: ``_core.InputArg(ptr, device, dtype, shape, stream)``."""
        return _core.InputArg(self.ptr, self.device, self.dtype, self.shape, self.stream)

    @property
    def nbytes(self) -> int:
        """Size of the viewed data in bytes (elements x bytes per element)."""
        count = 1
        for d in self.shape:
            count *= d
        return count * ITEMSIZE[self.dtype]

    def as_output(self, name: str):
        """This array as the preallocated buffer for output ``name``.

        Returns
        -------
        _core.OutputArg
            ``(name, ptr, nbytes, device, stream)``; the runner checks size and device per call.
        """
        return _core.OutputArg(name, self.ptr, self.nbytes, self.device, self.stream)


_NUMPY_DTYPES: dict = {}  # numpy dtype -> name, filled as dtypes are seen
_TORCH_DTYPES: dict = {}  # torch dtype -> name, filled on first use (str() of a dtype is slow)


_STREAM_GETTER: list = []  # the function giving torch's current stream handle on a device, once torch is used


def _stream_getter():
    # torch's raw getter costs a fraction of torch.cuda.current_stream(); fall back where it is missing.
    if not _STREAM_GETTER:
        torch = _torch_module()
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        _STREAM_GETTER.append(raw or (lambda device: torch.cuda.current_stream(device).cuda_stream))
    return _STREAM_GETTER[0]


def torch_current_streams(devices) -> list[int]:
    """torch's current stream on each of ``devices`` (CUDA device indices), as :func:`describe`
    names it for a torch CUDA tensor there.

    torch's default stream is the device's legacy default stream (handle 0), which mdtrt's
    non-blocking rank streams do not wait for by themselves: it is named explicitly (1)."""
    get = _STREAM_GETTER[0] if _STREAM_GETTER else _stream_getter()
    streams = []
    for device in devices:  # a loop: a comprehension's set-up costs more for a few devices
        streams.append(get(device) or _LEGACY_DEFAULT_STREAM)
    return streams


_INFERENCE_MODE: list = []  # torch.is_inference_mode_enabled, once asked


def torch_inference_mode() -> bool:
    """Whether torch's inference mode is on in this thread: tensors allocated now are inference
    tensors, which cannot be changed in place nor saved for backward outside it."""
    if not _INFERENCE_MODE:
        _INFERENCE_MODE.append(_torch_module().is_inference_mode_enabled)
    return _INFERENCE_MODE[0]()


_TORCH_TENSOR_TYPES: set = set()  # torch.Tensor and subclasses seen so far
_TORCH: list = []  # the torch module, once a torch tensor was seen (an import statement per call costs)


def _torch_module():
    if not _TORCH:
        import torch

        _TORCH.append(torch)
    return _TORCH[0]


def _is_torch_tensor(x) -> bool:
    cls = type(x)
    if cls in _TORCH_TENSOR_TYPES:
        return True
    if cls.__module__.startswith("torch") and hasattr(x, "data_ptr") and hasattr(x, "is_cuda"):
        _TORCH_TENSOR_TYPES.add(cls)
        return True
    return False


def read_torch_cuda(inputs: Any, out: Any, count: int) -> tuple | None:
    """One pass over a call's torch CUDA tensors, one input (and one ``out``) per local rank: what a
    kept call's signature needs and the addresses its run needs, without an ArrayRef per tensor
    (the one-shot calls' fast path).

    Parameters
    ----------
    inputs, out : object
        What the caller passed as one input per local rank, and as ``out`` (None: not given).
    count : int
        The number of local ranks.

    Returns
    -------
    tuple or None
        ``(signature, pointers)``: a flat tuple with each tensor's torch dtype, shape and device
        (inputs, then ``out``'s), and the list of their data pointers in the same order. It covers
        every property of a torch CUDA tensor that :func:`describe` reads or checks: a signature
        whose call the general path made stands for tensors that path accepts and describes alike,
        but for the addresses. None when ``inputs`` (or ``out``) is not a list or tuple of
        ``count`` contiguous torch CUDA tensors: those arguments take the general path, which
        describes or refuses them.
    """
    types = _TORCH_TENSOR_TYPES
    signature = ()
    pointers = []
    for arrays in (inputs,) if out is None else (inputs, out):
        if (type(arrays) is not list and type(arrays) is not tuple) or len(arrays) != count:
            return None
        for x in arrays:
            if (type(x) not in types and not _is_torch_tensor(x)) or not x.is_cuda or not x.is_contiguous():
                return None
            signature += (x.dtype, x.shape, x.get_device())
            pointers.append(x.data_ptr())
    return signature, pointers


def describe(x: Any, what: str = "input", which: Any = None) -> ArrayRef:
    """An ArrayRef for one array, without copying device memory.

    Runs on every call, so the name in errors is only formatted when there is an error.

    Parameters
    ----------
    x : array-like
        A numpy array (a non-contiguous one is copied to a contiguous one), a torch tensor (CUDA or
        CPU, contiguous), an object with ``__cuda_array_interface__`` (CuPy, Numba) or with
        ``__dlpack__`` and ``__dlpack_device__`` (JAX), or anything ``numpy.asarray`` takes (lists,
        scalars). Any shape; the dtype must be in :data:`mdtrt.vocabulary.DTYPES`.
    what : str, optional
        How errors name the array (default "input").
    which : object, optional
        Appended to ``what`` in errors (an input name or a rank), when given.

    Returns
    -------
    ArrayRef
        With the producer's current stream for torch CUDA tensors and CUDA array interface objects,
        the legacy default stream (1) for DLPack CUDA arrays, 0 for host memory.

    Raises
    ------
    InvalidArgumentError
        A non-contiguous torch tensor, CUDA array interface object or DLPack array; an unsupported
        dtype; a DLPack device that is neither CPU nor CUDA; ``x`` is not an array at all.
    """
    if isinstance(x, np.ndarray):
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        name = _NUMPY_DTYPES.get(x.dtype)
        if name is None:
            name = _NUMPY_DTYPES[x.dtype] = _dtype_name_of(x.dtype, what, which)
        # __array_interface__ is an order of magnitude cheaper than x.ctypes.data, per call.
        return ArrayRef(x.__array_interface__["data"][0], -1, name, x.shape, x, "numpy")
    if _is_torch_tensor(x):
        torch = _torch_module()
        if not _TORCH_DTYPES:
            for dt in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int8, torch.uint8,
                       torch.int64, torch.float64, torch.bool):
                _TORCH_DTYPES[dt] = dtype_name(dt)

        if not x.is_contiguous():
            name = what if which is None else f"{what} {which}"
            raise InvalidArgumentError(f"{name} is a non-contiguous torch tensor: call .contiguous() first")
        if not x.is_cuda:
            name = _TORCH_DTYPES.get(x.dtype) or _dtype_name_of(x.dtype, what, which)
            # numpy has no bfloat16: torch refuses .numpy() for it, so its bytes travel as int16.
            arr = (x.view(torch.int16) if name == "bfloat16" else x).numpy()
            return ArrayRef(arr.__array_interface__["data"][0], -1, name, tuple(x.shape), (x, arr), "torch_cpu")
        device = x.get_device()
        return ArrayRef(x.data_ptr(), device, _TORCH_DTYPES.get(x.dtype) or _dtype_name_of(x.dtype, what, which),
                        tuple(x.shape), x, "torch", torch_current_streams((device,))[0])
    if which is not None:
        what = f"{what} {which}"
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        typestr = cai["typestr"]
        if typestr[1:] not in _TYPESTR:
            raise InvalidArgumentError(f"{what} has element type {typestr}, which mdtrt does not support")
        shape = tuple(int(d) for d in cai["shape"])
        strides = cai.get("strides")
        if strides is not None:
            itemsize = int(typestr[2:])
            expected, acc = [], itemsize
            for d in reversed(shape):
                expected.append(acc)
                acc *= d
            if tuple(strides) != tuple(reversed(expected)):
                raise InvalidArgumentError(f"{what} is not C-contiguous: make a contiguous copy first")
        ptr = int(cai["data"][0])
        device = _core.pointer_device(ptr) if ptr else 0
        stream = cai.get("stream") or 0
        return ArrayRef(ptr, device, _TYPESTR[typestr[1:]], shape, x, "cai", int(stream))
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return _describe_dlpack(x, what)
    if hasattr(x, "__array__") or isinstance(x, (list, tuple, float, int)):
        return describe(np.asarray(x), what)
    raise InvalidArgumentError(
        f"{what} of type {type(x).__name__} is not an array: pass a numpy array, a torch tensor, an object "
        "with __cuda_array_interface__ (CuPy, Numba) or with __dlpack__ (JAX)")


# DLPack's C ABI (dlpack.h, v0.8 and later, unversioned capsule "dltensor").
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


_DL_CPU, _DL_CUDA, _DL_CUDA_HOST = 1, 2, 3
# DLPack's type codes (dlpack.h DLDataTypeCode) by numpy kind; bfloat16 has a code of its own.
_DL_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}
_DL_BFLOAT = 4
# (DLPack code, bits) -> name, for every dtype of the core's table.
_DL_TYPES = {((_DL_BFLOAT, 16) if name == "bfloat16" else (_DL_CODES[np.dtype(name).kind], 8 * size)): name
             for name, size in ITEMSIZE.items()}


def _describe_dlpack(x: Any, what: str) -> ArrayRef:
    """An ArrayRef for a DLPack producer. The capsule is kept with the ref: its destructor releases
    the producer's tensor once mdtrt is done with it."""
    device_type, device_id = x.__dlpack_device__()
    if device_type not in (_DL_CPU, _DL_CUDA, _DL_CUDA_HOST):
        raise InvalidArgumentError(f"{what} lives on DLPack device type {device_type}; mdtrt takes CPU or CUDA arrays")
    # On CUDA, asking for the legacy default stream makes the producer order its pending work
    # before it; mdtrt then orders its rank streams after that stream. That stream belongs to the
    # array's device, which must be current while the producer exports (torch insists on it).
    if device_type == _DL_CUDA:
        previous = _core.current_device()
        _core.set_current_device(device_id)
        try:
            capsule = x.__dlpack__(stream=_LEGACY_DEFAULT_STREAM)
        finally:
            _core.set_current_device(previous)
    else:
        capsule = x.__dlpack__()
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    tensor = _DLTensor.from_address(get_pointer(capsule, b"dltensor"))
    dtype = _DL_TYPES.get((tensor.dtype.code, tensor.dtype.bits))
    if dtype is None or tensor.dtype.lanes != 1:
        raise InvalidArgumentError(f"{what} has DLPack type code {tensor.dtype.code}, {tensor.dtype.bits} bits, which "
                                   "mdtrt does not support")
    shape = tuple(tensor.shape[i] for i in range(tensor.ndim))
    if tensor.strides:
        expected, acc = [], 1
        for d in reversed(shape):
            expected.append(acc)
            acc *= d
        actual = tuple(tensor.strides[i] for i in range(tensor.ndim))
        if any(s != e for s, e, d in zip(actual, reversed(expected), shape) if d > 1):
            raise InvalidArgumentError(f"{what} is not C-contiguous: make a contiguous copy first")
    ptr = (tensor.data or 0) + tensor.byte_offset
    on_gpu = device_type == _DL_CUDA
    return ArrayRef(ptr, device_id if on_gpu else -1, dtype, shape, (x, capsule), "dlpack",
                    _LEGACY_DEFAULT_STREAM if on_gpu else 0)


class DeviceArray:
    """An output that lives on a GPU, owned by mdtrt.

    Exposes ``__cuda_array_interface__`` (version 3, C-contiguous, ``stream`` None: mdtrt has
    already ordered its writes before returning) so that ``torch.as_tensor(a, device=...)`` or
    ``cupy.asarray(a)`` use it without a copy. bfloat16 has no typestr in that interface and is
    described as 2-byte integers ("<i2"); view the result as bfloat16.

    Parameters
    ----------
    buffer : _core.PooledBuffer
        The device memory (``ptr``, ``device``); it returns to mdtrt's pool when the last reference
        to this array (or to a tensor made from it) goes.
    dtype : str
        mdtrt's dtype name (:data:`mdtrt.vocabulary.DTYPES`).
    shape : tuple of int
        Elements per dimension, C-contiguous.

    Attributes
    ----------
    dtype : str
    shape : tuple of int
    device : int
        CUDA device index that holds the memory.
    """

    def __init__(self, buffer, dtype: str, shape: tuple[int, ...]):
        self._buffer = buffer
        self.dtype = dtype
        self.shape = tuple(shape)
        self.device = buffer.device

    @property
    def ptr(self) -> int:
        """Device address of the first element, as an integer."""
        return self._buffer.ptr

    @property
    def nbytes(self) -> int:
        """Size in bytes (elements x bytes per element of ``dtype``)."""
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]

    @property
    def __cuda_array_interface__(self) -> dict:
        """CUDA array interface version 3: ``shape``, ``typestr`` (little-endian; "<i2" for
        bfloat16), ``data`` (pointer, read-only False), ``strides`` None (C-contiguous) and
        ``stream`` None (no synchronization asked of the consumer)."""
        # bfloat16 has no typestr: it is described as 2-byte integers (torch callers get a view back).
        typestr = {v: k for k, v in _TYPESTR.items()}.get(self.dtype, "i2")
        typestr = ("|" if typestr[1] == "1" else "<") + typestr
        return {"shape": self.shape, "typestr": typestr, "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": None}

    def numpy(self) -> np.ndarray:
        """A host copy, shape ``shape`` and dtype ``dtype`` (``ml_dtypes.bfloat16`` for bfloat16).

        Blocks until the copy is done; it is ordered after work on the device's legacy default stream
        only, so wait for other streams writing this array first.

        Returns
        -------
        numpy.ndarray
            ``nbytes`` bytes, shape ``shape``.

        Raises
        ------
        CudaError
            The copy failed (the device is not usable, the memory was freed).
        InvalidArgumentError
            A bfloat16 array without the ml_dtypes package installed.
        """
        raw = _core.copy_device_to_host(self.ptr, self.device, self.nbytes)
        return raw.view(numpy_dtype(self.dtype)).reshape(self.shape)

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def wrap_device_output(buffer, dtype: str, shape, like: ArrayRef | None):
    """A device output as the caller's kind of array, without a copy.

    Parameters
    ----------
    buffer : _core.PooledBuffer
        Owns the device memory; it returns to its pool when the array goes.
    dtype : str
        mdtrt's dtype name.
    shape : sequence of int
        Elements per dimension.
    like : ArrayRef or None
        An input of the call; when it is a torch CUDA tensor the output is one too.

    Returns
    -------
    DeviceArray or torch.Tensor
        A torch tensor on ``cuda:<buffer.device>`` (bfloat16 viewed as ``torch.bfloat16``) when
        ``like.kind == "torch"``, a DeviceArray otherwise.
    """
    array = DeviceArray(buffer, dtype, shape)
    if like is not None and like.kind == "torch":
        import torch

        if dtype == "bfloat16":
            return torch.as_tensor(array, device=f"cuda:{array.device}").view(torch.bfloat16)
        return torch.as_tensor(array, device=f"cuda:{array.device}")
    return array


def host_output(raw: np.ndarray, dtype: str, shape, like: ArrayRef | None = None):
    """A host output from its raw bytes, without a copy.

    Parameters
    ----------
    raw : numpy.ndarray
        The output's bytes (any 1-D dtype whose size matches ``dtype`` x ``prod(shape)``).
    dtype : str
        mdtrt's dtype name.
    shape : sequence of int
        Elements per dimension.
    like : ArrayRef, optional
        An input of the call; when it is a torch CPU tensor the output is one too.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        A view of ``raw`` with ``shape`` and ``dtype`` (``ml_dtypes.bfloat16`` for bfloat16), or a
        torch CPU tensor when ``like.kind == "torch_cpu"`` (bfloat16 included, without ml_dtypes).

    Raises
    ------
    InvalidArgumentError
        A bfloat16 numpy output without ml_dtypes installed.
    """
    if like is not None and like.kind == "torch_cpu":
        import torch

        return torch.from_numpy(raw).view(_torch_dtype(torch, dtype)).reshape(tuple(shape))
    return raw.view(numpy_dtype(dtype)).reshape(tuple(shape))


def _torch_dtype(torch, name: str):
    return getattr(torch, name)  # mdtrt's dtype names are torch's attribute names


def torch_allocator(shape, dtype: str, devices: list[int], like_shape, like_devices: list[int]):
    """A function that allocates one output per rank as a torch tensor from torch's caching
    allocator, all of one shape and dtype (a collective's).

    Parameters
    ----------
    shape : tuple of int
    dtype : str
        mdtrt's dtype name.
    devices : list of int
        CUDA device index of each rank.
    like_shape : tuple of int
        The shape of the tensors the function gets (of ``dtype``, one per rank: a call's inputs).
    like_devices : list of int
        Their CUDA devices.

    Returns
    -------
    callable
        ``allocate(likes)`` returns a list with one new tensor per rank, on its device. Where each
        of ``likes`` is on its rank's device, the outputs are made from them: ``torch.empty_like``
        for their shape, ``Tensor.new_empty`` for another; each costs about half of
        ``torch.empty`` with dtype and device arguments.
    """
    import torch

    # Loops rather than comprehensions: with a few ranks, a comprehension's set-up costs more.
    on_their_devices = list(like_devices) == list(devices)
    if on_their_devices and tuple(like_shape) == tuple(shape):
        empty_like = torch.empty_like

        def allocate(likes) -> list:
            out = []
            for x in likes:
                out.append(empty_like(x))
            return out
    elif on_their_devices and shape:
        sizes = tuple(int(d) for d in shape)  # as separate ints: a tuple argument parses slower

        def allocate(likes) -> list:
            out = []
            for x in likes:
                out.append(x.new_empty(*sizes))
            return out
    else:
        empty, torch_dtype = torch.empty, _torch_dtype(torch, dtype)
        targets = [torch.device("cuda", d) for d in devices]

        def allocate(likes) -> list:
            out = []
            for device in targets:
                out.append(empty(shape, dtype=torch_dtype, device=device))
            return out
    return allocate


def torch_output_factory(specs: list, devices: list[int]):
    """A function that allocates every rank's outputs as torch tensors from torch's caching allocator.

    Parameters
    ----------
    specs : list of list of (str, str, sequence of int)
        ``specs[i]`` lists rank i's outputs as (name, dtype name, shape).
    devices : list of int
        CUDA device index of each rank, same length as ``specs``.

    Returns
    -------
    callable
        ``allocate(likes=None)`` returns a list with one ``{name: ArrayRef}`` per rank; each ref
        (kind "torch") carries the stream current on its GPU at allocation time, since the caching
        allocator hands its blocks out in that stream's order. ``likes`` (optional): one torch
        tensor per rank (the rank's input); an output of its shape and dtype, when it is on the
        rank's GPU, is then allocated with ``torch.empty_like``, which costs about half of
        ``torch.empty`` with a device argument.
    """
    import torch

    plan = []
    for rank_specs, device in zip(specs, devices):
        plan.append((device, torch.device("cuda", device),
                     [(name, dtype, tuple(int(d) for d in shape), _torch_dtype(torch, dtype))
                      for name, dtype, shape in rank_specs]))
    empty, empty_like = torch.empty, torch.empty_like

    def allocate(likes=None) -> list[dict]:
        out = []
        for i, (index, device, outputs) in enumerate(plan):
            stream = torch_current_streams((index,))[0]
            like = likes[i] if likes is not None else None
            refs = {}
            for name, dtype, shape, torch_dtype in outputs:
                if (like is not None and like.dtype is torch_dtype and like.shape == shape
                        and like.get_device() == index):  # an input on another GPU is copied to this one
                    t = empty_like(like)
                else:
                    t = empty(shape, dtype=torch_dtype, device=device)
                refs[name] = ArrayRef(t.data_ptr(), index, dtype, shape, t, "torch", stream)
            out.append(refs)
        return out

    return allocate
