"""Stand-ins for torch CUDA tensors, torch's allocator and the native group, for the fast-path
tests on any machine (the one-shot collectives', EngineRunner.infer's): mdtrt reads of a torch
CUDA tensor only its dtype, shape, device, data pointer and contiguity, and allocates with
``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty``."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mdtrt import arrays


class Native:
    """A native group of 2 local ranks on GPUs 0 and 1 (DeviceGroup._adopt takes it)."""

    num_local_ranks = world_size = 2
    ranks = devices = [0, 1]

    def close(self):
        pass


class OneRankNative(Native):
    """This process's one rank of a world of 2 (as DeviceGroup.from_env() makes it)."""

    num_local_ranks = 1
    ranks = devices = [0]


class FakeCuda:
    """What mdtrt reads of a torch CUDA tensor: dtype, shape, device, data pointer, contiguity."""

    __module__ = "torch.fake"  # mdtrt recognizes torch tensors by their module
    __slots__ = ("dtype", "shape", "device_index", "ptr", "contiguous", "is_cuda", "__weakref__")

    def __init__(self, shape, device, ptr, dtype=None, contiguous=True, is_cuda=True):
        self.dtype = torch.float32 if dtype is None else dtype
        self.shape, self.device_index, self.ptr = torch.Size(shape), device, ptr
        self.contiguous, self.is_cuda = contiguous, is_cuda

    def is_contiguous(self):
        return self.contiguous

    def get_device(self):
        return self.device_index if self.is_cuda else -1

    def data_ptr(self):
        return self.ptr


def fake_torch(monkeypatch) -> SimpleNamespace:
    """Makes torch allocate FakeCuda tensors (at addresses from 0x900000) and torch's current
    stream on GPU d read 100 + d. Returns (allocated, how): every tensor allocated, and per
    allocation "empty", "empty_like" or "new_empty"."""
    monkeypatch.setattr(arrays, "_STREAM_GETTER", [lambda device: 100 + device])
    allocated, how = [], []

    def fake_empty(shape, dtype=None, device=None, via="empty"):
        how.append(via)
        allocated.append(FakeCuda(shape, device.index, 0x900000 + 0x1000 * len(allocated), dtype))
        return allocated[-1]

    def on(x):
        return torch.device("cuda", x.device_index)

    monkeypatch.setattr(torch, "empty", fake_empty)
    monkeypatch.setattr(torch, "empty_like", lambda x: fake_empty(x.shape, x.dtype, on(x), "empty_like"))
    monkeypatch.setattr(FakeCuda, "new_empty", lambda x, *sizes: fake_empty(sizes, x.dtype, on(x), "new_empty"),
                        raising=False)
    return SimpleNamespace(allocated=allocated, how=how)


def failing_runs(monkeypatch, call_class, message: str) -> list:
    """Makes ``call_class.run_flat`` (a stub native call's) raise ``RankTimeoutError(message)``
    once the returned list holds anything, as a run timed out with its work possibly queued."""
    import mdtrt

    fail: list = []
    real = call_class.run_flat

    def run_flat(self, *args, **kwargs):
        if fail:
            raise mdtrt.RankTimeoutError(message)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(call_class, "run_flat", run_flat)
    return fail


def recorded_addressed(monkeypatch, call_class) -> list:
    """Makes ``call_class.addressed`` (a stub native call's) record the arguments of each addressed
    run made, in the returned list, and make it as before."""
    made: list = []
    real = call_class.addressed

    def addressed(self, *args):
        made.append(args)
        return real(self, *args)

    monkeypatch.setattr(call_class, "addressed", addressed)
    return made


def runs_as_prepared(patch, call_class, as_prepared: bool) -> list:
    """For comparing a prepared call run as prepared with the general path: unless ``as_prepared``,
    every PreparedCall takes the general path (``_runs_as_prepared`` answers False); either way the
    returned list gets an entry per run of ``call_class.run_stream_ordered`` (a stub native call's
    run as prepared). ``patch``: a pytest MonkeyPatch."""
    from mdtrt import prepared_call

    if not as_prepared:
        patch.setattr(prepared_call.PreparedCall, "_runs_as_prepared", lambda self: False)
    runs: list = []
    real = call_class.run_stream_ordered
    patch.setattr(call_class, "run_stream_ordered", lambda self: runs.append(real(self)))
    return runs
