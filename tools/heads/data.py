"""Labeled rows for training a head: JSON lines with `query`, optional `title`, `site`, `ner`,
`industry`, and a 0/1 `label` (also accepted: true/false, "0"/"1", 0.0/1.0)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A labeled file or row that cannot be used; the message names the line."""


@dataclass(frozen=True)
class LabeledRow:
    query: str
    title: str | None
    site: str | None
    ner: tuple[str, ...]
    industry: str | None
    label: int


def _label(value: object, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    raise DataError(f"{where}: label must be 0 or 1, got {value!r}")


def _optional_text(doc: dict[str, object], key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {key} must be a string, got {type(value).__name__}")
    return value


def parse_row(doc: object, where: str) -> LabeledRow:
    if not isinstance(doc, dict):
        raise DataError(f"{where}: expected a JSON object")
    query = doc.get("query")
    if not isinstance(query, str) or not query.strip():
        raise DataError(f"{where}: query must be a non-empty string")
    if "label" not in doc:
        raise DataError(f"{where}: no label")
    ner = doc.get("ner") or ()
    if isinstance(ner, str):
        ner = (ner,)
    if not isinstance(ner, list | tuple) or not all(isinstance(t, str) for t in ner):
        raise DataError(f"{where}: ner must be a string or a list of strings")
    return LabeledRow(query, _optional_text(doc, "title", where), _optional_text(doc, "site", where),
                      tuple(ner), _optional_text(doc, "industry", where), _label(doc["label"], where))


def read_labeled(path: Path) -> list[LabeledRow]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not JSON: {exc}") from exc
            rows.append(parse_row(doc, f"{path}:{lineno}"))
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows

