"""The model repository on disk: `<root>/<model>/<version>/`, scanned for complete versions.

A version is complete only when its `manifest.json` parses and every file's SHA-256 matches.
Writers build a version in a hidden temporary folder beside it and rename it into place
(`publish_version`), so a scan never sees a half-written version under its final name.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from model_format.manifest import Manifest, ManifestError, read_manifest, verify_files

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,17}$")


@dataclass(frozen=True)
class VersionStatus:
    model: str
    version: int
    path: Path
    manifest: Manifest | None
    error: str | None  # why the version is incomplete; None when complete

    @property
    def complete(self) -> bool:
        return self.error is None


def valid_model_name(name: str) -> bool:
    return bool(MODEL_NAME_RE.match(name))


def check_version(path: Path, model: str, version: int, *, verify_checksums: bool = True) -> VersionStatus:
    """Reads and checks one version folder; never raises for a bad version, reports it instead."""
    try:
        manifest = read_manifest(path)
        if manifest.model != model or manifest.version != version:
            raise ManifestError(
                f"manifest names {manifest.model}/{manifest.version} but the folder is {model}/{version}"
            )
        if verify_checksums:
            verify_files(path, manifest)
    except ManifestError as exc:
        return VersionStatus(model, version, path, None, str(exc))
    return VersionStatus(model, version, path, manifest, None)


def scan_model(root: Path, model: str, *, verify_checksums: bool = True) -> list[VersionStatus]:
    """Every version folder of a model, ascending; temporary and non-numeric folders are skipped."""
    model_dir = root / model
    statuses = []
    for entry in sorted(model_dir.iterdir(), key=lambda p: p.name) if model_dir.is_dir() else []:
        if entry.is_dir() and VERSION_RE.match(entry.name):
            statuses.append(check_version(entry, model, int(entry.name), verify_checksums=verify_checksums))
    return sorted(statuses, key=lambda s: s.version)


def scan_repository(root: Path, *, verify_checksums: bool = True) -> dict[str, list[VersionStatus]]:
    """All models under `root` with their versions."""
    if not root.is_dir():
        return {}
    return {
        entry.name: scan_model(root, entry.name, verify_checksums=verify_checksums)
        for entry in sorted(root.iterdir())
        if entry.is_dir() and valid_model_name(entry.name)
    }


def latest_complete(statuses: list[VersionStatus]) -> VersionStatus | None:
    complete = [s for s in statuses if s.complete]
    return complete[-1] if complete else None


@contextmanager
def staging_dir(root: Path, model: str) -> Iterator[Path]:
    """A hidden temporary folder on the same file system as the model, removed if not published."""
    model_dir = root / model
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a published version is readable like any folder
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_version(staged: Path, root: Path, model: str, version: int) -> Path:
    """Atomically renames a fully written staging folder to `<root>/<model>/<version>`.

    Fails rather than overwrite: versions are immutable once published.
    """
    if not valid_model_name(model):
        raise ValueError(f"invalid model name {model!r}")
    if version <= 0:
        raise ValueError(f"version must be positive, got {version}")
    target = root / model / str(version)
    for f in staged.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    # rename(2) of a directory onto a non-existent name is atomic on POSIX file systems.
    if target.exists():
        raise FileExistsError(f"{target} already exists; versions are immutable")
    os.rename(staged, target)
    return target


def next_version(root: Path, model: str) -> int:
    model_dir = root / model
    versions = [int(p.name) for p in model_dir.iterdir() if VERSION_RE.match(p.name)] if model_dir.is_dir() else []
    return max(versions, default=0) + 1
