"""A PaddleNLP-style ERNIE checkpoint (`model_state.pdparams`, `model_config.json`, `vocab.txt`) read without
PaddlePaddle.

`.pdparams` is a pickle of {parameter name: numpy array} (what `paddle.save(model.state_dict())` writes, plus
Paddle's own "StructuredToParameterName@@" name map). It is read by an unpickler that builds numpy arrays and
plain containers only and refuses any other global, naming it: a checkpoint cannot run code. Paddle's Linear
stores its weight as [in, out], the orientation the graph computes `x @ W` in, so nothing is transposed.

Names (PaddleNLP `ErnieModel`, optionally prefixed `ernie.`): `embeddings.{word,position,token_type,
task_type}_embeddings.weight`, `embeddings.layer_norm.*`, `encoder.layers.i.self_attn.{q,k,v,out}_proj.*`,
`encoder.layers.i.norm1.*`, `encoder.layers.i.linear1.*`, `encoder.layers.i.linear2.*`,
`encoder.layers.i.norm2.*`, `pooler.dense.*`. A missing tensor, or a shape that does not fit the config, is
refused naming it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from model_format.manifest import EncoderShape
from tools.build_model.weights import F32, EncoderWeights, LayerWeights

# The globals a pickle of numpy arrays needs; nothing that can run code.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"), ("builtins", "dict"),
    ("builtins", "list"), ("builtins", "tuple"),
}
NAME_MAP_KEY = "StructuredToParameterName@@"  # paddle.save's structured-name map: not a parameter


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a .pdparams file may hold arrays only")
        return super().find_class(module, name)


def read_pdparams(path: Path) -> dict[str, np.ndarray]:
    try:
        with path.open("rb") as fh:
            state = _ArraysOnly(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
        raise SystemExit(f"{path}: {exc}") from exc
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: expected a dict of arrays, got {type(state).__name__}")
    arrays = {}
    for key, value in state.items():
        if key == NAME_MAP_KEY:
            continue
        if not isinstance(value, np.ndarray):
            raise SystemExit(f"{path}: {key!r} is a {type(value).__name__}, not an array")
        arrays[str(key).removeprefix("ernie.")] = value
    return arrays


def _config(ckpt: Path) -> dict[str, Any]:
    doc = json.loads((ckpt / "model_config.json").read_text(encoding="utf-8"))
    if "init_args" in doc:  # PaddleNLP 2.x: {"init_args": [{...}], "init_class": "ErnieModel"}
        doc = doc["init_args"][0]
    config: dict[str, Any] = doc
    return config


def encoder_from_paddle(ckpt: Path) -> EncoderWeights:
    config = _config(ckpt)
    if config.get("hidden_act", "gelu") != "gelu":
        raise SystemExit(f"hidden_act {config['hidden_act']!r} is not supported: the graph uses exact (erf) GELU")
    sd = read_pdparams(ckpt / "model_state.pdparams")
    hidden = int(config["hidden_size"])
    shape = EncoderShape(
        type="ernie", vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]), num_attention_heads=int(config["num_attention_heads"]),
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config["max_position_embeddings"]),
        type_vocab_size=int(config.get("type_vocab_size", 4)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),  # Paddle's LayerNorm default
    )

    used: set[str] = set()

    def t(name: str, want: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        if name not in sd:
            raise SystemExit(f"{ckpt / 'model_state.pdparams'}: lacks tensor {name}")
        value = sd[name]
        if tuple(value.shape) != want:
            raise SystemExit(f"{ckpt / 'model_state.pdparams'}: {name} is {tuple(value.shape)}, expected {want}")
        return np.ascontiguousarray(value, dtype=F32)

    h, inter = hidden, shape.intermediate_size
    token_type = t("embeddings.token_type_embeddings.weight", (shape.type_vocab_size, h))
    if config.get("use_task_id") and "embeddings.task_type_embeddings.weight" in sd:
        rows = int(config.get("task_type_vocab_size", 3))
        token_type = token_type + t("embeddings.task_type_embeddings.weight", (rows, h))[0]  # task id 0
    layers = []
    for i in range(shape.num_layers):
        p = f"encoder.layers.{i}"
        layers.append(LayerWeights(
            q_w=t(f"{p}.self_attn.q_proj.weight", (h, h)), q_b=t(f"{p}.self_attn.q_proj.bias", (h,)),
            k_w=t(f"{p}.self_attn.k_proj.weight", (h, h)), k_b=t(f"{p}.self_attn.k_proj.bias", (h,)),
            v_w=t(f"{p}.self_attn.v_proj.weight", (h, h)), v_b=t(f"{p}.self_attn.v_proj.bias", (h,)),
            attn_out_w=t(f"{p}.self_attn.out_proj.weight", (h, h)), attn_out_b=t(f"{p}.self_attn.out_proj.bias", (h,)),
            attn_ln_g=t(f"{p}.norm1.weight", (h,)), attn_ln_b=t(f"{p}.norm1.bias", (h,)),
            ffn_in_w=t(f"{p}.linear1.weight", (h, inter)), ffn_in_b=t(f"{p}.linear1.bias", (inter,)),
            ffn_out_w=t(f"{p}.linear2.weight", (inter, h)), ffn_out_b=t(f"{p}.linear2.bias", (h,)),
            ffn_ln_g=t(f"{p}.norm2.weight", (h,)), ffn_ln_b=t(f"{p}.norm2.bias", (h,)),
        ))
    encoder = EncoderWeights(
        shape=shape,
        word=t("embeddings.word_embeddings.weight", (shape.vocab_size, h)),
        position=t("embeddings.position_embeddings.weight", (shape.max_position_embeddings, h)),
        token_type=np.ascontiguousarray(token_type, dtype=F32),
        emb_ln_g=t("embeddings.layer_norm.weight", (h,)), emb_ln_b=t("embeddings.layer_norm.bias", (h,)),
        layers=layers,
        pooler_w=t("pooler.dense.weight", (h, h)), pooler_b=t("pooler.dense.bias", (h,)),
    )
    extra = sorted(set(sd) - used - {"embeddings.task_type_embeddings.weight"})  # unused without use_task_id
    if extra:
        raise SystemExit(f"{ckpt / 'model_state.pdparams'}: tensors that are not part of the bottom: {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''} (a task model's head? save the bare ErnieModel)")
    return encoder
