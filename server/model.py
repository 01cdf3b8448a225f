"""A loaded model version: features, engine and batcher behind one handle.

Callers (servicer, cache, manager, metrics, admin) use the handle's methods: `start`, `submit` and
`close` for its batcher, `info` for what it is, and the live readings of its queue. The engine and
the batcher stay inside.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model_format.features import EncodedRequest, FeatureEncoder
from model_format.golden import check_golden
from model_format.manifest import Head, Manifest
from server.batcher import Batcher, BatcherConfig
from server.metrics import Metrics
from server.responses import ResponseEncoder
from server.runtime import CUDA, ModelRuntime, RuntimeOptions

log = logging.getLogger(__name__)


def warm_up_shapes(manifest: Manifest, config: BatcherConfig) -> list[tuple[int, int]]:
    """The batcher's extremes, each run cheaply: one item at the shortest and longest length, and the
    widest batch of short items. Every kernel is initialised before SERVING; the memory arena grows
    later in steps of milliseconds. A full-size batch is left out on purpose: during a hot swap each
    warm-up run competes for the CPU with the serving version (at lower priority, on the manager's
    loader thread), so every run must be short.
    With shape buckets (GPU) every bucket is warmed instead (ModelRuntime.warm_up_shapes)."""
    widest = max(1, min(config.max_batch_size, config.max_batch_tokens // 16))
    return list(dict.fromkeys([(1, 8), (1, manifest.max_seq_len), (widest, 16)]))


@dataclass(frozen=True)
class VersionInfo:
    """What a loaded version is: fixed once it has loaded."""

    name: str
    version: int
    heads: tuple[Head, ...]
    precision: str
    provider: str  # the ONNX Runtime execution provider
    lanes: int  # batches its engine runs at once
    batch_overhead_tokens: int  # the fixed cost of one run, as set or as measured at warm-up
    max_batch_tokens: int  # the widest batch, in padded tokens
    max_seq_len: int
    bottom_fingerprint: str
    loaded_at: float  # Unix time


class LoadedModel:
    """The handle to one loaded version. Its batcher runs once `start` is called and stops admitting
    at `close`, which returns when every queued and running item has been answered."""

    def __init__(self, path: Path, manifest: Manifest, features: FeatureEncoder, runtime: ModelRuntime,
                 batcher: Batcher, loaded_at: float = 0.0) -> None:
        self.name = manifest.model
        self.version = manifest.version
        self.path = path
        self.manifest = manifest
        self.features = features
        self.srcids = manifest.srcids
        self.srcid_index = {s: i for i, s in enumerate(manifest.srcids)}
        self.responses = ResponseEncoder(self.name, self.version, self.srcids)
        self._runtime = runtime
        self._batcher = batcher
        self._info = VersionInfo(name=self.name, version=self.version, heads=manifest.heads,
                                 precision=runtime.precision, provider=runtime.provider, lanes=batcher.lanes,
                                 batch_overhead_tokens=batcher.config.batch_overhead_tokens,
                                 max_batch_tokens=batcher.config.max_batch_tokens,
                                 max_seq_len=manifest.max_seq_len, bottom_fingerprint=manifest.bottom_fingerprint,
                                 loaded_at=loaded_at)

    @staticmethod
    def load(path: Path, manifest: Manifest, options: RuntimeOptions, config: BatcherConfig,
             metrics: Metrics) -> LoadedModel:
        """Creates the session, warms it up and checks its golden requests; blocking, so call it off
        the event loop. Raises on any failure: such a version must never serve."""
        features = FeatureEncoder(path, manifest)
        runtime = ModelRuntime(path, manifest, options)
        wanted = config
        on_gpu = runtime.provider == CUDA
        config = config.for_device(on_gpu)
        runtime.set_batch_limit(config.max_batch_size)
        if not wanted.batch_overhead_tokens:  # not set: this engine's own (the fastest of a few runs)
            config = replace(wanted, batch_overhead_tokens=runtime.measure_overhead_tokens()).for_device(on_gpu)
        seconds = runtime.warm_up(runtime.warm_up_shapes(warm_up_shapes(manifest, config)))
        golden_diff = check_golden(path, manifest, features, runtime)
        log.info("model warmed", extra={"event": "model_warmed", "model": manifest.model,
                                        "version": manifest.version, "seconds": round(seconds, 3),
                                        "provider": runtime.provider, "precision": runtime.precision,
                                        "threads": runtime.threads, "lanes": runtime.lanes,
                                        "batch_overhead_tokens": config.batch_overhead_tokens,
                                        "max_batch_tokens": config.max_batch_tokens,
                                        "golden_max_abs_diff": golden_diff})
        thresholds = np.array([h.threshold for h in manifest.heads], np.float32)
        version_metrics = metrics.for_version(manifest.model, manifest.version, manifest.srcids, thresholds)
        batcher = Batcher(runtime.run_timed, config, name=f"{manifest.model}-v{manifest.version}",
                          on_batch=version_metrics.observe_batch, lanes=runtime.lanes)
        return LoadedModel(path, manifest, features, runtime, batcher, loaded_at=time.time())

    # --- lifecycle and requests (event loop) ------------------------------------------------------

    def start(self) -> None:
        """Starts the batcher's dispatcher on the running event loop."""
        self._batcher.start()

    def submit(self, items: Sequence[EncodedRequest], deadline: float | None = None
               ) -> list[asyncio.Future[np.ndarray]]:
        """Queues all items or none (raises server.admission.QueueFull or server.batcher.BatcherClosed);
        each future resolves to that item's score row, in the order of `srcids`."""
        return self._batcher.submit(items, deadline)

    async def close(self) -> None:
        """Takes no new items; returns once every queued and running item has been answered."""
        await self._batcher.close()

    def info(self) -> VersionInfo:
        return self._info

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this version serves on; its clock is the one deadlines are given in."""
        return self._batcher.loop

    # --- live readings (the metrics endpoint reads these from its own thread) ----------------------

    @property
    def queue_depth(self) -> int:
        return self._batcher.queue_depth

    @property
    def overloaded(self) -> bool:
        """A standing queue holds admission at `queue_target_ms`."""
        return self._batcher.overloaded

    def offered_load(self) -> float:
        """Engine work offered over the last interval, as a share of what the lanes run at full batches."""
        return self._batcher.current_offered_load()
