"""NumPy reference of the eight DistCollective operations.

This module is the ground truth that the native NCCL collectives, the TensorRT DistCollective
layer and :func:`mdtrt.simulate` are checked against, so it favours being obviously right over
being fast.

Semantics (the same as NCCL and TensorRT's ``IDistCollectiveLayer``):

* ``inputs[r]`` is the tensor held by world rank ``r``; every rank holds the same shape and dtype.
* The collective runs along the first dimension: a tensor is seen as ``D`` row-major contiguous
  slices ``x[0], ..., x[D-1]``, and "chunk ``i`` of ``G``" is ``x[i*D/G:(i+1)*D/G]``.
* ``groups`` is the ordered list of world ranks taking part; the position of a world rank in it
  is its group-local rank. Ranks outside the group get ``None``.
* ``root`` is a world rank; it is mapped to its group-local position.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

from . import arguments
from .errors import InvalidArgumentError
from .vocabulary import COLLECTIVES, REDUCE_OPS, REDUCING, ROOTED

try:  # bfloat16 is only reachable through ml_dtypes; it is optional.
    import ml_dtypes as _ml_dtypes

    _BFLOAT16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    _BFLOAT16 = None

__all__ = ["OPERATIONS", "REDUCE_OPERATIONS", "collective"]

#: Collective operation names, as TensorRT's ONNX parser and polygraphy spell them.
OPERATIONS = COLLECTIVES
#: Reduction names accepted by the reducing operations.
REDUCE_OPERATIONS = REDUCE_OPS

_REDUCING_OPERATIONS = REDUCING
_ROOTED_OPERATIONS = ROOTED
# Operations that slice or concatenate along dim 0 need at least one dimension.
_DIM0_OPERATIONS = frozenset({"all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"})
# Operations whose dim 0 must split evenly over the group.
_SPLITTING_OPERATIONS = frozenset({"reduce_scatter", "all_to_all", "scatter"})

_SUPPORTED_DTYPES = tuple(
    np.dtype(t) for t in (np.float32, np.float16, np.int32, np.int8, np.uint8)
) + ((_BFLOAT16,) if _BFLOAT16 is not None else ())


def _supported_dtype_names() -> str:
    return ", ".join(str(d) for d in _SUPPORTED_DTYPES)


def _check_inputs(op: str, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(inputs, np.ndarray) or not isinstance(inputs, Sequence):
        raise InvalidArgumentError(
            "inputs must be a list with one array per world rank (inputs[r] is rank r's tensor), "
            f"got {type(inputs).__name__}"
        )
    if len(inputs) == 0:
        raise InvalidArgumentError("inputs is empty: give one array per world rank")
    arrays = []
    for rank, tensor in enumerate(inputs):
        if not isinstance(tensor, np.ndarray):
            raise InvalidArgumentError(f"inputs[{rank}] is a {type(tensor).__name__}, expected a numpy array")
        arrays.append(tensor)
    first = arrays[0]
    if first.dtype not in _SUPPORTED_DTYPES:
        bf16_note = "" if _BFLOAT16 is not None else " (install ml_dtypes for bfloat16)"
        raise InvalidArgumentError(
            f"unsupported dtype {first.dtype}; supported: {_supported_dtype_names()}{bf16_note}"
        )
    for rank, tensor in enumerate(arrays[1:], start=1):
        if tensor.shape != first.shape or tensor.dtype != first.dtype:
            raise InvalidArgumentError(
                f"every rank must hold the same shape and dtype: rank 0 has {first.shape} "
                f"{first.dtype}, rank {rank} has {tensor.shape} {tensor.dtype}"
            )
    if op in _DIM0_OPERATIONS and first.ndim == 0:
        raise InvalidArgumentError(f"{op} runs along dimension 0, so the tensors need at least one dimension")
    return arrays


def _check_groups(groups: Sequence[int] | None, world_size: int) -> list[int]:
    if groups is None or len(groups) == 0:
        return list(range(world_size))
    members = []
    for member in groups:
        if isinstance(member, (bool, np.bool_)) or not isinstance(member, numbers.Integral):
            raise InvalidArgumentError(f"groups must hold integer world ranks, got {member!r} in {list(groups)}")
        if not 0 <= int(member) < world_size:
            raise InvalidArgumentError(
                f"groups {list(groups)} names rank {int(member)}, outside the world of "
                f"{world_size} ranks (0..{world_size - 1})"
            )
        members.append(int(member))
    if len(set(members)) != len(members):
        raise InvalidArgumentError(f"groups {members} names a rank more than once; ranks must be distinct")
    return members


_REDUCERS = {"sum": np.sum, "prod": np.prod, "max": np.max, "min": np.min}


def _reduce(tensors: list[np.ndarray], reduce: str) -> np.ndarray:
    """Elementwise reduction over the ranks' tensors, exact where the dtype allows."""
    dtype = tensors[0].dtype
    if dtype.kind in "iu":
        # int64 arithmetic wraps modulo 2**64, so the low bits kept by the final cast are those
        # of the dtype's own wrapping arithmetic (float64 would lose them past 2**53).
        stacked = np.stack(tensors).astype(np.int64)
        if reduce == "avg":  # the exact mean of integers, truncated toward zero as C integer division does
            total = stacked.sum(axis=0)
            result = np.sign(total) * (np.abs(total) // len(tensors))
        else:
            result = _REDUCERS[reduce](stacked, axis=0)
        return result.astype(dtype)
    stacked = np.stack([t.astype(np.float64) for t in tensors])
    result = stacked.mean(axis=0) if reduce == "avg" else _REDUCERS[reduce](stacked, axis=0)
    with np.errstate(over="ignore"):  # overflow to inf is what the device would produce too
        return result.astype(dtype)


def _chunks(tensor: np.ndarray, count: int, op: str) -> list[np.ndarray]:
    rows = tensor.shape[0]
    if rows % count != 0:
        raise InvalidArgumentError(
            f"{op} splits dimension 0 into {count} equal chunks (one per group member), but "
            f"dimension 0 has size {rows}, which is not divisible by {count}"
        )
    size = rows // count
    return [tensor[i * size : (i + 1) * size] for i in range(count)]


def collective(
    op: str,
    inputs: list[np.ndarray],
    *,
    reduce: str = "sum",
    root: int = 0,
    groups: Sequence[int] | None = None,
) -> list[np.ndarray | None]:
    """Compute a DistCollective operation over simulated ranks.

    Parameters
    ----------
    op : str
        One of :data:`OPERATIONS`.
    inputs : list of numpy.ndarray
        ``inputs[r]`` is world rank ``r``'s tensor, shape ``(N, ...)``; all of one shape and dtype
        (float32, float16, int32, int8, uint8, or ml_dtypes' bfloat16 when installed).
    reduce : str
        ``sum``, ``prod``, ``max``, ``min`` or ``avg`` for the reducing operations (``all_reduce``,
        ``reduce``, ``reduce_scatter``); ignored by the others, which also accept ``none``.
    root : int
        World rank of the root for ``broadcast``, ``reduce``, ``gather``, ``scatter``; must be in
        ``groups``. Ignored by the other operations.
    groups : sequence of int, optional
        Ordered distinct world ranks taking part; ``None`` or ``[]`` means all ranks.

    Returns
    -------
    list of numpy.ndarray or None
        One entry per world rank: the output tensor, or ``None`` for ranks outside the group and
        for non-root members of ``reduce`` and ``gather`` (whose output is undefined). Shapes, for
        ``G`` group members: ``(G * N, ...)`` for all_gather and gather's root, ``(N / G, ...)`` for
        reduce_scatter and scatter, ``(N, ...)`` otherwise.

    Raises
    ------
    InvalidArgumentError
        (a ``ValueError``) An unknown op or reduction, inputs that are not one numpy array per rank of one shape and
        a supported dtype, a 0-d tensor for an op along dimension 0, invalid or repeated group
        ranks, a root outside the group, or a first dimension the group size does not divide.
    """
    # Exact names, as DeviceGroup.collective and the native core take them (no case folding):
    # mdtrt.simulate lower-cases the ONNX node's attribute itself before calling this.
    arguments.choice(op, "op", OPERATIONS)
    reduces = op in _REDUCING_OPERATIONS
    arguments.choice(reduce, "reduce", REDUCE_OPERATIONS if reduces else REDUCE_OPERATIONS + ("none",))
    arrays = _check_inputs(op, inputs)
    world_size = len(arrays)
    members = _check_groups(groups, world_size)
    group_size = len(members)

    root_local = None
    if op in _ROOTED_OPERATIONS:
        if isinstance(root, (bool, np.bool_)) or not isinstance(root, numbers.Integral):
            raise InvalidArgumentError(f"root must be an integer world rank, got {root!r}")
        if int(root) not in members:
            raise InvalidArgumentError(
                f"root {int(root)} of {op} is not in the group {members}; the root must be one of "
                "the group's world ranks"
            )
        root_local = members.index(int(root))

    group_inputs = [arrays[rank] for rank in members]
    if op in _SPLITTING_OPERATIONS:
        source = group_inputs[root_local] if op == "scatter" else group_inputs[0]
        _chunks(source, group_size, op)  # validates divisibility before any work

    # local_outputs[i] is group-local rank i's output.
    local_outputs: list[np.ndarray | None]
    if op == "all_reduce":
        reduced = _reduce(group_inputs, reduce)
        local_outputs = [reduced.copy() for _ in members]
    elif op == "reduce":
        local_outputs = [None] * group_size
        local_outputs[root_local] = _reduce(group_inputs, reduce)
    elif op == "reduce_scatter":
        reduced = _reduce(group_inputs, reduce)
        local_outputs = [chunk.copy() for chunk in _chunks(reduced, group_size, op)]
    elif op == "broadcast":
        local_outputs = [group_inputs[root_local].copy() for _ in members]
    elif op == "all_gather":
        gathered = np.concatenate(group_inputs, axis=0)
        local_outputs = [gathered.copy() for _ in members]
    elif op == "gather":
        local_outputs = [None] * group_size
        local_outputs[root_local] = np.concatenate(group_inputs, axis=0)
    elif op == "scatter":
        local_outputs = [chunk.copy() for chunk in _chunks(group_inputs[root_local], group_size, op)]
    else:  # all_to_all: member j receives chunk j of every member, in group order
        sent = [_chunks(tensor, group_size, op) for tensor in group_inputs]
        local_outputs = [
            np.concatenate([sent[i][j] for i in range(group_size)], axis=0) for j in range(group_size)
        ]

    outputs: list[np.ndarray | None] = [None] * world_size
    for local_rank, world_rank in enumerate(members):
        outputs[world_rank] = local_outputs[local_rank]
    return outputs
