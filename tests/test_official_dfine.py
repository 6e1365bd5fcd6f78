"""Official D-FINE checkpoints (Peterande/D-FINE ``.pth``): key remap, config inference, loader, parity (no downloads).

tests/data/official_dfine/dfine_*.json list the official models' state-dict names, shapes and dtypes, read from
the official model code (each file's ``source``). Synthetic checkpoints built from them stand in for the real
weights; ``dfine_n_outputs.json`` holds what the official code (deploy mode, official postprocessor) computed
on such weights, the reference the transformers model must reproduce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from tests.official_dfine_data import MANIFESTS, manifest, parity_image, synthetic_state
from toolkit.errors import CheckpointError
from toolkit.export.permutation import match_permutation
from toolkit.models.config import build_model
from toolkit.models.loading import load_model
from toolkit.models.official_dfine import DFINE_CONFIGS, dfine_key, infer_config, looks_dfine, plan_load


def meta_state(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta") for k, v in manifest(name)["tensors"].items()}


@dataclass
class NotATensor:  # a pickled object: needs weights_only=False, which the toolkit refuses
    value: int = 1


@pytest.mark.parametrize("name", DFINE_CONFIGS)
def test_manifest_remaps_completely(name):
    state = meta_state(name)
    assert looks_dfine(state)
    with torch.device("meta"):
        model = build_model(name).model
    _, report = plan_load(model, state, name)
    assert report.complete, report.summary()
    assert report.num_classes == 80
    # only BatchNorm step counters of the frozen backbone, the anchors and the decoder's duplicate buffers stay out
    assert all(k.endswith("num_batches_tracked") or k in ("decoder.anchors", "decoder.valid_mask", "decoder.up", "decoder.reg_scale")
               for k in report.ignored), report.ignored
    assert report.loaded == len({id(t) for t in model.state_dict(keep_vars=True).values()})


@pytest.mark.parametrize("name", ["dfine_n", "dfine_x"])
def test_config_is_inferred_from_the_weights(name):
    assert infer_config(meta_state(name)) == name


def test_rules_pinned():
    assert dfine_key("backbone.stem.stem2a.bn.running_var") == ["model.backbone.model.embedder.stem2a.normalization.running_var"]
    assert dfine_key("backbone.stages.2.blocks.0.layers.1.conv2.lab.scale") == [
        "model.backbone.model.encoder.stages.2.blocks.0.layers.1.conv2.lab.scale"]
    assert dfine_key("encoder.fpn_blocks.0.cv2.0.bottlenecks.1.conv1.conv.weight") == [
        "model.encoder.fpn_blocks.0.csp_rep1.bottlenecks.1.conv1.conv.weight"]
    assert dfine_key("encoder.downsample_convs.1.0.cv2.norm.bias") == ["model.encoder.downsample_convs.1.conv2.norm.bias"]
    assert dfine_key("decoder.decoder.layers.0.self_attn.in_proj_weight") == [
        f"model.decoder.layers.0.self_attn.{x}_proj.weight" for x in "qkv"]
    assert dfine_key("decoder.dec_score_head.2.bias") == ["model.decoder.class_embed.2.bias", "class_embed.2.bias"]
    assert dfine_key("decoder.enc_output.proj.weight") == ["model.enc_output.0.weight"]
    assert dfine_key("decoder.anchors") is None


def test_inconclusive_weights_are_refused():
    state = meta_state("dfine_n")
    del state["decoder.dec_score_head.0.weight"]  # an incomplete checkpoint fits no config completely
    with pytest.raises(CheckpointError, match="cannot decide"):
        infer_config(state)


def test_checkpoint_holding_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"decoder.decoder.lqe_layers.0.w": torch.zeros(1)}, "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError):
        load_model(path)


@pytest.fixture(scope="module")
def dfine_n_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("official_dfine") / "dfine_n.pth"
    torch.save({"model": synthetic_state("dfine_n"), "last_epoch": 159}, path)
    return path


@pytest.mark.slow
def test_load_and_reproduce_the_official_outputs(dfine_n_checkpoint):
    model = load_model(dfine_n_checkpoint)  # no config: inferred
    assert model.name == "dfine_n" and model.load_report.complete, model.load_report.summary()
    ref = json.loads((MANIFESTS / "dfine_n_outputs.json").read_text())
    with torch.inference_mode():
        raw = model.model(pixel_values=parity_image())
        labels, boxes, scores = model(parity_image(), torch.tensor([[640, 480]]))
    assert torch.allclose(raw.logits[0, :5, :5], torch.tensor(ref["pred_logits_first"]), atol=1e-4)
    assert torch.allclose(raw.pred_boxes[0, :5], torch.tensor(ref["pred_boxes_first"]), atol=1e-5)
    got = {"labels": labels[0], "boxes": boxes[0], "scores": scores[0]}
    want = {"labels": torch.tensor(ref["labels"]), "boxes": torch.tensor(ref["boxes"]), "scores": torch.tensor(ref["scores"])}
    m = match_permutation(want, got, score_band=1e-5)  # equal scores may come in either order
    assert m.compared >= 290 and m.label_mismatches == 0, m  # all but the top-K boundary band
    assert m.max_box_diff < 0.01 and m.max_score_diff < 1e-5, m
