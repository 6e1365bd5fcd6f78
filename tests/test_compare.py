"""compare / sentinels / validate / bisect / reference bundles on the tiny model (CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import toolkit
from toolkit.checks.matching import Thresholds
from toolkit.checks.compare import compare
from toolkit.checks.sides import synthetic_images
from toolkit.errors import ComparisonError

from .conftest import run_cli


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    synthetic_images(d)
    return d


@pytest.fixture(scope="module")
def results(tiny_onnx, images_dir, tmp_path_factory) -> list[dict]:
    """COCO records of the tie-free tiny model, written by toolkit.tasks.run.run."""
    from toolkit.tasks.run import run

    out = run(tiny_onnx, [images_dir], tmp_path_factory.mktemp("run"), draw_images=False)
    return json.loads(out.results_path.read_text())


def write_results(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def compare_edited(results, images_dir, tmp_path, edit, **kwargs):
    good = write_results(tmp_path / "a" / "detections.json", results)
    bad = write_results(tmp_path / "b" / "detections.json", edit([dict(r, bbox=list(r["bbox"])) for r in results]))
    return compare(good, bad, images_dir, **kwargs)


def test_identical_onnx_agree_via_cli(tiny_onnx, tmp_path):
    proc = run_cli("compare", str(tiny_onnx), str(tiny_onnx), "--report", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["ok"] and report["verdict"] == "agree" and report["sentinels"] == []
    assert {"image", "matched_fraction", "iou_min", "iou_median", "shift_median_px", "ok"} <= set(report["images"][0])
    assert (tmp_path / "rep" / "report.md").is_file()


def test_ort_vs_torch_agree_and_bundle_round_trip(tiny_model, tiny_onnx, tmp_path):
    engine = toolkit.load(tiny_model, device="cpu")
    report = compare(engine, tiny_onnx, save_reference_dir=tmp_path / "ref")
    assert report.ok, report.summary()
    assert report.images and all(s.shift_median_px < 0.01 for s in report.images if s.shift_median_px is not None)
    report.raise_for_failure()
    meta = json.loads((tmp_path / "ref" / "reference.json").read_text())
    assert meta["backend"] == "torch" and len(meta["images"]) == 4
    replay = compare(tmp_path / "ref", tiny_onnx)
    assert replay.ok, replay.summary()


def test_zero_y_results_fail_via_cli(results, images_dir, tmp_path):
    good = write_results(tmp_path / "a" / "detections.json", results)
    zeroed = [dict(r, bbox=[r["bbox"][0], 0.0, r["bbox"][2], 0.0]) for r in results]
    bad = write_results(tmp_path / "b" / "detections.json", zeroed)
    proc = run_cli("compare", str(good), str(bad), "--images", str(images_dir), "--report", str(tmp_path / "rep"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "every y coordinate is 0. orig_target_sizes was probably read with the wrong dtype" in proc.stdout
    assert list((tmp_path / "rep" / "images").glob("*.compare.png"))


def test_subpixel_jitter_passes(results, images_dir, tmp_path):
    gen = torch.Generator().manual_seed(0)

    def jitter(recs):
        for r in recs:
            r["bbox"] = [v + float(d) for v, d in zip(r["bbox"], torch.empty(4).uniform_(-0.2, 0.2, generator=gen))]
        return recs
    report = compare_edited(results, images_dir, tmp_path, jitter)  # x2 = x + w moves by up to 0.4 px
    assert report.ok, report.summary()


def test_two_px_shift_fails(results, images_dir, tmp_path):
    def shift(recs):
        for r in recs:
            r["bbox"][0] += 2.0
        return recs
    report = compare_edited(results, images_dir, tmp_path, shift)
    assert not report.ok and report.verdict == "disagree"
    assert "moved by 2.00 px" in report.summary()
    with pytest.raises(ComparisonError, match="moved by"):
        report.raise_for_failure()


def test_swapped_label_is_a_label_disagreement(results, images_dir, tmp_path):
    top = max(range(len(results)), key=lambda i: results[i]["score"])

    def swap(recs):
        recs[top]["category_id"] = (recs[top]["category_id"] + 1) % 4
        return recs
    report = compare_edited(results, images_dir, tmp_path, swap)
    assert not report.ok
    assert sum(s.label_disagreements for s in report.images) >= 1
    assert "label disagreement" in report.summary()


def test_dropped_confident_detection_fails(results, images_dir, tmp_path):
    top = max(range(len(results)), key=lambda i: results[i]["score"])
    report = compare_edited(results, images_dir, tmp_path, lambda recs: recs[:top] + recs[top + 1:])
    assert not report.ok and "A has 1 confident detection(s) the other backend lacks" in report.summary()


def test_dropped_detection_near_threshold_is_tolerated(results, images_dir, tmp_path):
    low = min(range(len(results)), key=lambda i: results[i]["score"])
    threshold = results[low]["score"] - 0.01  # the dropped one is within the score margin of the threshold
    report = compare_edited(results, images_dir, tmp_path, lambda recs: recs[:low] + recs[low + 1:], score_threshold=threshold)
    assert report.ok, report.summary()
    assert sum(s.near_threshold for s in report.images) == 1


def test_nan_scores_fire_a_sentinel(results, images_dir, tmp_path):
    def nan(recs):
        recs[0]["score"] = math.nan
        return recs
    report = compare_edited(results, images_dir, tmp_path, nan)
    assert not report.ok
    assert any(f.check == "non_finite" and "NaN or Inf" in f.message for f in report.sentinels)


def test_random_weights_raise_no_false_alarm_and_no_false_pass(tmp_path):
    from toolkit.export.onnx import export_onnx
    from toolkit.models.config import build_model

    model = build_model("tiny", seed=0)  # untrained: the query selection is tied
    export_onnx(model, tmp_path / "random.onnx")
    report = compare(toolkit.load(model, device="cpu"), tmp_path / "random.onnx")
    assert report.verdict == "inconclusive" and not report.ok, report.summary()  # neither disagree nor a vacuous pass
    assert not report.sentinels
    assert any("too flat to judge" in n for n in report.notes)


def test_thresholds_catch_two_px_shift_of_a_small_box():
    from toolkit.checks.matching import match_image
    from toolkit.runtime.detections import Detections

    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [100.0, 50.0, 400.0, 350.0]])
    a = Detections(torch.tensor([0, 1]), boxes, torch.tensor([0.9, 0.8]))
    for shift, ok in ((0.4, True), (2.0, False)):
        b = Detections(a.labels, boxes + torch.tensor([shift, 0.0, shift, 0.0]), a.scores)
        assert match_image("x", a, b, 0.3, Thresholds(), (640, 480)).ok is ok


def test_validate_names_the_first_broken_stage(tiny_model, tmp_path):
    from toolkit.checks.validate import validate

    def shift(out):
        return {**out, "boxes": out["boxes"] + 3.0}
    report = validate(tiny_model, ("torch", "onnxruntime", "tensorrt"), workdir=tmp_path, perturb={"onnxruntime": shift})
    assert report.first_failure == "onnxruntime" and not report.ok
    status = {s.name: s.status for s in report.stages}
    assert status["preprocess"] == "pass" and status["torch"] == "pass"
    assert status["tensorrt"] in ("skipped", "fail", "pass")
    files = report.write(tmp_path / "rep")
    assert json.loads(files[0].read_text())["first_failure"] == "onnxruntime"


def test_bisect_finds_the_first_perturbed_node(tiny_onnx, tmp_path):
    import onnx
    from onnx import numpy_helper

    from toolkit.checks.bisect import bisect_onnx

    model = onnx.load(str(tiny_onnx))
    inits = {i.name: i for i in model.graph.initializer}
    conv = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits][3]
    w = numpy_helper.to_array(inits[conv.input[1]])
    inits[conv.input[1]].CopyFrom(numpy_helper.from_array(w * 1.5, conv.input[1]))
    onnx.save(model, str(tmp_path / "broken.onnx"))
    report = bisect_onnx(tiny_onnx, tmp_path / "broken.onnx")
    assert not report.ok and report.first.node == conv.name and report.first.op == "Conv", report.summary()
    assert bisect_onnx(tiny_onnx, tiny_onnx).ok


def test_zero_y_bug_through_the_tensorrt_double(tiny_onnx, tmp_path, monkeypatch):
    """TensorRT 8.6 narrows orig_target_sizes to int32: a raw int64 pointer gives every y = 0; the binder's path is fine."""
    from toolkit import dtypes
    from toolkit.builders.build import build_engine
    from toolkit.runtime.base import BaseEngine
    from toolkit.testing.fake_tensorrt import make_fake_tensorrt

    monkeypatch.setenv("RTDETR_DEPLOY_CACHE", str(tmp_path / "cache"))
    fake = make_fake_tensorrt(version="8.6")
    built = build_engine(tiny_onnx, tmp_path / "tiny.engine", backend="tensorrt", trt_module=fake, progress=False)
    engine = toolkit.load(built.path, backend="tensorrt", trt_module=fake)
    assert engine.signature.input("orig_target_sizes").dtype == "int32"

    class RawPointerEngine(BaseEngine):
        """The original bug: tensors bound by data_ptr() as they come, no binder."""

        backend = "tensorrt"

        def infer(self, feeds):
            ctx = engine._context()
            feeds = {k: v.contiguous() for k, v in feeds.items()}
            for name, t in feeds.items():
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
            outs = {s.name: torch.empty(tuple(ctx.get_tensor_shape(s.name)), dtype=dtypes.get(s.dtype).torch)
                    for s in self.signature.outputs}
            for name, t in outs.items():
                ctx.set_tensor_address(name, t.data_ptr())
            if not ctx.execute_async_v3(0):
                raise RuntimeError("execute_async_v3 failed")
            return outs

    raw = RawPointerEngine(engine.signature, engine.device, class_names=engine.class_names)
    broken = compare(tiny_onnx, raw)
    assert not broken.ok
    assert any(f.check == "zero_y" and f.message.startswith(
        "backend tensorrt: every y coordinate is 0. orig_target_sizes was probably read with the wrong dtype "
        "(engine expects int32, check the binding)") for f in broken.sentinels), broken.summary()
    fixed = compare(tiny_onnx, engine)
    assert fixed.ok, fixed.summary()


def test_tolerance_profile_follows_the_recorded_precision(shapes_onnx):
    """compare picks the profile of the lower precision the sides record and names it: the same shift of
    every box (0.4 px) is a defect between two fp32 files (fp32 profile) and rounding noise when a side is fp16."""
    import toolkit
    from tests.conftest import shifted_engine
    from toolkit.checks.compare import compare
    from toolkit.checks.matching import PROFILES

    ref = toolkit.load(shapes_onnx["int64"], device="cpu")
    assert ref.precision == "fp32"  # recorded by the export
    moved = shifted_engine(ref, 0.4)
    for precision, profile, verdict in (("fp32", "fp32", "disagree"), ("fp16", "fp16", "agree"), (None, "fp16", "agree"),
                                        ("int8", "int8", "agree")):
        moved.precision = precision
        report = compare(ref, moved)
        assert report.profile == profile and report.thresholds == PROFILES[profile], (precision, report.profile)
        assert report.verdict == verdict and report.compared >= 8, (precision, report.summary())
        assert f"the {profile} profile" in report.summary()
    given = compare(ref, moved, thresholds=PROFILES["fp32"])
    assert given.profile == "given" and given.verdict == "disagree"
