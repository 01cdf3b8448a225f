"""Number formatting for reports: one place, so every table writes a figure the same way."""

from __future__ import annotations


def fmt_ms(x: float | None) -> str:
    return "–" if x is None else f"{x:,.1f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"
