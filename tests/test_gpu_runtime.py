"""GPU runtime: ONNX Runtime CUDA with IOBinding on torch CUDA tensors (run on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

import toolkit
from toolkit.export.permutation import match_permutation

pytestmark = pytest.mark.gpu


def _ort_cuda(path):
    from toolkit.runtime.backends.onnxruntime import cuda_available

    if not cuda_available():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (stage onnxruntime-gpu: shared/device/README.md)")
    return toolkit.load(path, device="cuda")


def _agree(a, b, n, box_tol=0.05, score_tol=1e-4):
    for i in range(n):
        m = match_permutation({k: v[i].cpu() for k, v in a.items()}, {k: v[i].cpu() for k, v in b.items()})
        assert m.compared > 50 and m.label_mismatches == 0, m
        assert m.max_box_diff < box_tol and m.max_score_diff < score_tol, m


def test_ort_cuda_iobinding_matches_ort_cpu(tiny_onnx, sample_images):
    images, sizes = sample_images
    engine = _ort_cuda(tiny_onnx)
    assert engine.device.type == "cuda"
    gpu = engine(images=images.cuda(), orig_target_sizes=sizes.cuda().int())  # int32 converted safely on the GPU
    cpu = toolkit.load(tiny_onnx, device="cpu")(images=images, orig_target_sizes=sizes)
    assert all(v.is_cuda for v in gpu.values())
    _agree(cpu, gpu, 2, box_tol=0.1, score_tol=1e-3)


def test_outputs_are_the_callers_cuda_tensors_and_no_host_copies(tiny_onnx, sample_images):
    from torch.profiler import ProfilerActivity, profile

    images, sizes = (t.cuda() for t in sample_images)
    engine = _ort_cuda(tiny_onnx)
    outs = {"labels": torch.empty(2, 100, dtype=torch.int64, device="cuda"),
            "boxes": torch.empty(2, 100, 4, device="cuda"), "scores": torch.empty(2, 100, device="cuda")}
    ptrs = {k: v.data_ptr() for k, v in outs.items()}
    engine.infer({"images": images, "orig_target_sizes": sizes}, outputs=outs)  # warm-up
    torch.cuda.synchronize()
    fast = toolkit.load(tiny_onnx, device="cuda", check_values=False)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        got = fast.infer({"images": images, "orig_target_sizes": sizes}, outputs=outs)
        torch.cuda.synchronize()
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs
    big = images.numel() * 4
    copies = [e for e in prof.events() if "memcpy" in e.name.lower() and ("htod" in e.name.lower() or "dtoh" in e.name.lower())]
    # IOBinding binds by pointer: no copy of the image batch or of the outputs between host and device
    assert not [e for e in copies if getattr(e, "cuda_memory_usage", 0) >= big], [e.name for e in copies]
    assert len(copies) < 10, [e.name for e in copies]


def test_results_follow_the_callers_stream(tiny_onnx, sample_images):
    images, sizes = sample_images
    engine = _ort_cuda(tiny_onnx)
    ref = engine(images=images.cuda(), orig_target_sizes=sizes.cuda())
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = images.cuda(non_blocking=True) * 1.0  # produced on the side stream
        out = engine(images=x, orig_target_sizes=sizes.cuda())
        boxes = out["boxes"].clone()  # consumed on the side stream, no explicit sync
    side.synchronize()
    assert torch.equal(boxes, ref["boxes"])


def test_torch_engine_on_cuda_matches_cpu(tiny_model, sample_images):
    import copy

    images, sizes = sample_images
    cpu = toolkit.load(copy.deepcopy(tiny_model), device="cpu")(images=images, orig_target_sizes=sizes)
    gpu = toolkit.load(copy.deepcopy(tiny_model), device="cuda")(images=images.cuda(), orig_target_sizes=sizes.cuda())
    _agree(cpu, gpu, 2, box_tol=0.1, score_tol=1e-3)


def test_cpu_tensor_for_cuda_engine_refused_or_copied(tiny_model, sample_images):
    import copy

    images, sizes = sample_images
    engine = toolkit.load(copy.deepcopy(tiny_model), device="cuda")
    with pytest.raises(toolkit.BindingError, match="wrong device"):
        engine(images=images, orig_target_sizes=sizes)
    copying = toolkit.load(copy.deepcopy(tiny_model), device="cuda", copy_to_device=True)
    assert copying(images=images, orig_target_sizes=sizes)["boxes"].is_cuda
