"""INT8 on the GPU: the TensorRT form of the fixture's Q/DQ graph (symmetric int8 activations) under ONNX Runtime CUDA
and TensorRT-RTX. References: ONNX Runtime CPU running the same INT8 file, and the builder's own network types.

Run on a GPU machine: ``pytest -q -m gpu tests/test_quantize_gpu.py``. The ORT CUDA speed ratio for the docs:
``python tools/int8_cuda_speed.py`` (prints int8 vs fp32 at batch 1, 4 and 32).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import tensorrt_rtx_or_skip


@pytest.fixture(scope="module")
def int8_pair(tmp_path_factory):
    """(fp32 file, int8 file in the TensorRT form) of the shipped fixture, gates skipped (they are CPU gates)."""
    from toolkit.data.shapes import write_split
    from toolkit.export.onnx import export_onnx
    from toolkit.tasks.demo import fixture_path
    from toolkit.tasks.quantize import quantize

    d = tmp_path_factory.mktemp("q8gpu")
    fp32 = export_onnx(fixture_path(), d / "shapes.onnx", verify=False).path
    write_split(d / "calib", "train", 16, seed=5, size=320)
    out = d / "shapes.int8.onnx"
    quantize(fp32, out, d / "calib" / "train", activations="int8", eval_synthetic=8, min_speedup=None, force=True, progress=False)
    return fp32, out


@pytest.mark.gpu
def test_int8_qdq_graph_runs_on_ort_cuda_like_ort_cpu(int8_pair, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    import toolkit
    from toolkit.checks.compare import compare
    from toolkit.tasks.quantize import INT8_THRESHOLDS

    _, int8 = int8_pair
    cpu = toolkit.load(int8, backend="onnxruntime", device="cpu")
    cuda = toolkit.load(int8, backend="onnxruntime", device="cuda")
    assert cuda.session.get_providers()[0] == "CUDAExecutionProvider"
    report = compare(cpu, cuda, thresholds=INT8_THRESHOLDS)
    assert report.verdict == "agree", report.summary()




@pytest.mark.gpu
def test_int8_qdq_graph_builds_with_tensorrt_rtx_and_records_layer_precisions(int8_pair, tmp_path):
    tensorrt_rtx_or_skip()
    from toolkit.builders.build import build_engine
    from toolkit.runtime.sidecar import sidecar_path

    _, int8 = int8_pair
    out = tmp_path / "shapes.int8.engine"
    build_engine(int8, out, backend="tensorrt-rtx", progress=False, cache=False)
    meta = json.loads(sidecar_path(out).read_text())
    layers = meta["layer_precisions"]
    assert layers.get("INT8", 0) > 0 and layers.get("FLOAT", 0) > 0, layers  # Q/DQ in INT8, the decoder in fp32
    dtypes = {t["name"]: t["dtype"] for t in meta["signature"]["inputs"]}
    assert dtypes["orig_target_sizes"] == "int64" and meta["strongly_typed"]
