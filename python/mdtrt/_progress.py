"""Where progress is shown: tqdm bars redraw in place, which only a terminal shows as such; into
a log file or a CI log they write one long line of carriage returns."""

from __future__ import annotations

import sys


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` is a terminal (False when it was replaced by an object without
    ``isatty``, closed, or set to None)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
