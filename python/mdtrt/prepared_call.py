"""PreparedCall: one ProgramRunner call checked, converted and planned once, run again on the same
buffers (used by ProgramRunner.prepare and DeviceGroup's collectives)."""

from __future__ import annotations

from typing import Sequence

from . import arguments
from .arrays import ArrayRef, host_output, torch_output_factory, wrap_device_output
from .errors import InvalidArgumentError


class PreparedCall:
    """A ProgramRunner call whose arguments were checked, converted and planned once (the native
    ``PreparedInfer``): calling it runs the program again on the same buffers (their current
    contents), with no per-call argument work. Device arrays are ordered with the streams that were
    current when the call was prepared."""

    def __init__(self, runner, per_rank_refs: list[list[ArrayRef]], *, fetch_all: bool, poison_outputs: bool = False,
                 replication: str = "auto", timeout: float | None = None, fetch_ranks: Sequence[int] | None = None,
                 out: list[dict[str, ArrayRef]] | None = None, new_out=None,
                 torch_devices: list[int] | None = None, spec_cache: dict | None = None):
        # One pass over the inputs; a replicated input list is the same object on every rank.
        on_device = on_host = False
        native_by_list: dict[int, list] = {}
        native_inputs = []
        for refs in per_rank_refs:
            native = native_by_list.get(id(refs))
            if native is None:
                native = native_by_list[id(refs)] = [ref.as_native() for ref in refs]
                for ref in refs:
                    if ref.device >= 0:
                        on_device = True
                    else:
                        on_host = True
            native_inputs.append(native)
        if on_device and on_host:
            raise InvalidArgumentError("mix of host and device inputs: pass all numpy arrays or all device arrays")
        if out is not None and not on_device:
            raise InvalidArgumentError("preallocated outputs are for device inputs; with numpy inputs outputs come back as numpy")
        if out is not None and any(ref.device < 0 for given in out for ref in given.values()):
            raise InvalidArgumentError("preallocated outputs must be device arrays")
        n = len(per_rank_refs)
        fetch = [] if on_device else (list(range(n)) if fetch_all else list(fetch_ranks or [0]))
        # Checked and planned once, natively; calling it repeats the call (positional arguments:
        # pybind11 matches keywords noticeably slower).
        self._call = runner.prepare(native_inputs, replication, poison_outputs, fetch, on_device, float(timeout or 0.0),
                                    [[ref.as_output(name) for name, ref in given.items()] for given in out] if out else [])
        self._refs = per_rank_refs  # keeps the arrays alive as long as the call can run
        self._out = out
        # new_out(): fresh output buffers for every call ([{name: ArrayRef}] per rank), for outputs
        # the caller keeps (torch's caching allocator instead of the runner's pool).
        self._new_out = new_out if out is None and on_device else None
        self._on_device = on_device
        # Torch inputs whose output shapes are not known in advance (engines): the first call takes
        # pooled outputs and records the shapes in spec_cache (keyed by the inputs' dtypes and
        # shapes, which determine them); from then on, outputs come from torch's allocator.
        self._torch_devices = None
        if (self._new_out is None and out is None and on_device and torch_devices is not None
                and all(ref.kind == "torch" for refs in per_rank_refs for ref in refs)):
            self._torch_devices = list(torch_devices)
            self._spec_cache = spec_cache if spec_cache is not None else {}
            self._spec_key = tuple(tuple((ref.dtype, ref.shape) for ref in refs) for refs in per_rank_refs)
            specs = self._spec_cache.get(self._spec_key)
            if specs is not None:
                self._new_out = torch_output_factory(specs, self._torch_devices)

    def __call__(self) -> list[dict]:
        out = self._out
        if self._new_out is None:
            results = self._call()
        else:
            out = self._new_out()
            results = self._call([[ref.as_output(name) for name, ref in given.items()] for given in out])
        on_device, refs = self._on_device, self._refs
        if self._torch_devices is not None and self._new_out is None:
            specs = [list(res.outputs) for res in results]
            self._spec_cache[self._spec_key] = specs
            self._new_out = torch_output_factory(specs, self._torch_devices)
        outputs = []
        for i, res in enumerate(results):
            named = {}
            like = refs[i][0] if refs[i] else None
            host = None if on_device else res.host
            for k, (name, dtype, shape) in enumerate(res.outputs):
                if out and name in out[i]:
                    named[name] = out[i][name].owner
                elif on_device:
                    named[name] = wrap_device_output(res.device[k], dtype, shape, like)
                elif host:
                    named[name] = host_output(host[k], dtype, shape, like)
            outputs.append(named)
        return outputs
