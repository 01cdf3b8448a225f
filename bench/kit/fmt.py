"""Number formatting for reports: one place, so every table writes a figure the same way. A missing value
(None or NaN) is always an en dash."""

from __future__ import annotations

import math
from collections.abc import Sequence

DASH = "–"


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def num(x: float | None, digits: int = 1, suffix: str = "") -> str:
    """1,234.5 (thousands separated)."""
    return DASH if x is None or _missing(x) else f"{x:,.{digits}f}{suffix}"


def pct(x: float | None, digits: int = 0) -> str:
    """A fraction as a percentage: 0.25 -> 25%."""
    return DASH if x is None or _missing(x) else f"{100 * x:.{digits}f}%"


def ratio(x: float | None, digits: int = 2) -> str:
    """1.80×."""
    return DASH if x is None or _missing(x) else f"{x:.{digits}f}×"


def ms(x: float | None) -> str:
    """A latency with its unit: 12.3 ms, 1,234 ms."""
    return DASH if x is None or _missing(x) else f"{x:,.0f} ms" if x >= 100 else f"{x:.1f} ms"


def mib(x: float | None, unit: bool = True) -> str:
    return num(x, 0, " MiB" if unit else "")


def signed(x: float | None, digits: int = 0, suffix: str = "") -> str:
    """+12 / -3 (a change)."""
    return DASH if x is None or _missing(x) else f"{x:+,.{digits}f}{suffix}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    """A Markdown table; `align` has one letter per column (l, r or c; default r but the first column l)."""
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    spec = align or "l" + "r" * (len(header) - 1)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in spec) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]
