"""The synthetic shapes dataset, the COCO evaluator (checked against an independent reference) and the trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from toolkit.data import CLASS_NAMES, ShapesDataset, coco_dict, make_shapes_dataset, render_sample

pytest.importorskip("faster_coco_eval")


def test_dataset_deterministic_by_seed(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", 2, 3, seed=5, size=96)
    b = make_shapes_dataset(tmp_path / "b", 2, 3, seed=5, size=96)
    c = make_shapes_dataset(tmp_path / "c", 2, 3, seed=6, size=96)
    for split in ("train", "val"):
        assert (a.root / f"{split}.json").read_bytes() == (b.root / f"{split}.json").read_bytes()
        for f in sorted((a.root / split).iterdir()):
            assert f.read_bytes() == (b.root / split / f.name).read_bytes()
    assert (a.root / "val.json").read_bytes() != (c.root / "val.json").read_bytes()
    assert (a.root / "val/000000.png").read_bytes() != (c.root / "val/000000.png").read_bytes()
    img_train, _ = render_sample(5, 0, 96, "train")
    img_val, _ = render_sample(5, 0, 96, "val")
    assert not np.array_equal(img_train, img_val)  # the splits are distinct streams
    im, t = ShapesDataset(3, seed=5, size=96, split="val")[0]
    assert im.dtype == torch.uint8 and im.shape == (3, 96, 96)
    assert np.array_equal(im.permute(1, 2, 0).numpy(), render_sample(5, 0, 96, "val")[0])


def test_annotations_valid(tmp_path):
    paths = make_shapes_dataset(tmp_path, 0, 12, seed=1, size=(80, 120))
    gt = json.loads(paths.val_json.read_text())
    assert [c["id"] for c in gt["categories"]] == list(range(len(CLASS_NAMES)))
    assert [c["name"] for c in gt["categories"]] == CLASS_NAMES
    assert len(gt["images"]) == 12 and len(gt["annotations"]) >= 12
    ids = {im["id"]: im for im in gt["images"]}
    seen = set()
    for a in gt["annotations"]:
        im = ids[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert (im["height"], im["width"]) == (80, 120)
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"] and w >= 6 and h >= 6
        assert a["iscrowd"] == 0 and 0 < a["area"] <= w * h and a["category_id"] in range(4)
        seen.add(a["category_id"])
    assert len(seen) >= 3
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])


# --- an independent COCO AP reference (pycocotools' algorithm, area "all", maxDets 100, no crowd) ---

def _iou(a, b):
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0.0, min(ax1, bx1) - max(a[0], b[0])), max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def reference_map(gt, results):
    thresholds = np.linspace(0.5, 0.95, 10)
    recall_pts = np.linspace(0, 1, 101)
    aps = np.full((len(thresholds), len(gt["categories"])), -1.0)
    for ci, cat in enumerate(c["id"] for c in gt["categories"]):
        gts = {im["id"]: [a["bbox"] for a in gt["annotations"] if a["image_id"] == im["id"] and a["category_id"] == cat] for im in gt["images"]}
        n_gt = sum(map(len, gts.values()))
        if n_gt == 0:
            continue
        for ti, thr in enumerate(thresholds):
            scored = []  # (score, tp) over all images
            for img_id, g in gts.items():
                dets = sorted((r for r in results if r["image_id"] == img_id and r["category_id"] == cat), key=lambda r: -r["score"])[:100]
                used = [False] * len(g)
                for d in dets:
                    best, m = min(thr, 1 - 1e-10), -1
                    for gi, gb in enumerate(g):
                        if used[gi]:
                            continue
                        iou = _iou(d["bbox"], gb)
                        if iou < best:
                            continue
                        best, m = iou, gi
                    if m >= 0:
                        used[m] = True
                    scored.append((d["score"], m >= 0))
            scored.sort(key=lambda s: -s[0])
            tp = np.cumsum([s[1] for s in scored])
            fp = np.cumsum([not s[1] for s in scored])
            rc = tp / n_gt if len(scored) else np.zeros(0)
            pr = tp / np.maximum(tp + fp, np.spacing(1)) if len(scored) else np.zeros(0)
            pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr
            idx = np.searchsorted(rc, recall_pts, side="left")
            q = np.array([pr[i] if i < len(pr) else 0.0 for i in idx])
            aps[ti, ci] = q.mean()
    valid = aps[aps > -1]
    return float(valid.mean()) if valid.size else 0.0, float(aps[0][aps[0] > -1].mean())


@pytest.fixture(scope="module")
def small_gt():
    ds = ShapesDataset(10, seed=3, size=128, split="val")
    samples = []
    for i in range(len(ds)):
        _, t = ds[i]
        samples.append((f"{i}.png", (128, 128), {"boxes": t["boxes"].numpy(), "labels": t["labels"].numpy(), "areas": t["area"].numpy()}))
    return coco_dict(samples, CLASS_NAMES)


def _gt_as_results(gt, shift=0.0, score=1.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": score,
             "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], a["bbox"][2], a["bbox"][3]]} for a in gt["annotations"]]


def test_evaluator_sanity(small_gt):
    from toolkit.tasks.evaluate import coco_map

    perfect = coco_map(small_gt, _gt_as_results(small_gt))
    assert perfect == {"mAP": 1.0, "mAP50": 1.0, "mAP75": 1.0}
    shifted = coco_map(small_gt, _gt_as_results(small_gt, shift=0.5))  # IoU 1/3: below every threshold
    assert shifted["mAP"] < 0.05 and shifted["mAP50"] < 0.05
    assert coco_map(small_gt, []) == {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0}
    assert reference_map(small_gt, _gt_as_results(small_gt))[0] == pytest.approx(1.0)


def test_evaluator_matches_independent_reference(small_gt):
    """Noisy boxes, wrong classes, duplicates and false positives: faster-coco-eval == the reference above."""
    from toolkit.tasks.evaluate import coco_map

    rng = np.random.default_rng(0)
    results = []
    for a in small_gt["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(int(rng.integers(0, 3))):  # 0 (a miss), 1 or 2 (a duplicate) detections per object
            j = rng.normal(0, 0.06, 4)
            cat = a["category_id"] if rng.random() > 0.15 else int(rng.integers(0, 4))
            results.append({"image_id": a["image_id"], "category_id": cat, "score": float(rng.random()),
                            "bbox": [x + j[0] * w, y + j[1] * h, w * (1 + j[2]), h * (1 + j[3])]})
    for im in small_gt["images"]:  # background false positives
        for _ in range(3):
            results.append({"image_id": im["id"], "category_id": int(rng.integers(0, 4)), "score": float(rng.random()),
                            "bbox": [float(rng.uniform(0, 100)), float(rng.uniform(0, 100)), 20.0, 20.0]})
    got = coco_map(small_gt, results)
    ref_map, ref_map50 = reference_map(small_gt, results)
    assert 0.1 < got["mAP"] < 0.9, (got, ref_map)
    assert got["mAP"] == pytest.approx(ref_map, abs=1e-4)
    assert got["mAP50"] == pytest.approx(ref_map50, abs=1e-4)


def test_evaluate_tiny_on_torch_and_onnxruntime(tiny_model, tmp_path):
    from toolkit.tasks.evaluate import evaluate

    make_shapes_dataset(tmp_path, 0, 6, seed=9, size=128)
    report = evaluate(tiny_model, data_dir=tmp_path, backends=("torch", "onnxruntime"), device="cpu")
    assert [r.backend for r in report.rows] == ["torch", "onnxruntime"]
    for r in report.rows:
        assert r.error is None and 0.0 <= r.mAP <= 1.0 and r.images_per_second > 0
    assert report.num_images == 6
    assert report.agree and "agree" in report.message  # random weights: both near 0, within 0.5 points
    assert "onnxruntime" in report.table()


def test_train_steps_record_and_resume(tmp_path):
    from toolkit.models.loading import load_model
    from toolkit.tasks.train import main

    out = tmp_path / "run"
    assert main(["--config", "tiny", "--out", str(out), "--max-steps", "3", "--batch-size", "2", "--seconds", "300",
                 "--reserve", "0", "--eval-images", "2", "--log-every", "1", "--device", "cpu", "--no-progress"]) == 0
    rec = json.loads((out / "train_record.json").read_text())
    assert rec["steps"] == 3 and len(rec["loss_curve"]) == 3 and rec["runs"][0]["seed"] == 0
    assert "toolkit.tasks.train" in rec["runs"][0]["command"] and "mAP" in rec["eval"]
    assert all(np.isfinite(c["loss"]) for c in rec["loss_curve"])
    assert (out / "loss.png").is_file() or "plot" in rec
    model = load_model(str(out / "model"))  # fp16 on disk, fp32 when loaded
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert main(["--resume", str(out), "--max-steps", "5", "--seconds", "300", "--reserve", "0", "--eval-images", "0",
                 "--device", "cpu", "--no-progress"]) == 0
    rec = json.loads((out / "train_record.json").read_text())
    assert rec["steps"] == 5 and [(r["step_start"], r["step_end"]) for r in rec["runs"]] == [(0, 3), (3, 5)]
    assert rec["runs"][1]["resumed_from"] == str(out) and rec["runs"][1]["batch_size"] == 2
