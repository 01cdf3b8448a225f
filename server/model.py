"""A loaded model version: features, engine and batcher behind one handle."""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_format.features import FeatureEncoder
from model_format.golden import check_golden
from model_format.manifest import Manifest
from server.batcher import Batcher, BatcherConfig
from server.metrics import Metrics
from server.runtime import CUDA, ModelRuntime, RuntimeOptions

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"  # loaded and warm, not the serving version (reachable by explicit version)
    SERVING = "serving"
    DRAINING = "draining"
    FAILED = "failed"
    UNLOADED = "unloaded"


def warm_up_shapes(manifest: Manifest, config: BatcherConfig) -> list[tuple[int, int]]:
    """The batcher's extremes, each run cheaply: one item at the shortest and longest length, and the
    widest batch of short items. Every kernel is initialised before SERVING; the memory arena grows
    later in steps of milliseconds. A full-size batch is left out on purpose: during a hot swap each
    warm-up run competes for the CPU with the serving version (at lower priority, on the manager's
    loader thread), so every run must be short.
    With shape buckets (GPU) every bucket is warmed instead (ModelRuntime.warm_up_shapes)."""
    widest = max(1, min(config.max_batch_size, config.max_batch_tokens // 16))
    return list(dict.fromkeys([(1, 8), (1, manifest.max_seq_len), (widest, 16)]))


@dataclass
class LoadedModel:
    name: str
    version: int
    path: Path
    manifest: Manifest
    features: FeatureEncoder
    runtime: ModelRuntime
    batcher: Batcher
    srcid_index: dict[int, int]
    srcids: tuple[int, ...]
    thresholds: np.ndarray
    loaded_at: float = 0.0

    @staticmethod
    def load(path: Path, manifest: Manifest, options: RuntimeOptions, config: BatcherConfig,
             metrics: Metrics) -> LoadedModel:
        """Creates the session, warms it up and checks its golden requests; blocking, so call it off
        the event loop. Raises on any failure: such a version must never serve."""
        features = FeatureEncoder(path, manifest)
        runtime = ModelRuntime(path, manifest, options)
        config = config.for_device(on_gpu=runtime.provider == CUDA)
        runtime.set_batch_limit(config.max_batch_size)
        seconds = runtime.warm_up(runtime.warm_up_shapes(warm_up_shapes(manifest, config)))
        golden_diff = check_golden(path, manifest, features, runtime)
        log.info("model warmed", extra={"event": "model_warmed", "model": manifest.model,
                                        "version": manifest.version, "seconds": round(seconds, 3),
                                        "provider": runtime.provider, "precision": runtime.precision,
                                        "threads": runtime.threads, "lanes": runtime.lanes,
                                        "golden_max_abs_diff": golden_diff})
        thresholds = np.array([h.threshold for h in manifest.heads], np.float32)
        version_metrics = metrics.for_version(manifest.model, manifest.version, manifest.srcids, thresholds)
        batcher = Batcher(runtime.run_timed, config, name=f"{manifest.model}-v{manifest.version}",
                          on_batch=version_metrics.observe_batch, lanes=runtime.lanes)
        return LoadedModel(
            name=manifest.model,
            version=manifest.version,
            path=path,
            manifest=manifest,
            features=features,
            runtime=runtime,
            batcher=batcher,
            srcid_index={s: i for i, s in enumerate(manifest.srcids)},
            srcids=manifest.srcids,
            thresholds=thresholds,
            loaded_at=time.time(),
        )
