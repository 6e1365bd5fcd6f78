"""The shipped trained fixture: loads, exports tie-free, and fp16 vs fp32 agree detection by detection."""

from __future__ import annotations

import onnx
import pytest
import torch

import toolkit
from toolkit.tasks.demo import FIXTURE_DIR, fixture_path
from toolkit.export.onnx import export_onnx

from tests.conftest import shifted_engine


@pytest.fixture(scope="module")
def fixture_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("fixture")
    fp32 = export_onnx(fixture_path(), d / "shapes.onnx")
    fp16 = export_onnx(fixture_path(), d / "shapes.fp16.onnx", precision="fp16")
    return fp32, fp16


def test_fixture_is_small_and_loads_as_fp32():
    weights = FIXTURE_DIR / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    model = toolkit.load_model(FIXTURE_DIR)
    assert model.class_names == ["circle", "square", "triangle", "star"] and model.preprocess.size == (320, 320)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_trained_weights_verify_end_to_end(fixture_onnx):
    """Trained weights have no ties at the query selection, so final outputs are compared too."""
    report = fixture_onnx[0].verify
    assert report.ok and not any(c.tied for c in report.checks)
    assert all(c.final_compared > 50 and c.final_max_box_diff < 0.05 for c in report.checks)


def test_fp16_graph_keeps_fp32_io_and_postprocess(fixture_onnx):
    model = onnx.load(str(fixture_onnx[1].path))
    io = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert io == {"images": onnx.TensorProto.FLOAT, "orig_target_sizes": onnx.TensorProto.INT64,
                  "labels": onnx.TensorProto.INT64, "boxes": onnx.TensorProto.FLOAT, "scores": onnx.TensorProto.FLOAT}
    assert {i.data_type for i in model.graph.initializer if i.dims} == {onnx.TensorProto.FLOAT16}
    typed = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    post = [n for n in model.graph.node if n.op_type in ("Sigmoid", "TopK") and not n.name.startswith("/deploy/model/")]
    assert post and all(typed.get(n.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for n in post)
    # GridSample runs in fp32 inside the fp16 body: ONNX Runtime's CUDA kernel is float-only, and an fp16 one is
    # placed on the CPU (host copies on every call: docs/benchmarks.md)
    grid = [n for n in model.graph.node if n.op_type == "GridSample"]
    assert grid and all(typed[name] == onnx.TensorProto.FLOAT for n in grid for name in (*n.input[:2], n.output[0]))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(typed[n.output[0]] == onnx.TensorProto.FLOAT16 for n in convs)  # the body stays half
    assert {p.key: p.value for p in model.metadata_props}["precision"] == "fp16"


def test_fp16_and_fp32_engines_agree_and_a_2px_shift_does_not(fixture_onnx, tmp_path):
    from toolkit.checks.compare import compare

    fp32, fp16 = (r.path for r in fixture_onnx)
    a, b = toolkit.load(fp32, device="cpu"), toolkit.load(fp16, device="cpu")
    report = compare(a, b)
    assert report.ok, report.summary()
    assert report.verdict == "agree"

    shifted = shifted_engine(a, 2.0)  # every box moved 2 px right: must fail
    assert not compare(a, shifted).ok


def test_fixture_map_agrees_across_backends():
    from toolkit.tasks.evaluate import evaluate

    report = evaluate(FIXTURE_DIR, synthetic=40, backends=("torch", "onnxruntime"), device="cpu")
    assert report.agree
    assert report.row("onnxruntime").mAP > 0.5
