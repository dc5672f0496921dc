"""Checks of the arguments of mdtrt's public calls (DeviceGroup, its collectives, EngineRunner):
a wrong type or value raises InvalidArgumentError naming the argument, what it expects and what it
got, instead of a TypeError or AttributeError from deep inside."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Sequence

import numpy as np

from .errors import InvalidArgumentError
from .vocabulary import did_you_mean


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def fail(name: str, expected: str, value: Any) -> InvalidArgumentError:
    """The error for argument ``name``: it expects ``expected``, it got ``value``.

    Parameters
    ----------
    name : str
        The argument as the caller wrote it ("gpus", "timeout", "inputs['x']").
    expected : str
        What it must be, in words ("a positive, finite number of seconds").
    value : object
        What was given; its repr (cut at 60 characters) and type go into the message.

    Returns
    -------
    InvalidArgumentError
        Not raised: the caller raises it (``raise fail(...)``), so the traceback ends there.
    """
    return InvalidArgumentError(f"{name} must be {expected}, got {_got(value)}")


def input_file(path: str | os.PathLike, what: str, remedy: str) -> str:
    """``path`` as a str, when it names a file that can be read.

    Parameters
    ----------
    path : str or os.PathLike
        The path the caller gave.
    what : str
        What the file is, in words, as the message starts ("engine file", "hints: file").
    remedy : str
        What to give instead, in words ("give the path of a serialized TensorRT plan").

    Returns
    -------
    str
        ``os.fspath(path)``.

    Raises
    ------
    InvalidArgumentError
        The path does not exist (a relative one names the working directory it was taken from),
        is a directory, cannot be read or is an empty file; the message ends with ``remedy``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        problem = "is a directory"
    elif not os.path.exists(path):
        problem = "does not exist" + ("" if os.path.isabs(path) else
                                      f" (a relative path, taken from the working directory {os.getcwd()})")
    elif not os.access(path, os.R_OK):
        problem = "cannot be read (permission denied)"
    elif os.path.isfile(path) and os.path.getsize(path) == 0:
        problem = "is empty (0 bytes; was its writing interrupted?)"
    else:
        return path
    raise InvalidArgumentError(f"{what} {path} {problem}: {remedy}")


def integer(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an int (bool refused: True is not a GPU id or a count).

    Parameters
    ----------
    value : object
        Any ``numbers.Integral`` (numpy integers too).
    name : str
        How the message names the argument.
    minimum : int, optional
        Smallest value allowed.

    Returns
    -------
    int

    Raises
    ------
    InvalidArgumentError
        ``value`` is a bool or not an integer, or is below ``minimum``.
    """
    if type(value) is int and (minimum is None or value >= minimum):
        return value  # the common case, without the Integral ABC check (it runs on every call)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail(name, "an integer" + (f" >= {minimum}" if minimum is not None else ""), value)
    if minimum is not None and value < minimum:
        raise fail(name, f"an integer >= {minimum}", value)
    return int(value)


def integers(value: Any, name: str, *, hint: str = "") -> list[int]:
    """A list or tuple of ints (a range or a 1-D numpy array too); a single int or a string is refused.

    Parameters
    ----------
    value : object
        A sequence, range or 1-D numpy array whose elements are ``numbers.Integral`` (bools refused).
    name : str
        How the message names the argument.
    hint : str, optional
        Added to the message: how to write it right.

    Returns
    -------
    list of int

    Raises
    ------
    InvalidArgumentError
        ``value`` is a string, bytes, a non-sequence or a numpy array that is not 1-D, or an element
        is not an integer (its index named).
    """
    if (isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, range, np.ndarray))
            or isinstance(value, np.ndarray) and value.ndim != 1):
        raise InvalidArgumentError(f"{name} must be a list of integers, got {_got(value)}" + (f"; {hint}" if hint else ""))
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise InvalidArgumentError(f"{name} must be a list of integers, got {_got(value)}: element {i} is "
                                       f"{_got(v)}" + (f"; {hint}" if hint else ""))
        out.append(int(v))
    return out


def seconds(value: Any, name: str = "timeout") -> float:
    """A positive, finite number of seconds.

    Parameters
    ----------
    value : object
        Any ``numbers.Real`` (bools refused).
    name : str, optional
        How the message names the argument (default "timeout").

    Returns
    -------
    float
        Seconds, > 0 and finite.

    Raises
    ------
    InvalidArgumentError
        ``value`` is not a real number, is <= 0, NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise fail(name, "a positive, finite number of seconds", value)
    return float(value)


def rank_count(value: Any, name: str = "ranks") -> int:
    """A number of ranks: a positive int (a bool, a float or a numpy integer is refused: hints
    carry it as JSON, and a model is sharded for a whole number of ranks).

    Parameters
    ----------
    value : object
        What the caller gave.
    name : str, optional
        How the message names the argument (default "ranks").

    Returns
    -------
    int
        ``value``.

    Raises
    ------
    InvalidArgumentError
        "ranks must be a positive integer, got 0": ``value`` is not an int, or is below 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    return value


def non_negative(value: Any, name: str) -> float:
    """A finite number >= 0 (a tolerance).

    Parameters
    ----------
    value : object
        Any ``numbers.Real`` (bools refused).
    name : str
        How the message names the argument ("atol").

    Returns
    -------
    float
        ``value``, >= 0 and finite.

    Raises
    ------
    InvalidArgumentError
        ``value`` is not a real number, is negative, NaN or infinite (a negative tolerance would
        fail every comparison without saying why).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or not math.isfinite(value):
        raise fail(name, "a finite number >= 0", value)
    return float(value)


def flag(value: Any, name: str) -> bool:
    """True or False (numpy booleans too); anything else is a mistake worth naming.

    Parameters
    ----------
    value : object
    name : str
        How the message names the argument.

    Returns
    -------
    bool

    Raises
    ------
    InvalidArgumentError
        ``value`` is neither a bool nor a ``numpy.bool_`` (0 and 1 included).
    """
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise fail(name, "True or False", value)


def optional_flag(value: Any, name: str) -> bool | None:
    """:func:`flag` for a switch whose None means "decide for me": None, True or False.

    Raises InvalidArgumentError (naming all three) for anything else.
    """
    if value is None or value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise fail(name, "True, False or None", value)


def choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` when it is exactly one of the names ``choices`` (case and separators included).

    The one refusal of a name from a fixed vocabulary (collective op, reduce op, replication mode,
    context-parallel strategy, backend, dtype): every Python entry point calls this, and the native
    core's name tables (csrc/common/name_table.h) refuse in the same words, with the same
    suggestion: ``op is 'all-reduce' (did you mean 'all_reduce'?); it must be one of: all_reduce,
    all_gather, ...``.

    Parameters
    ----------
    value : object
        What the caller gave.
    name : str
        How the message names the argument ("op", "replication", "hints field 'strategy'").
    choices : sequence of str
        The accepted names, in the order the message lists them.

    Returns
    -------
    str
        ``value`` itself.

    Raises
    ------
    InvalidArgumentError
        ``value`` is not one of ``choices``: the message names the argument, the value given, the
        name it is close to (:func:`mdtrt.vocabulary.did_you_mean`) and every accepted name.
    """
    if isinstance(value, str) and value in choices:
        return value
    given = repr(value) if isinstance(value, str) else _got(value)
    raise InvalidArgumentError(f"{name} is {given}{did_you_mean(value, choices)}; it must be one of: "
                               + ", ".join(choices))


def per_rank(value: Any, name: str, n: int, entry: str = "entry") -> list:
    """One ``entry`` per local rank, as a list (a single one stands for a list of one).

    Parameters
    ----------
    value : object
        A list or tuple with one element per rank; anything else is one element.
    name : str
        How the message names the argument.
    n : int
        Number of local ranks.
    entry : str, optional
        What one element is, in the message (default "entry").

    Returns
    -------
    list
        ``n`` elements, in rank order.

    Raises
    ------
    InvalidArgumentError
        The number of elements is not ``n``.
    """
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) != n:
        raise InvalidArgumentError(f"{name} needs one {entry} per local rank: got {len(values)} for {n}")
    return values
