"""AOTInductor packages: build from the tiny model, load through toolkit.load, parity with ONNX Runtime, refusals."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import toolkit
from toolkit.builders.build import BuildError, build_engine
from toolkit.errors import EngineError
from toolkit.export.permutation import match_permutation
from toolkit.runtime.sidecar import read_sidecar, sidecar_path


@pytest.fixture(scope="module")
def tiny_pt2(tiny_model, tmp_path_factory):
    from toolkit.builders.aoti import build_aoti

    path = tmp_path_factory.mktemp("aoti") / "tiny.pt2"
    return build_aoti(tiny_model, path, batch=(1, 2, 4), device="cpu", progress=False)


def _batch(sample_images, n):
    images, sizes = sample_images
    idx = torch.arange(n) % images.shape[0]
    return images[idx].contiguous(), sizes[idx].contiguous()


def _assert_detections_close(out, ref, *, box_atol, score_atol, score_band=1e-4):
    """Per image, the detections of ``ref`` above its top-K boundary band are found in ``out`` (optimal matching)."""
    diffs = []
    for i in range(ref["scores"].shape[0]):
        m = match_permutation({k: v[i] for k, v in ref.items()}, {k: v[i] for k, v in out.items()}, score_band=score_band)
        assert m.compared > 0 and m.label_mismatches == 0, m
        assert m.max_box_diff <= box_atol and m.max_score_diff <= score_atol, m
        diffs.append(m)
    return diffs


def test_second_build_comes_from_the_cache(tiny_pt2, tiny_model, tmp_path):
    """The same weights and options reuse the package (the demo relies on it); other options do not."""
    import time

    from toolkit.builders.aoti import build_aoti

    start = time.perf_counter()
    again = build_aoti(tiny_model, tmp_path / "again.pt2", batch=(1, 2, 4), device="cpu", progress=False)
    assert time.perf_counter() - start < 30  # a compile takes minutes on this machine; a hit is a copy
    assert again.read_bytes() == tiny_pt2.read_bytes()
    from toolkit.builders.aoti import _cache_key

    key = _cache_key(tiny_model, "fp32", (1, 2, 4), "cpu", {})
    assert key != _cache_key(tiny_model, "fp32", (1, 2, 3), "cpu", {})  # other options, other package
    assert key != _cache_key(tiny_model, "fp16", (1, 2, 4), "cuda", {})


def test_sidecar(tiny_pt2, tiny_model):
    meta = read_sidecar(tiny_pt2)
    assert meta["backend"] == "aoti" and meta["device"] == "cpu" and meta["precision"] == "fp32"
    assert meta["batch"] == {"min": 1, "opt": 2, "max": 4} and meta["dynamic_batch"] is True
    assert meta["torch_version"] == torch.__version__ and meta["class_names"] == tiny_model.class_names
    assert meta["signature"]["dim_bounds"] == {"N": [1, 4]}
    assert meta["inductor_configs"] == {}  # the measured CUDA defaults are for CUDA packages only
    assert not list(tiny_pt2.parent.glob(".*"))  # no temporary left behind


@pytest.mark.parametrize("n", [2, 3])
def test_parity_with_onnxruntime(tiny_pt2, tiny_onnx, sample_images, n):
    engine = toolkit.load(tiny_pt2)
    assert engine.backend == "aoti" and engine.device.type == "cpu"
    assert engine.class_names == ["circle", "square", "triangle", "star"]
    ort = toolkit.load(tiny_onnx, device="cpu")
    images, sizes = _batch(sample_images, n)
    out = engine(images=images, orig_target_sizes=sizes)
    ref = ort(images=images, orig_target_sizes=sizes)
    assert out["labels"].dtype == torch.int64 and out["boxes"].dtype == torch.float32 and out["boxes"].shape == (n, 100, 4)
    _assert_detections_close(out, ref, box_atol=0.1, score_atol=1e-4)


def test_batch_outside_range_is_refused(tiny_pt2, sample_images):
    images, sizes = _batch(sample_images, 5)
    with pytest.raises(toolkit.BindingError, match=r"outside the engine's range \[1, 4\]"):
        toolkit.load(tiny_pt2)(images=images, orig_target_sizes=sizes)


def test_missing_sidecar(tiny_pt2, tmp_path):
    bare = tmp_path / "bare.pt2"
    shutil.copy(tiny_pt2, bare)
    with pytest.raises(EngineError, match="sidecar"):
        toolkit.load(bare)


def test_cuda_package_refused_on_cpu(tiny_pt2, tmp_path):
    fake = tmp_path / "cuda.pt2"
    shutil.copy(tiny_pt2, fake)
    meta = read_sidecar(tiny_pt2) | {"device": "cuda", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    sidecar_path(fake).write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="compiled for CUDA"):
        toolkit.load(fake, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="CUDA"):
            toolkit.load(fake)


def test_corrupted_package(tiny_pt2, tmp_path):
    bad = tmp_path / "bad.pt2"
    data = tiny_pt2.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    shutil.copy(sidecar_path(tiny_pt2), sidecar_path(bad))
    with pytest.raises(EngineError, match=f"{bad}: .* bytes, but its sidecar .* records .*truncated"):
        toolkit.load(bad)


def test_build_refusals(tiny_model, tiny_onnx, tmp_path):
    from toolkit.builders.build import build_from_model
    from toolkit.builders.aoti import build_aoti

    with pytest.raises(BuildError, match="precision"):
        build_aoti(tiny_model, tmp_path / "m.pt2", precision="int8")
    with pytest.raises(BuildError, match="CUDA only"):
        build_aoti(tiny_model, tmp_path / "m.pt2", precision="fp16", device="cpu")
    with pytest.raises(BuildError, match="batch"):
        build_aoti(tiny_model, tmp_path / "m.pt2", batch=(4, 2, 8))
    with pytest.raises(BuildError, match=".pt2"):
        build_aoti(tiny_model, tmp_path / "m.engine")
    with pytest.raises(BuildError, match="from an ONNX file"):
        build_from_model(tiny_model, tmp_path / "m.engine", backend="tensorrt")
    with pytest.raises(BuildError, match="--model"):  # exported from an in-memory module: no model to compile
        build_engine(tiny_onnx, tmp_path / "m.pt2", backend="aoti", cache=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_package(tmp_path, precision):
    """CUDA packages of the trained fixture (the tie-free tiny test model overflows in fp16) against eager torch."""
    from toolkit.builders.aoti import build_aoti
    from toolkit.checks.compare import compare
    from toolkit.runtime.cudagraph import CudaGraphEngine
    from toolkit.tasks.demo import fixture_path

    path = build_aoti(fixture_path(), tmp_path / f"shapes_{precision}.pt2", precision=precision, batch=(1, 2, 4),
                      device="cuda", progress=False)
    meta = read_sidecar(path)
    assert meta["device"] == "cuda" and meta["precision"] == precision and meta["compute_capability"]
    assert meta["inductor_configs"] == {"freezing": True, "force_layout_optimization": True}  # the measured fast path
    engine = toolkit.load(path)
    assert engine.device.type == "cuda"
    with pytest.raises(EngineError, match="compiled for CUDA"):
        toolkit.load(path, device="cpu")
    ref_engine = toolkit.load(fixture_path(), backend="torch", device="cuda")
    from toolkit.export.verify import verification_images

    for n in (2, 3):
        images = verification_images(n, (320, 320), seed=n).cuda()
        sizes = torch.tensor([[640, 480]] * n, device="cuda")
        out = engine(images=images, orig_target_sizes=sizes)
        ref = ref_engine(images=images, orig_target_sizes=sizes)
        if precision == "fp32":
            _assert_detections_close(out, ref, box_atol=0.1, score_atol=1e-4)
    report = compare(ref_engine, engine)  # detection by detection, the verdict users get
    assert report.ok, report.summary()
    # the default AOTInductor runner synchronizes threads in ways stream capture refuses: a clear error up front
    with pytest.raises(EngineError, match="cannot be captured"):
        CudaGraphEngine(engine)
    # loaded single-threaded (what cuda_graph=True asks for), the package is captured and replayed per batch size;
    # the binder still converts the int32 sizes before they are copied into the graph's static inputs
    graphed = toolkit.load(path, device="cuda", cuda_graph=True)
    assert isinstance(graphed, CudaGraphEngine) and graphed.inner.run_single_threaded
    for n in (1, 3, 1):
        images = verification_images(n, (320, 320), seed=10 + n).cuda()
        sizes = torch.tensor([[640, 480]] * n, device="cuda")
        plain = engine(images=images, orig_target_sizes=sizes)
        replayed = graphed(images=images, orig_target_sizes=sizes.to(torch.int32))
        _assert_detections_close(replayed, plain, box_atol=1e-3, score_atol=1e-5)
    assert len(graphed._graphs) == 2


def test_cli_build_onnx_to_pt2_then_run(tmp_path):
    """The issue's flow: export a checkpoint, `build m.onnx --backend aoti -o m.pt2` (the ONNX names its model and
    the weights' sha256), then `run m.pt2`; the detections equal ONNX Runtime's on the same image."""
    from tests.conftest import run_cli
    from torchvision.io import write_png

    from toolkit.tasks.demo import fixture_path
    from toolkit.export.verify import verification_images

    onnx_path, pt2 = tmp_path / "m.onnx", tmp_path / "m.pt2"
    r = run_cli("export", str(fixture_path()), "-o", str(onnx_path), "--no-verify")
    assert r.returncode == 0, r.stderr
    # batch 1,4,16 on CPU: the demo's package, so the session cache usually has it
    r = run_cli("build", str(onnx_path), "--backend", "aoti", "-o", str(pt2), "--batch", "1,4,16", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert read_sidecar(pt2)["device"] == "cpu"
    write_png((verification_images(1, (240, 320), seed=4)[0] * 255).to(torch.uint8), str(tmp_path / "a.png"))
    r = run_cli("run", str(pt2), str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    from toolkit.tasks.run import infer_images

    got = infer_images(toolkit.load(pt2), [tmp_path / "a.png"])[0]
    ref = infer_images(toolkit.load(onnx_path, device="cpu"), [tmp_path / "a.png"])[0]
    assert got.labels.tolist() == ref.labels.tolist()
    assert torch.allclose(got.boxes_xyxy, ref.boxes_xyxy, atol=0.05) and torch.allclose(got.scores, ref.scores, atol=1e-4)


def test_build_from_onnx_refuses_when_the_model_cannot_be_recovered(tiny_model, tmp_path):
    """An ONNX from an in-memory module names no source; one whose checkpoint changed since has other weights."""
    from tests.conftest import run_cli

    from toolkit.export.onnx import export_onnx
    from toolkit.models.loading import save_model

    r = run_cli("build", str(export_onnx(tiny_model, tmp_path / "mem.onnx", verify=False).path), "--backend", "aoti",
                "-o", str(tmp_path / "m.pt2"))
    assert r.returncode == 2 and "in-memory" in r.stderr and "--model" in r.stderr
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model, ckpt)
    onnx_path = export_onnx(str(ckpt), tmp_path / "ck.onnx", verify=False).path
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    save_model(changed, ckpt)
    with pytest.raises(BuildError, match="not the exported ones"):
        build_engine(onnx_path, tmp_path / "m.pt2", backend="aoti", device="cpu")
    with pytest.raises(BuildError, match="TensorRT build options"):
        build_engine(onnx_path, tmp_path / "m.pt2", backend="aoti", device="cpu", workspace_gib=1)
    assert not (tmp_path / "m.pt2").exists()
