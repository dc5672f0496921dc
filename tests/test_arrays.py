"""How arrays are seen on their way to the ranks (no GPU needed)."""

from __future__ import annotations

import numpy as np
import pytest

import mdtrt
from mdtrt.arrays import describe


class DLPackOnly:
    """An array that only speaks DLPack, like a JAX array (here backed by numpy on the CPU)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, stream=None):
        return self._array.__dlpack__()

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int8", "uint8", "int64"])
def test_dlpack_host_array_is_used_in_place(dtype):
    base = (np.random.default_rng(0).standard_normal((3, 5)) * 10).astype(dtype)
    ref = describe(DLPackOnly(base))
    assert (ref.ptr, ref.device, ref.dtype, ref.shape) == (base.ctypes.data, -1, dtype, (3, 5))
    assert ref.nbytes == base.nbytes


def test_dlpack_view_with_offset_points_at_its_first_element():
    base = np.arange(40, dtype=np.float32).reshape(8, 5)
    view = base[2:5]  # contiguous rows, data starts 2 rows in
    ref = describe(DLPackOnly(view))
    assert ref.ptr == base.ctypes.data + 2 * 5 * 4 and ref.shape == (3, 5)


def test_dlpack_non_contiguous_is_refused():
    with pytest.raises(mdtrt.InvalidArgumentError, match="contiguous"):
        describe(DLPackOnly(np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]))


def test_numpy_and_unsupported_inputs():
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    ref = describe(x)
    assert (ref.ptr, ref.device, ref.dtype, ref.shape, ref.kind) == (x.ctypes.data, -1, "int32", (2, 3), "numpy")
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    contiguous = describe(fortran)
    assert contiguous.ptr != fortran.ctypes.data and np.array_equal(contiguous.owner, fortran)
    with pytest.raises(mdtrt.InvalidArgumentError, match="not supported"):
        describe(np.ones(3, np.complex64))
    with pytest.raises(mdtrt.InvalidArgumentError, match="not an array"):
        describe(object())


def test_ml_dtypes_bfloat16_host_array_round_trip():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from mdtrt.arrays import host_output

    x = np.random.default_rng(5).standard_normal((3, 4)).astype(ml_dtypes.bfloat16)
    ref = describe(x)
    assert (ref.dtype, ref.shape, ref.nbytes, ref.kind) == ("bfloat16", (3, 4), 24, "numpy")
    arg = ref.as_native()
    assert (arg.dtype, arg.nbytes, arg.ptr) == ("bfloat16", 24, x.ctypes.data)
    raw = np.frombuffer(x.tobytes(), np.uint8).copy()  # what the native runner hands back
    out = host_output(raw, "bfloat16", (3, 4), ref)
    assert out.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(out.view(np.uint16), x.view(np.uint16))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int32"])
def test_torch_cpu_tensors_travel_as_their_bytes_and_come_back_as_torch(dtype):
    """torch refuses .numpy() for bfloat16 ("Got unsupported ScalarType BFloat16"): its bytes travel
    as int16, and torch in gives torch out, bfloat16 included."""
    torch = pytest.importorskip("torch")
    from mdtrt.arrays import host_output

    t = (torch.randn(4, 5) * 10).to(getattr(torch, dtype))
    ref = describe(t)
    assert (ref.ptr, ref.device, ref.dtype, ref.shape, ref.kind) == (t.data_ptr(), -1, dtype, (4, 5), "torch_cpu")
    assert ref.nbytes == t.numel() * t.element_size()
    raw = t.contiguous().view(torch.uint8).reshape(-1).numpy().copy()
    out = host_output(raw, dtype, (4, 5), ref)
    assert isinstance(out, torch.Tensor) and out.dtype == t.dtype and tuple(out.shape) == (4, 5)
    assert torch.equal(out, t)


@pytest.mark.parametrize("make", [lambda: np.ones(3, np.complex64), lambda: np.ones((2, 2), np.uint16),
                                  lambda: [1 + 2j, 3j], lambda: np.array(["a", "b"])])
def test_an_unsupported_dtype_names_the_array_and_how_to_convert_it(make):
    """A numpy input of a dtype mdtrt does not move says which argument it is (as the group and
    the runner name them), which dtypes are taken, and how to convert it."""
    with pytest.raises(mdtrt.InvalidArgumentError) as error:
        describe(make(), "input of rank", 1)
    message = str(error.value)
    assert message.startswith("input of rank 1: dtype "), message
    assert "float32, float16, bfloat16" in message and "x.astype(numpy.float32)" in message, message


def test_an_unsupported_torch_dtype_names_the_tensor():
    torch = pytest.importorskip("torch")
    with pytest.raises(mdtrt.InvalidArgumentError) as error:
        describe(torch.ones(3, dtype=torch.complex64), "input", "'x'")
    message = str(error.value)
    assert message.startswith("input 'x': dtype torch.complex64 is not supported"), message
    assert "x.to(torch.float32)" in message, message
