"""Hot swaps for benchmarks: a throw-away repository, a version staged by hard links and published by rename, and
its lifecycle followed in the server's JSON log."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.kit.data import newest_version

LIFECYCLE_EVENTS = ("model_loading", "model_ready", "model_serving", "model_unloaded", "model_load_failed")


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)  # same bytes, no copy, and the source is never opened for writing
    except OSError:
        shutil.copy2(src, dst)
    return dst


@contextmanager
def temp_repo(model_repo: Path, model: str, parent: Path) -> Iterator[tuple[Path, Path]]:
    """A throw-away repository holding only the newest version of `model` (hard links): the tools drop new
    versions into it without touching the real one. Yields (root, version folder)."""
    src = newest_version(model_repo, model)
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="repo-", dir=parent))
    try:
        dst = root / model / src.name
        dst.parent.mkdir(parents=True)
        shutil.copytree(src, dst, copy_function=_link_or_copy)
        yield root, dst
    finally:
        shutil.rmtree(root, ignore_errors=True)


def stage_and_publish(root: Path, model: str, src: Path, version: int) -> Path:
    """Version `version` with `src`'s bytes: hard links under a staging name, a fresh manifest that names the
    new version (the manifest is not in its own checksum list), then one atomic rename into place."""
    from model_format.repository import publish_version, staging_dir

    with staging_dir(root, model) as staged:
        for f in src.iterdir():
            if f.name != "manifest.json":
                _link_or_copy(str(f), str(staged / f.name))
        doc = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
        doc["version"] = version
        (staged / "manifest.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return publish_version(staged, root, model, version)


class LifecycleLog:
    """Lifecycle events from the server's JSON log (stderr, `--log-level INFO`), timed from the run's start."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path = path
        self.t0 = t0
        self.wall0 = time.time() - (time.perf_counter() - t0)  # wall clock at t0
        self._pos = 0
        self._partial = b""
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._pos)
                data = fh.read()
                self._pos = fh.tell()
        except OSError:
            return []
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        new = []
        for raw in lines:
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("event") in LIFECYCLE_EVENTS:
                doc["t"] = round(self._time(doc), 3)
                new.append(doc)
        self.events += new
        return new

    def _time(self, doc: dict[str, Any]) -> float:
        try:  # logging's asctime, local time, millisecond resolution
            wall = dt.datetime.strptime(str(doc["time"]), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except (KeyError, ValueError):
            wall = time.time()
        return wall - self.wall0

    def find(self, event: str, version: int) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == event and e.get("version") == version), None)

    async def wait(self, event: str, version: int, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            self.poll()
            found = self.find(event, version)
            if found is not None or self.find("model_load_failed", version) is not None:
                return found
            await asyncio.sleep(0.05)
        return None


@dataclass
class Swap:
    version: int
    previous: int
    renamed_t: float
    loading_t: float | None = None
    ready_t: float | None = None
    serving_t: float | None = None
    unloaded_t: float | None = None
    failed: str | None = None

    @property
    def end_t(self) -> float:
        return next(t for t in (self.unloaded_t, self.serving_t, self.ready_t, self.loading_t, self.renamed_t)
                    if t is not None)

    def phases(self) -> dict[str, float | None]:
        def gap(a: float | None, b: float | None) -> float | None:
            return round(b - a, 3) if a is not None and b is not None else None

        return {"detect_s": gap(self.renamed_t, self.loading_t),
                "load_verify_warm_golden_s": gap(self.loading_t, self.ready_t),
                "switch_s": gap(self.ready_t, self.serving_t),
                "drain_unload_s": gap(self.serving_t, self.unloaded_t),
                "total_s": gap(self.renamed_t, self.unloaded_t)}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), **self.phases()}


async def hot_swap(root: Path, model: str, src: Path, version: int, previous: int, events: LifecycleLog,
                   t0: float, timeout_s: float = 180.0) -> Swap:
    """Drops `version` into the live repository and follows it until the previous version is unloaded."""
    await asyncio.to_thread(stage_and_publish, root, model, src, version)
    swap = Swap(version, previous, round(time.perf_counter() - t0, 3))
    deadline = time.perf_counter() + timeout_s
    for event, version_of, attr in (("model_loading", version, "loading_t"), ("model_ready", version, "ready_t"),
                                    ("model_serving", version, "serving_t"),
                                    ("model_unloaded", previous, "unloaded_t")):
        found = await events.wait(event, version_of, max(deadline - time.perf_counter(), 0.1))
        if found is None:
            failed = events.find("model_load_failed", version)
            swap.failed = str(failed.get("reason")) if failed else f"no {event} event within {timeout_s:.0f} s"
            break
        setattr(swap, attr, found["t"])
    return swap
