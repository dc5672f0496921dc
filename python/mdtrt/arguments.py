"""Checks of the arguments of mdtrt's public calls (DeviceGroup, its collectives, EngineRunner):
a wrong type or value raises InvalidArgumentError naming the argument, what it expects and what it
got, instead of a TypeError or AttributeError from deep inside."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

from .errors import InvalidArgumentError


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def fail(name: str, expected: str, value: Any) -> InvalidArgumentError:
    """The error for argument ``name``: it expects ``expected``, it got ``value``."""
    return InvalidArgumentError(f"{name} must be {expected}, got {_got(value)}")


def integer(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an int (bool refused: True is not a GPU id or a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail(name, "an integer" + (f" >= {minimum}" if minimum is not None else ""), value)
    if minimum is not None and value < minimum:
        raise fail(name, f"an integer >= {minimum}", value)
    return int(value)


def integers(value: Any, name: str, *, hint: str = "") -> list[int]:
    """A list or tuple of ints (a range or a 1-D numpy array too); a single int or a string is refused. ``hint`` is
    added to the message (how to write it right)."""
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
    """A positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):
        raise fail(name, "a positive number of seconds", value)
    return float(value)


def flag(value: Any, name: str) -> bool:
    """True or False (numpy booleans too); anything else is a mistake worth naming."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise fail(name, "True or False", value)


def choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` when it is one of the strings ``choices``.

    Raises
    ------
    InvalidArgumentError
        Naming ``name``, the choices and the value given, otherwise.
    """
    if not isinstance(value, str) or value not in choices:
        raise fail(name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def per_rank(value: Any, name: str, n: int, entry: str = "entry") -> list:
    """One ``entry`` per local rank, as a list (a single one stands for a list of one)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) != n:
        raise InvalidArgumentError(f"{name} needs one {entry} per local rank: got {len(values)} for {n}")
    return values
