"""Hot swaps for benchmarks: a throw-away repository, a version staged by hard links and published by rename, and
its lifecycle followed in the server's JSON log (`hot_swap`)."""

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
from bench.kit.server import ServerProcess


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
        ts = {"detect_s": (self.renamed_t, self.loading_t), "load_verify_warm_golden_s": (self.loading_t, self.ready_t),
              "switch_s": (self.ready_t, self.serving_t), "drain_unload_s": (self.serving_t, self.unloaded_t),
              "total_s": (self.renamed_t, self.unloaded_t)}
        return {k: round(b - a, 3) if a is not None and b is not None else None for k, (a, b) in ts.items()}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), **self.phases()}


async def hot_swap(server: ServerProcess, src: Path, version: int, previous: int, t0: float,
                   timeout_s: float = 180.0) -> Swap:
    """Drops `version` (`src`'s bytes, a version folder of the repository `server` serves) into that repository and
    follows it in the server's JSON log (`--log-level INFO`), timed from `t0` (perf_counter), until the previous
    version is unloaded."""
    await asyncio.to_thread(stage_and_publish, server.spec.model_repo, src.parent.name, src, version)
    swap = Swap(version, previous, round(time.perf_counter() - t0, 3))
    wall0, deadline = time.time() - (time.perf_counter() - t0), time.perf_counter() + timeout_s
    wanted = {("model_loading", version): "loading_t", ("model_ready", version): "ready_t",
              ("model_serving", version): "serving_t", ("model_unloaded", previous): "unloaded_t"}
    while swap.unloaded_t is None and swap.failed is None:
        for doc in server.events():
            key = (doc.get("event"), doc.get("version"))
            if key == ("model_load_failed", version):
                swap.failed = str(doc.get("reason"))
            elif key in wanted and getattr(swap, wanted[key]) is None:
                wall = dt.datetime.strptime(doc["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # logging's asctime
                setattr(swap, wanted[key], round(wall - wall0, 3))
        if swap.failed is None and time.perf_counter() > deadline:
            missing = next(e for (e, _), attr in wanted.items() if getattr(swap, attr) is None)
            swap.failed = f"no {missing} event within {timeout_s:.0f} s"
        await asyncio.sleep(0.05)
    return swap
