"""Precision variants of an fp32 version: int8 (CPU) and fp16 (GPU); heads always stay fp32.

Heads stay fp32 so that a head's scores only move by what the bottom's precision does to the
features, and so merging heads (bit-identical by contract) never touches quantized weights.
"""

from __future__ import annotations

from pathlib import Path

import onnx


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


def write_fp16(fp32_path: Path, out_path: Path) -> None:
    """fp16 bottom with fp32 inputs, outputs and heads, for the CUDA execution provider."""
    from onnxconverter_common import float16

    model = onnx.load(str(fp32_path))
    converted = float16.convert_float_to_float16(
        model, keep_io_types=True, node_block_list=head_node_names(model), disable_shape_infer=False
    )
    onnx.save(converted, str(out_path))
