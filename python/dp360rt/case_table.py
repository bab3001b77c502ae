"""The pass/fail table the ``verify`` commands print: one row per checked case.

A row is the case name, its error columns, PASS or FAIL, then the worst output or, when the case
could not be compared, the message instead of the numbers. Both ``dp360rt verify``
(:mod:`dp360rt.verify`) and ``dp360rt panohead verify`` (:mod:`dp360rt.panohead.verify`) print one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class CaseResult:
    """One checked case: ``ok``, the errors (``max_abs``, ``rel`` = max abs error / max |expected|,
    against ``tol``), the worst output's name, or a ``message`` when it could not be compared."""

    name: str
    ok: bool
    max_abs: float = float("nan")
    rel: float = float("nan")
    tol: float = float("nan")
    worst: str = ""
    message: str = ""


@dataclass(frozen=True)
class CaseTable:
    """Column layout of a verify table of :class:`CaseResult` rows. ``columns``: (title, result
    attribute, width, format spec) per error column."""

    name_width: int
    columns: tuple[tuple[str, str, int, str], ...]

    @property
    def header(self) -> str:
        cells = [f"{title:>{width}}" for title, _, width, _ in self.columns]
        return " ".join([f"{'case':<{self.name_width}}", *cells]) + "  result"

    def row(self, r: Any) -> str:
        status = "PASS" if r.ok else "FAIL"
        if r.message:
            cells = [f"{'-':>{width}}" for _, _, width, _ in self.columns]
            tail = r.message
        else:
            cells = [f"{getattr(r, attr):{width}{spec}}" for _, attr, width, spec in self.columns]
            tail = f"worst: {r.worst}"
        return " ".join([f"{r.name:<{self.name_width}}", *cells]) + f"  {status}  {tail}"
