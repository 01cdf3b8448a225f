"""Head surgery on a version's ONNX graphs, and the byte-for-byte bottom comparison merging needs.

The heads are stored stacked (model_repo/README.md, "The graph contract"): `heads.w1` [D, N*h],
`heads.b1` [N*h], `heads.w2` [N, h, 1], `heads.b2` [N], the reshape constant
`const.split_heads_out` = [0, N, h] and the declared `scores` output [batch, N]. Changing the
heads of a graph means replacing exactly those, in every precision variant (heads are fp32 in all
of them), and leaving every other initializer and every node untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from model_format.manifest import TOKENIZER_FILE, Manifest
from tools.build_model.graph import BOTTOM_PREFIX, HEAD_PREFIX
from tools.build_model.precision import head_node_names
from tools.build_model.weights import HeadWeights

W1, B1, W2, B2 = (f"{HEAD_PREFIX}{n}" for n in ("w1", "b1", "w2", "b2"))
HEAD_TENSORS = (W1, B1, W2, B2)
SPLIT_HEADS_OUT = "const.split_heads_out"
SCORES = "scores"


class GraphEditError(ValueError):
    """The graph does not follow the stacked-heads contract, so its heads cannot be edited safely."""


class BottomMismatch(ValueError):
    """Two versions do not share the bottom; the message names the first difference."""


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _head_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    names = set(head_node_names(model))
    return [n for n in model.graph.node if n.name in names]


def _scores_output(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    for out in model.graph.output:
        if out.name == SCORES:
            found: onnx.ValueInfoProto = out
            return found
    raise GraphEditError("the graph has no `scores` output")


def _check_contract(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(D, N, h) of a graph whose heads can be edited; raises GraphEditError otherwise."""
    inits = _initializers(model)
    missing = [n for n in (*HEAD_TENSORS, SPLIT_HEADS_OUT) if n not in inits]
    if missing:
        raise GraphEditError(f"the graph lacks {missing}: not a stacked-heads graph")
    extra = sorted(n for n in inits if n.startswith(HEAD_PREFIX) and n not in HEAD_TENSORS)
    if extra:
        raise GraphEditError(f"unexpected head initializers {extra}")
    for name in HEAD_TENSORS:
        if inits[name].data_type != TensorProto.FLOAT:
            raise GraphEditError(f"{name} is {TensorProto.DataType.Name(inits[name].data_type)}, heads must be fp32")
    head_nodes = {n.name for n in _head_nodes(model)}
    for node in model.graph.node:
        uses = [i for i in node.input if i in HEAD_TENSORS or i == SPLIT_HEADS_OUT]
        if uses and node.name not in head_nodes:
            raise GraphEditError(f"node {node.name} ({node.op_type}) upstream of `features` reads {uses}")
    w1 = inits[W1].dims
    w2 = inits[W2].dims
    if len(w1) != 2 or len(w2) != 3 or w2[2] != 1:
        raise GraphEditError(f"head shapes w1 {list(w1)}, w2 {list(w2)} do not follow the contract")
    d, n, h = int(w1[0]), int(w2[0]), int(w2[1])
    split = numpy_helper.to_array(inits[SPLIT_HEADS_OUT])
    if split.tolist() != [0, n, h]:
        raise GraphEditError(f"{SPLIT_HEADS_OUT} is {split.tolist()}, expected [0, {n}, {h}]")
    dims = _scores_output(model).type.tensor_type.shape.dim
    if len(dims) != 2 or dims[1].dim_value != n:
        declared = [d.dim_value or d.dim_param for d in dims]
        raise GraphEditError(f"`scores` is declared {declared}, expected [batch, {n}]")
    return d, n, h


def read_heads(model: onnx.ModelProto) -> HeadWeights:
    """The stacked head tensors of a graph (fp32 copies)."""
    _check_contract(model)
    inits = _initializers(model)
    arrays = [np.array(numpy_helper.to_array(inits[n]), dtype=np.float32, copy=True) for n in HEAD_TENSORS]
    return HeadWeights(*arrays)


def set_heads(model: onnx.ModelProto, heads: HeadWeights) -> None:
    """Replaces the heads of `model` in place: the four head tensors, `[0, N, h]` and `scores` [batch, N].

    Every other initializer and every node stay as they are, so the bottom is byte-identical.
    Shape annotations (`value_info`) of tensors downstream of `features` are dropped: they carry the
    old N, and they are optional.
    """
    d, _n, h = _check_contract(model)
    if heads.w1.shape[0] != d or heads.hidden != h:
        raise GraphEditError(f"heads of shape w1 {heads.w1.shape}, h {heads.hidden} do not fit D={d}, h={h}")
    if heads.count < 1:
        raise GraphEditError("a model needs at least one head")
    new = {W1: heads.w1, B1: heads.b1, W2: heads.w2, B2: heads.b2,
           SPLIT_HEADS_OUT: np.array([0, heads.count, h], np.int64)}
    for init in model.graph.initializer:
        if init.name in new:
            arr = new[init.name]
            dtype = np.int64 if init.name == SPLIT_HEADS_OUT else np.float32
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=dtype), init.name))
    dim = _scores_output(model).type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = heads.count
    head_tensors = {o for node in _head_nodes(model) for o in node.output}
    kept = [vi for vi in model.graph.value_info if vi.name not in head_tensors]
    if len(kept) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    _check_contract(model)


def select_heads(heads: HeadWeights, index: Sequence[int]) -> HeadWeights:
    """Heads `index[0], index[1], …` of a stack, as a new stack (the columns copied exactly)."""
    d, h = heads.w1.shape[0], heads.hidden
    idx = np.asarray(index, np.int64)
    return HeadWeights(
        np.ascontiguousarray(heads.w1.reshape(d, heads.count, h)[:, idx, :].reshape(d, len(idx) * h)),
        np.ascontiguousarray(heads.b1.reshape(heads.count, h)[idx].reshape(len(idx) * h)),
        np.ascontiguousarray(heads.w2[idx]),
        np.ascontiguousarray(heads.b2[idx]),
    )


def stack_heads(parts: Sequence[tuple[HeadWeights, int]]) -> HeadWeights:
    """Concatenates single heads `(stack, index in that stack)` into one stack, in order."""
    if not parts:
        raise GraphEditError("a model needs at least one head")
    picked = [select_heads(stack, [i]) for stack, i in parts]
    return HeadWeights(
        np.ascontiguousarray(np.concatenate([p.w1 for p in picked], axis=1)),
        np.ascontiguousarray(np.concatenate([p.b1 for p in picked])),
        np.ascontiguousarray(np.concatenate([p.w2 for p in picked])),
        np.ascontiguousarray(np.concatenate([p.b2 for p in picked])),
    )


# --- the bottom ------------------------------------------------------------------------------------

def _is_head_tensor(name: str) -> bool:
    return name.startswith(HEAD_PREFIX) or name == SPLIT_HEADS_OUT


def _tensor_bytes(t: onnx.TensorProto) -> tuple[str, tuple[int, ...], bytes]:
    arr = numpy_helper.to_array(t)
    return arr.dtype.str, tuple(arr.shape), np.ascontiguousarray(arr).tobytes()


def _describe_tensor_difference(name: str, a: onnx.TensorProto, b: onnx.TensorProto) -> str | None:
    if a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return (f"tensor {name}: {TensorProto.DataType.Name(a.data_type)}{list(a.dims)} vs "
                f"{TensorProto.DataType.Name(b.data_type)}{list(b.dims)}")
    if a.HasField("raw_data") and b.HasField("raw_data") and a.raw_data == b.raw_data:
        return None
    xa, xb = numpy_helper.to_array(a), numpy_helper.to_array(b)
    if np.ascontiguousarray(xa).tobytes() == np.ascontiguousarray(xb).tobytes():
        return None
    flat_a, flat_b = xa.reshape(-1), xb.reshape(-1)
    bytes_a = flat_a.view(np.uint8).reshape(flat_a.size, -1)
    bytes_b = flat_b.view(np.uint8).reshape(flat_b.size, -1)
    diff = np.flatnonzero(np.any(bytes_a != bytes_b, axis=1))
    first = int(diff[0])
    where = np.unravel_index(first, xa.shape) if xa.shape else ()
    return (f"tensor {name}: {diff.size} of {flat_a.size} values differ, first at {tuple(int(i) for i in where)}: "
            f"{flat_a[first].item()!r} vs {flat_b[first].item()!r}")


def _node_key(node: onnx.NodeProto) -> bytes:
    """A node without its name: op, domain, inputs, outputs and attributes."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = ""
    copy.doc_string = ""
    key: bytes = copy.SerializeToString(deterministic=True)
    return key


def _describe_node(node: onnx.NodeProto) -> str:
    attrs = ", ".join(f"{a.name}={onnx.helper.get_attribute_value(a)!r}" for a in node.attribute)
    return f"{node.op_type}({', '.join(node.input)}) -> {', '.join(node.output)}" + (f" [{attrs}]" if attrs else "")


def _first_line_difference(a: bytes, b: bytes) -> str:
    la, lb = a.split(b"\n"), b.split(b"\n")
    for i, (x, y) in enumerate(zip(la, lb, strict=False)):
        if x != y:
            return f"line {i + 1}: {x[:60].decode(errors='replace')!r} vs {y[:60].decode(errors='replace')!r}"
    return f"{len(la)} vs {len(lb)} lines"


def manifest_bottom_fields(m: Manifest) -> dict[str, object]:
    """Manifest fields that change what `features` a request gets (or the head shape merging needs)."""
    return {
        "encoder": m.encoder,
        "max_seq_len": m.max_seq_len,
        "max_ner_tags": m.max_ner_tags,
        "head_hidden": m.head_hidden,
        "site.dim": m.site.dim,
        "ner.dim": m.ner.dim,
        "industry.dim": m.industry.dim,
    }


def shared_file_names(m: Manifest) -> list[str]:
    return [TOKENIZER_FILE, m.site.vocab_file, m.ner.vocab_file, m.industry.vocab_file]


@dataclass(frozen=True)
class VersionGraph:
    """A version folder with its manifest and fp32 graph (the reference for the bottom)."""

    path: Path
    manifest: Manifest
    model: onnx.ModelProto

    @property
    def label(self) -> str:
        return f"{self.manifest.model}/{self.manifest.version}"


def first_bottom_difference(a: VersionGraph, b: VersionGraph) -> str | None:
    """None when the bottoms are identical, else a sentence naming the first difference.

    Identical means: the manifest fields that shape features (encoder, max_seq_len, max_ner_tags,
    look-up widths, head width), the tokenizer and the three vocabularies byte for byte, every
    initializer that is not a head tensor (`bottom.*` and the shared `const.*`) byte for byte, the
    graph inputs, and every node upstream of `features` (op, wiring, attributes such as LayerNorm's
    epsilon). That is stricter than `bottom_fingerprint`, which covers tensors and files only.
    """
    fa, fb = manifest_bottom_fields(a.manifest), manifest_bottom_fields(b.manifest)
    for key in fa:
        if fa[key] != fb[key]:
            return f"manifest {key}: {fa[key]!r} ({a.label}) vs {fb[key]!r} ({b.label})"
    for name_a, name_b in zip(shared_file_names(a.manifest), shared_file_names(b.manifest), strict=True):
        da, db = (a.path / name_a).read_bytes(), (b.path / name_b).read_bytes()
        if da != db:
            return f"{name_a} differs ({_first_line_difference(da, db)})"
    ia = {k: v for k, v in _initializers(a.model).items() if not _is_head_tensor(k)}
    ib = {k: v for k, v in _initializers(b.model).items() if not _is_head_tensor(k)}
    for name in sorted(set(ia) ^ set(ib)):
        return f"tensor {name} exists only in {a.label if name in ia else b.label}"
    for name in sorted(ia, key=lambda n: (not n.startswith(BOTTOM_PREFIX), n)):
        diff = _describe_tensor_difference(name, ia[name], ib[name])
        if diff:
            return diff
    inputs_a = [i.SerializeToString(deterministic=True) for i in a.model.graph.input]
    inputs_b = [i.SerializeToString(deterministic=True) for i in b.model.graph.input]
    if inputs_a != inputs_b:
        return f"graph inputs: {[i.name for i in a.model.graph.input]} vs {[i.name for i in b.model.graph.input]}"
    heads_a, heads_b = set(head_node_names(a.model)), set(head_node_names(b.model))
    nodes_a = [n for n in a.model.graph.node if n.name not in heads_a]
    nodes_b = [n for n in b.model.graph.node if n.name not in heads_b]
    for i, (x, y) in enumerate(zip(nodes_a, nodes_b, strict=False)):
        if _node_key(x) != _node_key(y):
            return f"bottom node {i}: {_describe_node(x)} vs {_describe_node(y)}"
    if len(nodes_a) != len(nodes_b):
        return f"bottom has {len(nodes_a)} nodes in {a.label}, {len(nodes_b)} in {b.label}"
    if a.manifest.bottom_fingerprint != b.manifest.bottom_fingerprint:
        return f"bottom_fingerprint {a.manifest.bottom_fingerprint[:12]}… vs {b.manifest.bottom_fingerprint[:12]}…"
    return None


def require_same_bottom(a: VersionGraph, b: VersionGraph) -> None:
    diff = first_bottom_difference(a, b)
    if diff is not None:
        raise BottomMismatch(f"{a.label} and {b.label} do not share the bottom: {diff}")


def non_head_digest(model: onnx.ModelProto) -> str:
    """SHA-256 over everything but the heads: non-head initializers (name, type, shape, bytes), graph
    inputs and the nodes upstream of `features`. Equal digests = the same bottom graph."""
    digest = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        if not _is_head_tensor(init.name):
            dtype, shape, data = _tensor_bytes(init)
            digest.update(f"{init.name}|{dtype}|{shape}|".encode())
            digest.update(data)
    for inp in model.graph.input:
        digest.update(inp.SerializeToString(deterministic=True))
    heads = set(head_node_names(model))
    for node in model.graph.node:
        if node.name not in heads:
            digest.update(_node_key(node))
    return digest.hexdigest()
