"""Weights of the shared bottom and the stacked heads, as numpy arrays in `x @ W` orientation.

Sources: a seeded random demo, or a Hugging Face ERNIE/BERT checkpoint folder. No PyTorch needed
for `model.safetensors`; a legacy `pytorch_model.bin` is read with torch only if it is installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_format.manifest import EncoderShape, Head

F32 = np.float32


@dataclass
class LayerWeights:
    q_w: np.ndarray
    q_b: np.ndarray
    k_w: np.ndarray
    k_b: np.ndarray
    v_w: np.ndarray
    v_b: np.ndarray
    attn_out_w: np.ndarray
    attn_out_b: np.ndarray
    attn_ln_g: np.ndarray
    attn_ln_b: np.ndarray
    ffn_in_w: np.ndarray
    ffn_in_b: np.ndarray
    ffn_out_w: np.ndarray
    ffn_out_b: np.ndarray
    ffn_ln_g: np.ndarray
    ffn_ln_b: np.ndarray


@dataclass
class EncoderWeights:
    shape: EncoderShape
    word: np.ndarray
    position: np.ndarray
    token_type: np.ndarray  # the task-type embedding, when the checkpoint has one, is folded in here
    emb_ln_g: np.ndarray
    emb_ln_b: np.ndarray
    layers: list[LayerWeights]
    pooler_w: np.ndarray
    pooler_b: np.ndarray


@dataclass
class LookupTables:
    """Embedding tables for site, NER tag and industry; row 0 (missing) is never read as a value."""

    site: np.ndarray
    ner: np.ndarray
    industry: np.ndarray


@dataclass
class HeadWeights:
    """N heads of width h stacked: w1 [D, N*h] (head i owns columns i*h:(i+1)*h), w2 [N, h, 1]."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @property
    def count(self) -> int:
        return int(self.w2.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.w2.shape[1])

    def __post_init__(self) -> None:
        n, h, one = self.w2.shape
        if one != 1 or self.w1.shape[1] != n * h or self.b1.shape != (n * h,) or self.b2.shape != (n,):
            raise ValueError(
                f"inconsistent head shapes: w1 {self.w1.shape}, b1 {self.b1.shape}, "
                f"w2 {self.w2.shape}, b2 {self.b2.shape}"
            )


@dataclass
class ModelWeights:
    encoder: EncoderWeights
    lookups: LookupTables
    heads: HeadWeights
    extra: dict[str, str] = field(default_factory=dict)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=F32) * F32(std)).astype(F32)


def random_encoder(shape: EncoderShape, seed: int, std: float = 0.02) -> EncoderWeights:
    """BERT-style initialisation (normal(0, std) weights, small random biases, LayerNorm at identity)."""
    rng = np.random.default_rng(seed)
    h, i = shape.hidden_size, shape.intermediate_size

    def ln() -> tuple[np.ndarray, np.ndarray]:
        return (1.0 + _normal(rng, (h,), 0.05)).astype(F32), _normal(rng, (h,), 0.02)

    layers = []
    for _ in range(shape.num_layers):
        attn_ln, ffn_ln = ln(), ln()
        layers.append(
            LayerWeights(
                q_w=_normal(rng, (h, h), std), q_b=_normal(rng, (h,), std),
                k_w=_normal(rng, (h, h), std), k_b=_normal(rng, (h,), std),
                v_w=_normal(rng, (h, h), std), v_b=_normal(rng, (h,), std),
                attn_out_w=_normal(rng, (h, h), std), attn_out_b=_normal(rng, (h,), std),
                attn_ln_g=attn_ln[0], attn_ln_b=attn_ln[1],
                ffn_in_w=_normal(rng, (h, i), std), ffn_in_b=_normal(rng, (i,), std),
                ffn_out_w=_normal(rng, (i, h), std), ffn_out_b=_normal(rng, (h,), std),
                ffn_ln_g=ffn_ln[0], ffn_ln_b=ffn_ln[1],
            )
        )
    emb_ln = ln()
    return EncoderWeights(
        shape=shape,
        word=_normal(rng, (shape.vocab_size, h), std),
        position=_normal(rng, (shape.max_position_embeddings, h), std),
        token_type=_normal(rng, (shape.type_vocab_size, h), std),
        emb_ln_g=emb_ln[0],
        emb_ln_b=emb_ln[1],
        layers=layers,
        pooler_w=_normal(rng, (h, h), std),
        pooler_b=_normal(rng, (h,), std),
    )


def random_lookups(sizes: tuple[int, int, int], dims: tuple[int, int, int], seed: int) -> LookupTables:
    rng = np.random.default_rng(seed)
    tables = [_normal(rng, (n, d), 0.5) for n, d in zip(sizes, dims, strict=True)]
    for t in tables:
        t[0] = 0.0  # the graph masks id 0 anyway; a zero row keeps the file honest too
    return LookupTables(*tables)


def random_heads(count: int, feature_dim: int, hidden: int, seed: int) -> HeadWeights:
    """He-initialised heads whose scores spread over (0, 1) on real inputs rather than sit at 0.5."""
    rng = np.random.default_rng(seed)
    return HeadWeights(
        w1=_normal(rng, (feature_dim, count * hidden), (2.0 / feature_dim) ** 0.5),
        b1=_normal(rng, (count * hidden,), 0.1),
        w2=_normal(rng, (count, hidden, 1), (2.0 / hidden) ** 0.5),
        b2=_normal(rng, (count,), 0.5),
    )


# --- Hugging Face checkpoints -------------------------------------------------------------------

def _load_state_dict(ckpt: Path) -> dict[str, np.ndarray]:
    st = ckpt / "model.safetensors"
    if st.exists():
        from safetensors.numpy import load_file

        return {k: np.asarray(v) for k, v in load_file(str(st)).items()}
    binf = ckpt / "pytorch_model.bin"
    if binf.exists():
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise SystemExit(
                f"{binf} is a pickled PyTorch file and needs torch to read; convert it to "
                "model.safetensors or install torch"
            ) from exc
        sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}
    raise SystemExit(f"{ckpt} has neither model.safetensors nor pytorch_model.bin")


def _strip_prefix(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accepts bare `ErnieModel`/`BertModel` names and `ernie.`/`bert.`-prefixed ones; a task model's own
    layers (a classifier) are then left over and refused by name, never dropped silently."""
    out = {}
    for k, v in sd.items():
        for prefix in ("ernie.", "bert.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")] = v
    return out


# Buffers and unused embeddings a Hugging Face checkpoint may carry: not parameters of the bottom.
_HF_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "embeddings.task_type_embeddings.weight")


def _hf_shapes(s: EncoderShape, task_types: int) -> dict[str, tuple[int, ...]]:
    """The shape each tensor of a bare ErnieModel/BertModel must have, in torch's orientation."""
    h, i = s.hidden_size, s.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (s.vocab_size, h),
        "embeddings.position_embeddings.weight": (s.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (s.type_vocab_size, h),
        "embeddings.task_type_embeddings.weight": (task_types, h),
        "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,),
    }
    for n in range(s.num_layers):
        p = f"encoder.layer.{n}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[f"{p}.{name}.weight"], shapes[f"{p}.{name}.bias"] = (h, h), (h,)
        shapes[f"{p}.intermediate.dense.weight"], shapes[f"{p}.intermediate.dense.bias"] = (i, h), (i,)
        shapes[f"{p}.output.dense.weight"], shapes[f"{p}.output.dense.bias"] = (h, i), (h,)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{p}.{name}.weight"], shapes[f"{p}.{name}.bias"] = (h,), (h,)
    return shapes


def encoder_from_hf(ckpt: Path) -> EncoderWeights:
    config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise SystemExit(f"hidden_act {act!r} is not supported: the graph uses exact (erf) GELU")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise SystemExit("only absolute position embeddings are supported")
    sd = _strip_prefix(_load_state_dict(ckpt))
    used: set[str] = set()
    expected: dict[str, tuple[int, ...]] = {}

    def t(name: str) -> np.ndarray:
        try:
            value = sd[name]
        except KeyError as exc:
            raise SystemExit(f"{ckpt}: checkpoint lacks tensor {name}") from exc
        want = expected.get(name)
        if want is not None and tuple(value.shape) != want:
            raise SystemExit(f"{ckpt}: {name} is {tuple(value.shape)}, expected {want} from config.json")
        used.add(name)
        return np.ascontiguousarray(value, dtype=F32)

    def lin(name: str) -> tuple[np.ndarray, np.ndarray]:
        # torch Linear stores [out, in]; the graph computes x @ W, so transpose once here.
        return np.ascontiguousarray(t(f"{name}.weight").T), t(f"{name}.bias")

    shape = EncoderShape(
        type=str(config.get("model_type", "ernie")),
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_attention_heads=int(config["num_attention_heads"]),
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config["max_position_embeddings"]),
        type_vocab_size=int(config.get("type_vocab_size", 2)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
    )
    expected.update(_hf_shapes(shape, int(config.get("task_type_vocab_size", 3))))
    token_type = t("embeddings.token_type_embeddings.weight")
    if config.get("use_task_id") and "embeddings.task_type_embeddings.weight" in sd:
        # ErnieModel adds task_type_embeddings[0] to every token when no task id is given.
        token_type = token_type + t("embeddings.task_type_embeddings.weight")[0]
    layers = []
    for i in range(shape.num_layers):
        p = f"encoder.layer.{i}"
        q, k, v = lin(f"{p}.attention.self.query"), lin(f"{p}.attention.self.key"), lin(f"{p}.attention.self.value")
        ao, fi, fo = lin(f"{p}.attention.output.dense"), lin(f"{p}.intermediate.dense"), lin(f"{p}.output.dense")
        layers.append(
            LayerWeights(
                q_w=q[0], q_b=q[1], k_w=k[0], k_b=k[1], v_w=v[0], v_b=v[1],
                attn_out_w=ao[0], attn_out_b=ao[1],
                attn_ln_g=t(f"{p}.attention.output.LayerNorm.weight"),
                attn_ln_b=t(f"{p}.attention.output.LayerNorm.bias"),
                ffn_in_w=fi[0], ffn_in_b=fi[1], ffn_out_w=fo[0], ffn_out_b=fo[1],
                ffn_ln_g=t(f"{p}.output.LayerNorm.weight"), ffn_ln_b=t(f"{p}.output.LayerNorm.bias"),
            )
        )
    pw, pb = lin("pooler.dense")
    encoder = EncoderWeights(
        shape=shape,
        word=t("embeddings.word_embeddings.weight"),
        position=t("embeddings.position_embeddings.weight"),
        token_type=np.ascontiguousarray(token_type, dtype=F32),
        emb_ln_g=t("embeddings.LayerNorm.weight"),
        emb_ln_b=t("embeddings.LayerNorm.bias"),
        layers=layers,
        pooler_w=pw,
        pooler_b=pb,
    )
    extra = sorted(k for k in set(sd) - used if not k.endswith(_HF_IGNORED))
    if extra:
        more = " ..." if len(extra) > 8 else ""
        raise SystemExit(f"{ckpt}: tensors that are not part of the bottom: {extra[:8]}{more} (a task model's "
                         "head, or another architecture? export the bare ErnieModel/BertModel)")
    return encoder


def heads_from_npz(path: Path) -> tuple[HeadWeights, list[Head]]:
    """Heads from an `.npz` with w1 [D,N*h], b1 [N*h], w2 [N,h,1] (or [N,h]), b2 [N], srcids [N];
    optional names [N] and thresholds [N]."""
    z = np.load(path, allow_pickle=False)
    w2 = z["w2"].astype(F32)
    if w2.ndim == 2:
        w2 = w2[:, :, None]
    heads = HeadWeights(z["w1"].astype(F32), z["b1"].astype(F32), w2, z["b2"].astype(F32))
    srcids = [int(s) for s in z["srcids"]]
    names = [str(s) for s in z["names"]] if "names" in z else [f"head_{s}" for s in srcids]
    thresholds = [float(x) for x in z["thresholds"]] if "thresholds" in z else [0.5] * len(srcids)
    meta = [Head(s, n, th) for s, n, th in zip(srcids, names, thresholds, strict=True)]
    if len(meta) != heads.count:
        raise SystemExit(f"{path}: {len(meta)} srcids for {heads.count} heads")
    return heads, meta
