"""compare_outputs: how far one set of outputs is from a reference (numpy only: the check that
``simulate``, the attention sample and the tests share)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from . import arguments
from .errors import InvalidArgumentError

__all__ = ["compare_outputs", "ComparisonReport", "OutputComparison"]


@dataclass
class OutputComparison:
    """One output's verdict: ``passed``, the largest absolute error, that error over the largest
    reference magnitude (``max_rel_error``; inf for a nonzero error against a reference whose finite
    values are all zeros, which :meth:`ComparisonReport.format` calls undefined), and ``detail``: why it failed without a
    number (missing output, wrong shape, non-finite values), else "".
    """
    name: str
    passed: bool
    max_abs_error: float
    max_rel_error: float
    detail: str = ""


@dataclass
class ComparisonReport:
    """How far one set of outputs is from a reference. An output passes when
    ``max|actual - expected| <= atol + rtol * max|expected|`` over the values finite in both, and
    it holds the reference's NaN and inf values exactly where the reference does (see
    :func:`compare_outputs`).
    ``unexpected``: the names of outputs that only the compared ones have (not compared; a
    renamed output shows here and as missing)."""

    outputs: list[OutputComparison]
    atol: float
    rtol: float
    unexpected: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every output passed."""
        return all(o.passed for o in self.outputs)

    def format(self, label: str = "multi-device vs single-device") -> str:
        """A human-readable report: a header with the pass rule, then one PASS/FAIL line per output
        (and one naming the outputs not in the reference, unless a missing one names them)."""
        lines = [f"{label} (pass: max abs error <= {self.atol:g} + {self.rtol:g} * max |reference|):"]
        for o in self.outputs:
            verdict = "PASS" if o.passed else "FAIL"
            if o.detail:
                lines.append(f"  {o.name}: {verdict}: {o.detail}")
            else:
                # A reference whose finite values are all zeros (all of them, or beside its NaN and
                # inf) has no scale to be relative to: the absolute error decides.
                relative = ("undefined (the reference's finite values are all zeros)" if np.isinf(o.max_rel_error)
                            and np.isfinite(o.max_abs_error) else f"{o.max_rel_error:.3g}")
                lines.append(f"  {o.name}: {verdict}: max abs error {o.max_abs_error:.3g}, max rel error {relative}")
        if self.unexpected and all(o.detail != _missing(self.unexpected) for o in self.outputs):
            lines.append(f"  not in the reference, not compared: {', '.join(self.unexpected)}")
        return "\n".join(lines)


def _missing(unexpected: list[str]) -> str:
    """Why an output of the reference failed when the outputs lack it (naming what they have instead)."""
    return "missing from the outputs" + (f" (they have: {', '.join(unexpected)})" if unexpected else "")


def compare_outputs(
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    *,
    atol: float,
    rtol: float,
) -> ComparisonReport:
    """Compare ``actual`` to ``expected`` output by output.

    An output passes when ``max|actual - expected| <= atol + rtol * max|expected|`` (computed in
    float64 over the values finite in both) and it holds the reference's NaN and inf values exactly
    where the reference does. The relative error reported is
    the max absolute error over the largest reference magnitude, which stays meaningful where
    individual reference values are near zero.

    Parameters
    ----------
    expected : mapping of str to array
        The reference outputs by name (any numeric dtype numpy can convert to float64).
    actual : mapping of str to array
        The outputs to check; an output of ``expected`` missing here, or of another shape, fails.
        Extra outputs are not compared; the report names them (``unexpected``).
    atol, rtol : float
        Absolute tolerance (in the outputs' units) and tolerance relative to ``max|expected|``.

    Returns
    -------
    ComparisonReport
        One :class:`OutputComparison` per expected output; ``report.passed`` when all pass.

    Raises
    ------
    InvalidArgumentError
        ``expected`` or ``actual`` is not a dict (a list of one dict per rank says to pick a rank),
        or a tolerance is not a finite number >= 0.
    """
    for argument, outputs in (("expected", expected), ("actual", actual)):
        if not isinstance(outputs, Mapping):
            per_rank = isinstance(outputs, (list, tuple)) and outputs and all(isinstance(o, Mapping) for o in outputs)
            raise InvalidArgumentError(
                f"{argument} must be a dict of output name to array, got {type(outputs).__name__}" + (
                    f" of {len(outputs)} dicts (one per rank, as simulate returns them): compare one rank's "
                    f"outputs, e.g. {argument}[0], or each rank's in turn" if per_rank else ""))
    atol, rtol = arguments.non_negative(atol, "atol"), arguments.non_negative(rtol, "rtol")
    results = []
    unexpected = [str(name) for name in actual if name not in expected]
    for name, want in expected.items():
        if name not in actual:
            results.append(OutputComparison(name, False, np.inf, np.inf, _missing(unexpected)))
            continue
        want = np.asarray(want)
        got = np.asarray(actual[name])
        if got.shape != want.shape:
            results.append(
                OutputComparison(name, False, np.inf, np.inf, f"shape {got.shape}, expected {want.shape}")
            )
            continue
        want64, got64 = want.astype(np.float64), got.astype(np.float64)
        if want.size == 0:
            results.append(OutputComparison(name, True, 0.0, 0.0))
            continue
        # The errors are over the values finite in both; elsewhere both must hold the same NaN or inf
        # (inf - inf would be NaN, and fail an output that matches its reference).
        finite_want, finite_got = np.isfinite(want64), np.isfinite(got64)
        both = finite_want & finite_got
        same_non_finite = bool(np.array_equal(got64[~both], want64[~both], equal_nan=True))
        scale = float(np.max(np.abs(want64[both]), initial=0.0))
        max_abs = float(np.max(np.abs(got64[both] - want64[both]), initial=0.0))
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf)
        passed = same_non_finite and max_abs <= atol + rtol * scale
        detail = ("" if same_non_finite else "non-finite values where the reference has finite ones"
                  if np.any(finite_want & ~finite_got) else "values other than the reference's where it is non-finite")
        results.append(OutputComparison(name, passed, max_abs, max_rel, detail))
    return ComparisonReport(results, atol, rtol, unexpected)
