"""fp32 islands for fp16 graphs: find the nodes whose fp16 outputs overflow on real inputs and run them in fp32.

fp16 holds magnitudes up to 65504. A layer whose activations exceed that (a large-gain convolution before a
normalization, an unnormalized attention logit) turns into ``inf`` and then ``NaN`` downstream: the classic
fp16 accuracy collapse of DETR-style detectors. Finding the spot by hand means printing tensors node by node.

:func:`find_overflow_nodes` measures instead: it runs an **fp32 twin** of the fp16 graph (the same nodes and
names, every fp16 tensor, initializer, constant and cast retyped to fp32) in ONNX Runtime on calibration images
with every intermediate tensor as an output, and flags each tensor that is fp16 in the real graph and whose
magnitude exceeds ``limit`` (a quarter of the fp16 range by default, headroom for images brighter than the
calibration set). The island is every node producing such a tensor plus every node consuming one (it receives an
fp32 value fp16 cannot hold). :func:`apply_islands` rewrites those nodes to fp32 with Casts at the island's
border, the same way the export keeps GridSample in fp32. The twin is needed because ONNX Runtime CPU computes
most fp16 ops in fp32 internally, so an fp16 run on the CPU can hide an overflow that a GPU shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

FP16_MAX = 65504.0
DEFAULT_LIMIT = FP16_MAX / 4


@dataclass
class IslandReport:
    """Which nodes were put in fp32 and why (peak magnitude of the offending tensor on the calibration inputs)."""

    nodes: list[str] = field(default_factory=list)
    peaks: dict[str, float] = field(default_factory=dict)  # overflowing tensor -> max |x| seen
    limit: float = DEFAULT_LIMIT

    def summary(self) -> str:
        if not self.nodes:
            return f"fp16 islands: none needed (no fp16 tensor above {self.limit:g} on the calibration inputs)"
        worst = ", ".join(f"{k} ({v:.3g})" for k, v in sorted(self.peaks.items(), key=lambda kv: -kv[1])[:3])
        return f"fp16 islands: {len(self.nodes)} node(s) kept in fp32 ({', '.join(self.nodes[:6])}{'...' if len(self.nodes) > 6 else ''}); overflowing: {worst}"


def _types(model: Any) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def fp32_twin(model: Any) -> Any:
    """A copy of the fp16 graph computing in fp32 throughout, node names and tensor names unchanged."""
    import onnx
    from onnx import TensorProto, numpy_helper

    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    g = twin.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    return twin


def find_overflow_nodes(model: Any, feeds: Sequence[Mapping[str, np.ndarray]], limit: float = DEFAULT_LIMIT) -> IslandReport:
    """Nodes of the fp16 ``model`` that must run in fp32 for its fp16 tensors to stay below ``limit`` on ``feeds``."""
    import onnxruntime as ort
    from onnx import TensorProto

    types = _types(model)
    fp16 = {name for name, t in types.items() if t == TensorProto.FLOAT16}
    twin = fp32_twin(model)
    produced = [o for n in twin.graph.node for o in n.output if o in fp16]
    existing = {o.name for o in twin.graph.output}
    for name in produced:
        if name not in existing:
            twin.graph.output.add(name=name)  # untyped outputs: ONNX Runtime infers them
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # fusions would hide the tensors
    so.log_severity_level = 3
    sess = ort.InferenceSession(twin.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    peaks: dict[str, float] = {}
    for feed in feeds:
        inputs = {i.name: np.asarray(feed[i.name]).astype(np.float32 if i.type == "tensor(float)" else np.asarray(feed[i.name]).dtype)
                  for i in sess.get_inputs()}
        for name, value in zip(names, sess.run(names, inputs)):
            if name not in fp16 or not np.issubdtype(np.asarray(value).dtype, np.floating) or np.asarray(value).size == 0:
                continue
            a = np.abs(np.asarray(value, dtype=np.float64))
            a = a[np.isfinite(a) & (a != FP16_MAX)]  # +-inf masks and finfo(fp16).max sentinels are intentional
            if a.size:
                peaks[name] = max(peaks.get(name, 0.0), float(a.max()))
    hot = {k: v for k, v in peaks.items() if v > limit}
    nodes = [n.name for n in model.graph.node if any(o in hot for o in n.output) or any(i in hot for i in n.input)]
    return IslandReport(nodes, hot, limit)


def apply_islands(model: Any, nodes: Sequence[str]) -> int:
    """Run ``nodes`` of the fp16 ``model`` in fp32, in place: fp16 inputs from outside are cast up, fp16 outputs used
    outside (or graph outputs) are cast back down, Casts to fp16 inside become Casts to fp32. Returns nodes changed."""
    from onnx import TensorProto, helper

    island = set(nodes)
    if not island:
        return 0
    types = _types(model)
    is16 = lambda name: types.get(name) == TensorProto.FLOAT16  # noqa: E731
    consumers: dict[str, list[Any]] = {}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    out, casts_in, changed = [], {}, 0
    for n in model.graph.node:
        if n.name not in island:
            out.append(n)
            continue
        changed += 1
        for k, x in enumerate(n.input):
            if not x or not is16(x):
                continue
            if producer.get(x) in island:
                n.input[k] = f"{x}__fp32"
                continue
            if x not in casts_in:
                casts_in[x] = f"{x}__to_fp32"
                out.append(helper.make_node("Cast", [x], [casts_in[x]], to=TensorProto.FLOAT, name=f"{n.name}/island_in{k}"))
            n.input[k] = casts_in[x]
        for a in n.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT
        out.append(n)
        for k, y in enumerate(n.output):
            if not y or not is16(y):
                continue
            n.output[k] = f"{y}__fp32"
            if y in graph_outputs or any(c.name not in island for c in consumers.get(y, [])):
                out.append(helper.make_node("Cast", [n.output[k]], [y], to=TensorProto.FLOAT16, name=f"{n.name}/island_out{k}"))
    del model.graph.node[:]
    model.graph.node.extend(out)
    return changed


def auto_islands(model: Any, feeds: Sequence[Mapping[str, np.ndarray]], limit: float = DEFAULT_LIMIT) -> IslandReport:
    """Find and apply fp32 islands on an fp16 ``model`` in place; the report lists them."""
    report = find_overflow_nodes(model, feeds, limit)
    apply_islands(model, report.nodes)
    return report


def fp16_emulation(model: Any) -> Any:
    """The fp32 twin of the fp16 ``model`` with every tensor that is fp16 in ``model`` rounded to fp16 where it is
    produced (an explicit Cast to fp16 and back, same tensor names). ONNX Runtime CPU runs chains of fp16 elementwise
    ops in fp32 and drops the roundings in between, at every optimization level, so an fp16 rounding failure (a
    large offset added and subtracted) never shows in an fp16 run on the CPU; the emulation shows what a GPU's fp16
    kernels compute."""
    from onnx import TensorProto, helper

    fp16 = {name for name, t in _types(model).items() if t == TensorProto.FLOAT16}
    twin = fp32_twin(model)
    inits = {i.name for i in twin.graph.initializer}
    out = []
    for n in twin.graph.node:
        out.append(n)
        if n.op_type in ("Constant", "ConstantOfShape"):
            continue
        for k, y in enumerate(n.output):
            if y and y in fp16 and y not in inits:
                n.output[k] = f"{y}__unrounded"
                out.append(helper.make_node("Cast", [n.output[k]], [f"{y}__fp16"], to=TensorProto.FLOAT16, name=f"{n.name}/round{k}"))
                out.append(helper.make_node("Cast", [f"{y}__fp16"], [y], to=TensorProto.FLOAT, name=f"{n.name}/unround{k}"))
    del twin.graph.node[:]
    twin.graph.node.extend(out)
    return twin
