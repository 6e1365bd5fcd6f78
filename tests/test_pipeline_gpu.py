"""The image pipeline's GPU path (nvJPEG decode, EXIF, preprocessing on the device, a second stream) against the CPU
path: preprocessed tensors within the measured decoder difference, boxes of the trained fixture within 1.5 px, and the
decode of later batches overlapping the inference of earlier ones (CUDA events)."""

from __future__ import annotations

import pytest
import torch

import toolkit
from tests.test_pipeline import write_fixture_images
from toolkit.runtime.pipeline import ImagePipeline
from toolkit.runtime.preprocessing import preprocess
from toolkit.signature import PreprocessSpec
from toolkit.tasks.demo import fixture_path

pytestmark = pytest.mark.gpu

CPU_ROUTED = {"c_plain.png", "f_wide.png", "i_cmyk.jpg"}  # decoded by libjpeg / libpng on both paths


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_fixture_images(tmp_path_factory.mktemp("gpu-pipeline"), 480, 640)


@pytest.fixture(scope="module")
def engine():
    return toolkit.load(fixture_path(), backend="torch", device="cuda")


@pytest.mark.parametrize("spec", [PreprocessSpec(size=(320, 320)), PreprocessSpec(size=(384, 384), resize="letterbox")],
                         ids=["stretch", "letterbox"])
def test_gpu_decode_matches_the_cpu_preprocess(files, spec):
    """Reference: toolkit.preprocess on the CPU. Files decoded on the CPU on both paths differ only by the GPU's float
    resize rounding (at most 1 level of 255 where the CPU emulates it); nvJPEG's IDCT and chroma upsampling differ from
    libjpeg's by a few levels on average, more on sharp colour edges."""
    ref_images, ref_sizes = preprocess(files, spec)
    pipeline = ImagePipeline(files, spec, 4, "cuda")
    batches = list(pipeline)
    assert not pipeline.bad
    assert [p for b in batches for p in b.paths] == files
    images = torch.cat([b.images for b in batches]).cpu()
    sizes = torch.cat([b.sizes for b in batches]).cpu()
    assert torch.equal(sizes, ref_sizes)  # EXIF-rotated files have the displayed (w, h) on the GPU path too
    assert images.shape == ref_images.shape and images.dtype == torch.float32
    measured = []
    for p, got, ref in zip(files, images, ref_images):
        d = (got - ref).abs() * 255
        measured.append(f"{p.name}: mean {d.mean():.3f} max {d.max():.1f} >4: {(d > 4).float().mean():.4f}")
        if p.name in CPU_ROUTED:  # the same float-resize-then-round emulated on the CPU: at most 1 level, on 90 resizes
            assert d.max() <= 2 + 1e-3 and (d > 1 + 1e-3).float().mean() <= 1e-4, measured[-1]
        else:
            assert d.mean() <= 2.0 and (d > 4).float().mean() <= 0.05, measured[-1]
    print("GPU vs CPU preprocess, in levels of 255:", "; ".join(measured))


def _matched_within(a, b, px: float) -> tuple[int, float]:
    """Each confident detection of ``a`` has one of ``b`` of its class within ``px`` on every coordinate; (count, worst)."""
    a_boxes, a_labels, a_scores = a.boxes_xyxy.cpu(), a.labels.cpu(), a.scores.cpu()
    keep_a, keep_b = a_scores >= 0.5, b.scores.cpu() >= 0.3
    boxes_b, labels_b = b.boxes_xyxy.cpu()[keep_b], b.labels.cpu()[keep_b]
    worst = 0.0
    for box, label in zip(a_boxes[keep_a], a_labels[keep_a]):
        same = labels_b == label
        assert same.any(), f"no detection of class {int(label)} on the other path"
        err = (boxes_b[same] - box).abs().amax(dim=1).min().item()
        assert err <= px, f"box {box.tolist()} is {err:.2f} px from the nearest of its class on the other path"
        worst = max(worst, err)
    return int(keep_a.sum()), worst


def test_run_on_cuda_gives_the_cpu_decoded_boxes_within_1_5_px(engine, files, tmp_path):
    """Same CUDA engine, two input paths: run() (GPU decode) against CPU decode + toolkit.preprocess uploaded.
    Measured on an H200 (2026-12-04): worst box 1.41 px apart (nvJPEG and libjpeg differ by up to 39 levels of
    255 at sharp colour edges), so the bound is 1.5 px, not the 1 px first aimed for."""
    from toolkit.runtime.detections import split_batch
    from toolkit.runtime.preprocessing import engine_preprocess
    from toolkit.signature import INPUT_IMAGES, INPUT_SIZES
    from toolkit.tasks.run import run

    result = run(engine, files, tmp_path / "out", batch_size=4, draw_images=False, progress=False)
    assert result.images == files
    spec, ref = engine_preprocess(engine), []
    for i in range(0, len(files), 4):
        batch, sizes = preprocess(files[i:i + 4], spec)
        ref += split_batch(engine.infer({INPUT_IMAGES: batch.cuda(), INPUT_SIZES: sizes.cuda()}))
    compared = 0
    for got, want in zip(result.detections, ref):
        compared += _matched_within(want, got, 1.5)[0]
        _matched_within(got, want, 1.5)
    assert compared >= 10  # never vacuous: the trained fixture finds shapes on these images


def test_decode_of_later_batches_overlaps_inference(files):
    """A consumer whose 'inference' keeps its stream busy ~15 ms per batch: the side stream's decodes run meanwhile."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles = int(10_000_000 * 15.0 / max(start.elapsed_time(end), 1e-3))
    jpegs = [p for p in files if p.suffix == ".jpg" and p.name != "i_cmyk.jpg"]
    paths = [jpegs[i % len(jpegs)] for i in range(64)]
    pipeline = ImagePipeline(paths, PreprocessSpec(size=(320, 320)), 8, "cuda", prefetch=2)
    seen = 0
    for batch in pipeline:
        torch.cuda._sleep(cycles)
        batch.images.sum()  # the batch is used on the consumer's stream after its ready event
        seen += len(batch.paths)
    assert seen == 64 and len(pipeline.decode_events) == 8 and len(pipeline.infer_events) == 8
    overlapped = pipeline.overlapped_decodes()
    assert overlapped >= 5, f"only {overlapped} of 8 decodes overlapped another batch's inference"
    torch.cuda.synchronize()
    # batch i+1's decode began before batch i's inference ended, for most i
    began_before = sum(pipeline.decode_events[i + 1][0].elapsed_time(pipeline.infer_events[i][1]) > 0 for i in range(7))
    assert began_before >= 6


def test_gpu_path_reports_broken_files_like_the_cpu_path(files, tmp_path):
    """Reference: the CPU path (read_image's messages). A truncated JPEG must not reach nvJPEG, which may decode it."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8not a jpeg")
    raw = files[0].read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(raw[:raw.index(b"\xff\xda") + 400])
    order = [files[0], broken, files[1], cut, files[3], tmp_path / "missing.jpg", files[7]]
    cpu = ImagePipeline(order, PreprocessSpec(size=(320, 320)), 2, "cpu")
    cpu_paths = [p for b in cpu for p in b.paths]
    gpu = ImagePipeline(order, PreprocessSpec(size=(320, 320)), 2, "cuda")
    gpu_paths = [p for b in gpu for p in b.paths]
    assert set(cpu.bad) == {broken, cut, tmp_path / "missing.jpg"}
    assert gpu.bad == cpu.bad and gpu_paths == cpu_paths == [files[0], files[1], files[3], files[7]]


def test_a_batch_nvjpeg_refuses_is_decoded_on_the_cpu(files, monkeypatch):
    """nvJPEG failing on a batch (a file it cannot decode): that batch goes through read_image, file by file."""
    import torchvision.io

    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("nvjpeg: unsupported bitstream")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuse)
    spec = PreprocessSpec(size=(320, 320))
    pipeline = ImagePipeline(files, spec, 4, "cuda")
    images = torch.cat([b.images for b in pipeline]).cpu()
    assert calls and not pipeline.bad
    ref, _ = preprocess(files, spec)
    d = (images - ref).abs() * 255  # CPU-decoded: only the GPU resize rounding differs
    assert d.max() <= 2 + 1e-3 and (d > 1 + 1e-3).float().mean() <= 1e-4
