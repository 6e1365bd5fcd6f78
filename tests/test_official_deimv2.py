"""Official DEIMv2 checkpoints (Intellindust-AI-Lab/DEIMv2 ``.pth``): key remap, config inference, loader, parity (no downloads).

tests/data/official_deimv2/deimv2_*.json list the official models' state-dict names, shapes and dtypes, written by
tools/official_deimv2.py from the official model code (each file's ``source``). Synthetic checkpoints built from
them stand in for the real weights; ``deimv2_{atto,s,m,l,x}_outputs.json`` hold what the official code (deploy mode,
official postprocessor; the DINOv3 ones on the ImageNet-normalized image, as the official inference feeds them)
computed on such weights, the reference the transformers model (with the official structure) must reproduce.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.official_deimv2_data import MANIFESTS, manifest, normalized, parity_image, synthetic_state
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


# DINOv3 tensors not loaded as such: computed from the config and checked (RoPE periods), unused by detection and
# checked finite (mask_token), folded into the qkv bias (the key-bias mask)
DINOV3_NOT_LOADED = ("rope_embed.periods", "mask_token", "attn.qkv.bias_mask")


@pytest.mark.parametrize("name", HGNETV2 + DINOV3)
def test_manifest_remaps_completely(name):
    state = meta_state(name)
    assert looks_deimv2(state)
    model = _meta_model(name)
    _, report = plan_load(model, state, name)
    assert report.complete, report.summary()
    assert not report.missing and not report.unexpected and not report.misshaped
    assert report.num_classes == 80
    # only BatchNorm step counters, the anchors, the decoder's duplicate buffers and the DINOv3 buffers above stay out
    assert all(k.endswith("num_batches_tracked") or k in ("decoder.anchors", "decoder.valid_mask", "decoder.up", "decoder.reg_scale")
               or (k.startswith("backbone.dinov3.") and k.endswith(DINOV3_NOT_LOADED)) for k in report.ignored), report.ignored
    assert report.loaded == len({id(t) for t in model.state_dict(keep_vars=True).values()})
    if name in DINOV3:  # every official backbone tensor but those three lands in the model
        backbone = [k for k in state if k.startswith("backbone.")]
        assert backbone and all(k in report.ignored or k.endswith("num_batches_tracked") or deimv2_key(k) for k in backbone)


def test_dfine_and_deimv2_checkpoints_are_told_apart():
    dfine = meta_state("dfine_n", dfine_manifest)
    assert looks_dfine(dfine) and not looks_deimv2(dfine)
    assert looks_deimv2(meta_state("deimv2_atto")) and looks_deimv2(meta_state("deimv2_s"))


@pytest.mark.parametrize("name", ["deimv2_atto", "deimv2_n", *DINOV3])
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
    vit = "model.conv_encoder.backbone."
    # the official ViT-Tiny (S, M) under ``_model``, the official DINOv3 ViT (L, X) without
    assert deimv2_key("backbone.dinov3._model.blocks.3.attn.qkv.bias") == [
        vit + "model.layer.3.attention.q_proj.bias", vit + "model.layer.3.attention.k_proj.bias", vit + "model.layer.3.attention.v_proj.bias"]
    assert deimv2_key("backbone.dinov3._model.patch_embed.proj.weight") == [vit + "embeddings.patch_embeddings.weight"]
    assert deimv2_key("backbone.dinov3.storage_tokens") == [vit + "embeddings.register_tokens"]
    assert deimv2_key("backbone.dinov3.blocks.11.ls2.gamma") == [vit + "model.layer.11.layer_scale2.lambda1"]
    assert deimv2_key("backbone.dinov3.blocks.0.mlp.w1.weight") == [vit + "model.layer.0.mlp.gate_proj.weight"]
    assert deimv2_key("backbone.dinov3.blocks.0.mlp.w2.bias") == [vit + "model.layer.0.mlp.up_proj.bias"]
    assert deimv2_key("backbone.dinov3.blocks.0.attn.proj.weight") == [vit + "model.layer.0.attention.o_proj.weight"]
    assert deimv2_key("backbone.dinov3.norm.bias") == [vit + "norm.bias"]
    assert deimv2_key("backbone.sta.stem.1.running_var") == ["model.conv_encoder.spatial_tuning_adapter.stem_conv.norm.running_var"]
    assert deimv2_key("backbone.sta.conv3.1.weight") == ["model.conv_encoder.spatial_tuning_adapter.conv3.conv.weight"]
    assert deimv2_key("backbone.convs.2.weight") == ["model.conv_encoder.fusion_proj.2.conv.weight"]
    assert deimv2_key("backbone.norms.0.bias") == ["model.conv_encoder.fusion_proj.0.norm.bias"]
    assert deimv2_key("backbone.dinov3.rope_embed.periods") is None


def test_official_structure_matches_the_official_decoder():
    model = _meta_model("deimv2_atto")
    assert isinstance(model.model.enc_output, torch.nn.Identity)
    acts = {n: type(m.act).__name__ for n, m in model.named_modules() if type(m).__name__ == "Deimv2MLP"}
    # the official configs' mlp_act / activation (SiLU) where transformers hard-codes ReLU
    for name in ("model.enc_bbox_head", "model.decoder.pre_bbox_head", "model.decoder.bbox_embed.0", "model.decoder.lqe_layers.0.reg_conf"):
        assert "SiLU" in acts[name], (name, acts[name])
    assert "ReLU" not in acts["model.decoder.query_pos_head"]


def test_official_structure_matches_the_official_dinov3_backbones():
    """S, M: the official ViT-Tiny (no final norm, no layer scale, no register tokens, eps 1e-6, a key bias);
    L, X: the official DINOv3 ViT (norm on every feature map), X's SwiGLU with SiLU; mask_token out of the state dict."""
    for name in ("deimv2_s", "deimv2_x"):
        model = _meta_model(name)
        backbone = model.model.conv_encoder.backbone
        keys = model.state_dict()
        assert not any(k.endswith("embeddings.mask_token") for k in keys)
        layer = backbone.model.layer[0]
        if name == "deimv2_s":
            assert isinstance(backbone.norm, torch.nn.Identity) and isinstance(layer.layer_scale1, torch.nn.Identity)
            assert layer.norm1.eps == layer.norm2.eps == 1e-6 and layer.attention.k_proj.bias is not None
            assert not any(k.endswith("register_tokens") for k in keys)
        else:
            assert isinstance(backbone.norm, torch.nn.LayerNorm) and backbone.config.apply_layernorm
            assert isinstance(layer.mlp.act_fn, torch.nn.SiLU)


@pytest.mark.parametrize("name", ["deimv2_atto", "deimv2_s", "deimv2_l"])
def test_inconclusive_weights_are_refused(name):
    state = meta_state(name)
    del state["decoder.dec_score_head.0.weight"]  # an incomplete checkpoint fits no config completely
    with pytest.raises(CheckpointError, match="cannot decide"):
        infer_config(state)


@pytest.mark.parametrize("name", ["deimv2_s", "deimv2_x"])
def test_an_incomplete_dinov3_backbone_is_refused(name):
    state = meta_state(name)
    del state[next(k for k in state if ".blocks.5.attn.qkv.weight" in k)]
    with pytest.raises(CheckpointError, match="cannot decide"):
        infer_config(state)


def test_ambiguous_weights_are_refused(monkeypatch):
    """Two configs that both fit the weights completely: no guess, a refusal naming both."""
    import toolkit.models.official_deimv2 as official

    monkeypatch.setattr(official, "DEIMV2_CONFIGS", ("deimv2_s", "deimv2_m", "deimv2_s"))
    with pytest.raises(CheckpointError, match=r"several \(deimv2_s, deimv2_s\) .* cannot decide"):
        official.infer_config(meta_state("deimv2_s"))


@pytest.mark.parametrize("bad", ["periods", "bias_mask", "mask_token"])
def test_dinov3_buffers_the_model_cannot_hold_are_checked(bad):
    """What the loader computes instead of loading must be what the checkpoint holds: RoPE periods of the config's
    rope_theta, a finite key-bias mask (NaN unless pretrained DINOv3 weights were read) and a finite mask_token."""
    from toolkit.models.official_deimv2 import load_deimv2_checkpoint

    state = synthetic_state("deimv2_l", 0)
    suffix = {"periods": "rope_embed.periods", "bias_mask": "blocks.0.attn.qkv.bias_mask", "mask_token": "mask_token"}[bad]
    key = "backbone.dinov3." + suffix
    state[key] = state[key] * 2 if bad == "periods" else torch.full_like(state[key], float("nan"))
    with pytest.raises(CheckpointError, match=r"^the state dict: .*(RoPE periods|not finite)") as e:
        load_deimv2_checkpoint(state, config="deimv2_l")
    assert key in str(e.value) and "\n" not in str(e.value)


def _reference(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}_outputs.json").read_text())


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """name -> a .pth of the synthetic weights the official outputs of ``name`` were recorded on (written once)."""
    root, made = tmp_path_factory.mktemp("official_deimv2"), {}

    def make(name: str):
        if name not in made:
            made[name] = root / f"{name}.pth"
            torch.save({"model": synthetic_state(name, _reference(name)["seed"]), "last_epoch": 499}, made[name])
        return made[name]

    return make


@pytest.fixture(scope="module")
def atto_checkpoint(official_checkpoint):
    return official_checkpoint("deimv2_atto")


# Atto (HGNetV2, 320 px) and S (DINOv3 ViT-Tiny, 640 px) take a few seconds; M, L, X (640 px) more
PARITY = ["deimv2_atto", "deimv2_s", *(pytest.param(n, marks=pytest.mark.slow) for n in ("deimv2_m", "deimv2_l", "deimv2_x"))]


@pytest.mark.parametrize("name", PARITY)
def test_load_and_reproduce_the_official_outputs(name, official_checkpoint):
    ref = _reference(name)
    model = load_model(official_checkpoint(name))  # no config: inferred; DEIMv2 recognised before D-FINE
    assert model.name == name and model.load_report.complete, model.load_report.summary()
    image = parity_image(ref["input_size"][0])
    # the DINOv3 models take images in [0, 1] and normalize them once, inside the wrapper: the official model was
    # fed the normalized image (as the official inference does), the toolkit's the [0, 1] one
    assert ref.get("input_normalized", False) == (name in DINOV3)
    assert (model.preprocess.in_model_normalization is not None) == (name in DINOV3)
    with torch.inference_mode():
        logits, pred_boxes = model.raw(image)
        labels, boxes, scores = model(image, torch.tensor(ref["orig_target_sizes"]))
        if name in DINOV3:  # the bare transformers model on the normalized image computes the same: no second normalization
            bare = model.model(pixel_values=normalized(image))
            assert torch.equal(bare.logits, logits) and torch.equal(bare.pred_boxes, pred_boxes)
    assert torch.allclose(logits[0, :5, :5], torch.tensor(ref["pred_logits_first"]), atol=1e-4)
    assert torch.allclose(pred_boxes[0, :5], torch.tensor(ref["pred_boxes_first"]), atol=1e-5)
    k = labels.shape[1]  # the config's top-K (Atto 100, S..X 300) of the official postprocessor's 300
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
@pytest.mark.parametrize("name", ["deimv2_atto", "deimv2_s"])
def test_the_official_structure_survives_export(name, official_checkpoint, tmp_path):
    """The patched decoder (query position embedding once, SiLU heads, no enc_output) and, for S, the official ViT-Tiny
    backbone (no final norm, no layer scale, key bias, eps 1e-6) are what the ONNX graph computes: the export
    (BatchNorm folded on a copy) verifies against the loaded torch model, images in [0, 1] on both sides."""
    from toolkit.export.onnx import export_onnx

    result = export_onnx(load_model(official_checkpoint(name)), tmp_path / f"{name}.onnx")
    checks = result.verify.checks
    # synthetic weights can tie the query selection on one of the verify's images (S: one batch of four, selection
    # scores still within 1e-5): every batch agrees before the selection, every untied one end to end
    assert result.verify.verdict != "disagree", result.verify.summary()
    assert all(c.final_compared or c.tied for c in checks) and sum(bool(c.final_compared) for c in checks) >= len(checks) - 1, \
        result.verify.summary()
    assert all(c.selection_max_diff is not None and c.selection_max_diff < 1e-4 for c in checks), result.verify.summary()
