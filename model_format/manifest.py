"""The `manifest.json` of a model version: what the version is and how to check it is whole.

The format is documented in `model_repo/README.md`; this module is its single reader and writer.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHUNK_BYTES = 1 << 20

# File names inside a version folder, by precision.
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
TOKENIZER_FILE = "tokenizer.json"
# The published contract other exporters check themselves against (JSON Schema 2020-12).
SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")


class ManifestError(ValueError):
    """The manifest is missing, unreadable or does not describe a valid version."""


@dataclass(frozen=True)
class Head:
    srcid: int
    name: str
    threshold: float


@dataclass(frozen=True)
class EncoderShape:
    type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float


@dataclass(frozen=True)
class LookupFeature:
    """A look-up table feature (site, NER tag, industry): its vocabulary file and embedding width."""

    vocab_file: str
    dim: int


@dataclass(frozen=True)
class GoldenSpec:
    """Requests shipped with a version and the scores its fp32 graph gave them at build time.

    A server checks them after warm-up, within `tolerance[precision]`, before the version may serve.
    """

    file: str
    tolerance: dict[str, float]


@dataclass(frozen=True)
class Manifest:
    model: str
    version: int
    encoder: EncoderShape
    max_seq_len: int
    max_ner_tags: int
    head_hidden: int
    site: LookupFeature
    ner: LookupFeature
    industry: LookupFeature
    heads: tuple[Head, ...]
    # precision name -> model file, e.g. {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    precisions: dict[str, str]
    # relative file name -> lowercase hex SHA-256, for every file in the version but the manifest
    sha256: dict[str, str]
    # SHA-256 over the bottom's tensors, tokenizer and vocabularies: equal bottoms, equal fingerprints
    bottom_fingerprint: str
    schema_version: int = SCHEMA_VERSION
    golden: GoldenSpec | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return self.encoder.hidden_size + self.site.dim + self.ner.dim + self.industry.dim

    @property
    def srcids(self) -> tuple[int, ...]:
        return tuple(h.srcid for h in self.heads)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["heads"] = [asdict(h) for h in self.heads]
        ordered = {"schema_version": doc.pop("schema_version"), **doc}
        return json.dumps(ordered, indent=2, ensure_ascii=False, sort_keys=False) + "\n"

    @staticmethod
    def from_json(text: str) -> Manifest:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ManifestError("manifest must be a JSON object")
        schema = doc.get("schema_version")
        if schema != SCHEMA_VERSION:
            raise ManifestError(f"unsupported schema_version {schema!r} (this server reads {SCHEMA_VERSION})")
        for key in ("version", "max_seq_len", "max_ner_tags", "head_hidden"):
            if type(doc.get(key)) is not int:  # not bool, not 1.5, not "1"
                raise ManifestError(
                    f"manifest field missing or malformed: {key} must be an integer, got {doc.get(key)!r}")
        try:
            manifest = Manifest(
                model=str(doc["model"]),
                version=int(doc["version"]),
                encoder=EncoderShape(**doc["encoder"]),
                max_seq_len=int(doc["max_seq_len"]),
                max_ner_tags=int(doc["max_ner_tags"]),
                head_hidden=int(doc["head_hidden"]),
                site=LookupFeature(**doc["site"]),
                ner=LookupFeature(**doc["ner"]),
                industry=LookupFeature(**doc["industry"]),
                heads=tuple(Head(int(h["srcid"]), str(h["name"]), float(h["threshold"])) for h in doc["heads"]),
                precisions={str(k): str(v) for k, v in doc["precisions"].items()},
                sha256={str(k): str(v) for k, v in doc["sha256"].items()},
                bottom_fingerprint=str(doc["bottom_fingerprint"]),
                golden=GoldenSpec(str(doc["golden"]["file"]),
                                  {str(k): float(v) for k, v in doc["golden"]["tolerance"].items()})
                if doc.get("golden") else None,
                extra=dict(doc.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest field missing or malformed: {exc!r}") from exc
        manifest.validate()
        check_schema(doc)
        return manifest

    def validate(self) -> None:
        """Checks that need no other file: shapes, heads and file references agree."""
        if self.version <= 0:
            raise ManifestError(f"version must be a positive integer, got {self.version}")
        if not self.heads:
            raise ManifestError("a model needs at least one head")
        srcids = [h.srcid for h in self.heads]
        if len(set(srcids)) != len(srcids):
            dup = sorted({s for s in srcids if srcids.count(s) > 1})
            raise ManifestError(f"duplicate srcids in heads: {dup}")
        for h in self.heads:
            if not 0.0 <= h.threshold <= 1.0:
                raise ManifestError(f"head {h.srcid} threshold {h.threshold} is outside [0, 1]")
        if not 2 <= self.max_seq_len <= self.encoder.max_position_embeddings:
            raise ManifestError(
                f"max_seq_len {self.max_seq_len} must be in [2, {self.encoder.max_position_embeddings}]"
            )
        if "fp32" not in self.precisions:
            raise ManifestError("the fp32 model (model.onnx) is required")
        referenced = [
            *self.precisions.values(),
            TOKENIZER_FILE,
            self.site.vocab_file,
            self.ner.vocab_file,
            self.industry.vocab_file,
            *([self.golden.file] if self.golden else []),
        ]
        for name in referenced:
            if name not in self.sha256:
                raise ManifestError(f"{name} is referenced but has no sha256 entry")
        for name in self.sha256:
            if Path(name).is_absolute() or ".." in Path(name).parts or name == MANIFEST_NAME:
                raise ManifestError(f"illegal file name in sha256: {name!r}")


@functools.cache
def _schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator: jsonschema.protocols.Validator = jsonschema.Draft202012Validator(schema)
    return validator


def check_schema(doc: Any) -> None:
    """Raises ManifestError naming the field where `doc` departs from manifest.schema.json (after the
    reader's own checks, which give the more specific messages for the common mistakes)."""
    error = jsonschema.exceptions.best_match(_schema_validator().iter_errors(doc))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ManifestError(f"does not match {SCHEMA_FILE.name} at {where}: {error.message}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(version_dir: Path) -> Manifest:
    path = version_dir / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is unreadable: {exc}") from exc
    try:
        return Manifest.from_json(text)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc


def verify_files(version_dir: Path, manifest: Manifest) -> None:
    """Raises ManifestError naming the first file that is missing or whose SHA-256 differs."""
    for name, expected in sorted(manifest.sha256.items()):
        path = version_dir / name
        if not path.is_file():
            raise ManifestError(f"{name} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected.lower():
            raise ManifestError(f"{name} sha256 mismatch: manifest {expected[:12]}…, file {actual[:12]}…")


def read_lookup_vocab(path: Path) -> list[str]:
    """A look-up vocabulary: one entry per line, line number = id; line 0 is missing, line 1 unknown."""
    entries = path.read_text(encoding="utf-8").split("\n")
    if entries and entries[-1] == "":
        entries.pop()
    if len(entries) < 2 or entries[0] != "[PAD]" or entries[1] != "[UNK]":
        raise ManifestError(f"{path.name}: the first two lines must be [PAD] and [UNK]")
    return entries
