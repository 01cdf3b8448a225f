"""The manager's records of model versions: their state, files and loaded handle, per model."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.model import LoadedModel

Signature = tuple[tuple[str, int, int], ...]


class ModelState(enum.Enum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"  # loaded and warm, not the serving version (reachable by explicit version)
    SERVING = "serving"
    DRAINING = "draining"
    FAILED = "failed"
    UNLOADED = "unloaded"


LOADED_STATES = (ModelState.READY, ModelState.SERVING)  # a loaded, warm handle answers requests


def folder_signature(path: Path) -> Signature:
    """Names, sizes and modification times: cheap, and changes whenever a file is replaced."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))
    except OSError:
        return ()


@dataclass
class VersionRecord:
    model: str
    version: int
    path: Path
    state: ModelState = ModelState.UNLOADED
    reason: str = ""
    signature: Signature = ()  # the files as they were when the version was last tried
    files: Signature = ()  # the files as last seen (by a scan or a load attempt)
    incomplete: str | None = None  # why the last scan found the version incomplete; None = complete
    loaded: LoadedModel | None = None
    keep_loaded: bool = False  # loaded by an admin call: stays loaded when it stops serving
    on_disk: bool = True

    @property
    def usable(self) -> bool:
        return self.loaded is not None and self.state in LOADED_STATES


@dataclass
class ModelRecords:
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    serving: VersionRecord | None = None
    pinned: int = 0
    history: list[int] = field(default_factory=list)  # serving versions, oldest first
