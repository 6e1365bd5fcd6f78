"""TensorRT-RTX builds on a GPU: the exported ONNX parses and builds, and the builder keeps int64 I/O.

Skips unless ``tensorrt_rtx`` or ``tensorrt_rtx_bindings`` imports (see shared/device/README.md for staging it on
the H100). TensorRT-RTX 1.x cannot deserialize or run engines on compute capability 9.0, so the run is skipped there.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tensorrt_rtx_or_skip
from toolkit.builders.build import build_engine
from toolkit.runtime.sidecar import sidecar_path




def _build_and_check(onnx_path, out, rtx, sample=None):
    result = build_engine(onnx_path, out, backend="tensorrt-rtx", progress=False, cache=False)
    assert out.is_file() and out.stat().st_size > 0
    meta = json.loads(sidecar_path(out).read_text())
    dtypes = {t["name"]: t["dtype"] for t in meta["signature"]["inputs"] + meta["signature"]["outputs"]}
    assert dtypes["orig_target_sizes"] == "int64" and dtypes["labels"] == "int64"  # RTX keeps int64 (TRT 8 narrowed it)
    assert meta["backend"] == "tensorrt-rtx" and meta["library"] == "tensorrt_rtx" and meta["strongly_typed"]
    assert "kept as in the ONNX" in meta["orig_target_sizes_note"]
    engine = rtx.Runtime(rtx.Logger(rtx.Logger.ERROR)).deserialize_cuda_engine(out.read_bytes())
    if engine is None and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("TensorRT-RTX does not support compute capability 9.0")
    assert engine is not None
    if sample is not None:
        import toolkit

        images, sizes = sample
        out_rtx = toolkit.load(out, backend="tensorrt", trt_module=rtx)(images=images.cuda(), orig_target_sizes=sizes.cuda())
        ref = toolkit.load(onnx_path, device="cpu")(images=images, orig_target_sizes=sizes)
        torch.testing.assert_close(out_rtx["boxes"].cpu(), ref["boxes"], atol=1e-3, rtol=1e-3)
    return result


@pytest.mark.gpu
def test_rtx_builds_tiny(tiny_onnx, tmp_path, sample_images):
    rtx = tensorrt_rtx_or_skip()
    _build_and_check(tiny_onnx, tmp_path / "tiny.engine", rtx, sample_images)


@pytest.mark.gpu
def test_rtx_builds_r50(tmp_path):
    rtx = tensorrt_rtx_or_skip()
    from toolkit.export.onnx import export_onnx

    onnx_path = tmp_path / "r50.onnx"
    export_onnx(None, onnx_path, config="rtdetr_r50vd", verify=False)
    _build_and_check(onnx_path, tmp_path / "r50.engine", rtx)
