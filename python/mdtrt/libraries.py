"""What the run-time library searches (NCCL, TensorRT, its ONNX parser) report: every candidate
tried, in order, with the loader's message."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LoadAttempt:
    rule: str
    candidate: str
    loaded: bool
    message: str


def attempts_from(native) -> tuple[LoadAttempt, ...]:
    """Plain records from the extension's LoadAttempt objects."""
    return tuple(LoadAttempt(a.rule, a.candidate, a.loaded, a.message) for a in native)
