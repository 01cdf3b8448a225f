"""Which model versions are loaded and which one serves; the servicer only asks `resolve`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.batcher import BatcherConfig
from server.metrics import Metrics
from server.model import LoadedModel, ModelState
from server.repository import VersionStatus, latest_complete, scan_repository
from server.runtime import RuntimeOptions

log = logging.getLogger(__name__)


def _depth_of(model: LoadedModel) -> Callable[[], float]:
    return lambda: float(model.batcher.queue_depth)


class ModelNotFound(LookupError):
    """No such model, or no such loaded version of it."""


class ModelUnavailable(RuntimeError):
    """The model exists but no version is ready to serve."""


@dataclass(frozen=True)
class ManagerConfig:
    repo: Path
    default_model: str | None = None
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)


class ModelManager:
    def __init__(self, config: ManagerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._versions: dict[str, dict[int, LoadedModel]] = {}
        self._serving: dict[str, LoadedModel] = {}
        self._listeners: list[Callable[[], None]] = []

    # --- queries (event loop only) ----------------------------------------------------------------

    @property
    def default_model(self) -> str | None:
        if self.config.default_model:
            return self.config.default_model
        names = sorted(self._serving) or sorted(self._versions)
        return names[0] if len(names) == 1 else None

    def known_model(self, name: str) -> bool:
        return name in self._versions

    def serving(self) -> dict[str, LoadedModel]:
        return dict(self._serving)

    def is_serving(self) -> bool:
        """True when the default model (or, without one, every model) has a warm serving version."""
        default = self.default_model
        if default is not None:
            return default in self._serving
        return bool(self._serving) and set(self._serving) == set(self._versions)

    def resolve(self, model: str, version: int) -> LoadedModel:
        """The serving version (version 0) or a named loaded version of `model` ('' = default)."""
        name = model or self.default_model
        if name is None:
            raise ModelNotFound("no model named and the server has no default model; set the request's model")
        versions = self._versions.get(name)
        if versions is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        if version == 0:
            serving = self._serving.get(name)
            if serving is None:
                raise ModelUnavailable(f"model {name!r} has no version ready to serve yet")
            return serving
        loaded = versions.get(version)
        if loaded is None or loaded.state not in (ModelState.READY, ModelState.SERVING):
            ready = sorted(v for v, m in versions.items() if m.state in (ModelState.READY, ModelState.SERVING))
            raise ModelNotFound(f"version {version} of {name!r} is not loaded (loaded: {ready})")
        return loaded

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    # --- lifecycle --------------------------------------------------------------------------------

    async def load_latest(self) -> None:
        """Loads the newest complete version of every model in the repository and serves it."""
        repo = await asyncio.to_thread(scan_repository, self.config.repo)
        for name, statuses in repo.items():
            for s in statuses:
                if not s.complete:
                    log.warning("incomplete version skipped", extra={"event": "version_incomplete", "model": name,
                                                                      "version": s.version, "reason": s.error})
            latest = latest_complete(statuses)
            if latest is not None:
                await self.load_and_serve(latest)

    async def load_and_serve(self, status: VersionStatus) -> LoadedModel | None:
        assert status.manifest is not None
        name, version = status.model, status.version
        log.info("loading version", extra={"event": "model_loading", "model": name, "version": version})
        try:
            loaded = await asyncio.to_thread(
                LoadedModel.load, status.path, status.manifest, self.config.runtime, self.config.batcher, self.metrics
            )
        except Exception as exc:
            self.metrics.model_loads.labels(name, "failed").inc()
            log.error("version failed to load", extra={"event": "model_load_failed", "model": name,
                                                        "version": version, "reason": str(exc)})
            return None
        self.metrics.model_loads.labels(name, "ok").inc()
        self.metrics.init_version(name, version)
        loaded.batcher.start()
        self._versions.setdefault(name, {})[version] = loaded
        previous = self._serving.get(name)
        loaded.state = ModelState.SERVING
        self._serving[name] = loaded
        if previous is not None:
            previous.state = ModelState.READY
        self.metrics.model_swaps.labels(name, "ok").inc()
        self.metrics.last_swap.labels(name).set_to_current_time()
        self._publish_info()
        log.info("version serving", extra={"event": "model_serving", "model": name, "version": version,
                                            "provider": loaded.runtime.provider,
                                            "precision": loaded.runtime.precision})
        for listener in self._listeners:
            listener()
        return loaded

    def _publish_info(self) -> None:
        self.metrics.model_info.clear()
        for name, versions in self._versions.items():
            for version, m in versions.items():
                self.metrics.model_info.labels(name, str(version), str(len(m.srcids)), m.runtime.precision,
                                               m.runtime.provider, m.state.value).set(1)
                self.metrics.queue_depth.labels(name, str(version)).set_function(_depth_of(m))

    async def close(self) -> None:
        """Drains every batcher: queued and running items are answered, then engines are released."""
        models = [m for versions in self._versions.values() for m in versions.values()]
        self._serving.clear()
        for m in models:
            m.state = ModelState.DRAINING
        await asyncio.gather(*(m.batcher.close() for m in models))
        for m in models:
            m.state = ModelState.UNLOADED
        self._versions.clear()
