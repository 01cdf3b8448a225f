"""The `python -m bench.heads` report: each step of labeled rows -> a new head serving, in seconds."""

from __future__ import annotations

from typing import Any

from bench.kit.fmt import num, table


def markdown(doc: dict[str, Any]) -> str:
    f, val = doc["features"], doc["held_out"]
    return "\n".join([
        f"Head lifecycle: {doc['rows']:,} rows -> srcid {doc['new_srcid']} serving in `{doc['merged']}` "
        f"({doc['cpu_count']} CPUs)", "",
        *table(["step", "seconds"], [[step, num(s, 2)] for step, s in doc["seconds"].items()]), "",
        f"Features: {f['computed']:,} computed of {f['distinct']:,} distinct inputs ({num(f['rows_per_s'])} rows/s). "
        f"Held out: {val['rows']:,} rows, AUC {num(val['auc'], 4)}, F1 {num(val['f1'], 4)} ({doc['epochs']} epochs). "
        f"After the swap: {doc['unchanged_scores']} old scores on {doc['probe_queries']} queries unchanged; the new "
        f"head scores {num(doc['new_srcid_score'], 6)}.", ""])
