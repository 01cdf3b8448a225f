"""The model repository: only complete versions are served (manifest present and valid, every file
there with its SHA-256, the manifest naming this very version), staging folders and other names are
ignored, and publishing is a rename that never overwrites. Tiny models only (copies where damaged).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from model_format.manifest import MANIFEST_NAME, read_manifest
from model_format.repository import (
    check_version,
    latest_complete,
    next_version,
    publish_version,
    scan_model,
    scan_repository,
    staging_dir,
)
from tests import helpers

# --- the repository: complete versions only -----------------------------------------------------

@pytest.fixture
def repo_copy(tiny: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model at `<tmp>/repo/tiny/1` (safe to damage); returns the repo root."""
    root = tmp_path / "repo"
    shutil.copytree(tiny, root / "tiny" / "1")
    return root


def status_of(root: Path, version: int = 1) -> tuple[bool, str]:
    st = check_version(root / "tiny" / str(version), "tiny", version)
    return st.complete, st.error or ""


def test_complete_version_is_complete(repo_copy: Path) -> None:
    st = check_version(repo_copy / "tiny" / "1", "tiny", 1)
    assert st.complete and st.error is None and st.manifest is not None
    found = latest_complete(scan_repository(repo_copy)["tiny"])
    assert found is not None and found.version == 1


def test_changed_byte_is_incomplete(repo_copy: Path) -> None:
    path = repo_copy / "tiny" / "1" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    complete, error = status_of(repo_copy)
    assert not complete
    assert "model.onnx" in error and "sha256" in error
    assert latest_complete(scan_model(repo_copy, "tiny")) is None
    # Without checksum verification the damage is not seen: the scan's cheap mode is opt-in only.
    assert check_version(repo_copy / "tiny" / "1", "tiny", 1, verify_checksums=False).complete


def test_missing_manifest_is_incomplete(repo_copy: Path) -> None:
    (repo_copy / "tiny" / "1" / MANIFEST_NAME).unlink()
    complete, error = status_of(repo_copy)
    assert not complete and MANIFEST_NAME in error


@pytest.mark.parametrize("text, reason", [
    ('{"schema_version": 1, "model": "tiny"', "not valid JSON"),
    ("[]", "JSON object"),
    ('{"schema_version": 2}', "schema_version"),
    ('{"schema_version": 1, "model": "tiny"}', "missing or malformed"),
])
def test_bad_manifest_is_incomplete(repo_copy: Path, text: str, reason: str) -> None:
    (repo_copy / "tiny" / "1" / MANIFEST_NAME).write_text(text, encoding="utf-8")
    complete, error = status_of(repo_copy)
    assert not complete and "manifest" in error and reason in error


def test_missing_listed_file_is_incomplete(repo_copy: Path) -> None:
    (repo_copy / "tiny" / "1" / "tokenizer.json").unlink()
    complete, error = status_of(repo_copy)
    assert not complete and "tokenizer.json" in error and "missing" in error


def test_manifest_of_another_version_is_incomplete(repo_copy: Path) -> None:
    shutil.copytree(repo_copy / "tiny" / "1", repo_copy / "tiny" / "2")
    complete, error = status_of(repo_copy, 2)
    assert not complete and "tiny/1" in error and "tiny/2" in error
    statuses = scan_model(repo_copy, "tiny")
    assert [(s.version, s.complete) for s in statuses] == [(1, True), (2, False)]
    found = latest_complete(statuses)
    assert found is not None and found.version == 1


def test_manifest_listing_an_unsafe_path_is_incomplete(repo_copy: Path) -> None:
    path = repo_copy / "tiny" / "1" / MANIFEST_NAME
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["sha256"]["../escape.txt"] = "0" * 64
    path.write_text(json.dumps(doc), encoding="utf-8")
    complete, error = status_of(repo_copy)
    assert not complete and "../escape.txt" in error


def test_staging_and_other_folders_are_ignored(repo_copy: Path) -> None:
    shutil.copytree(repo_copy / "tiny" / "1", repo_copy / "tiny" / ".staging-xyz")
    shutil.copytree(repo_copy / "tiny" / "1", repo_copy / "tiny" / "07")  # not a version name
    (repo_copy / "tiny" / "notes").mkdir()
    (repo_copy / ".staging-abc").mkdir()  # not a model name either
    shutil.copytree(repo_copy / "tiny" / "1", repo_copy / ".hidden" / "1")
    repo = scan_repository(repo_copy)
    assert list(repo) == ["tiny"]
    assert [s.version for s in repo["tiny"]] == [1]
    assert next_version(repo_copy, "tiny") == 2


def test_publish_refuses_to_overwrite(repo_copy: Path) -> None:
    before = (repo_copy / "tiny" / "1" / MANIFEST_NAME).read_bytes()
    with staging_dir(repo_copy, "tiny") as stage:
        assert stage.parent == repo_copy / "tiny" and stage.name.startswith(".staging-")
        (stage / "payload.txt").write_text("new", encoding="utf-8")
        with pytest.raises(FileExistsError):
            publish_version(stage, repo_copy, "tiny", 1)
        assert (stage / "payload.txt").exists()
    assert not stage.exists(), "an unpublished staging folder is removed"
    assert (repo_copy / "tiny" / "1" / MANIFEST_NAME).read_bytes() == before
    assert status_of(repo_copy) == (True, "")
    assert sorted(p.name for p in (repo_copy / "tiny").iterdir()) == ["1"]


def test_publish_renames_the_staging_folder(repo_copy: Path) -> None:
    with staging_dir(repo_copy, "tiny") as stage:
        for f in (repo_copy / "tiny" / "1").iterdir():
            shutil.copy(f, stage / f.name)
        # The copied manifest names version 1; the published folder is version 2, so it is incomplete.
        target = publish_version(stage, repo_copy, "tiny", 2)
    assert target == repo_copy / "tiny" / "2" and not stage.exists()
    assert not check_version(target, "tiny", 2).complete
    with pytest.raises(ValueError):
        publish_version(target, repo_copy, "bad name!", 3)
    with pytest.raises(ValueError):
        publish_version(target, repo_copy, "tiny", 0)


def test_writer_refuses_an_existing_version(tmp_path: Path) -> None:
    helpers.build_small_model(tmp_path, num_heads=1)
    with pytest.raises(FileExistsError):
        helpers.build_small_model(tmp_path, num_heads=2)
    assert read_manifest(tmp_path / "tiny" / "1").srcids == (1,)
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["1"], "no staging folder is left behind"


def test_published_version_is_readable_like_any_folder(tiny: Path, tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    if umask & 0o055:
        pytest.skip(f"umask {umask:03o} makes every new folder private")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert stat.S_IMODE(tiny.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
