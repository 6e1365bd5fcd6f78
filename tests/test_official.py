"""Official RT-DETR / RT-DETRv2 checkpoints: configs, key remap, loader, export (no downloads).

The manifests in tests/data/official_manifests list the official models' state-dict names, shapes and dtypes
(read from the official model definitions, see each file's header). Synthetic checkpoints built from them stand
in for the real weights, which cannot be downloaded here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from toolkit.errors import CheckpointError, ConfigError
from toolkit.models.config import build_model, load_config
from toolkit.models.loading import load_model
from toolkit.models.official import (
    OFFICIAL_CONFIGS,
    deployed_layers,
    inference_parameter_count,
    infer_config,
    load_official_checkpoint,
    official_key,
    plan_load,
    remap_state_dict,
    trained_decoder_layers,
)

MANIFESTS = Path(__file__).parent / "data" / "official_manifests"
MANIFEST_NAMES = sorted(p.stem for p in MANIFESTS.glob("*.json"))
PUBLISHED_PARAMS_M = {"r18vd": 20, "r34vd": 31, "r50vd_m": 36, "r50vd": 42, "r101vd": 76}  # RT-DETR / RT-DETRv2 papers


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def meta_state(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta") for k, v in manifest(name)["tensors"].items()}


def synthetic_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the manifest's names/shapes/dtypes, scaled so that the network's activations stay finite."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, spec in manifest(name)["tensors"].items():
        shape, dtype = spec["shape"], getattr(torch, spec["dtype"])
        if dtype == torch.bool:
            state[key] = torch.rand(shape, generator=gen) > 0.5
        elif not dtype.is_floating_point:
            state[key] = torch.randint(0, 1000, shape, generator=gen, dtype=dtype)
        elif len(shape) >= 2:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(("weight", "running_var", "num_points_scale")):  # 1-D: norm scales, variances
            state[key] = torch.rand(shape, generator=gen) * 0.5 + 0.75
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1
    return state


@dataclass
class NotATensor:  # a pickled object: needs weights_only=False, which the toolkit refuses
    value: int = 1


@pytest.fixture(scope="module")
def r18_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    out = {}
    for name in ("rtdetr_r18vd", "rtdetrv2_r18vd"):
        state = synthetic_state(name)
        path = tmp_path_factory.mktemp("official") / f"{name}.pth"
        torch.save({"ema": {"module": state, "updates": 1000}, "last_epoch": 71}, path)
        out[name] = (path, state)
    return out


# --- configs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OFFICIAL_CONFIGS)
def test_config_parameter_count_matches_published(name):
    cfg = load_config(name)
    assert len(cfg.class_names) == 80 and tuple(cfg.input_size) == (640, 640)
    cfg.hf_config["decoder_layers"] = trained_decoder_layers(cfg)  # published sizes count every trained decoder layer
    with torch.device("meta"):
        model = build_model(cfg).model
    backbone = name.split("_", 1)[1].removesuffix("_dsp").split("_sp")[0]
    published = PUBLISHED_PARAMS_M[backbone] * 1e6
    count = inference_parameter_count(model)
    assert abs(count - published) / published < 0.02, f"{name}: {count / 1e6:.2f}M vs published {published / 1e6:.0f}M"


# --- remap against the official manifests (meta tensors: no memory, no time) -------------------------------

def _manifest_cases() -> list[tuple[str, str]]:
    """(manifest, config): a _dsp model has the tensors of its bilinear twin, so both configs load that manifest."""
    cases = [(m, m) for m in MANIFEST_NAMES]
    return cases + [(c.removesuffix("_dsp"), c) for c in OFFICIAL_CONFIGS if c.endswith("_dsp")]


@pytest.mark.parametrize(("name", "config"), _manifest_cases())
def test_manifest_remaps_onto_the_transformers_model(name, config):
    state = meta_state(name)
    yaml = load_config(config).official["yaml"]
    assert infer_config(state, name=f"{yaml}.pth") == config  # the official file name decides bilinear vs discrete
    cfg = load_config(config)
    with torch.device("meta"):
        model = build_model(cfg).model
    _, report = plan_load(model, state, config, deployed_layers(cfg))
    assert report.complete, report.summary()
    # only BatchNorm step counters of the frozen backbone and RT-DETRv2's precomputed anchors are left out
    assert all(k.endswith("num_batches_tracked") or k in ("decoder.anchors", "decoder.valid_mask") for k in report.ignored)
    assert report.loaded == len({id(t) for t in model.state_dict(keep_vars=True).values()})
    tensors = manifest(name)["tensors"]
    # _m: the decoder layers after the official eval_idx (layers 4-6) are dropped, each of their tensors listed once
    kept_layers = deployed_layers(cfg) or trained_decoder_layers(cfg)
    beyond = {k for k in tensors if (m := re.match(r"decoder\.(?:decoder\.layers|dec_score_head|dec_bbox_head)\.(\d+)\.", k)) and int(m[1]) >= kept_layers}
    assert sorted(report.dropped) == sorted(beyond) and len(report.dropped) == len(set(report.dropped))
    assert bool(beyond) == name.endswith("_m")
    # same parameters as the official model, except that transformers keeps every backbone norm frozen (buffers)
    official = sum(math.prod(v["shape"]) for k, v in tensors.items()
                   if v["parameter"] and k not in beyond and not (k.startswith("backbone.") and ".norm." in k))
    assert sum(p.numel() for p in model.parameters()) == official


def test_rules_pinned():
    assert official_key("backbone.conv1.conv1_2.norm.running_var") == ["model.backbone.model.embedder.embedder.1.normalization.running_var"]
    assert official_key("backbone.res_layers.1.blocks.0.short.conv.conv.weight") == [
        "model.backbone.model.encoder.stages.1.layers.0.shortcut.1.convolution.weight"]
    assert official_key("backbone.res_layers.0.blocks.0.short.norm.bias") == ["model.backbone.model.encoder.stages.0.layers.0.shortcut.normalization.bias"]
    assert official_key("backbone.res_layers.2.blocks.5.branch2c.conv.weight") == [
        "model.backbone.model.encoder.stages.2.layers.5.layer.2.convolution.weight"]
    assert official_key("encoder.encoder.0.layers.0.self_attn.in_proj_weight") == [
        f"model.encoder.aifi.0.layers.0.self_attn.{x}_proj.weight" for x in "qkv"]
    assert official_key("encoder.encoder.0.layers.0.linear2.bias") == ["model.encoder.aifi.0.layers.0.mlp.fc2.bias"]
    assert official_key("encoder.input_proj.1.0.weight") == official_key("encoder.input_proj.1.conv.weight") == ["model.encoder_input_proj.1.0.weight"]
    assert official_key("decoder.decoder.layers.2.norm2.weight") == ["model.decoder.layers.2.encoder_attn_layer_norm.weight"]
    assert official_key("decoder.decoder.layers.2.cross_attn.num_points_scale") == ["model.decoder.layers.2.encoder_attn.n_points_scale"]
    assert official_key("decoder.decoder.layers.0.self_attn.out_proj.bias") == ["model.decoder.layers.0.self_attn.o_proj.bias"]
    assert official_key("decoder.enc_output.norm.bias") == official_key("decoder.enc_output.1.bias") == ["model.enc_output.1.bias"]
    assert official_key("decoder.dec_score_head.5.weight") == ["model.decoder.class_embed.5.weight"]
    assert official_key("decoder.denoising_class_embed.weight") == ["model.denoising_class_embed.weight"]
    assert official_key("backbone.stem.stem1.conv.weight") is None  # HGNetv2 backbones are not covered


# --- real loads of the r18 variants ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rtdetr_r18vd", "rtdetrv2_r18vd"])
def test_r18_loads_bit_identical(r18_checkpoints, name):
    path, state = r18_checkpoints[name]
    model = load_official_checkpoint(path)  # config inferred from the shapes
    assert model.name == name
    report = model.load_report
    assert report.complete and report.num_classes == 80, report.summary()
    loaded = model.model.state_dict()
    mapped, _, _, _ = remap_state_dict(state)
    for key, tensor in mapped.items():
        if key in loaded:
            assert torch.equal(loaded[key], tensor), key
    q, k, v = state["decoder.decoder.layers.1.self_attn.in_proj_weight"].chunk(3)
    assert torch.equal(loaded["model.decoder.layers.1.self_attn.k_proj.weight"], k)
    assert torch.equal(loaded["model.backbone.model.embedder.embedder.0.convolution.weight"], state["backbone.conv1.conv1_1.conv.weight"])
    assert torch.equal(model.model.model.decoder.class_embed[2].weight, state["decoder.dec_score_head.2.weight"])
    assert torch.equal(loaded["model.enc_score_head.bias"], state["decoder.enc_score_head.bias"])


@pytest.mark.parametrize("name", ["rtdetr_r18vd", "rtdetrv2_r18vd"])
def test_r18_exports_and_runs_in_onnxruntime(r18_checkpoints, name, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from toolkit.export.onnx import export_onnx

    path, _ = r18_checkpoints[name]
    # load_model: official keys, no config; 256x256 (anchors regenerated) keeps the CPU time of the verification down
    result = export_onnx(load_model(path), tmp_path / "m.onnx", size=(256, 256), verify=True)
    # untrained synthetic weights: the query selection may tie, so verify may be inconclusive; never a difference
    assert result.verify is not None and result.verify.verdict != "disagree", result.verify.summary()
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    labels, boxes, scores = session.run(None, {"images": np.random.rand(1, 3, 256, 256).astype(np.float32),
                                               "orig_target_sizes": np.array([[640, 480]], dtype=np.int64)})
    assert labels.shape == (1, 300) and boxes.shape == (1, 300, 4) and np.isfinite(scores).all()


def test_cli_export_official_checkpoint(r18_checkpoints, tmp_path):
    path, _ = r18_checkpoints["rtdetr_r18vd"]
    proc = run_cli("export", str(path), "--config", "rtdetr_r18vd", "-o", str(tmp_path / "m.onnx"), "--size", "256", "--no-verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "m.onnx").is_file()


# --- bad input -----------------------------------------------------------------------------------------------

def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1), 2], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_official_checkpoint(path)


def test_pickle_needing_weights_only_false_is_refused(tmp_path, r18_checkpoints):
    path = tmp_path / "pickled.pth"
    torch.save({"ema": {"module": r18_checkpoints["rtdetr_r18vd"][1]}, "args": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_official_checkpoint(path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(path)


def test_another_architecture(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}}, path)
    with pytest.raises(CheckpointError, match="not an official RT-DETR checkpoint"):
        load_official_checkpoint(path)
    hgnet = {"backbone.stem.stem1.conv.weight": torch.zeros(32, 3, 3, 3), "encoder.input_proj.0.conv.weight": torch.zeros(256, 512, 1, 1),
             "decoder.dec_score_head.0.weight": torch.zeros(80, 256)}
    with pytest.raises(CheckpointError, match="PResNet-vd"):
        load_official_checkpoint(hgnet)


def test_config_checkpoint_mismatch(r18_checkpoints):
    path, state = r18_checkpoints["rtdetr_r18vd"]
    with pytest.raises(ConfigError, match="does not fit config 'rtdetr_r34vd'"):
        load_official_checkpoint(path, config="rtdetr_r34vd")
    with pytest.raises(ConfigError, match="is rt_detr_v2 but the checkpoint is rt_detr"):
        load_official_checkpoint(state, config="rtdetrv2_r18vd")


def test_other_class_count_needs_allow_partial(r18_checkpoints):
    _, state = r18_checkpoints["rtdetr_r18vd"]
    tuned = dict(state)
    for key in list(tuned):
        if key.startswith(("decoder.dec_score_head.", "decoder.enc_score_head.")):
            tuned[key] = tuned[key][:20].clone()
    tuned["decoder.denoising_class_embed.weight"] = tuned["decoder.denoising_class_embed.weight"][:21].clone()
    with pytest.raises(ConfigError, match="the checkpoint has 20 classes"):
        load_official_checkpoint(tuned)
    model = load_official_checkpoint(tuned, allow_partial=True)
    report = model.load_report
    assert not report.complete and report.num_classes == 20 and not report.unexpected
    assert {k for k, _, _ in report.misshaped} == {"model.denoising_class_embed.weight", "model.enc_score_head.weight", "model.enc_score_head.bias",
                                                 *(f"model.decoder.class_embed.{i}.{p}" for i in range(3) for p in ("weight", "bias"))}
    loaded = model.model.state_dict()
    assert torch.equal(loaded["model.decoder.bbox_embed.2.layers.0.weight"], state["decoder.dec_bbox_head.2.layers.0.weight"])


# --- zoo variants the weights cannot tell apart, or transformers cannot express --------------------------------

def test_bilinear_or_discrete_is_inconclusive_unless_the_file_name_decides():
    state = meta_state("rtdetrv2_r18vd")  # a _dsp checkpoint has exactly these tensors
    for name in (None, "model_final.pth", "checkpoint0071.pth"):
        with pytest.raises(ConfigError, match=r"inconclusive: .*\(rtdetrv2_r18vd, rtdetrv2_r18vd_dsp\)"):
            infer_config(state, name=name)
    assert infer_config(state, name="rtdetrv2_r18vd_dsp_3x_coco.pth") == "rtdetrv2_r18vd_dsp"
    assert infer_config(state, name="/ckpts/rtdetrv2_r18vd_120e_coco_rerun_48.1.pth") == "rtdetrv2_r18vd"
    assert infer_config(meta_state("rtdetrv2_r50vd_m"), name="rtdetrv2_r50vd_m_dsp_3x_coco.pth") == "rtdetrv2_r50vd_m_dsp"
    assert infer_config(meta_state("rtdetr_r18vd")) == "rtdetr_r18vd"  # RT-DETR v1 has no discrete sampling: nothing to decide


def test_inconclusive_checkpoint_on_the_cli(r18_checkpoints, tmp_path):
    _, state = r18_checkpoints["rtdetrv2_r18vd"]
    path = tmp_path / "checkpoint0071.pth"
    torch.save({"ema": {"module": state}}, path)
    with pytest.raises(ConfigError, match="inconclusive"):
        load_model(path)
    proc = run_cli("export", str(path), "-o", str(tmp_path / "m.onnx"), "--no-verify")
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "inconclusive" in proc.stdout + proc.stderr and "--config rtdetrv2_r18vd_dsp" in proc.stdout + proc.stderr


def test_discrete_config_loads_the_same_tensors(r18_checkpoints):
    _, state = r18_checkpoints["rtdetrv2_r18vd"]
    model = load_official_checkpoint(state, config="rtdetrv2_r18vd_dsp")
    assert model.load_report.complete and model.model.config.decoder_method == "discrete"


@pytest.mark.parametrize("points", [1, 2, 3])
def test_num_points_variants_are_inferred(points):
    assert infer_config(meta_state(f"rtdetrv2_r18vd_sp{points}"), name=f"rtdetrv2_r18vd_sp{points}_120e_coco.pth") == f"rtdetrv2_r18vd_sp{points}"


def test_num_points_mismatch_names_the_config():
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in meta_state("rtdetrv2_r18vd_sp1").items()}
    for key in state:
        if key.endswith("num_points_scale"):
            state[key] = torch.ones(3)  # the official buffer of num_points [1, 1, 1]
    with pytest.raises(ConfigError, match=r"1 point\(s\) per level .*use config rtdetrv2_r18vd_sp1"):
        load_official_checkpoint(state, config="rtdetrv2_r18vd")
    assert load_official_checkpoint(state, name="rtdetrv2_r18vd_sp1_120e_coco.pth").name == "rtdetrv2_r18vd_sp1"


def test_points_that_differ_per_level_are_refused_with_the_fix():
    # [6, 4, 2] has the tensor shapes of the standard [4, 4, 4]: only the stored scale buffer tells them apart
    state = dict(meta_state("rtdetrv2_r18vd"))
    scale = torch.tensor([1 / n for n in (6, 4, 2) for _ in range(n)])
    state.update({k: scale for k in state if k.endswith("num_points_scale")})
    for call in (lambda: infer_config(state, name="rtdetrv2_r18vd_120e_coco.pth"),
                 lambda: load_official_checkpoint(state, config="rtdetrv2_r18vd")):
        with pytest.raises(ConfigError, match=r"num_points \[6, 4, 2\].*official code \(rtdetrv2_pytorch/tools/export_onnx.py\)"):
            call()


def test_split_in_proj_key_is_listed_once():
    state = dict(meta_state("rtdetrv2_r18vd"))
    state["encoder.encoder.1.layers.0.self_attn.in_proj_weight"] = torch.empty(768, 256, device="meta")  # no second AIFI layer
    with torch.device("meta"):
        model = build_model("rtdetrv2_r18vd").model
    _, report = plan_load(model, state, "rtdetrv2_r18vd")
    assert report.unexpected == ["encoder.encoder.1.layers.0.self_attn.in_proj_weight"]
    assert report.summary().count("in_proj_weight") == 1


def test_m_config_deploys_the_eval_idx_layer():
    for name in ("rtdetr_r50vd_m", "rtdetrv2_r50vd_m", "rtdetrv2_r50vd_m_dsp"):
        cfg = load_config(name)
        assert cfg.hf_config["decoder_layers"] == 3 and trained_decoder_layers(cfg) == 6 and deployed_layers(cfg) == 3
    state = meta_state("rtdetrv2_r50vd_m")
    with torch.device("meta"):
        model = build_model("rtdetrv2_r50vd_m").model
    _, report = plan_load(model, state, "rtdetrv2_r50vd_m", deployed_layers=3)
    assert report.complete and report.dropped
    assert "decoder layers 4-6 not loaded" in report.summary() and "decoder layer 3 (eval_idx 2)" in report.summary()
    _, without = plan_load(model, state, "rtdetrv2_r50vd_m")  # not told about eval_idx: layers 4-6 are unexpected
    assert not without.complete and not without.dropped and without.unexpected
