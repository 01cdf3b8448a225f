"""merge, replace and remove: a new version with other heads on the same, byte-identical bottom.

Every edit loads each precision variant of the base version, replaces only the head tensors
(graph_edit.set_heads), writes a complete version into a staging folder beside the target, runs the
verification (verify.py) on the staged files, and only then renames the folder into place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from model_format.features import FeatureEncoder
from model_format.manifest import MODEL_FILES, Head, Manifest, ManifestError, read_manifest, verify_files
from model_format.repository import VERSION_RE, next_version, valid_model_name
from tools.build_model.weights import HeadWeights
from tools.build_model.writer import write_version_from_graphs
from tools.heads import verify
from tools.heads.graph_edit import (
    VersionGraph,
    non_head_digest,
    read_heads,
    require_same_bottom,
    set_heads,
    stack_heads,
)

Report = verify.Report


class EditError(ValueError):
    """The edit cannot be done as asked (unknown or duplicate srcid, bad output folder, …)."""


@dataclass(frozen=True)
class Target:
    """Where a new version goes: `<root>/<model>/<version>`."""

    root: Path
    model: str
    version: int

    @property
    def path(self) -> Path:
        return self.root / self.model / str(self.version)


def resolve_target(out: Path | None, base_dir: Path) -> Target:
    """`--out` is the new version folder `<repo>/<model>/<version>` (must not exist); by default the
    next version of the base version's own model, so a server watching that repository hot-swaps it."""
    if out is None:
        base = base_dir.resolve()
        root, model = base.parent.parent, base.parent.name
        if not valid_model_name(model):
            raise EditError(f"cannot derive a model name from {base_dir}; pass --out <repo>/<model>/<version>")
        return Target(root, model, next_version(root, model))
    out = out.resolve()
    if not VERSION_RE.match(out.name) or not valid_model_name(out.parent.name):
        raise EditError(f"--out must be a version folder <repo>/<model>/<version> (a positive integer), got {out}")
    if out.exists():
        raise EditError(f"{out} already exists; versions are immutable")
    return Target(out.parent.parent, out.parent.name, int(out.name))


def load_version(path: Path) -> VersionGraph:
    """A complete version (manifest parses, every checksum matches) with its fp32 graph."""
    try:
        manifest = read_manifest(path)
        verify_files(path, manifest)
    except ManifestError as exc:
        raise EditError(f"{path} is not a complete version: {exc}") from exc
    model = onnx.load(str(path / manifest.precisions["fp32"]))
    return VersionGraph(path, manifest, model)


@dataclass(frozen=True)
class HeadSource:
    """The model the added heads come from, and its heads as a stack."""

    version: VersionGraph
    heads: HeadWeights


@dataclass
class EditResult:
    path: Path
    manifest: Manifest
    checks: list[verify.VariantResult]
    seconds: float


def _probes(base: VersionGraph, source: VersionGraph | None, probe_data: Path | None, probe_rows: int
            ) -> list[verify.Probe]:
    probes = verify.builtin_probes(base.path, base.manifest) + verify.golden_probes(base.path, base.manifest)
    if source is not None:
        probes += verify.golden_probes(source.path, source.manifest)
    if probe_data is not None:
        probes += verify.probes_from_jsonl(probe_data, probe_rows)
    return probes


def _edit(
    base: VersionGraph,
    new_meta: Sequence[Head],
    parts: Sequence[tuple[HeadWeights, int]],
    kept: Sequence[tuple[int, int, int]],
    added: Sequence[tuple[int, int, int]],
    source: HeadSource | None,
    target: Target,
    extra: dict[str, object],
    report: Report,
    probe_data: Path | None,
    probe_rows: int,
) -> EditResult:
    t0 = time.perf_counter()
    new_heads = stack_heads(parts)
    base_heads = read_heads(base.model)
    graphs: dict[str, onnx.ModelProto] = {}
    references: dict[str, Path | bytes] = {}
    for precision, file in base.manifest.precisions.items():
        model = base.model if precision == "fp32" else onnx.load(str(base.path / file))
        before = non_head_digest(model)
        if source is not None:
            if precision in source.version.manifest.precisions:
                references[precision] = source.version.path / source.version.manifest.precisions[precision]
            else:
                # The source model in this precision: this variant's (identical) bottom with the source's heads.
                set_heads(model, source.heads)
                references[precision] = model.SerializeToString()
        set_heads(model, new_heads)
        if non_head_digest(model) != before:
            raise verify.VerificationError(f"{precision}: editing the heads changed a non-head tensor or node")
        got = read_heads(model)
        if not all(np.array_equal(getattr(got, f), getattr(new_heads, f)) for f in ("w1", "b1", "w2", "b2")):
            raise verify.VerificationError(f"{precision}: head tensors differ from the fp32 variant's")
        graphs[precision] = model
    report(f"heads: {base_heads.count} -> {new_heads.count} (D={new_heads.w1.shape[0]}, h={new_heads.hidden}); "
           f"precisions {', '.join(graphs)}")

    encoder = FeatureEncoder(base.path, base.manifest)
    batches = verify.probe_batches(verify.encode_probes(encoder, _probes(
        base, source.version if source else None, probe_data, probe_rows)))

    def check(stage: Path, manifest: Manifest) -> None:
        if manifest.bottom_fingerprint != base.manifest.bottom_fingerprint:
            raise verify.VerificationError(
                f"bottom_fingerprint changed: {base.manifest.bottom_fingerprint[:12]}… -> "
                f"{manifest.bottom_fingerprint[:12]}…")
        report(f"bottom_fingerprint unchanged: {manifest.bottom_fingerprint}")
        variants = [verify.VariantInputs(p, base.path / base.manifest.precisions[p], stage / manifest.precisions[p],
                                         references.get(p)) for p in manifest.precisions]
        checks.extend(verify.verify_all(variants, batches, kept, added, report))

    checks: list[verify.VariantResult] = []
    path = write_version_from_graphs(
        graphs, base.manifest, base.path, root=target.root, model_name=target.model, version=target.version,
        heads=new_meta, extra=extra, before_publish=check,
        progress=lambda msg: report(f"  {msg}"),
    )
    manifest = read_manifest(path)
    return EditResult(path, manifest, checks, time.perf_counter() - t0)


def merge(
    base_dir: Path,
    source_dir: Path,
    out: Path | None = None,
    *,
    replace: bool = False,
    report: Report = print,
    probe_data: Path | None = None,
    probe_rows: int = 64,
) -> EditResult:
    """Appends the heads of `source_dir` (usually a single-head model) to the base version.

    A srcid that the base already has is an error unless `replace`, which swaps that head in place
    (same column, so every other column keeps its position)."""
    target = resolve_target(out, base_dir)
    base, source = load_version(base_dir), load_version(source_dir)
    require_same_bottom(base, source)
    report(f"bottoms identical: {base.label} and {source.label} "
           f"(bottom_fingerprint {base.manifest.bottom_fingerprint[:16]}…, tensors, nodes, tokenizer, vocabularies)")
    base_heads, source_heads = read_heads(base.model), read_heads(source.model)
    source_index = {h.srcid: i for i, h in enumerate(source.manifest.heads)}
    clash = [h for h in base.manifest.heads if h.srcid in source_index]
    if clash and not replace:
        raise EditError(f"srcid {clash[0].srcid} ({clash[0].name}) already exists in {base.label}; "
                        "pass --replace to replace it")
    meta: list[Head] = []
    parts: list[tuple[HeadWeights, int]] = []
    kept: list[tuple[int, int, int]] = []
    added: list[tuple[int, int, int]] = []
    for col, head in enumerate(base.manifest.heads):
        if head.srcid in source_index:
            j = source_index[head.srcid]
            added.append((head.srcid, j, len(meta)))
            meta.append(source.manifest.heads[j])
            parts.append((source_heads, j))
        else:
            kept.append((head.srcid, col, len(meta)))
            meta.append(head)
            parts.append((base_heads, col))
    replaced = [h.srcid for h in clash]
    for j, head in enumerate(source.manifest.heads):
        if head.srcid not in replaced:
            added.append((head.srcid, j, len(meta)))
            meta.append(head)
            parts.append((source_heads, j))
    report(f"merge: {len(kept)} kept, {len(replaced)} replaced {replaced}, "
           f"{len(added) - len(replaced)} appended {[s for s, _, _ in added if s not in replaced]} "
           f"-> {target.model}/{target.version}")
    extra: dict[str, object] = {
        "source": "tools.heads merge",
        "parent": base.label,
        "heads_from": source.label,
        "added": [s for s, _, _ in added if s not in replaced],
        "replaced": replaced,
        "origin": base.manifest.extra.get("origin", base.manifest.extra.get("source")),
    }
    return _edit(base, meta, parts, kept, added, HeadSource(source, source_heads), target, extra, report,
                 probe_data, probe_rows)


def remove(
    base_dir: Path,
    srcids: Sequence[int],
    out: Path | None = None,
    *,
    report: Report = print,
    probe_data: Path | None = None,
    probe_rows: int = 64,
) -> EditResult:
    """A new version without the heads `srcids`; every other head keeps its scores bit for bit."""
    target = resolve_target(out, base_dir)
    base = load_version(base_dir)
    present = set(base.manifest.srcids)
    unknown = [s for s in srcids if s not in present]
    if unknown:
        raise EditError(f"{base.label} has no head with srcid {unknown[0]}")
    drop = set(srcids)
    if drop >= present:
        raise EditError("removing every head would leave an empty model; a version needs at least one head")
    base_heads = read_heads(base.model)
    meta: list[Head] = []
    kept: list[tuple[int, int, int]] = []
    for col, head in enumerate(base.manifest.heads):
        if head.srcid not in drop:
            kept.append((head.srcid, col, len(meta)))
            meta.append(head)
    report(f"remove: {sorted(drop)} from {base.label}, {len(kept)} heads kept -> {target.model}/{target.version}")
    extra: dict[str, object] = {"source": "tools.heads remove", "parent": base.label, "removed": sorted(drop),
                                "origin": base.manifest.extra.get("origin", base.manifest.extra.get("source"))}
    parts = [(base_heads, old) for _, old, _ in kept]
    return _edit(base, meta, parts, kept, [], None, target, extra, report, probe_data, probe_rows)


def export_heads(
    base_dir: Path,
    heads: HeadWeights,
    meta: Sequence[Head],
    out: Path,
    *,
    extra: dict[str, object],
    precisions: Sequence[str] | None = None,
    report: Report = print,
    before_publish: Callable[[Path, Manifest], None] | None = None,
) -> Path:
    """A version with the base's bottom and only `heads` (e.g. a newly trained single head).

    `before_publish(stage, manifest)` may check the staged version; raising there publishes nothing."""
    target = resolve_target(out, base_dir)
    base = load_version(base_dir)
    wanted = list(precisions) if precisions is not None else list(base.manifest.precisions)
    unknown = [p for p in wanted if p not in base.manifest.precisions]
    if unknown or "fp32" not in wanted:
        raise EditError(f"precisions {wanted}: fp32 is required and {base.label} has only "
                        f"{sorted(base.manifest.precisions)}")
    graphs: dict[str, onnx.ModelProto] = {}
    for precision in wanted:
        model = base.model if precision == "fp32" else onnx.load(str(base.path / MODEL_FILES[precision]))
        before = non_head_digest(model)
        set_heads(model, heads)
        if non_head_digest(model) != before:
            raise verify.VerificationError(f"{precision}: editing the heads changed a non-head tensor or node")
        graphs[precision] = model

    def same_bottom(stage: Path, manifest: Manifest) -> None:
        if manifest.bottom_fingerprint != base.manifest.bottom_fingerprint:
            raise verify.VerificationError("bottom_fingerprint changed while exporting")
        if before_publish is not None:
            before_publish(stage, manifest)

    return write_version_from_graphs(
        graphs, base.manifest, base.path, root=target.root, model_name=target.model, version=target.version,
        heads=meta, extra=extra, before_publish=same_bottom, progress=lambda msg: report(f"  {msg}"))
