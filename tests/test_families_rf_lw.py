"""RF-DETR and LW-DETR through the deploy contract, and transformers modules of every family handed to
``toolkit.load_model`` (CPU).

References: the published parameter counts (roboflow/rf-detr README: N 30.5M, S 32.1M, M 33.7M, L 33.9M;
the LW-DETR paper, Atten4Vis/LW-DETR: tiny 12.1M ... xlarge 118.0M; both count every parameter, the
training-only query groups included), plain ONNX Runtime against eager torch (verify, compare), torchvision's
``normalize`` for the in-wrapper normalization, and transformers' own postprocess
(``RTDetrImageProcessor.post_process_object_detection``: sigmoid, top-K over queries x classes) for modules
handed in from a training loop. Test models are the ``*_mini`` configs with seeded, tie-free weights.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import toolkit
from toolkit.errors import ConfigError, ExportError
from toolkit.models.config import build_model, load_config, make_tie_free_
from toolkit.models.families import IMAGENET, families, family_for, transformers_classes

PUBLISHED_PARAMS_M = {  # (published millions, unit of its last digit)
    "rfdetr_nano": (30.5, 0.1), "rfdetr_small": (32.1, 0.1), "rfdetr_medium": (33.7, 0.1), "rfdetr_large": (33.9, 0.1),
    "lwdetr_tiny": (12.1, 0.1), "lwdetr_small": (14.6, 0.1), "lwdetr_medium": (28.2, 0.1), "lwdetr_large": (46.8, 0.1),
    "lwdetr_xlarge": (118.0, 0.1),
}
MINI = ("rfdetr_mini", "lwdetr_mini")
NOISE = 0.2  # make_tie_free_ std, as for D-FINE / DEIMv2 (tests/test_families.py)


@pytest.fixture(scope="module")
def mini_models():
    return {name: make_tie_free_(build_model(name, seed=0), seed=0, std=NOISE) for name in MINI}


@pytest.fixture(scope="module")
def mini_onnx(mini_models, tmp_path_factory):
    from toolkit.export.onnx import export_onnx

    out = {}
    for name in MINI:
        path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
        out[name] = (path, export_onnx(mini_models[name], path, progress=False))
    return out


# --- registry and named configs ------------------------------------------------------------------------------

def test_rf_detr_and_lw_detr_are_registered():
    assert {"rf_detr", "lw_detr"} <= set(families())
    for model_type, prefix in (("rf_detr", "RfDetr"), ("lw_detr", "LwDetr")):
        config_cls, model_cls = transformers_classes(model_type)
        assert (config_cls.__name__, model_cls.__name__) == (f"{prefix}Config", f"{prefix}ForObjectDetection")
        assert family_for(model_type).normalization(config_cls()) == IMAGENET


def test_a_transformers_without_the_family_classes_is_one_clear_error(monkeypatch):
    import toolkit.models.families as fam

    missing = fam.Family(name="future", description="", model_types={"future_detr": "FutureDetr"})
    monkeypatch.setitem(fam._FAMILIES, "future", missing)
    with pytest.raises(ConfigError, match=r"needs FutureDetrForObjectDetection, which transformers .* does not have; upgrade"):
        transformers_classes("future_detr")


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS_M))
def test_config_parameter_count_matches_published(name):
    cfg = load_config(name)
    assert len(cfg.class_names) == 91 and cfg.class_names[1] == "person" and cfg.class_names[90] == "toothbrush"
    with torch.device("meta"):  # shapes only: no heavy build
        model = build_model(cfg).model
    count = sum(p.numel() for p in model.parameters()) / 1e6
    published, unit = PUBLISHED_PARAMS_M[name]
    assert abs(count - published) <= unit / 2, f"{name}: {count:.3f}M vs published {published}M"


# --- normalization inside the wrapper -------------------------------------------------------------------------

@pytest.mark.parametrize("name", MINI)
def test_imagenet_normalization_inside_the_wrapper(mini_models, name):
    from torchvision.transforms.functional import normalize

    model = mini_models[name]
    assert model.preprocess.in_model_normalization == IMAGENET and model.preprocess.value_range == (0.0, 1.0)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = model.raw(images)[0]
        ref = model.model(pixel_values=normalize(images, *IMAGENET)).logits
        unnormalized = model.model(pixel_values=images).logits
    assert torch.allclose(ours, ref, atol=1e-5)
    assert (ours - unnormalized).abs().max() > 1e-2  # not a vacuous check


# --- export, verify, compare ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MINI)
def test_export_verifies_end_to_end(mini_onnx, name):
    import onnx

    from toolkit.signature import from_onnx

    path, result = mini_onnx[name]
    assert result.verify.ok, result.verify.summary()
    for check in result.verify.checks:  # selection found and untied, so the final outputs were compared
        assert check.selection_max_diff is not None and check.selection_max_diff < 1e-4
        assert not check.tied and check.final_compared > 0 and check.final_label_mismatches == 0, result.verify.summary()
    pre = from_onnx(onnx.load(str(path))).preprocess
    assert pre.in_model_normalization == IMAGENET and pre.value_range == (0.0, 1.0)


@pytest.mark.parametrize("name", MINI)
def test_onnxruntime_and_torch_agree_detection_by_detection(mini_models, mini_onnx, name):
    report = toolkit.compare(toolkit.load(mini_models[name], device="cpu"), mini_onnx[name][0])
    assert report.ok, report.summary()
    assert report.verdict != "too_flat" and any(s.matched for s in report.images), report.summary()


def test_rf_detr_position_embedding_freeze_is_what_makes_it_export(mini_models, tmp_path, monkeypatch):
    """Without the freeze the antialiased bicubic resample does not export; the freeze is scoped to the export."""
    import toolkit.export.onnx as onnx_export

    model = mini_models["rfdetr_mini"]
    embeddings = [m for m in model.modules() if type(m).__name__ == "RfDetrDinov2Embeddings"]
    assert embeddings and embeddings[0].position_embeddings.shape[1] - 1 != (128 // 16) ** 2  # a real resample
    assert all("interpolate_pos_encoding" not in m.__dict__ for m in embeddings)  # mini_onnx's export left nothing
    monkeypatch.setattr(onnx_export, "trace_patches", lambda *_: contextlib.nullcontext())
    with pytest.raises(ExportError, match="torch.onnx.export failed"):
        onnx_export.export_onnx(model, tmp_path / "unfrozen.onnx", progress=False, verify=False)


# --- transformers modules from a training loop, every family --------------------------------------------------

FAMILY_MINIS = ("dfine_tiny", "deimv2_tiny", "deimv2_dinov3_tiny", "rfdetr_mini", "lwdetr_mini")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", FAMILY_MINIS)
def test_load_model_of_a_transformers_module_uses_the_family_wrapper(name, mode, monkeypatch):
    from torchvision.transforms.functional import normalize
    from transformers import RTDetrImageProcessor

    import toolkit.models.loading as loading

    def no_probe(*_a, **_k):
        raise AssertionError("a family module must not go through wrap_module's probe")

    monkeypatch.setattr(loading, "wrap_module", no_probe)
    module = make_tie_free_(build_model(name, seed=0), seed=0, std=NOISE).model
    getattr(module, mode)()
    norm = family_for(module.config.model_type).normalization(module.config)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    sizes = torch.tensor([[128, 128], [300, 200]])  # (w, h)
    with torch.no_grad():
        raw = module.eval()(pixel_values=normalize(images, *norm) if norm else images)
    ref = RTDetrImageProcessor().post_process_object_detection(raw, threshold=0.0, target_sizes=sizes.flip(1))
    getattr(module, mode)()
    deploy = toolkit.load_model(module)
    assert deploy.preprocess.in_model_normalization == norm
    engine = toolkit.load(module, device="cpu")
    out = engine(images=images, orig_target_sizes=sizes)
    k = ref[0]["scores"].numel()
    for i in range(len(images)):
        assert torch.allclose(out["scores"][i, :k], ref[i]["scores"], atol=1e-5)
        assert torch.equal(out["labels"][i, :k], ref[i]["labels"])
        assert torch.allclose(out["boxes"][i, :k], ref[i]["boxes"], atol=1e-3)


# --- Hugging Face directories, CLI, torch.export ---------------------------------------------------------------

def test_hf_directory_round_trip(mini_models, tmp_path):
    from toolkit.models.loading import load_model, save_model

    for name in MINI:
        model = mini_models[name]
        loaded = load_model(save_model(model, tmp_path / name))
        assert loaded.preprocess == model.preprocess  # normalization comes back from the family
        images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
        sizes = torch.tensor([[200, 100]])
        with torch.inference_mode():
            for a, b in zip(model(images, sizes), loaded(images, sizes)):
                assert torch.equal(a, b)


@pytest.mark.slow
def test_cli_export_by_config_name(tmp_path):
    import json

    import onnx

    from tests.conftest import run_cli

    r = run_cli("export", "--config", "rfdetr_mini", "-o", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["config_name"] == "rfdetr_mini"
    assert tuple(map(tuple, json.loads(meta["preprocess"])["in_model_normalization"])) == IMAGENET


@pytest.mark.parametrize("name", MINI)
def test_torch_export_dynamic_batch(mini_models, name):
    """The family's torch.export patches keep the batch symbolic: batch 3 through a program exported at 2."""
    from toolkit.builders.aoti import _example_inputs, _export

    model = mini_models[name]
    program = _export(model, _example_inputs(model, 1, 2, 4, "cpu"), 1, 4)
    images = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    sizes = torch.tensor([[128, 128], [64, 96], [300, 200]])
    with torch.inference_mode():
        ref = model(images, sizes)
    got = program.module()(images, sizes)
    assert torch.equal(got[0], ref[0]) and torch.allclose(got[1], ref[1], atol=1e-3) and torch.allclose(got[2], ref[2], atol=1e-5)


# --- fp16 ----------------------------------------------------------------------------------------------------
# Why the *_mini models' fp16 export used to FAIL by ~10-20 px: RF-DETR and LW-DETR bind each selected proposal to
# its top-K slot's learned query (query_feat, reference_point_embed), so the ORDER of the encoder's selection
# matters, not only its set. The minis' 30 selected scores lie as close as 3e-4 apart, below fp16 rounding (~1e-2
# on these logits): fp16 reorders two of them and the two proposals swap their learned queries (measured: same
# selected set in fp16 and fp32 on all five verification images, different order exactly on the two images whose
# boxes moved; the fp32 model itself moves as far when only its weights are rounded to fp16, so no fp32 island can
# help). verify now treats such an order tie as a tie (inconclusive, never a false FAIL), and the agree test below
# uses weights whose selection is tie-free in order at fp16 resolution: 4 queries, measured gaps >= 0.017.
FP16_SEEDS = {"rfdetr_mini": 3, "lwdetr_mini": 6}  # make_tie_free_ seeds with order and boundary gaps >= 0.017 (fp16 and fp32)


def _four_query_model(name: str, seed: int | None = None):
    import dataclasses

    cfg = load_config(name)
    cfg = dataclasses.replace(cfg, hf_config={**cfg.hf_config, "num_queries": 4}, top_k=4 * len(cfg.class_names))
    return make_tie_free_(build_model(cfg, seed=0), seed=FP16_SEEDS[name] if seed is None else seed, std=NOISE)


def _tie_free_fp16_export(name: str, path, tries: int = 8):
    """The four-query model and its verified fp16 file, on weights whose selection is tie-free in order on THIS
    machine. The base weights come from transformers' initialisation, which changes between transformers versions
    (FP16_SEEDS were measured with this project's pinned test environment), so the gaps are measured here, by
    verify, and the next seed is taken when they are too close; the seeds tried are reported."""
    from toolkit.export.onnx import export_onnx
    from toolkit.export.verify import TOLERANCES

    need = 2 * TOLERANCES["fp16"][1]
    seen = []
    for seed in range(FP16_SEEDS[name], FP16_SEEDS[name] + tries):
        model = _four_query_model(name, seed)
        result = export_onnx(model, path, precision="fp16")
        gaps = [min(c.order_gap, c.boundary_gap) for c in result.verify.checks
                if c.order_gap is not None and c.boundary_gap is not None]
        gap = min(gaps) if len(gaps) == len(result.verify.checks) and gaps else float("nan")
        seen.append(f"seed {seed}: {result.verify.verdict}, smallest selection gap {gap:.3g}")
        if result.verify.verdict == "agree" and gap >= need:
            return model, result, seen
    pytest.fail(f"no tie-free weights for {name} within {tries} seeds (gap >= {need:g} needed): {'; '.join(seen)}")


@pytest.mark.parametrize("name", MINI)
def test_fp16_export_verifies_against_torch(name, tmp_path):
    from toolkit.export.onnx import export_onnx
    from toolkit.export.verify import TOLERANCES

    model = _four_query_model(name)
    result = export_onnx(model, tmp_path / "h.onnx", precision="fp16")
    assert result.verify.verdict == "agree" and result.verify.ok, result.verify.summary()
    tie_gap = TOLERANCES["fp16"][1]
    assert all(c.order_gap is not None and c.order_gap >= tie_gap and c.boundary_gap >= tie_gap and c.final_compared > 0
               for c in result.verify.checks), result.verify.summary()
    # and against the fp32 torch model, detection by detection (verify's torch side runs fp16 like the graph)
    report = toolkit.compare(toolkit.load(tmp_path / "h.onnx", device="cpu"), toolkit.load(model, backend="torch", device="cpu"))
    assert report.ok and report.verdict == "agree" and sum(s.matched for s in report.images) > 0, report.summary()


def test_fp16_selection_order_tie_is_inconclusive_not_a_failure(mini_models, tmp_path):
    """The 30-query LW-DETR mini: its fp16 selection reorders near-equal scores (see above); verify says so."""
    from toolkit.export.onnx import export_onnx

    result = export_onnx(mini_models["lwdetr_mini"], tmp_path / "h.onnx", precision="fp16")
    assert result.verify.verdict == "inconclusive" and not result.verify.ok, result.verify.summary()
    assert any(c.tied and c.order_gap is not None and c.order_gap < c.boundary_gap for c in result.verify.checks)
    assert any("INSIDE the top-K" in n for n in result.verify.notes), result.verify.notes


@pytest.mark.gpu
@pytest.mark.parametrize("name", MINI)
def test_gpu_fp16_onnx_on_cuda_matches_torch_fp16(name, tmp_path):
    """The fp16 file on ONNX Runtime's CUDA provider against eager fp32 torch on CUDA, detection by detection, on the
    weights whose selection is tie-free in order at fp16 resolution (above). fp32 is the reference, as on the CPU
    above: fp16 autocast rounds other tensors than the fp16 file does, so it is no reference for it.

    The file is made as ``rtdetr-deploy export --precision fp16`` makes it on a GPU machine: its accuracy-island
    search runs the file on ONNX Runtime CUDA. (This test once failed on an H100 by 1.9 and 5.2 px: the weights
    there were not those measured tie-free here, because transformers 5.17 initialises them differently from
    5.25, and the fp16 file agreed with eager fp16 on all 40 detections; the seeds are now checked where it runs.)"""
    from toolkit.checks.island_search import repair_fp16

    path = tmp_path / "h.onnx"
    model, _, seeds = _tie_free_fp16_export(name, path)
    search = repair_fp16(path, device="cuda")
    engine = toolkit.load(path, device="cuda")
    assert engine.device.type == "cuda"
    eager = toolkit.load(model, backend="torch", device="cuda")
    report = toolkit.compare(eager, engine)
    assert report.ok and report.verdict == "agree", ("; ".join(seeds) + "\n" + search.summary() + "\n" + report.summary()
                                                     + _fp16_spread_on_cuda(model, eager, engine))
    print(f"{name}: {'; '.join(seeds)}; {search.summary()}; {report.summary().splitlines()[0]}")


def _fp16_spread_on_cuda(model, eager, engine) -> str:
    """For a failure message: what eager torch with half weights on the same GPU gives against fp32 and against the
    file, which tells fp16's own spread on these weights from a deployment that computes something else."""
    import copy

    from toolkit.models.contract import ReducedPrecision
    from toolkit.runtime.backends.torch import TorchEngine

    half = TorchEngine(copy.deepcopy(model), torch.device("cuda"))
    half.model = ReducedPrecision(copy.deepcopy(model), torch.float16).cuda().eval()
    return ("\neager fp16 (half weights, CUDA) vs eager fp32: " + toolkit.compare(eager, half).summary().splitlines()[0]
            + "\nthe fp16 file vs eager fp16: " + toolkit.compare(half, engine).summary().splitlines()[0])
