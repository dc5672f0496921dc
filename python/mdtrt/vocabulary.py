"""The names mdtrt accepts, derived from the native core's tables (csrc/common/name_table.h and
the tables in csrc/runtime): collective operations, reduce ops, replication modes and dtypes.
Every Python list of these names comes from here, so that Python and C++ cannot drift apart."""

from __future__ import annotations

import difflib

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
    string close to one of ``known`` (a typo, another case, a missing underscore), else ``""``.

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
    by_key = {name.lower().replace("_", ""): name for name in known}
    key = value.lower().replace("_", "").replace("-", "").replace(" ", "")
    close = [by_key[key]] if key in by_key else [by_key[k] for k in difflib.get_close_matches(key, by_key, n=1)]
    return f" (did you mean {close[0]!r}?)" if close and close[0] != value else ""
