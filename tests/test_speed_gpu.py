"""The fast paths on a GPU: folded and bucketed AOTInductor packages and the torch.compile peer against eager torch
(the unfolded trained fixture). Marked gpu: skipped, with the reason, without CUDA."""

from __future__ import annotations

import pytest
import torch

import toolkit
from toolkit.checks.compare import compare
from toolkit.export.verify import verification_images
from toolkit.runtime.buckets import BucketEngine

from .test_aoti import _assert_detections_close

pytestmark = pytest.mark.gpu
FIXTURE = "toolkit/fixtures/shapes"


@pytest.fixture(scope="module")
def eager():
    return toolkit.load(FIXTURE, backend="torch", device="cuda")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_folded_bucketed_aoti_packages_match_eager(eager, tmp_path, precision):
    from toolkit.builders.buckets import build_buckets

    manifest = build_buckets(FIXTURE, tmp_path / f"shapes_{precision}.buckets", [1, 4], precision=precision, device="cuda",
                             progress=False)
    for graph in (False, True):
        engine = toolkit.load(manifest, device="cuda", cuda_graph=graph)
        assert isinstance(engine, BucketEngine) and engine.buckets == (1, 4)
        for n in (1, 3, 4):
            images = verification_images(n, (320, 320), seed=50 + n).cuda()
            sizes = torch.tensor([[640, 480]] * n, device="cuda")
            out, ref = engine(images=images, orig_target_sizes=sizes), eager(images=images, orig_target_sizes=sizes)
            assert out["boxes"].shape[0] == n and torch.isfinite(out["boxes"]).all()
            if precision == "fp32":  # folded + static + compiled, still exact fp32 (TF32 off)
                _assert_detections_close(out, ref, box_atol=0.1, score_atol=1e-4)
        assert engine.calls == {1: 1, 4: 2}
        if precision != "bf16":  # bf16 (7-bit mantissa) is judged by bench's accuracy gate on the fixture instead
            report = compare(eager, engine)
            assert report.ok, report.summary()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_compile_peer_matches_eager(eager, precision):
    engine = toolkit.load(FIXTURE, backend="torch-compile", device="cuda", precision=precision)
    for n in (2, 2, 3):
        images = verification_images(n, (320, 320), seed=60 + n).cuda()
        sizes = torch.tensor([[640, 480]] * n, device="cuda")
        first = engine(images=images, orig_target_sizes=sizes)
        again = engine(images=images * 0.5, orig_target_sizes=sizes)  # a CUDA-graph replay must not overwrite `first`
        assert not torch.equal(first["scores"], again["scores"])
        if precision == "fp32":
            _assert_detections_close(first, eager(images=images, orig_target_sizes=sizes), box_atol=0.1, score_atol=1e-4)
    assert set(engine.compile_s) == {(2, 3, 320, 320), (3, 3, 320, 320)}
    if precision != "bf16":
        report = compare(eager, engine)
        assert report.ok, report.summary()
