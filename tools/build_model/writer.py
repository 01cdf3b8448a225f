"""Writes a complete model version: graph, variants, tokenizer, vocabularies, manifest, checksums.

Everything is written into a staging folder and renamed into place only when whole.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
from tokenizers import Tokenizer

from model_format.manifest import (
    MANIFEST_NAME,
    MODEL_FILES,
    TOKENIZER_FILE,
    Head,
    LookupFeature,
    Manifest,
    read_lookup_vocab,
    sha256_file,
)
from model_format.repository import publish_version, staging_dir
from tools.build_model.golden import write_golden
from tools.build_model.graph import build_graph
from tools.build_model.precision import head_node_names, write_fp16, write_int8
from tools.build_model.weights import ModelWeights

SITE_VOCAB, NER_VOCAB, INDUSTRY_VOCAB = "site_vocab.txt", "ner_vocab.txt", "industry_vocab.txt"
Progress = Callable[[str], None]
GRAPH_PROP_PREFIX = "scoring."


@dataclass(frozen=True)
class LookupVocabs:
    """Entries without the reserved `[PAD]` (id 0, missing) and `[UNK]` (id 1, unknown) lines."""

    sites: Sequence[str]
    ner_tags: Sequence[str]
    industries: Sequence[str]

    @property
    def sizes(self) -> tuple[int, int, int]:
        return len(self.sites) + 2, len(self.ner_tags) + 2, len(self.industries) + 2


def _write_lookup_vocab(path: Path, entries: Sequence[str]) -> None:
    bad = [e for e in entries if not e or "\n" in e or e != e.strip()]
    if bad or len(set(entries)) != len(entries):
        raise ValueError(f"{path.name}: entries must be unique, non-empty single lines: {bad[:3]}")
    path.write_text("\n".join(["[PAD]", "[UNK]", *entries]) + "\n", encoding="utf-8")


def bottom_fingerprint(model: onnx.ModelProto, version_dir: Path, shared_files: Sequence[str]) -> str:
    """SHA-256 over everything that decides the features: the bottom's nodes (ops, wiring,
    attributes such as LayerNorm epsilon), every tensor they read (name, type, shape, bytes), the
    graph's sequence limits (`scoring.*` metadata) and the tokenizer and vocabularies.

    Two versions with equal fingerprints compute identical features for identical requests.
    """
    digest = hashlib.sha256()
    heads = set(head_node_names(model))
    bottom = [n for n in model.graph.node if n.name not in heads]
    read = {i for n in bottom for i in n.input}
    for node in bottom:
        digest.update(node.SerializeToString(deterministic=True))
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        if init.name in read:
            arr = onnx.numpy_helper.to_array(init)
            digest.update(f"{init.name}|{arr.dtype.str}|{arr.shape}|".encode())
            digest.update(arr.tobytes())
    for prop in sorted(model.metadata_props, key=lambda p: p.key):
        if prop.key.startswith(GRAPH_PROP_PREFIX):
            digest.update(f"{prop.key}={prop.value}|".encode())
    for name in shared_files:
        digest.update(f"{name}|".encode())
        digest.update((version_dir / name).read_bytes())
    return digest.hexdigest()


def write_version(
    weights: ModelWeights,
    heads: Sequence[Head],
    tokenizer: Tokenizer,
    vocabs: LookupVocabs,
    *,
    root: Path,
    model_name: str,
    version: int,
    max_seq_len: int,
    max_ner_tags: int,
    precisions: Sequence[str] = ("fp32",),
    progress: Progress = lambda _msg: None,
    extra: dict[str, object] | None = None,
) -> Path:
    if len(heads) != weights.heads.count:
        raise ValueError(f"{len(heads)} head entries for {weights.heads.count} heads in the weights")
    for table, expected, name in zip(
        (weights.lookups.site, weights.lookups.ner, weights.lookups.industry), vocabs.sizes,
        ("site", "ner", "industry"), strict=True,
    ):
        if table.shape[0] != expected:
            raise ValueError(f"{name} table has {table.shape[0]} rows, vocabulary needs {expected}")
    unknown = set(precisions) - set(MODEL_FILES)
    if unknown or "fp32" not in precisions:
        raise ValueError(f"precisions must include fp32 and be among {sorted(MODEL_FILES)}: {precisions}")

    with staging_dir(root, model_name) as stage:
        progress("building the ONNX graph")
        graph = build_graph(weights.encoder, weights.lookups, weights.heads)
        # The limits that shape the features travel with the graph, so head edits keep them.
        onnx.helper.set_model_props(graph, {f"{GRAPH_PROP_PREFIX}max_seq_len": str(max_seq_len),
                                            f"{GRAPH_PROP_PREFIX}max_ner_tags": str(max_ner_tags)})
        progress(f"writing {MODEL_FILES['fp32']}")
        onnx.save(graph, str(stage / MODEL_FILES["fp32"]))
        tokenizer.save(str(stage / TOKENIZER_FILE))
        _write_lookup_vocab(stage / SITE_VOCAB, vocabs.sites)
        _write_lookup_vocab(stage / NER_VOCAB, vocabs.ner_tags)
        _write_lookup_vocab(stage / INDUSTRY_VOCAB, vocabs.industries)
        if "int8" in precisions:
            progress("quantizing the bottom to int8 (ONNX Runtime dynamic quantization)")
            write_int8(stage / MODEL_FILES["fp32"], stage / MODEL_FILES["int8"])
        if "fp16" in precisions:
            progress("converting the bottom to fp16")
            write_fp16(stage / MODEL_FILES["fp32"], stage / MODEL_FILES["fp16"])

        progress("computing checksums and golden requests")
        shared = [TOKENIZER_FILE, SITE_VOCAB, NER_VOCAB, INDUSTRY_VOCAB]
        lk = weights.lookups
        draft = Manifest(
            model=model_name,
            version=version,
            encoder=weights.encoder.shape,
            max_seq_len=max_seq_len,
            max_ner_tags=max_ner_tags,
            head_hidden=weights.heads.hidden,
            site=LookupFeature(SITE_VOCAB, int(lk.site.shape[1])),
            ner=LookupFeature(NER_VOCAB, int(lk.ner.shape[1])),
            industry=LookupFeature(INDUSTRY_VOCAB, int(lk.industry.shape[1])),
            heads=tuple(heads),
            precisions={p: MODEL_FILES[p] for p in precisions},
            sha256={},
            bottom_fingerprint=bottom_fingerprint(graph, stage, shared),
            extra=dict(extra or {}),
        )
        return _seal_and_publish(stage, draft, root, progress)


def _shared_files(manifest: Manifest) -> list[str]:
    """The files a version shares with every version of the same bottom, in fingerprint order."""
    return [TOKENIZER_FILE, manifest.site.vocab_file, manifest.ner.vocab_file, manifest.industry.vocab_file]


def _seal_and_publish(
    stage: Path,
    draft: Manifest,
    root: Path,
    progress: Progress,
    before_publish: Callable[[Path, Manifest], None] | None = None,
) -> Path:
    """Golden requests, checksums and the manifest (last) for a staged version, then the atomic rename.

    `before_publish(stage, manifest)` runs on the complete staged version; raising there publishes nothing.
    """
    first_entries = [
        read_lookup_vocab(stage / f.vocab_file)[2:3] or ["[UNK]"] for f in (draft.site, draft.ner, draft.industry)
    ]
    golden = write_golden(stage, draft, first_entries[0][0], first_entries[1][0], first_entries[2][0])
    files = list(draft.precisions.values()) + _shared_files(draft) + [golden.file]
    manifest = replace(draft, golden=golden, sha256={name: sha256_file(stage / name) for name in files})
    manifest.validate()
    # The manifest goes last: without it, the folder is incomplete by definition.
    (stage / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    if before_publish is not None:
        before_publish(stage, manifest)
    progress(f"publishing {draft.model}/{draft.version}")
    return publish_version(stage, root, draft.model, draft.version)


def write_version_from_graphs(
    graphs: Mapping[str, onnx.ModelProto],
    template: Manifest,
    shared_from: Path,
    *,
    root: Path,
    model_name: str,
    version: int,
    heads: Sequence[Head],
    progress: Progress = lambda _msg: None,
    extra: dict[str, object] | None = None,
    before_publish: Callable[[Path, Manifest], None] | None = None,
) -> Path:
    """Writes a complete version from ready ONNX graphs (precision -> model; fp32 required).

    The tokenizer and look-up vocabularies are copied byte for byte from the version folder
    `shared_from`; shapes, sequence limits and look-up widths come from `template`, heads from
    `heads`. Golden requests, checksums, `bottom_fingerprint` and the manifest are computed afresh.
    Used by `tools.heads` to publish head edits of an existing version without rebuilding the bottom.
    """
    unknown = set(graphs) - set(MODEL_FILES)
    if unknown or "fp32" not in graphs:
        raise ValueError(f"graphs must include fp32 and be among {sorted(MODEL_FILES)}: {sorted(graphs)}")
    precisions = [p for p in MODEL_FILES if p in graphs]  # fp32, int8, fp16: a stable file order
    with staging_dir(root, model_name) as stage:
        for precision in precisions:
            progress(f"writing {MODEL_FILES[precision]}")
            onnx.save(graphs[precision], str(stage / MODEL_FILES[precision]))
        shared = _shared_files(template)
        for name in shared:
            shutil.copyfile(shared_from / name, stage / name)
        draft = replace(
            template,
            model=model_name,
            version=version,
            heads=tuple(heads),
            precisions={p: MODEL_FILES[p] for p in precisions},
            sha256={},
            bottom_fingerprint=bottom_fingerprint(graphs["fp32"], stage, shared),
            golden=None,
            extra=dict(extra or {}),
        )
        progress("computing checksums and golden requests")
        return _seal_and_publish(stage, draft, root, progress, before_publish)
