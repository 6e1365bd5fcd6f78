"""Where NaN/Inf first appears: in a set of named outputs, and in an ONNX graph in topological order.

A NaN in the final boxes says little (it may have come from the weights, an fp16 overflow, a bad input);
the first node whose output is non-finite says where to look. Verify uses both when an output is not finite.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def non_finite_names(tensors: Mapping[str, Any]) -> list[str]:
    """Names (in the given order) of the floating tensors that hold NaN or Inf; "name (NaN)" / "name (Inf)"."""
    found = []
    for name, value in tensors.items():
        a = np.asarray(value.detach().cpu().float() if hasattr(value, "detach") else value)
        if a.dtype.kind != "f" or a.size == 0:
            continue
        if np.isnan(a).any():
            found.append(f"{name} (NaN)")
        elif np.isinf(a).any():
            found.append(f"{name} (Inf)")
    return found


def first_non_finite_node(onnx_model: Any, feeds: Mapping[str, np.ndarray]) -> str | None:
    """Where NaN/Inf first appears: a weight (``initializer W``) or else the first node output in topological
    order (``tensor T (node N, op O)``); None when all are finite.

    Every float node output is exposed as a graph output and the graph runs once in ONNX Runtime (CPU,
    graph optimisations off so the tensors keep their names).
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    for init in onnx_model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype.kind == "f" and w.size and not np.isfinite(w).all():
            return f"initializer {init.name!r} (the weights hold NaN/Inf)"

    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    existing = {o.name for o in model.graph.output}
    order = []
    for node in model.graph.node:  # ONNX stores nodes topologically sorted
        for out in node.output:
            if out:
                order.append((out, node.name or out, node.op_type))
                if out not in existing:
                    model.graph.output.append(onnx.ValueInfoProto(name=out))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, dict(feeds))))
    for tensor, node, op in order:
        v = values.get(tensor)
        if v is None:
            continue
        a = np.asarray(v)
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            return f"tensor {tensor!r} (node {node!r}, op {op})"
    return None
