"""The manifest of a version: every file checksummed, the schema round trip, and the bottom
fingerprint (what two versions must share to share a bottom). Tiny models only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from model_format.manifest import MANIFEST_NAME, SCHEMA_FILE, Manifest, ManifestError, read_manifest
from tests import helpers
from tests.helpers import SMALL_ATTENTION_HEADS, SMALL_HEAD_HIDDEN, SmallModelFactory


def test_version_files_and_manifest(tiny: Path, tiny_manifest: Manifest) -> None:
    listed = set(tiny_manifest.sha256)
    on_disk = {p.name for p in tiny.iterdir()} - {MANIFEST_NAME}
    assert listed == on_disk, "every file but the manifest is checksummed, and nothing else is there"
    assert tiny_manifest.precisions == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert tiny_manifest.encoder.num_attention_heads == SMALL_ATTENTION_HEADS
    assert tiny_manifest.head_hidden == SMALL_HEAD_HIDDEN
    assert tiny_manifest.srcids == (1, 2, 3, 4)
    assert Manifest.from_json(tiny_manifest.to_json()) == tiny_manifest
    assert re.fullmatch(r"[0-9a-f]{64}", tiny_manifest.bottom_fingerprint)


def test_bottom_fingerprint_follows_the_bottom_only(small_model_factory: SmallModelFactory) -> None:
    base = read_manifest(small_model_factory(num_heads=3, seed=7))
    other_heads = read_manifest(small_model_factory(num_heads=3, seed=7, head_seed=99))
    more_heads = read_manifest(small_model_factory(num_heads=5, seed=7))
    other_bottom = read_manifest(small_model_factory(num_heads=3, seed=8, head_seed=7))
    assert base.bottom_fingerprint == other_heads.bottom_fingerprint == more_heads.bottom_fingerprint
    assert base.sha256["model.onnx"] != other_heads.sha256["model.onnx"]
    assert other_bottom.bottom_fingerprint != base.bottom_fingerprint


def test_bottom_fingerprint_covers_max_seq_len(small_model_factory: SmallModelFactory) -> None:
    long = read_manifest(small_model_factory(num_heads=3, seed=7))
    short = read_manifest(small_model_factory(num_heads=3, seed=7, max_seq_len=16))
    assert long.bottom_fingerprint != short.bottom_fingerprint


def test_bottom_fingerprint_covers_attention_heads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two = read_manifest(helpers.build_small_model(tmp_path, model="two", seed=7))
    monkeypatch.setattr(helpers, "SMALL_ATTENTION_HEADS", 4)
    four = read_manifest(helpers.build_small_model(tmp_path, model="four", seed=7))
    assert four.encoder.num_attention_heads == 4
    assert two.bottom_fingerprint != four.bottom_fingerprint


def test_the_published_schema_holds_every_built_manifest_and_the_reader_enforces_it(
        tiny: Path, demo_repo: Path) -> None:
    """model_format/manifest.schema.json is a valid JSON Schema; the builder's manifests (demo and tiny) pass
    it; and `read_manifest` refuses what only the schema catches, naming the field."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    for version_dir in (tiny, demo_repo / "demo" / "1"):
        doc = json.loads((version_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        assert not list(jsonschema.Draft202012Validator(schema).iter_errors(doc)), version_dir
    good = json.loads((tiny / MANIFEST_NAME).read_text(encoding="utf-8"))
    cases = [({**good, "unexpected": 1}, "(top level): Additional properties are not allowed ('unexpected'"),
             ({**good, "bottom_fingerprint": "xyz"}, "at bottom_fingerprint: 'xyz' does not match"),
             ({**good, "heads": [{**good["heads"][0], "colour": "red"}, *good["heads"][1:]]},
              "at heads/0: Additional properties are not allowed ('colour'"),
             ({**good, "site": {**good["site"], "dim": 0}}, "at site/dim: 0 is less than the minimum of 1")]
    for doc, message in cases:
        with pytest.raises(ManifestError) as err:
            Manifest.from_json(json.dumps(doc))
        assert message in str(err.value), str(err.value)
