"""Model versions: which are on disk, loaded, serving; how the serving one changes without loss.

The manager keeps the version records (server.versions) and applies the steps of the version policy
(server.version_policy, TensorFlow Serving's availability-preserving policy): a new version is fully
loaded, warmed and validated before it serves; the switch is one assignment on the event loop;
the old version then drains (queued and running batches finish) and is released. A version that
fails any step never serves, keeps its reason, and is retried only when its files change.

The servicer only calls `resolve`; everything else runs under one lifecycle lock. Every change is
announced to the `on_change` listeners with the records (the metrics and the health status).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from model_format.manifest import ManifestError, read_manifest, verify_files
from model_format.repository import VERSION_RE, VersionStatus, scan_repository, valid_model_name
from server.batcher import BatcherConfig
from server.metrics import Metrics
from server.model import LoadedModel
from server.resources import lower_thread_priority, release_free_memory
from server.runtime import RuntimeOptions
from server.version_policy import Action, ModelView, Step, next_step
from server.versions import ModelRecords, ModelState, Signature, VersionRecord, folder_signature

T = TypeVar("T")

log = logging.getLogger(__name__)
Listener = Callable[[Mapping[str, ModelRecords]], None]  # called with the records after every change


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


class ModelManager:
    def __init__(self, config: ManagerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._models: dict[str, ModelRecords] = {}
        self._lock = asyncio.Lock()
        self._listeners: list[Listener] = []
        self._poller: asyncio.Task[None] | None = None
        self._drains: set[asyncio.Task[None]] = set()
        # Checksums, session creation, warm-up, golden checks and heap trimming run on one thread of
        # lowered priority: a swap takes the CPU the serving version leaves, not the other way round.
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader",
                                              initializer=lower_thread_priority)
        for name, version in config.pinned.items():
            self._models.setdefault(name, ModelRecords()).pinned = version

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

    def on_change(self, listener: Listener) -> None:
        """Calls `listener` with the records (`snapshot()`) after every change of state."""
        self._listeners.append(listener)

    def snapshot(self, model: str = "") -> dict[str, ModelRecords]:
        return {n: m for n, m in sorted(self._models.items()) if not model or n == model}

    def _changed(self) -> None:
        models = self.snapshot()
        for listener in self._listeners:
            listener(models)

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
        """Records what the scan saw: which versions are on disk, their files, whether complete."""
        records = self._models.setdefault(name, ModelRecords())
        seen = set()
        for s in statuses:
            seen.add(s.version)
            record = records.versions.get(s.version)
            if record is None:
                record = records.versions[s.version] = VersionRecord(name, s.version, s.path)
            record.on_disk, record.files, record.incomplete = True, signatures[(name, s.version)], s.error
        for version, record in records.versions.items():
            if version not in seen:
                record.on_disk = False

    async def _converge(self, name: str) -> None:
        """Applies the version policy's steps until it has none left. Every step moves a version on
        (to failed, loaded, serving or draining), so the bound only guards against a policy bug."""
        records = self._models[name]
        applied = False
        for _ in range(4 * len(records.versions) + 4):
            step = next_step(ModelView.of(records))
            if step is None:
                break
            record = records.versions[step.version]
            if step.action is Action.LOAD:
                await self._ensure_loaded(record)  # ready, or failed with its reason: the old one serves on
            else:
                self._apply(name, step, record)
                applied = True
        else:
            log.error("version policy did not settle", extra={"event": "policy_unsettled", "model": name})
        if applied:
            self._changed()

    def _apply(self, name: str, step: Step, record: VersionRecord) -> None:
        """The policy's steps that need no waiting."""
        if step.action is Action.RETRY:
            record.state, record.reason = ModelState.UNLOADED, ""  # its files changed: try again
        elif step.action is Action.FAIL:
            self._fail(record, step.reason, record.files)
        elif step.action is Action.SERVE:
            self._switch(name, record)
        elif step.action is Action.UNLOAD:
            self._start_drain(record)

    # --- load, switch, drain -------------------------------------------------------------------------

    def _fail(self, record: VersionRecord, reason: str, signature: Signature) -> None:
        record.state, record.reason, record.signature = ModelState.FAILED, reason, signature
        self.metrics.model_loads.labels(record.model, "failed").inc()
        log.error("version failed", extra={"event": "model_load_failed", "model": record.model,
                                            "version": record.version, "reason": reason})
        self._changed()

    async def _ensure_loaded(self, record: VersionRecord) -> bool:
        """Verify checksums, create the session off the loop, warm up, check golden requests."""
        if record.usable:
            return True
        signature = await asyncio.to_thread(folder_signature, record.path)
        record.files = signature
        log.info("loading version", extra={"event": "model_loading", "model": record.model,
                                            "version": record.version})
        record.state, record.reason = ModelState.LOADING, ""
        self._changed()
        t0 = time.perf_counter()
        try:
            manifest = await asyncio.to_thread(read_manifest, record.path)
            if (manifest.model, manifest.version) != (record.model, record.version):
                raise ManifestError(f"manifest names {manifest.model}/{manifest.version}")
            await self._in_background(verify_files, record.path, manifest)
            record.state = ModelState.WARMING
            self._changed()
            loaded = await self._in_background(LoadedModel.load, record.path, manifest, self.config.runtime,
                                               self.config.batcher, self.metrics)
        except Exception as exc:
            self._fail(record, f"{type(exc).__name__}: {exc}", signature)
            return False
        loaded.start()
        record.loaded, record.state, record.signature = loaded, ModelState.READY, signature
        self.metrics.model_loads.labels(record.model, "ok").inc()
        self.metrics.init_version(record.model, record.version)
        log.info("version ready", extra={"event": "model_ready", "model": record.model, "version": record.version,
                                          "seconds": round(time.perf_counter() - t0, 3)})
        self._changed()
        return True

    async def _in_background(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._background, fn, *args)

    def _switch(self, name: str, record: VersionRecord) -> None:
        """The atomic part: one assignment, between two requests. The version it replaces stays
        loaded until the policy unloads it (at once, unless an admin call loaded it to stay)."""
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
            old.state = ModelState.READY

    def _start_drain(self, record: VersionRecord) -> None:
        loaded = record.loaded
        if loaded is None:
            return
        record.state = ModelState.DRAINING  # at once: nothing new reaches it from here on
        task = asyncio.get_running_loop().create_task(self._drain(record, loaded))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, record: VersionRecord, loaded: LoadedModel) -> None:
        """Nothing new reaches the version; what it already queued or runs finishes; then release."""
        record.state = ModelState.DRAINING
        self._changed()
        await loaded.close()
        if record.state is ModelState.DRAINING:  # not re-loaded meanwhile
            record.loaded, record.state = None, ModelState.UNLOADED
        del loaded
        self._changed()
        # The session sits in reference cycles (executor threads, futures, closures): without a
        # collection its memory would wait for the next automatic cycle collection, after several
        # more swaps (BENCHMARKS.md, 'Figures behind decisions in code').
        freed = gc.collect()
        await self._in_background(release_free_memory)
        log.info("version unloaded", extra={"event": "model_unloaded", "model": record.model,
                                             "version": record.version, "gc_objects": freed})

    # --- admin operations ------------------------------------------------------------------------------

    def _record(self, model: str, version: int) -> VersionRecord:
        if not valid_model_name(model):
            raise ValueError(f"invalid model name {model!r}")
        if not VERSION_RE.match(str(version)):
            raise ValueError(f"invalid version {version}: a positive integer")
        record = self._models.get(model, ModelRecords()).versions.get(version)
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
                await self._drain(record, record.loaded)

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
            await asyncio.gather(*(self._drain(r, r.loaded) for records in self._models.values()
                                   for r in records.versions.values()
                                   if r.loaded is not None and r.state is not ModelState.DRAINING))
            if self._drains:
                await asyncio.gather(*self._drains)
        self._background.shutdown(wait=False)
