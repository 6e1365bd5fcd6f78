"""Post-training INT8 of an exported ONNX file: Q/DQ nodes in the graph, through ONNX Runtime's quantization tools.

What decides whether INT8 pays on ONNX Runtime CPU (measured on the shapes fixture, ``docs/precision.md``):

* **Fold the frozen batch norms first.** The exported RT-DETR backbone computes its FrozenBatchNorm as a ``Mul``
  and an ``Add`` after each ``Conv``. Quantized as exported, the Q/DQ pair lands between the Conv and the Mul,
  so ONNX Runtime can no longer fold the Mul/Add into the Conv and runs them in fp32 between extra Q/DQ nodes.
  :func:`prepare_graph` runs ONNX Runtime's *basic* graph optimizations offline (constant folding, Conv+Mul,
  Conv+Add and Conv+BN fusion: platform-independent rewrites, nothing hardware-specific) before quantizing.
* **uint8 activations on x86.** With int8 activations (S8S8) ONNX Runtime's CPU QDQ selector fuses only a few
  Q/DQ Convs into ``QLinearConv`` (13 of 67 on the fixture; the rest run in fp32 between Q/DQ, slower than
  fp32); with uint8 activations and int8 per-channel weights (U8S8) all 67 fuse. TensorRT wants int8
  (symmetric) activations instead, so ``activations="int8"`` writes that form (its CPU speed gate will refuse).
* **Quantize the body, keep the decoder fp32.** The backbone and hybrid encoder are where the time goes; the
  decoder (sampling offsets, attention weights, GridSample), the heads, query selection and the postprocess
  (sigmoid, top-K, box scaling) cost little and lose the most: ``scope="body"`` (default) keeps them fp32.

This module changes the graph only; the gates (compare and mAP against fp32, speed) are
:func:`toolkit.tasks.quantize.quantize`, which is what users call.
"""

from __future__ import annotations

import collections
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ExportError, InputError
from .calibration import make_reader

METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("uint8", "int8")
SCOPES = ("body", "all")
#: node-name parts of the default INT8 region: backbone, hybrid encoder and the projections into it.
BODY_PATTERNS = ("/backbone/", "/encoder/", "encoder_input_proj")
#: kept fp32 in every scope unless quantized on purpose: deformable-attention sampling and the output heads.
SENSITIVE_PATTERNS = ("sampling_offsets", "attention_weights", "class_embed", "bbox_embed", "enc_score_head",
                      "enc_bbox_head", "query_pos_head")
#: op types never quantized (outputs are indices, coordinates or sampling locations).
FP32_OP_TYPES = ("GridSample", "TopK", "GatherElements", "Softmax", "Sigmoid", "LayerNormalization")


@dataclass
class QuantizeInfo:
    """What was quantized and how; stored (as JSON) in the output's ``quantization`` metadata entry."""

    method: str
    activations: str
    scope: str
    calibration_batches: int
    quantized_nodes: int
    fp32_nodes_kept: int
    excluded: list[str] = field(default_factory=list)  # the user's --exclude entries
    fused: dict[str, int] = field(default_factory=dict)  # op counts after ONNX Runtime's session optimizations
    prepared: bool = True
    islands: list[str] = field(default_factory=list)  # nodes kept fp32 by the compare-driven search

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare_graph(model: Any) -> Any:
    """ONNX Runtime's basic (hardware-independent) optimizations, offline: folds FrozenBatchNorm Mul/Add into the
    Convs so that the quantizer sees the graph ONNX Runtime will run. Metadata and I/O are kept as they were."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="rtdetr-quant-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "prepared.onnx"
        onnx.save(model, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ExportError(f"ONNX Runtime could not load the model to prepare it for quantization: {str(e).splitlines()[0]}") from None
        prepared = onnx.load(str(dst))
    used = {n.domain for n in prepared.graph.node}
    keep = [o for o in prepared.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del prepared.opset_import[:]
    prepared.opset_import.extend(keep)
    _copy_metadata(model, prepared, {})
    return prepared


def split_exclude(model: Any, exclude: Sequence[str]) -> tuple[set[str], list[str]]:
    """``--exclude`` entries: op types present in the graph, exact node names, or parts of node names.
    Returns (op types, name patterns); an entry that matches nothing is an error, so typos never pass silently."""
    ops = {n.op_type for n in model.graph.node}
    names = [n.name for n in model.graph.node]
    op_types, patterns = set(), []
    for entry in (e.strip() for e in exclude):
        if not entry:
            continue
        if entry in ops:
            op_types.add(entry)
        elif any(entry in name for name in names):
            patterns.append(entry)
        else:
            raise InputError(f"--exclude {entry!r} is neither an op type in the graph nor (part of) a node name; "
                             f"op types here: {', '.join(sorted(ops))}")
    return op_types, patterns


def select_nodes(model: Any, scope: str = "body", exclude: Sequence[str] = (), keep_fp32: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(nodes the quantizer may quantize, nodes kept fp32) for ``scope``: ``body`` quantizes the backbone and
    encoder (all of the graph when no node is named like RT-DETR's), ``all`` everything outside ``exclude``."""
    if scope not in SCOPES:
        raise InputError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    ex_ops, ex_names = split_exclude(model, exclude)
    exact = set(keep_fp32)  # node names, matched exactly (the island search's result)
    nodes = list(model.graph.node)
    named = any(p in n.name for n in nodes for p in BODY_PATTERNS)
    quantize, keep = [], []
    for n in nodes:
        inside = scope == "all" or not named or any(p in n.name for p in BODY_PATTERNS)
        sensitive = scope != "all" and (n.op_type in FP32_OP_TYPES or any(p in n.name for p in SENSITIVE_PATTERNS))
        if inside and not sensitive and n.op_type not in ex_ops and n.name not in exact and not any(p in n.name for p in ex_names):
            quantize.append(n.name)
        else:
            keep.append(n.name)
    return quantize, keep


def quantize_graph(
    source: Any,
    output: str | Path,
    feeds: Sequence[Mapping[str, Any]],
    *,
    method: str = "minmax",
    activations: str = "uint8",
    scope: str = "body",
    exclude: Sequence[str] = (),
    prepare: bool = True,
    progress: bool = True,
    keep_fp32: Sequence[str] = (),
) -> QuantizeInfo:
    """Quantize ``source`` (an ONNX path or ModelProto) to Q/DQ INT8 at ``output`` (written as is, not atomically:
    the caller writes to a temporary path), calibrated on ``feeds`` (ONNX Runtime feed dicts). Metadata and the
    I/O signature are carried over; the ``orig_target_sizes`` input is checked to be exactly the source's."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if activations not in ACTIVATIONS:
        raise InputError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    original = onnx.load(str(source)) if isinstance(source, (str, Path)) else source
    model = prepare_graph(original) if prepare else original
    quantize, keep = select_nodes(model, scope, exclude, keep_fp32)
    if not any(n.op_type in ("Conv", "MatMul", "Gemm") and n.name in set(quantize) for n in model.graph.node):
        raise InputError("nothing to quantize: the exclusions leave no Conv, MatMul or Gemm node in INT8")
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="rtdetr-quant-") as tmp:
        src = Path(tmp) / "prepared.onnx"
        onnx.save(model, str(src))
        try:
            quantize_static(
                str(src), str(output), make_reader(feeds, progress=progress), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, nodes_to_quantize=quantize, nodes_to_exclude=keep,
                calibrate_method=calib[method], calibration_providers=["CPUExecutionProvider"],
                extra_options={"ActivationSymmetric": activations == "int8", "CalibTensorRangeSymmetric": False,
                               "CalibMovingAverage": method == "minmax",
                               # TensorRT(-RTX) dequantizes only 8-bit (and fp8/4-bit) tensors: an int32 bias DQ
                               # fails its parser, so the TensorRT form keeps biases fp32 (ORT CPU fuses either)
                               "QuantizeBias": activations != "int8"},
            )
        except InputError:
            raise
        except Exception as e:
            raise ExportError(f"ONNX Runtime's quantize_static failed: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
    result = onnx.load(str(output))
    from .qdq_constants import fold_constant_dequantize

    fold_constant_dequantize(result)  # Clip bounds, scalars, embeddings: fp32 again (TensorRT refuses them quantized)
    _check_io(original, result)
    info = QuantizeInfo(method, activations, scope, len(feeds), len(quantize), len(keep), list(exclude), prepared=prepare,
                        islands=list(keep_fp32))
    info.fused = fused_ops(output)
    _copy_metadata(original, result, {"precision": "int8", "quantization": json.dumps(info.to_dict(), sort_keys=True)})
    _save_sealed(result, output)
    return info


def quantized_compute_nodes(model: Any) -> list[str]:
    """Nodes of a Q/DQ graph (topological order) that take at least one input through a DequantizeLinear."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq for i in n.input)]


def dequantize_nodes(model: Any, fp32: Any, nodes: Sequence[str]) -> Any:
    """A copy of the Q/DQ ``model`` where ``nodes`` read fp32 again: each input that comes through a DequantizeLinear
    is replaced by the tensor the node reads in ``fp32`` (the prepared graph the quantizer started from, same node
    names). Where the quantizer removed that tensor's producer (a Relu after a Conv folds into the Q range), the
    producer chain is copied back from ``fp32`` in front of the node. No new calibration, so the island search can
    try many sets cheaply, and the set found is written this way (excluding the nodes from quantization instead,
    ``keep_fp32``, would still quantize their inputs where a quantized producer's output is)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producer = {o: n for n in g.node for o in n.output}
    given = {i.name for i in g.initializer} | {i.name for i in g.input}
    names: dict[str, str] = {}  # fp32 tensor -> its name in the copy
    ref_nodes = {n.name: n for n in fp32.graph.node}
    ref_producer = {o: n for n in fp32.graph.node for o in n.output}
    ref_inits = {i.name: i for i in fp32.graph.initializer}
    wanted = set(nodes)
    new_nodes = []
    for n in g.node:
        ref = ref_nodes.get(n.name) if n.name in wanted else None
        before: list[Any] = []
        if ref is not None and len(ref.input) == len(n.input):

            def ensure(t: str) -> str:
                """The name under which ``t`` (a tensor of ``fp32``) holds its fp32 value in the copy."""
                if not t or t in names:
                    return names.get(t, t)
                if t in given or (t in producer and t in ref_producer and producer[t].name == ref_producer[t].name):
                    names[t] = t
                elif t in ref_producer:  # removed or renamed by the quantizer: copy its producer back
                    p = ref_producer[t]
                    copy = onnx.NodeProto()
                    copy.CopyFrom(p)
                    copy.name = f"{p.name}__fp32"
                    for j, x in enumerate(p.input):
                        copy.input[j] = ensure(x)
                    for j, y in enumerate(p.output):
                        if y:
                            names[y] = copy.output[j] = f"{y}__fp32"
                    before.append(copy)
                elif t in ref_inits:
                    init = g.initializer.add()
                    init.CopyFrom(ref_inits[t])
                    init.name = names[t] = f"{t}__fp32"
                else:
                    names[t] = t
                return names[t]

            for k, x in enumerate(n.input):
                d = producer.get(x)
                if d is not None and d.op_type == "DequantizeLinear":
                    n.input[k] = ensure(ref.input[k])
            new_nodes.extend(before)
        new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    return out


def fused_ops(path: str | Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime CPU actually runs (after its session optimizations): how many Q/DQ
    Convs and MatMuls became QLinearConv / QLinearMatMul, and how many stayed fp32 between Q/DQ nodes."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="rtdetr-quant-") as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    keys = ("Conv", "FusedConv", "QLinearConv", "MatMul", "FusedMatMul", "QLinearMatMul", "MatMulIntegerToFloat",
            "QuantizeLinear", "DequantizeLinear")
    return {k: ops[k] for k in keys if ops[k]}


def mark_metadata(path: str | Path, entries: Mapping[str, str]) -> None:
    """Add or replace metadata entries of an ONNX file in place (the caller holds it at a temporary path)."""
    import onnx

    model = onnx.load(str(path))
    _copy_metadata(model, model, entries)
    _save_sealed(model, path)


def _save_sealed(model: Any, path: str | Path) -> None:
    """Save, then record the new file's own size and sha256 (the source's record would no longer fit it)."""
    import onnx

    from ..integrity import ONNX_KEY, seal_onnx

    onnx.save(model, str(path))
    if any(p.key == ONNX_KEY for p in model.metadata_props):
        seal_onnx(path)


def _copy_metadata(src: Any, dst: Any, updates: Mapping[str, str]) -> None:
    from ..integrity import ONNX_KEY, ONNX_PLACEHOLDER

    meta = {p.key: p.value for p in src.metadata_props}
    meta.update(updates)
    if ONNX_KEY in meta:  # re-sealed by _save_sealed once the new bytes are on disk
        meta[ONNX_KEY] = ONNX_PLACEHOLDER
    del dst.metadata_props[:]
    for k, v in meta.items():
        dst.metadata_props.add(key=k, value=v)


def _io(model: Any) -> list[tuple[str, int, tuple]]:
    def dims(v: Any) -> tuple:
        return tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
    return [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in (*model.graph.input, *model.graph.output)]


def _check_io(original: Any, quantized: Any) -> None:
    if _io(original) != _io(quantized):
        raise ExportError(f"quantization changed the model's I/O: {_io(original)} -> {_io(quantized)}")

