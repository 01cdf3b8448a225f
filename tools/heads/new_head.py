"""`train`: labeled rows -> features of the frozen bottom (cached) -> a numpy-trained head -> a
single-head version with the same bottom, ready for `merge`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_format.features import FeatureEncoder, pad_batch
from model_format.manifest import Head, Manifest, sha256_file
from tools.heads.data import read_labeled
from tools.heads.edit import EditError, export_heads, load_version, resolve_target
from tools.heads.features import FeatureStats, compute_features, encode_rows
from tools.heads.graph_edit import non_head_digest
from tools.heads.train import TrainConfig, TrainResult, head_scores, train_head
from tools.heads.verify import Report, VerificationError, run, session

EXPORT_CHECK_ROWS = 64
EXPORT_TOLERANCE = 1e-5


@dataclass
class NewHeadResult:
    path: Path
    head: Head
    features: FeatureStats
    training: TrainResult
    steps: dict[str, float]  # step -> seconds


def train_new_head(
    version_dir: Path,
    data: Path,
    srcid: int,
    name: str,
    out: Path,
    *,
    config: TrainConfig | None = None,
    cache_dir: Path | None,
    precisions: list[str] | None = None,
    report: Report = print,
    show_progress: bool = True,
) -> NewHeadResult:
    config = config or TrainConfig()
    steps: dict[str, float] = {}
    t = time.perf_counter()
    resolve_target(out, version_dir)  # fail on a bad --out before hours of work, not after
    base = load_version(version_dir)
    if srcid in base.manifest.srcids:
        report(f"note: {base.label} already has srcid {srcid}; merging this head will need --replace")
    if not name.strip():
        raise EditError("--name must not be empty")
    rows = read_labeled(data)
    digest = non_head_digest(base.model)
    steps["load"] = time.perf_counter() - t

    t = time.perf_counter()
    feats, used, stats = compute_features(base.path, base.manifest, digest, rows, cache_dir, report=report,
                                          show_progress=show_progress)
    steps["features"] = time.perf_counter() - t

    t = time.perf_counter()
    labels = np.array([rows[i].label for i in used], np.int64)
    queries = [rows[i].query for i in used]
    result = train_head(feats, labels, queries, base.manifest.head_hidden, config, report=report,
                        show_progress=show_progress)
    steps["train"] = time.perf_counter() - t

    t = time.perf_counter()
    head = Head(srcid, name, result.threshold)
    # The exported graph must reproduce the numpy head on real rows (catches a layout or folding slip).
    check_rows = [rows[int(i)] for i in used[:EXPORT_CHECK_ROWS]]
    want = head_scores(result.heads, feats[:EXPORT_CHECK_ROWS])

    def check(stage: Path, manifest: Manifest) -> None:
        encoded = [e for e in encode_rows(FeatureEncoder(stage, manifest), check_rows) if e is not None]
        got, _ = run(session(stage / manifest.precisions["fp32"]), [pad_batch(encoded)])
        diff = float(np.abs(got[:, 0].astype(np.float64) - want).max())
        if not diff <= EXPORT_TOLERANCE:
            raise VerificationError(f"the exported head differs from the trained one by {diff:.3g} "
                                    f"(limit {EXPORT_TOLERANCE:g}); nothing was published")
        report(f"export check: graph vs numpy head on {len(encoded)} rows: max |Δ| {diff:.3g}")

    v = result.val
    extra: dict[str, object] = {
        "source": "tools.heads train",
        "base": base.label,
        "data": {"file": data.name, "sha256": sha256_file(data), "rows": len(rows), "used": len(used)},
        "held_out": {"rows": v.rows, "positives": v.positives, "auc": round(v.auc, 6),
                     "threshold": round(v.threshold, 6), "precision": round(v.precision, 6),
                     "recall": round(v.recall, 6), "f1": round(v.f1, 6)},
        "training": {"epochs": result.epochs, "best_epoch": result.best_epoch, "lr": config.learning_rate,
                     "weight_decay": config.weight_decay, "class_weight": config.class_weight,
                     "val_fraction": config.val_fraction, "seed": config.seed},
    }
    path = export_heads(base.path, result.heads, [head], out, extra=extra, precisions=precisions, report=report,
                        before_publish=check)
    steps["export"] = time.perf_counter() - t
    report(f"wrote {path}: srcid {srcid} ({name}), threshold {head.threshold}")
    return NewHeadResult(path, head, stats, result, steps)
