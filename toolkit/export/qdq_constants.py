"""Quantized constants that are not weights go back to fp32 after quantization.

ONNX Runtime's quantizer (seen with 1.31) also quantizes constant operands of elementwise ops: a Clip bound, a
scalar multiplier, a position embedding added to the activations. That saves nothing (those ops do not run in
INT8), costs accuracy (a clip bound rounded to the int8 grid), and TensorRT's strongly typed builder refuses the
graph ("Quantized constant ... is only allowed before DQ" once it folds the constant DequantizeLinear into its
consumer). Weights (and biases) of Conv / ConvTranspose / MatMul / Gemm keep their Q/DQ form: those are what INT8 is for.
"""

from __future__ import annotations

from typing import Any

WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "MatMul": (0, 1), "Gemm": (0, 1, 2)}  # weights and biases


def fold_constant_dequantize(model: Any) -> list[str]:
    """Replace each DequantizeLinear of an initializer whose consumers are not all weight slots by the fp32 value
    it computes (same output name, so nothing else changes). Returns the constants folded back. In place."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    folded, drop = [], []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        uses = consumers.get(node.output[0], [])
        if uses and all(k in WEIGHT_SLOTS.get(c.op_type, ()) for c, k in uses):
            continue
        has_zero = len(node.input) > 2 and node.input[2] != ""
        if node.input[1] not in inits or (has_zero and node.input[2] not in inits):
            continue  # a scale or zero point computed at run time: left to the runtime
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) if has_zero else np.zeros_like(scale)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and q.ndim > 0 and scale.size > 1:
            shape = [1] * q.ndim
            shape[axis % q.ndim] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        value = ((q - zero) * scale).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        drop.append(node)
        folded.append(node.input[0])
    for node in drop:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return folded
