"""The merged bottom-plus-heads ONNX graph, built from plain opset-17 ops.

Contract (names fixed; see model_repo/README.md):
  inputs  input_ids, attention_mask, token_type_ids [B,S]; site_id [B]; ner_ids [B,K]; industry_id [B]
          (all int64; 0 means missing / padding)
  outputs scores [B,N] float32 in [0,1], features [B,D] float32

The heads are stacked so that the node count does not depend on N: one 2-D MatMul [D, N*h]
(the only weight layout ORT pre-packs on CPU) and one batched MatMul [N, h, 1].
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tools.build_model.weights import EncoderWeights, HeadWeights, LookupTables

OPSET = 17
BOTTOM_PREFIX = "bottom."
HEAD_PREFIX = "heads."
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "site_id", "ner_ids", "industry_id")
OUTPUT_NAMES = ("scores", "features")
# Added to attention logits of padding positions. exp(-1e4) underflows to exactly 0 in fp32, the same
# result as transformers' finfo.min, and the value still fits in fp16 for the GPU variant.
MASK_NEGATIVE = -10000.0


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.require(value, requirements="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs: Any) -> str:
        self._n += 1
        out = name or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{self._n}_{op_type}", **attrs))
        return out

    def linear(self, x: str, w: np.ndarray, b: np.ndarray, prefix: str) -> str:
        y = self.op("MatMul", [x, self.const(f"{prefix}.weight", w)])
        return self.op("Add", [y, self.const(f"{prefix}.bias", b)])

    def layer_norm(self, x: str, g: np.ndarray, b: np.ndarray, eps: float, prefix: str) -> str:
        return self.op(
            "LayerNormalization",
            [x, self.const(f"{prefix}.weight", g), self.const(f"{prefix}.bias", b)],
            axis=-1,
            epsilon=eps,
        )


def _encoder(g: _Graph, enc: EncoderWeights) -> str:
    """ERNIE/BERT encoder; returns the tanh-pooled [CLS] output [B,H]."""
    s = enc.shape
    p = BOTTOM_PREFIX
    nh, hd = s.num_attention_heads, s.hidden_size // s.num_attention_heads

    # Embeddings: word + absolute position + token type, then LayerNorm.
    word = g.op("Gather", [g.const(f"{p}embeddings.word", enc.word), "input_ids"])
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const("const.one_i64", np.array(1, np.int64))])
    positions = g.op("Range", [g.const("const.zero_i64", np.array(0, np.int64)), seq_len,
                               "const.one_i64"])
    pos = g.op("Gather", [g.const(f"{p}embeddings.position", enc.position), positions])
    tt = g.op("Gather", [g.const(f"{p}embeddings.token_type", enc.token_type), "token_type_ids"])
    x = g.op("Add", [g.op("Add", [word, pos]), tt])
    x = g.layer_norm(x, enc.emb_ln_g, enc.emb_ln_b, s.layer_norm_eps, f"{p}embeddings.ln")

    # Additive attention mask [B,1,1,S]: 0 for tokens, MASK_NEGATIVE for padding.
    mask_f = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    inv = g.op("Sub", [g.const("const.one_f32", np.array(1.0, np.float32)), mask_f])
    bias = g.op("Mul", [inv, g.const("const.mask_negative", np.array(MASK_NEGATIVE, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const("const.axes_1_2", np.array([1, 2], np.int64))])

    split_heads = g.const("const.split_heads", np.array([0, 0, nh, hd], np.int64))
    merge_heads = g.const("const.merge_heads", np.array([0, 0, s.hidden_size], np.int64))
    scale = g.const("const.attn_scale", np.array(1.0 / math.sqrt(hd), np.float32))
    sqrt_half = g.const("const.inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))
    half = g.const("const.half", np.array(0.5, np.float32))

    for i, lw in enumerate(enc.layers):
        lp = f"{p}layer.{i}"
        q = g.op("Transpose", [g.op("Reshape", [g.linear(x, lw.q_w, lw.q_b, f"{lp}.q"), split_heads])],
                 perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [g.linear(x, lw.k_w, lw.k_b, f"{lp}.k"), split_heads])],
                 perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [g.linear(x, lw.v_w, lw.v_b, f"{lp}.v"), split_heads])],
                 perm=[0, 2, 1, 3])
        logits = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
        ctx = g.op("MatMul", [g.op("Softmax", [logits], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_heads])
        attn = g.linear(ctx, lw.attn_out_w, lw.attn_out_b, f"{lp}.attn_out")
        x = g.layer_norm(g.op("Add", [attn, x]), lw.attn_ln_g, lw.attn_ln_b, s.layer_norm_eps, f"{lp}.attn_ln")
        # Exact GELU: 0.5 * h * (1 + erf(h / sqrt(2))); ORT fuses this pattern into one Gelu kernel.
        h = g.linear(x, lw.ffn_in_w, lw.ffn_in_b, f"{lp}.ffn_in")
        erf = g.op("Erf", [g.op("Mul", [h, sqrt_half])])
        h = g.op("Mul", [g.op("Mul", [h, g.op("Add", [erf, "const.one_f32"])]), half])
        out = g.linear(h, lw.ffn_out_w, lw.ffn_out_b, f"{lp}.ffn_out")
        x = g.layer_norm(g.op("Add", [out, x]), lw.ffn_ln_g, lw.ffn_ln_b, s.layer_norm_eps, f"{lp}.ffn_ln")

    cls = g.op("Gather", [x, "const.zero_i64"], axis=1)
    return g.op("Tanh", [g.linear(cls, enc.pooler_w, enc.pooler_b, f"{p}pooler")])


def _masked_lookup(g: _Graph, table: np.ndarray, ids: str, name: str) -> str:
    """Embedding of a [B] id; id 0 (missing) gives an exact zero vector whatever row 0 holds."""
    emb = g.op("Gather", [g.const(f"{BOTTOM_PREFIX}{name}.embedding", table), ids])
    present = g.op("Not", [g.op("Equal", [ids, "const.zero_i64"])])
    present = g.op("Unsqueeze", [g.op("Cast", [present], to=TensorProto.FLOAT), "const.axis_last"])
    return g.op("Mul", [emb, present])


def _ner_mean(g: _Graph, table: np.ndarray) -> str:
    """Mean embedding over non-padding NER ids [B,K]; all padding gives an exact zero vector."""
    emb = g.op("Gather", [g.const(f"{BOTTOM_PREFIX}ner.embedding", table), "ner_ids"])  # [B,K,E]
    present = g.op("Cast", [g.op("Not", [g.op("Equal", ["ner_ids", "const.zero_i64"])])], to=TensorProto.FLOAT)
    summed = g.op("ReduceSum", [g.op("Mul", [emb, g.op("Unsqueeze", [present, "const.axis_last"])]),
                                g.const("const.axis_1", np.array([1], np.int64))], keepdims=0)
    count = g.op("ReduceSum", [present, "const.axis_1"], keepdims=1)  # [B,1]
    return g.op("Div", [summed, g.op("Max", [count, "const.one_f32"])])


def _heads(g: _Graph, features: str, heads: HeadWeights) -> str:
    n, h = heads.count, heads.hidden
    hidden = g.op("Relu", [g.op("Add", [
        g.op("MatMul", [features, g.const(f"{HEAD_PREFIX}w1", heads.w1)]),
        g.const(f"{HEAD_PREFIX}b1", heads.b1),
    ])])  # [B, N*h]
    per_head = g.op("Reshape", [hidden, g.const("const.split_heads_out", np.array([0, n, h], np.int64))])
    per_head = g.op("Transpose", [per_head], perm=[1, 0, 2])  # [N, B, h]
    logit = g.op("MatMul", [per_head, g.const(f"{HEAD_PREFIX}w2", heads.w2)])  # [N, B, 1]
    logit = g.op("Transpose", [g.op("Squeeze", [logit, "const.axis_last"])], perm=[1, 0])  # [B, N]
    logit = g.op("Add", [logit, g.const(f"{HEAD_PREFIX}b2", heads.b2)])
    return g.op("Sigmoid", [logit], name="scores")


def build_graph(enc: EncoderWeights, lookups: LookupTables, heads: HeadWeights) -> onnx.ModelProto:
    g = _Graph()
    g.const("const.axis_last", np.array([-1], np.int64))
    pooled = _encoder(g, enc)
    site = _masked_lookup(g, lookups.site, "site_id", "site")
    industry = _masked_lookup(g, lookups.industry, "industry_id", "industry")
    ner = _ner_mean(g, lookups.ner)
    features = g.op("Concat", [pooled, site, ner, industry], name="features", axis=1)
    _heads(g, features, heads)

    d = enc.shape.hidden_size + lookups.site.shape[1] + lookups.ner.shape[1] + lookups.industry.shape[1]
    ids = TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", ids, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", ids, ["batch", "seq"]),
        helper.make_tensor_value_info("token_type_ids", ids, ["batch", "seq"]),
        helper.make_tensor_value_info("site_id", ids, ["batch"]),
        helper.make_tensor_value_info("ner_ids", ids, ["batch", "ner"]),
        helper.make_tensor_value_info("industry_id", ids, ["batch"]),
    ]
    outputs = [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", heads.count]),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", d]),
    ]
    graph = helper.make_graph(g.nodes, "multi_head_scorer", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tools.build_model")
    model.ir_version = 8  # readable by every ONNX Runtime since 1.10
    onnx.checker.check_model(model, full_check=True)
    return model
