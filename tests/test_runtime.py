"""toolkit.load() through the Engine protocol: ONNX Runtime (CPU) and eager torch, threads, run."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import toolkit
from toolkit.errors import BindingError, EngineError
from toolkit.export.permutation import match_permutation

from .conftest import run_cli


def _agree(a, b, n):
    for i in range(n):
        m = match_permutation({k: v[i] for k, v in a.items()}, {k: v[i] for k, v in b.items()})
        assert m.compared > 50 and m.label_mismatches == 0 and m.max_box_diff < 0.05 and m.max_score_diff < 1e-4


def test_load_picks_backend_from_file_and_module(tiny_onnx, tiny_model):
    assert toolkit.load(tiny_onnx, device="cpu").backend == "onnxruntime"
    assert toolkit.load(tiny_model, device="cpu").backend == "torch"
    assert toolkit.load("tiny", device="cpu").backend == "torch"  # a config name builds the model
    assert isinstance(toolkit.load(tiny_onnx, device="cpu"), toolkit.Engine)


def test_int64_and_int32_sizes_give_the_same_correct_boxes(tiny_onnx, tiny_model, sample_images):
    images, sizes = sample_images
    engine = toolkit.load(tiny_onnx, device="cpu")
    a = engine(images=images, orig_target_sizes=sizes)
    b = engine(images=images, orig_target_sizes=sizes.to(torch.int32))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = toolkit.load(tiny_model, device="cpu")(images=images, orig_target_sizes=sizes)
    _agree(ref, a, 2)
    assert set(a) == {"labels", "boxes", "scores"} and a["boxes"].dtype == torch.float32


def test_int64_engine_input_from_int32_file(tiny_onnx_int32, tiny_onnx, sample_images):
    """The int32-declared file and the int64 one agree whatever the caller passes."""
    images, sizes = sample_images
    a = toolkit.load(tiny_onnx_int32, device="cpu")(images=images, orig_target_sizes=sizes)
    b = toolkit.load(tiny_onnx, device="cpu")(images=images, orig_target_sizes=sizes.int())
    _agree(a, b, 2)
    with pytest.raises(BindingError, match="engine expects int32 \\[N,2\\] on cpu, got int64"):
        toolkit.load(tiny_onnx_int32, device="cpu", cast="none")(images=images, orig_target_sizes=sizes)


def test_outputs_are_the_buffers_the_caller_allocated(tiny_onnx, sample_images):
    images, sizes = sample_images
    engine = toolkit.load(tiny_onnx, device="cpu")
    outs = {"labels": torch.empty(2, 100, dtype=torch.int64), "boxes": torch.empty(2, 100, 4), "scores": torch.empty(2, 100)}
    ptrs = {k: v.data_ptr() for k, v in outs.items()}
    got = engine.infer({"images": images, "orig_target_sizes": sizes}, outputs=outs)
    assert {k: v.data_ptr() for k, v in got.items()} == ptrs
    assert torch.equal(got["boxes"], engine(images=images, orig_target_sizes=sizes)["boxes"])


def test_threads_share_one_engine(tiny_onnx, sample_images):
    images, sizes = sample_images
    engine = toolkit.load(tiny_onnx, device="cpu")
    expected = engine(images=images, orig_target_sizes=sizes)["boxes"]
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(engine(images=images, orig_target_sizes=sizes)["boxes"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12 and all(torch.equal(r, expected) for r in results)


def test_torch_engine_runs_without_gradients(tiny_model, sample_images):
    images, sizes = sample_images
    out = toolkit.load(tiny_model, device="cpu")(images=images.requires_grad_(False), orig_target_sizes=sizes)
    assert not out["boxes"].requires_grad


@pytest.mark.parametrize("content", [b"", b"this is not onnx"])
def test_not_an_onnx_file(tmp_path, content):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(EngineError, match="bad.onnx"):
        toolkit.load(p, device="cpu")


def test_missing_engine_file_and_wrong_backend(tmp_path, tiny_onnx):
    with pytest.raises(EngineError, match="no such file"):
        toolkit.load(tmp_path / "m.onnx")
    with pytest.raises(EngineError, match="is a onnxruntime file; it cannot be loaded by the tensorrt backend"):
        toolkit.load(tiny_onnx, backend="tensorrt")


def test_run_cli_writes_coco_results_and_pictures(tiny_onnx, tmp_path):
    from torchvision.io import write_png

    from toolkit.export.verify import verification_images

    imgs = (verification_images(2, (96, 160), seed=3) * 255).to(torch.uint8)
    for i, im in enumerate(imgs):
        write_png(im, str(tmp_path / f"img{i}.png"))
    out = tmp_path / "out"
    r = run_cli("run", str(tiny_onnx), str(tmp_path), "-o", str(out), "--score-threshold", "0.0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    records = json.loads((out / "detections.json").read_text())
    assert {rec["file_name"] for rec in records} == {"img0.png", "img1.png"}
    rec = records[0]
    assert set(rec) == {"image_id", "category_id", "bbox", "score", "file_name"} and len(rec["bbox"]) == 4
    assert 0 <= rec["category_id"] < 4 and 0.0 <= rec["score"] <= 1.0
    assert (out / "img0.det.png").is_file() and (out / "img1.det.png").is_file()
    # COCO bbox [x,y,w,h] agrees with the engine's xyxy boxes for the same image
    engine = toolkit.load(tiny_onnx, device="cpu")
    from toolkit.tasks.run import infer_images

    dets = infer_images(engine, [tmp_path / "img0.png"])[0]
    x1, y1, x2, y2 = dets.boxes_xyxy[0].tolist()
    first = [r for r in records if r["image_id"] == 1][0]
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)


def test_run_cli_refuses_a_non_image(tiny_onnx, tmp_path):
    (tmp_path / "a.png").write_text("nope")
    r = run_cli("run", str(tiny_onnx), str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--device", "cpu")
    assert r.returncode == 2 and "not a readable image" in r.stderr
