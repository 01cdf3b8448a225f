"""Precision variants of an fp32 version: int8 (CPU) and fp16 (GPU); heads always stay fp32.

Heads stay fp32 so that a head's scores only move by what the bottom's precision does to the
features, and so merging heads (bit-identical by contract) never touches quantized weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def head_node_names(model: onnx.ModelProto) -> list[str]:
    """Nodes downstream of the `features` output: the stacked heads."""
    tainted = {"features"}
    names = []
    for node in model.graph.node:  # nodes are topologically sorted in a valid ONNX graph
        if any(i in tainted for i in node.input):
            tainted.update(node.output)
            names.append(node.name)
    return names


def _activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls with no constant operand (attention QK^T and AV): not weights, keep them fp32."""
    consts = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def write_int8(fp32_path: Path, out_path: Path) -> None:
    """ONNX Runtime dynamic quantization of the bottom's weight MatMuls (int8 weights, per channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path), load_external_data=False)
    exclude = head_node_names(model) + _activation_matmuls(model)
    quantize_dynamic(
        str(fp32_path),
        str(out_path),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=exclude,
        extra_options={"MatMulConstBOnly": True},
    )


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 bottom; inputs, outputs and heads stay fp32, with one Cast where the bottom ends.

    Written for this graph rather than with onnxconverter-common, whose generic pass retypes the
    outputs of our Cast(to=FLOAT) mask nodes without changing `to`, which ONNX Runtime refuses.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    heads = set(head_node_names(out))
    head_inputs = {i for n in graph.node if n.name in heads for i in n.input}
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and init.name not in head_inputs:
            arr = numpy_helper.to_array(init).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    for node in graph.node:
        if node.name in heads:
            continue
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
        if "features" in node.output:  # the bottom's last node: compute in fp16, hand fp32 on
            node.output[list(node.output).index("features")] = "features_fp16"
    boundary = onnx.helper.make_node("Cast", ["features_fp16"], ["features"], name="features_to_fp32",
                                     to=onnx.TensorProto.FLOAT)
    nodes = list(graph.node)
    at = next(i for i, n in enumerate(nodes) if "features_fp16" in n.output) + 1
    del graph.node[:]
    graph.node.extend([*nodes[:at], boundary, *nodes[at:]])
    onnx.checker.check_model(out, full_check=True)
    return out


def write_fp16(fp32_path: Path, out_path: Path) -> None:
    """fp16 bottom with fp32 inputs, outputs and heads, for the CUDA execution provider."""
    onnx.save(to_fp16(onnx.load(str(fp32_path))), str(out_path))
