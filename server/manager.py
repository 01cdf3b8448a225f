"""Model versions: which are on disk, loaded, serving; how the serving one changes without loss.

The policy follows TensorFlow Serving's availability-preserving manager: a new version is fully
loaded, warmed and validated before it serves; the switch is one assignment on the event loop;
the old version then drains (queued and running batches finish) and is released. A version that
fails any step never serves, keeps its reason, and is retried only when its files change.

The servicer only calls `resolve`; everything else runs under one lifecycle lock.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from model_format.manifest import ManifestError, read_manifest, verify_files
from model_format.repository import VERSION_RE, VersionStatus, scan_repository, valid_model_name
from server.batcher import Batcher, BatcherConfig
from server.metrics import Metrics
from server.model import LoadedModel, ModelState
from server.resources import lower_thread_priority, release_free_memory
from server.runtime import RuntimeOptions

T = TypeVar("T")

log = logging.getLogger(__name__)
Signature = tuple[tuple[str, int, int], ...]


class ModelNotFound(LookupError):
    """No such model, or no such loaded version of it."""


class ModelUnavailable(RuntimeError):
    """The model exists but no version is ready to serve."""


class LifecycleError(RuntimeError):
    """An admin operation that cannot apply in the current state."""


@dataclass(frozen=True)
class ManagerConfig:
    repo: Path
    default_model: str | None = None
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    poll_interval_s: float = 5.0  # 0 = no polling; admin ReloadRepository still rescans
    pinned: dict[str, int] = field(default_factory=dict)  # model -> version, from --pin


@dataclass
class VersionRecord:
    model: str
    version: int
    path: Path
    state: ModelState = ModelState.UNLOADED
    reason: str = ""
    signature: Signature = ()  # the files as they were when the version was last tried
    loaded: LoadedModel | None = None
    keep_loaded: bool = False  # loaded by an admin call: stays loaded when it stops serving
    on_disk: bool = True

    @property
    def usable(self) -> bool:
        return self.loaded is not None and self.state in (ModelState.READY, ModelState.SERVING)


def folder_signature(path: Path) -> Signature:
    """Names, sizes and modification times: cheap, and changes whenever a file is replaced."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))
    except OSError:
        return ()


@dataclass
class _ModelRecords:
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    serving: VersionRecord | None = None
    pinned: int = 0
    history: list[int] = field(default_factory=list)  # serving versions, oldest first


class ModelManager:
    def __init__(self, config: ManagerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._models: dict[str, _ModelRecords] = {}
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._poller: asyncio.Task[None] | None = None
        self._drains: set[asyncio.Task[None]] = set()
        # Checksums, session creation, warm-up, golden checks and heap trimming run on one thread of
        # lowered priority: a swap takes the CPU the serving version leaves, not the other way round.
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader",
                                              initializer=lower_thread_priority)
        for name, version in config.pinned.items():
            self._models.setdefault(name, _ModelRecords()).pinned = version

    # --- what the servicer sees (event loop only, never blocks) ---------------------------------

    @property
    def default_model(self) -> str | None:
        if self.config.default_model:
            return self.config.default_model
        names = [n for n, m in self._models.items() if m.versions]
        return names[0] if len(names) == 1 else None

    def known_model(self, name: str) -> bool:
        return name in self._models and bool(self._models[name].versions)

    def is_serving(self) -> bool:
        """Ready for traffic: the default model serves; without a default model, every model that
        has a version worth waiting for serves. A model whose every version failed does not hold the
        replica back (its requests get NOT_FOUND/UNAVAILABLE and the failure alerts), so one bad
        new model on a shared volume cannot take every replica out of the load balancer."""
        default = self.default_model
        if default is not None:
            m = self._models.get(default)
            return m is not None and m.serving is not None
        waiting = [m for m in self._models.values()
                   if m.serving is None and any(r.state is not ModelState.FAILED for r in m.versions.values())]
        return any(m.serving is not None for m in self._models.values()) and not waiting

    def resolve(self, model: str, version: int) -> LoadedModel:
        """The serving version (version 0) or a named loaded version of `model` ('' = default)."""
        name = model or self.default_model
        if name is None:
            raise ModelNotFound("no model named and the server has no default model; set the request's model")
        records = self._models.get(name)
        if records is None or not records.versions:
            raise ModelNotFound(f"model {name!r} is not loaded")
        if version == 0:
            serving = records.serving
            if serving is None or serving.loaded is None:
                raise ModelUnavailable(f"model {name!r} has no version ready to serve yet")
            return serving.loaded
        record = records.versions.get(version)
        if record is None or not record.usable or record.loaded is None:
            ready = sorted(v for v, r in records.versions.items() if r.usable)
            raise ModelNotFound(f"version {version} of {name!r} is not loaded (loaded: {ready})")
        return record.loaded

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def snapshot(self, model: str = "") -> dict[str, _ModelRecords]:
        return {n: m for n, m in sorted(self._models.items()) if not model or n == model}

    # --- repository ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.reconcile()
        if self.config.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="repository-poller")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.reconcile()
            except Exception:
                log.exception("repository poll failed", extra={"event": "poll_failed"})

    async def reconcile(self) -> None:
        """Rescans the repository and moves every model towards its aspired serving version."""
        async with self._lock:
            found = await asyncio.to_thread(scan_repository, self.config.repo, verify_checksums=False)
            signatures = await asyncio.to_thread(
                lambda: {(n, s.version): folder_signature(s.path) for n, sts in found.items() for s in sts})
            for name, statuses in found.items():
                self._sync_records(name, statuses, signatures)
            for name, records in self._models.items():
                if name not in found:
                    for r in records.versions.values():
                        r.on_disk = False
            for name in list(self._models):
                await self._converge(name)

    def _sync_records(self, name: str, statuses: list[VersionStatus],
                      signatures: dict[tuple[str, int], Signature]) -> None:
        records = self._models.setdefault(name, _ModelRecords())
        seen = set()
        for s in statuses:
            seen.add(s.version)
            sig = signatures[(name, s.version)]
            record = records.versions.get(s.version)
            if record is None:
                record = records.versions[s.version] = VersionRecord(name, s.version, s.path)
            record.on_disk = True
            if record.state is ModelState.FAILED and record.signature != sig:
                record.state, record.reason = ModelState.UNLOADED, ""  # its files changed: try again
            if not s.complete and record.state is ModelState.UNLOADED:
                self._fail(record, f"incomplete: {s.error}", sig)
        for version, record in records.versions.items():
            if version not in seen:
                record.on_disk = False

    def _aspired(self, name: str) -> int:
        records = self._models[name]
        if records.pinned:
            return records.pinned
        candidates = [v for v, r in records.versions.items() if r.on_disk and r.state is not ModelState.FAILED]
        return max(candidates, default=0)

    async def _converge(self, name: str) -> None:
        records = self._models[name]
        target = self._aspired(name)
        if not target or (records.serving is not None and records.serving.version == target):
            return
        record = records.versions.get(target)
        if record is None or record.state is ModelState.FAILED:
            return  # a pinned version that is missing or failed: keep serving what serves
        if await self._ensure_loaded(record):
            self._switch(name, record)

    # --- load, switch, drain -------------------------------------------------------------------------

    def _fail(self, record: VersionRecord, reason: str, signature: Signature) -> None:
        record.state, record.reason, record.signature = ModelState.FAILED, reason, signature
        self.metrics.model_loads.labels(record.model, "failed").inc()
        log.error("version failed", extra={"event": "model_load_failed", "model": record.model,
                                            "version": record.version, "reason": reason})
        self._publish()

    async def _ensure_loaded(self, record: VersionRecord) -> bool:
        """Verify checksums, create the session off the loop, warm up, check golden requests."""
        if record.usable:
            return True
        signature = await asyncio.to_thread(folder_signature, record.path)
        log.info("loading version", extra={"event": "model_loading", "model": record.model,
                                            "version": record.version})
        record.state, record.reason = ModelState.LOADING, ""
        self._publish()
        t0 = time.perf_counter()
        try:
            manifest = await asyncio.to_thread(read_manifest, record.path)
            if (manifest.model, manifest.version) != (record.model, record.version):
                raise ManifestError(f"manifest names {manifest.model}/{manifest.version}")
            await self._in_background(verify_files, record.path, manifest)
            record.state = ModelState.WARMING
            self._publish()
            loaded = await self._in_background(LoadedModel.load, record.path, manifest, self.config.runtime,
                                               self.config.batcher, self.metrics)
        except Exception as exc:
            self._fail(record, f"{type(exc).__name__}: {exc}", signature)
            return False
        loaded.batcher.start()
        record.loaded, record.state, record.signature = loaded, ModelState.READY, signature
        self.metrics.model_loads.labels(record.model, "ok").inc()
        self.metrics.init_version(record.model, record.version)
        log.info("version ready", extra={"event": "model_ready", "model": record.model, "version": record.version,
                                          "seconds": round(time.perf_counter() - t0, 3)})
        self._publish()
        return True

    async def _in_background(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._background, fn, *args)

    def _switch(self, name: str, record: VersionRecord) -> None:
        """The atomic part: one assignment, between two requests."""
        records = self._models[name]
        old = records.serving
        records.serving = record
        record.state = ModelState.SERVING
        if not records.history or records.history[-1] != record.version:
            records.history.append(record.version)
        self.metrics.model_swaps.labels(name, "ok").inc()
        self.metrics.last_swap.labels(name).set_to_current_time()
        log.info("version serving", extra={"event": "model_serving", "model": name, "version": record.version,
                                            "previous": old.version if old else None})
        if old is not None and old is not record:
            if old.keep_loaded:
                old.state = ModelState.READY
            else:
                self._start_drain(old)
        self._publish()

    def _start_drain(self, record: VersionRecord) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(record))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, record: VersionRecord) -> None:
        """Nothing new reaches the version; what it already queued or runs finishes; then release."""
        loaded = record.loaded
        if loaded is None:
            return
        record.state = ModelState.DRAINING
        self._publish()
        await loaded.batcher.close()
        if record.state is ModelState.DRAINING:  # not re-loaded meanwhile
            record.loaded, record.state = None, ModelState.UNLOADED
        del loaded
        self._publish()
        # The session sits in reference cycles (executor threads, futures, closures): without a
        # collection its ~370 MiB would wait for the next automatic cycle collection, after
        # several more swaps (measured: RSS grew by one version per swap).
        freed = gc.collect()
        await self._in_background(release_free_memory)
        log.info("version unloaded", extra={"event": "model_unloaded", "model": record.model,
                                             "version": record.version, "gc_objects": freed})

    def _publish(self) -> None:
        m = self.metrics
        m.model_info.clear()
        m.queue_depth.clear()  # an unloaded version's series goes, and with it any hold on its engine
        m.offered_load.clear()
        m.standing_queue.clear()
        m.engine_lanes.clear()
        for name, records in self._models.items():
            for version, r in records.versions.items():
                if r.loaded is not None or r.state is ModelState.FAILED:
                    precision = r.loaded.runtime.precision if r.loaded else ""
                    provider = r.loaded.runtime.provider if r.loaded else ""
                    heads = str(len(r.loaded.srcids)) if r.loaded else "0"
                    m.model_info.labels(name, str(version), heads, precision, provider, r.state.value).set(1)
                if r.loaded is not None:
                    labels = (name, str(version))
                    m.queue_depth.labels(*labels).set_function(_read(r.loaded, lambda b: b.queue_depth))
                    m.offered_load.labels(*labels).set_function(_read(r.loaded, Batcher.current_offered_load))
                    m.standing_queue.labels(*labels).set_function(_read(r.loaded, lambda b: b.overloaded))
                    m.engine_lanes.labels(name, str(version)).set(r.loaded.batcher.lanes)
        for listener in self._listeners:
            listener()

    # --- admin operations ------------------------------------------------------------------------------

    def _record(self, model: str, version: int) -> VersionRecord:
        if not valid_model_name(model):
            raise ValueError(f"invalid model name {model!r}")
        if not VERSION_RE.match(str(version)):
            raise ValueError(f"invalid version {version}: a positive integer")
        record = self._models.get(model, _ModelRecords()).versions.get(version)
        if record is None or (not record.on_disk and record.loaded is None):
            raise ModelNotFound(f"{model}/{version} is not in the repository")
        return record

    async def load(self, model: str, version: int) -> None:
        async with self._lock:
            record = self._record(model, version)
            if record.state is ModelState.FAILED and record.signature == folder_signature(record.path):
                raise LifecycleError(f"{model}/{version} failed and its files have not changed: {record.reason}")
            record.keep_loaded = True
            if not await self._ensure_loaded(record):
                raise LifecycleError(f"{model}/{version} failed to load: {record.reason}")

    async def unload(self, model: str, version: int) -> None:
        async with self._lock:
            record = self._record(model, version)
            if self._models[model].serving is record:
                raise LifecycleError(f"{model}/{version} is serving; set another serving version first")
            record.keep_loaded = False
            if record.loaded is not None and record.state is not ModelState.DRAINING:
                await self._drain(record)

    async def set_serving(self, model: str, version: int) -> None:
        """Pins `version` (0 = unpin, follow the newest complete version) and converges now."""
        async with self._lock:
            if version:
                record = self._record(model, version)
                if not await self._ensure_loaded(record):
                    raise LifecycleError(f"{model}/{version} cannot serve: {record.reason}")
            elif model not in self._models:
                raise ModelNotFound(f"model {model!r} is not in the repository")
            self._models[model].pinned = version
            await self._converge(model)

    async def rollback(self, model: str) -> int:
        """Serves (and pins) the version that served before the current one."""
        records = self._models.get(model)
        if records is None or records.serving is None:
            raise LifecycleError(f"model {model!r} has no serving version to roll back from")
        current = records.serving.version
        previous = [v for v in records.history if v != current]
        if not previous:
            raise LifecycleError(f"model {model!r} has no previous serving version")
        await self.set_serving(model, previous[-1])
        return previous[-1]

    async def close(self) -> None:
        """Stops polling and drains every loaded version: queued and running items are answered."""
        if self._poller is not None:
            self._poller.cancel()
        async with self._lock:
            for records in self._models.values():
                records.serving = None
            loaded = [r for records in self._models.values() for r in records.versions.values() if r.loaded]
            await asyncio.gather(*(self._drain(r) for r in loaded if r.state is not ModelState.DRAINING))
            if self._drains:
                await asyncio.gather(*self._drains)
        self._background.shutdown(wait=False)


def _read(model: LoadedModel, value: Callable[[Batcher], float]) -> Callable[[], float]:
    # A weak reference: a metrics callback must never keep an unloaded version's engine alive.
    ref = weakref.ref(model.batcher)

    def read() -> float:
        batcher = ref()
        return float(value(batcher)) if batcher is not None else 0.0

    return read
