"""The frozen bottom's `features` for labeled rows, computed once and cached on disk.

The cache is a folder per bottom (`<cache>/<key>/`, the key covering `bottom_fingerprint`, every
non-head tensor and node, and the ONNX Runtime version) holding `.npz` shards of
(request key, feature row). A request key is a hash of the ids the server would feed the graph
(tokens, token types, look-up ids), so identical requests are computed once, a re-run only computes
rows it has not seen, and an interrupted run resumes from its last shard. Any version with the same
bottom (a merged one, say) shares the cache.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from model_format.features import EncodedRequest, FeatureEncoder, FeatureError, pad_batch
from model_format.manifest import Manifest
from tools.heads.data import LabeledRow
from tools.heads.verify import Report, session

MAX_BATCH_ROWS = 64
MAX_BATCH_TOKENS = 8192
SHARD_ROWS = 2048
KEY_BYTES = 16
ENV_CACHE = "SCORING_HEADS_CACHE"


def default_cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "scoring-heads" / "features"


def request_key(e: EncodedRequest) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in (e.input_ids, e.token_type_ids, (e.site_id,), e.ner_ids, (e.industry_id,)):
        h.update(np.asarray(part, np.int64).tobytes())
        h.update(b"|")
    return h.digest()


def bottom_cache_key(manifest: Manifest, model_digest: str) -> str:
    h = hashlib.sha256(f"{manifest.bottom_fingerprint}|{model_digest}|ort {ort.__version__}".encode())
    return h.hexdigest()[:32]


@dataclass
class FeatureStats:
    rows: int
    skipped: int  # rows the server would refuse (a query with no tokens)
    unique: int
    cached: int
    computed: int
    seconds: float
    cache_dir: Path

    def line(self) -> str:
        rate = f", {self.computed / self.seconds:.0f} rows/s" if self.computed and self.seconds > 0 else ""
        return (f"features: {self.rows} rows ({self.skipped} skipped), {self.unique} distinct requests, "
                f"{self.cached} from cache, {self.computed} computed in {self.seconds:.1f} s{rate} "
                f"[cache {self.cache_dir}]")


class FeatureCache:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def load(self, wanted: set[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        if not self.folder.is_dir():
            return found
        for shard in sorted(self.folder.glob("shard-*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as z:
                    keys, feats = z["keys"], z["features"]
            except (OSError, ValueError, KeyError):
                continue  # a damaged shard is recomputed, never trusted
            for i, k in enumerate(keys):
                kb = k.tobytes()
                if kb in wanted:
                    found[kb] = feats[i]
        return found

    def save(self, keys: Sequence[bytes], feats: np.ndarray) -> None:
        if not keys:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        arr = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), KEY_BYTES)
        fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".npz", dir=self.folder)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, keys=arr, features=np.ascontiguousarray(feats, np.float32))
        os.replace(tmp, self.folder / f"shard-{time.time_ns()}-{os.getpid()}.npz")


def _batches(items: Sequence[tuple[bytes, EncodedRequest]]) -> list[list[tuple[bytes, EncodedRequest]]]:
    """Length-sorted batches within a row and a padded-token budget: little padding, steady cost."""
    ordered = sorted(items, key=lambda kv: kv[1].length)
    out: list[list[tuple[bytes, EncodedRequest]]] = []
    cur: list[tuple[bytes, EncodedRequest]] = []
    for kv in ordered:
        if cur and (len(cur) >= MAX_BATCH_ROWS or (len(cur) + 1) * kv[1].length > MAX_BATCH_TOKENS):
            out.append(cur)
            cur = []
        cur.append(kv)
    if cur:
        out.append(cur)
    return out


def encode_rows(encoder: FeatureEncoder, rows: Sequence[LabeledRow]) -> list[EncodedRequest | None]:
    out: list[EncodedRequest | None] = []
    for r in rows:
        try:
            out.append(encoder.encode(r.query, r.title, r.site, r.ner, r.industry))
        except FeatureError:
            out.append(None)
    return out


def compute_features(
    version_dir: Path,
    manifest: Manifest,
    model_digest: str,
    rows: Sequence[LabeledRow],
    cache_root: Path | None,
    *,
    report: Report = print,
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, FeatureStats]:
    """(features [n, D] of the usable rows, indices of those rows in `rows`, stats).

    `cache_root` None computes without a cache. `model_digest` is graph_edit.non_head_digest of the
    version's fp32 graph (the caller has the graph loaded already)."""
    encoder = FeatureEncoder(version_dir, manifest)
    encoded = encode_rows(encoder, rows)
    used = np.array([i for i, e in enumerate(encoded) if e is not None], np.int64)
    keys = [request_key(e) for e in encoded if e is not None]
    distinct: dict[bytes, EncodedRequest] = {}
    for k, e in zip(keys, (e for e in encoded if e is not None), strict=True):
        distinct.setdefault(k, e)
    folder = (cache_root / bottom_cache_key(manifest, model_digest)) if cache_root is not None else None
    cache = FeatureCache(folder) if folder is not None else None
    known = cache.load(set(distinct)) if cache is not None else {}
    missing = [(k, e) for k, e in distinct.items() if k not in known]
    computed = 0
    t_compute = time.perf_counter()
    if missing:
        sess = session(version_dir / manifest.precisions["fp32"])
        pending_keys: list[bytes] = []
        pending: list[np.ndarray] = []
        bar = tqdm(total=len(missing), desc="features", unit="row", file=sys.stderr, disable=not show_progress,
                   smoothing=0.1)
        for batch in _batches(missing):
            feats = np.asarray(sess.run(["features"], pad_batch([e for _, e in batch]))[0], np.float32)
            for (k, _), f in zip(batch, feats, strict=True):
                known[k] = f
                pending_keys.append(k)
                pending.append(f)
            computed += len(batch)
            bar.update(len(batch))
            if cache is not None and len(pending_keys) >= SHARD_ROWS:
                cache.save(pending_keys, np.stack(pending))
                pending_keys, pending = [], []
        bar.close()
        if cache is not None:
            cache.save(pending_keys, np.stack(pending) if pending else np.zeros((0, 0), np.float32))
    d = manifest.feature_dim
    features = np.stack([known[k] for k in keys]) if keys else np.zeros((0, d), np.float32)
    stats = FeatureStats(len(rows), len(rows) - len(keys), len(distinct), len(distinct) - len(missing), computed,
                         time.perf_counter() - t_compute if missing else 0.0, folder or Path("-"))
    report(stats.line())
    return features, used, stats
