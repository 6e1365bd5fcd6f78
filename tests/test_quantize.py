"""INT8 quantization with its gates, and fp32 islands for fp16 (references: plain ONNX Runtime, the fp32 file)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.conftest import run_cli
from toolkit.errors import InputError
from toolkit.export.islands import find_overflow_nodes
from toolkit.export.onnx import export_onnx
from toolkit.export.quantize import fused_ops, prepare_graph, select_nodes
from toolkit.export.verify import verification_images
from toolkit.integrity import ONNX_KEY, ONNX_PLACEHOLDER, check_onnx
from toolkit.tasks.quantize import QuantizationRefused, quantize


def _meta(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _run(path, images, sizes, names=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(names, {"images": images, "orig_target_sizes": sizes})


@pytest.fixture(scope="module")
def fixture_fp32(tmp_path_factory):
    from toolkit.tasks.demo import fixture_path

    return export_onnx(fixture_path(), tmp_path_factory.mktemp("q") / "shapes.onnx", verify=False).path


def test_prepare_folds_frozen_batchnorm_and_keeps_outputs(tiny_model, tiny_onnx, tmp_path):
    """The graph handed to the quantizer has no Conv->Mul (FrozenBatchNorm) left and computes what the export does.
    A default export already folds the norms into the convolutions (toolkit.models.fold), so the graph prepare_graph
    has to fold is an unfolded export (fold=False, --no-fold): the one that still carries the Conv->Mul."""

    def conv_then_mul(m):  # Conv -> Mul by a constant: a FrozenBatchNorm scale (SiLU's Mul takes a Sigmoid)
        consts = {i.name for i in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
        convs = {n.output[0] for n in m.graph.node if n.op_type == "Conv"}
        return sum(1 for n in m.graph.node if n.op_type == "Mul" and any(i in convs for i in n.input) and any(i in consts for i in n.input))

    assert conv_then_mul(onnx.load(str(tiny_onnx))) == 0  # folded at export
    tiny_onnx = export_onnx(tiny_model, tmp_path / "tiny.unfolded.onnx", fold=False).path
    original = onnx.load(str(tiny_onnx))
    prepared = prepare_graph(original)
    assert conv_then_mul(original) > 0 and conv_then_mul(prepared) == 0
    assert sum(n.op_type == "Conv" for n in prepared.graph.node) == sum(n.op_type == "Conv" for n in original.graph.node)
    kept = {p.key: p.value for p in prepared.metadata_props}
    # the source's integrity record fits the source's bytes only: the prepared graph carries the placeholder,
    # sealed with its own size and sha256 when the quantizer writes it
    assert kept.pop(ONNX_KEY) == ONNX_PLACEHOLDER and {k: v for k, v in _meta(tiny_onnx).items() if k != ONNX_KEY} == kept
    x = verification_images(2, (128, 128), seed=3).numpy()
    s = np.array([[640, 480], [320, 200]], np.int64)
    path = tiny_onnx.parent / "prepared.onnx"
    onnx.save(prepared, str(path))
    for a, b in zip(_run(tiny_onnx, x, s), _run(path, x, s)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_body_scope_keeps_decoder_heads_and_postprocess_fp32(tiny_onnx):
    model = onnx.load(str(tiny_onnx))
    quantize_names, keep = select_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert any(ops[n] == "Conv" for n in quantize_names)
    assert all("/decoder/" not in n and "bbox_embed" not in n and ops[n] not in ("TopK", "GridSample") for n in quantize_names)
    assert all(n in keep for n, op in ops.items() if op in ("TopK", "GridSample"))
    with pytest.raises(InputError, match="neither an op type"):
        select_nodes(model, exclude=["NoSuchOp"])
    only_matmul, _ = select_nodes(model, exclude=["Conv"])
    assert not any(ops[n] == "Conv" for n in only_matmul)


def test_cli_bad_input_is_one_line_exit_2(tiny_onnx, tmp_path):
    r = run_cli("quantize", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "x.onnx"), "--synthetic", "2")
    assert r.returncode == 2 and "quantize takes an fp32 .onnx" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("quantize", str(tiny_onnx), "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "--calib" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("quantize", str(tiny_onnx), "-o", str(tmp_path / "x.onnx"), "--synthetic", "2", "--exclude", "Bogus")
    assert r.returncode == 2 and "Bogus" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_failing_gate_refuses_and_force_writes_it_labelled(tiny_onnx, tmp_path):
    """An unreachable speed target fails the speed gate: nothing is written; with force it is written and labelled."""
    out = tmp_path / "tiny.int8.onnx"
    kw = dict(synthetic=4, eval_synthetic=4, min_speedup=1000.0, speed_batches=(1,), speed_rounds=2, progress=False)
    with pytest.raises(QuantizationRefused) as e:
        quantize(tiny_onnx, out, **kw)
    assert not out.exists()
    speed = next(g for g in e.value.report.gates if g.name == "speed")
    assert speed.passed is False and "needs >= 1000" in speed.detail
    report = quantize(tiny_onnx, out, force=True, **kw)
    meta = _meta(out)
    assert report.forced and "speed" in json.loads(meta["quantization_forced"])
    assert meta["precision"] == "int8" and json.loads(meta["quantization_gates"])["speed"]["1"]["fp32_ms"] > 0


@pytest.mark.slow
def test_fixture_int8_passes_accuracy_gates_with_convs_fused(fixture_fp32, tmp_path):
    """The shipped fixture quantized with calibration images: compare and mAP gates pass, every Conv runs as
    QLinearConv in ONNX Runtime, metadata and orig_target_sizes survive, and the binder runs it."""
    import toolkit
    from toolkit.data.shapes import write_split

    calib = tmp_path / "calib"
    write_split(calib, "train", 32, seed=5, size=320)
    out = tmp_path / "shapes.int8.onnx"
    report = quantize(fixture_fp32, out, calib / "train", eval_synthetic=24, min_speedup=None, progress=False)
    gates = {g.name: g.passed for g in report.gates}
    assert gates == {"compare": True, "mAP": True, "speed": None}, report.table()
    assert report.map["fp32"] > 0.5  # the mAP gate judged a trained model, not noise
    fused = fused_ops(out)
    assert fused.get("QLinearConv", 0) >= 60 and fused.get("Conv", 0) + fused.get("FusedConv", 0) <= 3, fused
    src, dst = onnx.load(str(fixture_fp32)), onnx.load(str(out))
    assert [(i.name, i.type) for i in src.graph.input] == [(i.name, i.type) for i in dst.graph.input]
    meta = _meta(out)
    own = ("precision", ONNX_KEY)  # the integrity record is the file's own size and sha256: sealed anew, checked below
    assert {k: v for k, v in meta.items() if k in _meta(fixture_fp32) and k not in own} == \
        {k: v for k, v in _meta(fixture_fp32).items() if k not in own}
    assert check_onnx(out) is True
    assert meta["precision"] == "int8" and "quantization_forced" not in meta
    engine = toolkit.load(out)
    outputs = engine.infer({"images": torch.rand(2, 3, 320, 320), "orig_target_sizes": torch.tensor([[640, 480], [320, 320]], dtype=torch.int32)})
    assert outputs["boxes"].shape == (2, 100, 4) and torch.isfinite(outputs["boxes"]).all()


@pytest.mark.slow
def test_quantizing_heads_and_postprocess_is_refused(fixture_fp32, tmp_path):
    out = tmp_path / "all.int8.onnx"
    with pytest.raises(QuantizationRefused) as e:
        quantize(fixture_fp32, out, synthetic=8, scope="all", eval_synthetic=24, min_speedup=None, progress=False)
    assert not out.exists()
    assert {g.name for g in e.value.report.failed()} & {"compare", "mAP"}, e.value.report.table()


def _planted(seed: int = 0):
    """The tiny model with its first convolution scaled up (and its frozen batch norm scaled down by as much): the
    fp32 function is unchanged, but the convolution's output exceeds fp16's 65504 while its weights still fit.
    Only in an unfolded graph (fold=False): folding the norm into the convolution cancels the two scalings."""
    from toolkit.models.config import build_model

    model = build_model("tiny", seed=seed)
    stem = model.model.model.backbone.model.embedder.embedder[0]
    with torch.no_grad():
        k = 64000.0 / float(stem.convolution.weight.abs().max())
        stem.convolution.weight.mul_(k)
        stem.normalization.weight.div_(k)
    return model


def test_auto_islands_find_and_repair_a_planted_fp16_overflow(tmp_path):
    model = _planted()
    plain = export_onnx(model, tmp_path / "plain.fp16.onnx", precision="fp16", verify=False, auto_islands=False, fold=False).path
    fixed = export_onnx(model, tmp_path / "fixed.fp16.onnx", precision="fp16", verify=False, fold=False)
    stem = "embedder.0/convolution/Conv"
    assert any(stem in n for n in fixed.islands.nodes), fixed.islands.summary()
    assert any(stem in n for n in json.loads(_meta(fixed.path)["fp16_islands"]))
    x = verification_images(2, (128, 128), seed=5).numpy()
    s = np.array([[128, 128], [256, 200]], np.int64)
    # reference: plain ONNX Runtime on the graph without islands shows the overflow at the stem's output
    m = onnx.load(str(plain))
    conv_out = next(n.output[0] for n in m.graph.node if n.name.endswith(stem))
    m.graph.output.add(name=conv_out)
    onnx.save(m, str(tmp_path / "probe.onnx"))
    assert not np.isfinite(_run(tmp_path / "probe.onnx", x, s, [conv_out])[0]).all()
    assert all(np.isfinite(o).all() for o in _run(fixed.path, x, s))
    # and the search run directly on the broken graph with other images names the same spot
    again = find_overflow_nodes(onnx.load(str(plain)), [{"images": x, "orig_target_sizes": s}])
    assert any(stem in n for n in again.nodes), again.summary()
    # the default export folds the norm into the convolution, which cancels the planted scaling: no island there
    folded = export_onnx(model, tmp_path / "folded.fp16.onnx", precision="fp16", verify=False)
    assert not any(stem in n for n in folded.islands.nodes), folded.islands.summary()
    assert all(np.isfinite(o).all() for o in _run(folded.path, x, s))


def test_quantized_constants_that_are_not_weights_go_back_to_fp32(fixture_fp32, tmp_path):
    """The TensorRT form: ONNX Runtime's quantizer also quantizes Clip bounds, scalars and an embedding that only
    elementwise ops read (TensorRT-RTX refused such a graph on an H200). Every DequantizeLinear of an initializer
    left feeds a Conv/MatMul/Gemm weight or bias; outputs equal the unfolded graph's (same values, plain ORT)."""
    import copy

    from toolkit.export.qdq_constants import WEIGHT_SLOTS, fold_constant_dequantize
    from toolkit.tasks.quantize import quantize

    out = tmp_path / "trt.int8.onnx"
    quantize(fixture_fp32, out, synthetic=8, activations="int8", eval_synthetic=4, min_speedup=None, force=True, progress=False)
    model = onnx.load(str(out))
    inits = {i.name for i in model.graph.initializer}
    uses = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, k))
    dq_consts = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert dq_consts, "the TensorRT form has quantized weights"
    for n in dq_consts:
        assert all(k in WEIGHT_SLOTS.get(op, ()) for op, k in uses[n.output[0]]), (n.name, uses[n.output[0]])
    # the fold itself against plain ONNX Runtime: a graph with the constants still quantized computes the same
    unfolded = copy.deepcopy(model)
    from onnx import helper, numpy_helper

    clip = next(n for n in unfolded.graph.node if n.op_type == "Clip" and len(n.input) > 2 and n.input[2] in inits)
    bound = next(i for i in unfolded.graph.initializer if i.name == clip.input[2])
    value = float(numpy_helper.to_array(bound))
    unfolded.graph.initializer.extend([numpy_helper.from_array(np.array(127, np.int8), "cq"),
                                       numpy_helper.from_array(np.array(value / 127, np.float32), "cs")])
    unfolded.graph.node.insert(0, helper.make_node("DequantizeLinear", ["cq", "cs"], ["cdq"], name="cdq_node"))
    clip.input[2] = "cdq"
    folded = copy.deepcopy(unfolded)
    assert fold_constant_dequantize(folded) == ["cq"]
    images = np.random.default_rng(0).random((2, 3, 320, 320), dtype=np.float32)
    sizes = np.array([[320, 240]] * 2, dtype=np.int64)
    onnx.save(unfolded, str(tmp_path / "unfolded.onnx"))
    onnx.save(folded, str(tmp_path / "folded.onnx"))
    for a, b in zip(_run(tmp_path / "unfolded.onnx", images, sizes), _run(tmp_path / "folded.onnx", images, sizes)):
        np.testing.assert_array_equal(a, b)
