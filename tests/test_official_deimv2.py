"""Official DEIMv2 checkpoints (Intellindust-AI-Lab/DEIMv2 ``.pth``): key remap, config inference, loader, parity (no downloads).

tests/data/official_deimv2/deimv2_*.json list the official models' state-dict names, shapes and dtypes, written by
tools/official_deimv2.py from the official model code (each file's ``source``). Synthetic checkpoints built from
them stand in for the real weights; ``deimv2_atto_outputs.json`` holds what the official code (deploy mode, official
postprocessor) computed on such weights, the reference the transformers model (with the official structure) must
reproduce.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.official_deimv2_data import MANIFESTS, manifest, parity_image, synthetic_state
from tests.official_dfine_data import manifest as dfine_manifest
from toolkit.errors import CheckpointError
from toolkit.export.permutation import match_permutation
from toolkit.models.config import build_model
from toolkit.models.loading import load_model
from toolkit.models.official_deimv2 import deimv2_key, infer_config, looks_deimv2, official_structure, plan_load
from toolkit.models.official_dfine import looks_dfine

HGNETV2 = ("deimv2_atto", "deimv2_femto", "deimv2_pico", "deimv2_n")
DINOV3 = ("deimv2_s", "deimv2_m", "deimv2_l", "deimv2_x")


def meta_state(name: str, source=manifest) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta") for k, v in source(name)["tensors"].items()}


def _meta_model(name: str):
    with torch.device("meta"):
        return official_structure(build_model(name).model)


@pytest.mark.parametrize("name", HGNETV2)
def test_manifest_remaps_completely(name):
    state = meta_state(name)
    assert looks_deimv2(state)
    model = _meta_model(name)
    _, report = plan_load(model, state, name)
    assert report.complete, report.summary()
    assert not report.missing and not report.unexpected and not report.misshaped
    assert report.num_classes == 80
    # only BatchNorm step counters, the anchors and the decoder's duplicate buffers stay out
    assert all(k.endswith("num_batches_tracked") or k in ("decoder.anchors", "decoder.valid_mask", "decoder.up", "decoder.reg_scale")
               for k in report.ignored), report.ignored
    assert report.loaded == len({id(t) for t in model.state_dict(keep_vars=True).values()})


def test_dfine_and_deimv2_checkpoints_are_told_apart():
    dfine = meta_state("dfine_n", dfine_manifest)
    assert looks_dfine(dfine) and not looks_deimv2(dfine)
    assert looks_deimv2(meta_state("deimv2_atto")) and looks_deimv2(meta_state("deimv2_s"))


@pytest.mark.parametrize("name", ["deimv2_atto", "deimv2_n"])
def test_config_is_inferred_from_the_weights(name):
    assert infer_config(meta_state(name)) == name


def test_rules_pinned():
    assert deimv2_key("backbone.stem.stem1.bn.running_var") == ["model.conv_encoder.model.embedder.stem1.normalization.running_var"]
    assert deimv2_key("encoder.down_sample1.1.weight") == ["model.encoder.down_conv1.conv.weight"]
    assert deimv2_key("encoder.fpn_block.cv2.1.conv.weight") == ["model.encoder.fpn_block.csp_rep1.conv2.conv.weight"]
    assert deimv2_key("encoder.pan_blocks.0.cv4.norm.bias") == ["model.encoder.pan_blocks.0.conv2.norm.bias"]
    assert deimv2_key("decoder.decoder.layers.0.swish_ffn.w12.weight") == [
        "model.decoder.layers.0.mlp.gate_proj.weight", "model.decoder.layers.0.mlp.up_proj.weight"]
    assert deimv2_key("decoder.decoder.layers.2.norm3.scale") == ["model.decoder.layers.2.final_layer_norm.weight"]
    assert deimv2_key("decoder.decoder.layers.1.gateway.norm.scale") == ["model.decoder.layers.1.gateway.norm.weight"]
    assert deimv2_key("decoder.anchors") is None


def test_official_structure_matches_the_official_decoder():
    model = _meta_model("deimv2_atto")
    assert isinstance(model.model.enc_output, torch.nn.Identity)
    acts = {n: type(m.act).__name__ for n, m in model.named_modules() if type(m).__name__ == "Deimv2MLP"}
    # the official configs' mlp_act / activation (SiLU) where transformers hard-codes ReLU
    for name in ("model.enc_bbox_head", "model.decoder.pre_bbox_head", "model.decoder.bbox_embed.0", "model.decoder.lqe_layers.0.reg_conf"):
        assert "SiLU" in acts[name], (name, acts[name])
    assert "ReLU" not in acts["model.decoder.query_pos_head"]


@pytest.mark.parametrize("name", DINOV3)
def test_dinov3_checkpoints_are_refused_in_one_line(name):
    from toolkit.models.official_deimv2 import load_deimv2_checkpoint

    with pytest.raises(CheckpointError, match=r"DINOv3 checkpoint .* only the HGNetV2 ones .* are remapped") as e:
        load_deimv2_checkpoint(meta_state(name))
    assert "\n" not in str(e.value)


def test_inconclusive_weights_are_refused():
    state = meta_state("deimv2_atto")
    del state["decoder.dec_score_head.0.weight"]  # an incomplete checkpoint fits no config completely
    with pytest.raises(CheckpointError, match="cannot decide"):
        infer_config(state)


@pytest.fixture(scope="module")
def atto_reference():
    return json.loads((MANIFESTS / "deimv2_atto_outputs.json").read_text())


@pytest.fixture(scope="module")
def atto_checkpoint(tmp_path_factory, atto_reference):
    path = tmp_path_factory.mktemp("official_deimv2") / "deimv2_atto.pth"
    torch.save({"model": synthetic_state("deimv2_atto", atto_reference["seed"]), "last_epoch": 499}, path)
    return path


def test_load_and_reproduce_the_official_outputs(atto_checkpoint, atto_reference):
    ref = atto_reference
    model = load_model(atto_checkpoint)  # no config: inferred; DEIMv2 recognised before D-FINE
    assert model.name == "deimv2_atto" and model.load_report.complete, model.load_report.summary()
    image = parity_image(ref["input_size"][0])
    with torch.inference_mode():
        raw = model.model(pixel_values=image)
        labels, boxes, scores = model(image, torch.tensor(ref["orig_target_sizes"]))
    assert torch.allclose(raw.logits[0, :5, :5], torch.tensor(ref["pred_logits_first"]), atol=1e-4)
    assert torch.allclose(raw.pred_boxes[0, :5], torch.tensor(ref["pred_boxes_first"]), atol=1e-5)
    k = labels.shape[1]  # the config's top-K (100) of the official postprocessor's 300
    want = {"labels": torch.tensor(ref["labels"][:k]), "boxes": torch.tensor(ref["boxes"][:k]), "scores": torch.tensor(ref["scores"][:k])}
    m = match_permutation(want, {"labels": labels[0], "boxes": boxes[0], "scores": scores[0]}, score_band=1e-5)
    assert m.compared >= k - 2 and m.label_mismatches == 0, m  # all but the top-K boundary band
    assert m.max_box_diff < 1e-3 and m.max_score_diff < 1e-5, m


def test_an_official_deimv2_model_is_not_saved_as_a_hf_directory(atto_checkpoint, tmp_path):
    """transformers would rebuild its own Deimv2 structure from the directory (584 px off on Atto): refused, nothing written."""
    from toolkit.errors import ConfigError
    from toolkit.models.loading import save_model

    model = load_model(atto_checkpoint)
    with pytest.raises(ConfigError, match="official DEIMv2 checkpoint .* keep the .pth, or export it"):
        save_model(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_the_official_structure_survives_export(atto_checkpoint, tmp_path):
    """The patched decoder (query position embedding once, SiLU heads, no enc_output) is what the ONNX graph computes:
    the export (BatchNorm folded on a copy) verifies against the loaded torch model."""
    from toolkit.export.onnx import export_onnx

    result = export_onnx(load_model(atto_checkpoint), tmp_path / "atto.onnx")
    assert result.verify.verdict == "agree" and result.verify.ok, result.verify.summary()
