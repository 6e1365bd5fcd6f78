from __future__ import annotations

import pytest

from toolkit.signature import PreprocessSpec, Signature, TensorSpec, deploy_signature, from_onnx


def test_json_round_trip_keeps_everything():
    sig = deploy_signature(PreprocessSpec(size=(320, 480), resize="letterbox"), sizes_dtype="int32", top_k=50).with_bounds(N=(1, 8))
    again = Signature.from_json(sig.to_json())
    assert again == sig
    assert again.input("orig_target_sizes").describe() == "int32 [N,2]"
    assert again.bounds("N") == (1, 8)


def test_tensor_spec_normalizes_dtype_names():
    import torch

    assert TensorSpec("x", torch.float16, (1, "N")).dtype == "float16"
    assert TensorSpec("x", "fp32", (1,)).dtype == "float32"
    with pytest.raises(ValueError, match="unknown dtype"):
        TensorSpec("x", "complex7", (1,))


def test_sizes_order_is_wh_only():
    with pytest.raises(ValueError, match=r"\(w, h\)"):
        PreprocessSpec(sizes_order="hw")


def test_from_onnx_reads_graph_and_preprocess(tiny_onnx):
    sig = from_onnx(tiny_onnx)
    assert [t.describe() for t in sig.inputs] == ["float32 [N,3,128,128]", "int64 [N,2]"]
    assert [(t.name, t.describe()) for t in sig.outputs] == [
        ("labels", "int64 [N,100]"), ("boxes", "float32 [N,100,4]"), ("scores", "float32 [N,100]")]
    assert sig.preprocess == PreprocessSpec(size=(128, 128))
    assert sig.is_deploy_contract()
