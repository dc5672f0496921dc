"""The names mdtrt accepts, derived from the native core's tables (csrc/common/name_table.h and
the tables in csrc/runtime): collective operations, reduce ops, replication modes and dtypes.
Every Python list of these names comes from here, so that Python and C++ cannot drift apart."""

from __future__ import annotations

from . import _core

__all__ = ["COLLECTIVES", "REDUCE_OPS", "REDUCING", "ROOTED", "REPLICATION_MODES", "DTYPES", "did_you_mean"]

#: The eight DistCollective operations, in TensorRT's order ("all_reduce", ..., "scatter").
COLLECTIVES: tuple[str, ...] = tuple(_core.collective_ops())
#: Reduce ops a reducing operation accepts ("sum", "prod", "max", "min", "avg"); the core's table
#: also has "none", which the operations that do not reduce take.
REDUCE_OPS: tuple[str, ...] = tuple(name for name in _core.reduce_ops() if name != "none")
#: The operations that reduce (all_reduce, reduce, reduce_scatter).
REDUCING: frozenset[str] = frozenset(op for op in COLLECTIVES if _core.op_reduces(op))
#: The operations that have a root rank (broadcast, reduce, gather, scatter).
ROOTED: frozenset[str] = frozenset(op for op in COLLECTIVES if _core.op_has_root(op))
#: How an input every rank needs reaches every GPU ("auto", "host", "peer", "broadcast").
REPLICATION_MODES: tuple[str, ...] = tuple(_core.replication_modes())
#: Every element type mdtrt moves, by name ("float32", "float16", "bfloat16", ...).
DTYPES: tuple[str, ...] = tuple(_core.dtype_sizes())


def did_you_mean(value: object, known) -> str:
    """For an error about an unknown name: ``" (did you mean 'all_reduce'?)"`` when ``value`` is a
    string close to one of ``known`` (another case, a missing or different separator, or at most a
    third of its letters wrong), else ``""``. It is the native core's function, so that the Python
    checks and the core's name tables suggest the same name.

    Parameters
    ----------
    value : object
        What the caller passed (anything: a non-string gets no suggestion).
    known : iterable of str
        The names accepted.

    Returns
    -------
    str
        The suggestion, starting with a space, or the empty string.
    """
    if not isinstance(value, str):
        return ""
    return _core.did_you_mean(value, [str(name) for name in known])
