"""Parity with the official lyuwenyu/RT-DETR code, per zoo variant, on seeded weights.

``tests/data/official_outputs/VARIANT.json`` holds what the OFFICIAL model code computed (``tools/official_parity.py``:
the official YAML, the official deploy model and postprocessor, float64) for the seeded official-format state dict of
:mod:`toolkit.testing.official_weights`. Here that state dict is rebuilt without the official code (its sha256 must
be the one the official model ran), loaded through the toolkit's remap with the config inferred from the weights and
the official file name, and its deploy outputs must match the official ones: in torch (fp32, and float64 as the
exactness proof) and in ONNX Runtime after export. Detections are matched up to a permutation of near-equal
scores. Discrete-sampling (``_dsp``) variants get the tolerance of :mod:`toolkit.export.discrete` on top of fp32's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from toolkit.export.discrete import flip_spread, is_discrete
from toolkit.export.onnx import _resize_model, export_onnx
from toolkit.export.permutation import match_permutation
from toolkit.models.official import load_official_checkpoint
from toolkit.testing.official_weights import (ANCHOR_KEYS, official_anchors, official_state_dict, parity_inputs, read_manifest,
                                             state_sha256)

DATA = Path(__file__).parent / "data" / "official_outputs"
MANIFESTS = Path(__file__).parent / "data" / "official_manifests"
VARIANTS = sorted(p.stem for p in DATA.glob("*.json"))
FAST = {"rtdetr_r18vd", "rtdetrv2_r18vd", "rtdetrv2_r18vd_dsp", "rtdetrv2_r18vd_sp1"}  # the rest: marked slow
MIN_GAP = 3e-4  # the least selection gap (logits) a record may have: 20x the fp32 noise of the selection scores


def _params(fast: set[str]) -> list:
    return [pytest.param(v, marks=() if v in fast else pytest.mark.slow) for v in VARIANTS]


_CACHE: dict[str, tuple] = {}


def official_anchors_f64(size):
    """The anchor buffers computed in float64, then float32: the reference for the float32 computation."""
    import torch

    with torch.no_grad():
        anchors, valid = official_anchors(size)
        h, w = size
        levels = []
        for lvl, s in enumerate((8, 16, 32)):
            fh, fw = int(h / s), int(w / s)
            gy, gx = torch.meshgrid(torch.arange(fh), torch.arange(fw), indexing="ij")
            xy = (torch.stack([gx, gy], -1).unsqueeze(0) + 0.5).double() / torch.tensor([fw, fh], dtype=torch.float64)
            levels.append(torch.cat([xy, torch.ones_like(xy) * 0.05 * 2.0 ** lvl], -1).reshape(-1, fh * fw, 4))
        a = torch.cat(levels, 1)
        logit = torch.where(valid, torch.log(a / (1 - a)), torch.inf).float()
    return logit, valid


def variant(name: str):
    """(record, fp32 model at the record's input size, images, orig_target_sizes, tolerances); built once per variant."""
    if name not in _CACHE:
        rec = json.loads((DATA / f"{name}.json").read_text())
        size = tuple(rec["input_size"])
        state = official_state_dict(read_manifest(MANIFESTS / f"{rec['manifest']}.json"), rec["seed"], size)
        # the seeded tensors are what the official model ran; the anchors are computed from the input size, and
        # their last bit follows the CPU's float32 log (it moved between torch builds), so they are checked by value
        random_part = {k: v for k, v in state.items() if k not in ANCHOR_KEYS}
        assert state_sha256(random_part) == rec["random_state_sha256"], "not the weights the official model ran"
        for key, got in zip(ANCHOR_KEYS, official_anchors_f64(size)):
            if key in state:
                assert state[key].dtype == got.dtype and torch.equal(torch.isinf(state[key]), torch.isinf(got))
                torch.testing.assert_close(state[key][~torch.isinf(got)], got[~torch.isinf(got)], atol=1e-5, rtol=0)
        file_name = Path(rec["official"]["yaml"]).stem + ".pth"  # as the official zoo names its checkpoints
        model = load_official_checkpoint(state, name=file_name)  # config inferred from the weights (and, for _dsp, the name)
        assert model.name == name and model.load_report.complete, model.load_report.summary()
        model = _resize_model(model, size)  # a resized copy
        images, sizes = parity_inputs(rec["image_seed"], size, rec["orig_target_sizes"])
        box_tol = 1e-4 * max(*size, *(max(s) for s in rec["orig_target_sizes"])) + 0.01  # verify's fp32 tolerance
        score_tol, labels_tol = 1e-4, 0
        if is_discrete(model):
            spread_box, spread_score, spread_labels = flip_spread(model, images, sizes)
            box_tol, score_tol, labels_tol = box_tol + 2 * spread_box, score_tol + 2 * spread_score, 2 * spread_labels
        _CACHE[name] = (rec, model, images, sizes, (box_tol, score_tol, labels_tol))
    return _CACHE[name]


def assert_official(rec: dict, labels, boxes, scores, tol: tuple[float, float, int], what: str) -> None:
    box_tol, score_tol, labels_tol = tol
    for i, ref in enumerate(rec["outputs"]):
        official = {k: torch.tensor(v) for k, v in ref.items()}
        m = match_permutation(official, {"labels": torch.as_tensor(labels[i]), "boxes": torch.as_tensor(boxes[i]),
                                         "scores": torch.as_tensor(scores[i])}, score_band=0.0)
        # the official top-K is a prefix of our 300: no boundary to exclude (band 0 leaves out only the K-th itself)
        assert m.compared >= rec["top_k"] - 1, f"{what}: only {m.compared} official detections compared"
        assert m.label_mismatches <= labels_tol, f"{what} image {i}: {m}"
        assert m.max_box_diff <= box_tol and m.max_score_diff <= score_tol, f"{what} image {i}: {m} (tol box {box_tol:.3g}, score {score_tol:.3g})"


@pytest.mark.parametrize("name", _params(FAST))
def test_torch_matches_official(name):
    rec, model, images, sizes, tol = variant(name)
    captured = {}
    handle = model.model.model.enc_score_head.register_forward_hook(lambda _m, _i, out: captured.__setitem__("s", out))
    with torch.inference_mode():
        labels, boxes, scores = model(images, sizes)
    handle.remove()
    ordered = captured["s"].max(-1).values.sort(dim=1, descending=True).values
    gap = (ordered[:, model.model.config.num_queries - 1] - ordered[:, model.model.config.num_queries]).min().item()
    assert rec["selection_gap"] >= MIN_GAP and gap >= MIN_GAP / 2, f"tied selection: {gap}"  # the comparison means something
    assert_official(rec, labels, boxes, scores, tol, "torch fp32")
    # float64: the remapped model computes the official function itself, to the fp32 rounding of the postprocess
    with torch.inference_mode():  # on a copy: the fp32 model stays cached for the ONNX Runtime test
        labels64, boxes64, scores64 = copy.deepcopy(model).double()(images.double(), sizes)
    assert_official(rec, labels64, boxes64, scores64, (1e-3, 1e-6, 0), "torch float64")


@pytest.mark.parametrize("name", _params(set()))
def test_onnxruntime_matches_official(name, tmp_path):
    import onnxruntime as ort

    rec, model, images, sizes, tol = variant(name)
    # one export per variant; a discrete-sampling model must also pass the export's own verify
    result = export_onnx(model, tmp_path / f"{name}.onnx", verify=is_discrete(model))
    assert result.verify is None or result.verify.ok, result.verify.summary()
    if name.endswith("_m"):
        assert any("decoder layers 4-6 not loaded" in n for n in result.lints), result.lints
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    labels, boxes, scores = session.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    assert_official(rec, labels, boxes, scores, tol, "ONNX Runtime fp32")
