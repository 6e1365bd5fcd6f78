"""Three verdicts (agree / disagree / inconclusive) for compare, validate, verify and the bench gate; deterministic,
labelled config weights; NaN/Inf refused; fixed-batch ONNX files flagged; transformers modules loaded (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import toolkit
from toolkit.checks.compare import compare
from toolkit.checks.sides import synthetic_images
from toolkit.errors import EngineError
from toolkit.export.onnx import export_onnx
from toolkit.models.config import build_model

from .conftest import run_cli


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    synthetic_images(d)
    return d


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """transformers' plain initialisation of `tiny` (seed 0): its query selection is tied; and its ONNX export."""
    model = build_model("tiny", seed=0)
    path = tmp_path_factory.mktemp("tied") / "tied.onnx"
    result = export_onnx(model, path)
    return model, path, result


# ------------------------------------------------------------------ compare


def test_scores_below_the_threshold_are_compared_on_the_top_k(tiny_onnx, tmp_path):
    """Nothing scores 0.999: the old compare agreed on 0 detections. Now each image's top-10 is compared, and
    a model with other weights is found different there."""
    same = compare(tiny_onnx, tiny_onnx, score_threshold=0.999)
    assert same.ok and same.verdict == "agree", same.summary()
    assert same.selection.startswith("top-10 per image") and same.compared >= same.thresholds.min_compared
    assert f"agree on {same.compared} detections over 4 images" in same.summary()
    other = tmp_path / "other.onnx"
    export_onnx(build_model("tiny", seed=1, tie_free=True), other, verify=False)
    proc = run_cli("compare", str(tiny_onnx), str(other), "--score-threshold", "0.999", "--report", str(tmp_path / "rep"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["verdict"] == "disagree" and not report["ok"] and report["selection"].startswith("top-10")


def test_too_few_detections_is_inconclusive_exit_3(tiny_onnx, images_dir, tmp_path):
    """Result files that keep 1 detection per image: 4 matched < min_compared 8, even on the top-K."""
    from toolkit.tasks.run import run

    out = run(tiny_onnx, [images_dir], tmp_path / "run", draw_images=False, score_threshold=0.3)
    records = json.loads(out.results_path.read_text())
    best = {}
    for r in records:
        if r["file_name"] not in best or r["score"] > best[r["file_name"]]["score"]:
            best[r["file_name"]] = r
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "detections.json").write_text(json.dumps(list(best.values())))
    report = compare(tmp_path / "a", tmp_path / "b", images_dir)
    assert report.verdict == "inconclusive" and not report.ok and report.compared == 4
    assert "fewer than the 8 a verdict needs" in report.reason
    proc = run_cli("compare", str(tmp_path / "a"), str(tmp_path / "b"), "--images", str(images_dir))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "INCONCLUSIVE" in proc.stdout


def test_tied_selection_is_inconclusive_not_ok(tied, tmp_path):
    model, path, _ = tied
    report = compare(toolkit.load(model, device="cpu"), path, save_reference_dir=tmp_path / "ref")
    assert report.verdict == "inconclusive" and not report.ok, report.summary()
    assert "query selection is tied" in report.reason
    assert "both sides run generated random weights" in report.summary()
    proc = run_cli("compare", str(tmp_path / "ref"), str(path))  # torch's stored outputs replayed into ORT
    assert proc.returncode == 3, proc.stdout + proc.stderr


def test_nan_outputs_are_inconclusive(tiny_onnx, images_dir, tmp_path):
    from toolkit.tasks.run import run

    out = run(tiny_onnx, [images_dir], tmp_path / "run", draw_images=False)
    records = json.loads(out.results_path.read_text())
    for side, recs in (("a", records), ("b", [dict(r, score=float("nan")) if i == 0 else r for i, r in enumerate(records)])):
        (tmp_path / side).mkdir()
        (tmp_path / side / "detections.json").write_text(json.dumps(recs))
    report = compare(tmp_path / "a", tmp_path / "b", images_dir)
    assert report.verdict == "inconclusive" and not report.ok
    assert report.reason.startswith("NaN or Inf in the outputs")


@pytest.mark.slow
def test_validate_and_bench_gate_refuse_inconclusive(tied, tmp_path):
    from toolkit.checks.validate import validate
    from toolkit.tasks.bench import bench

    model, _, _ = tied
    report = validate(model, ("torch", "onnxruntime"), workdir=tmp_path / "v")
    status = {s.name: s.status for s in report.stages}
    assert status["onnxruntime"] == "inconclusive" and report.verdict == "inconclusive" and report.exit_code == 3
    assert not report.ok and "INCONCLUSIVE" in report.summary()
    rows = bench(build_model("tiny"), backends=("torch",), batches=(1,), warmup=0, iters=1, device="cpu", check_model=model,
                 check_images=0, workdir=tmp_path / "b", progress=False).rows
    assert rows and all(r.status == "refused" and r.reason.startswith("inconclusive: ") for r in rows), rows


# ------------------------------------------------------------------ config weights


HASH = "from toolkit.models.config import build_model; from toolkit.models.weights import weights_sha256; " \
       "print(weights_sha256(build_model('tiny')))"


def test_config_weights_are_the_same_in_every_process_and_labelled(tmp_path):
    from toolkit.models.loading import load_model
    from toolkit.models.weights import weights_sha256

    hashes = {subprocess.run([sys.executable, "-c", HASH], capture_output=True, text=True, check=True).stdout.strip()
              for _ in range(2)}
    assert len(hashes) == 1 and len(next(iter(hashes))) == 64
    before = torch.random.get_rng_state()
    model = build_model("tiny")
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is left alone
    assert weights_sha256(model) in hashes
    assert model.random_weights == "config tiny, seed 0, make_tie_free_"
    from safetensors.torch import save_file

    save_file(build_model("tiny", seed=3).model.state_dict(), str(tmp_path / "w.safetensors"))
    assert load_model(tmp_path / "w.safetensors", config="tiny").random_weights is None  # loaded weights: no label


@pytest.mark.slow
def test_export_of_a_config_name_is_labelled_in_metadata_sidecar_and_report(tmp_path):
    from toolkit.builders.build import build_engine
    from toolkit.testing import make_fake_tensorrt

    out = tmp_path / "m.onnx"
    proc = run_cli("export", "--config", "tiny", "-o", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify: PASS: agree on" in proc.stdout
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["random_weights"] == "config tiny, seed 0, make_tie_free_"
    assert meta["weights_sha256"] == subprocess.run([sys.executable, "-c", HASH], capture_output=True, text=True).stdout.strip()
    built = build_engine(out, tmp_path / "m.engine", trt_module=make_fake_tensorrt("10"), progress=False, cache=False)
    assert json.loads(built.sidecar.read_text())["random_weights"] == meta["random_weights"]
    report = compare(out, "tiny")  # the quickstart's compare: a real agree
    assert report.ok and report.compared >= report.thresholds.min_compared, report.summary()
    assert report.to_dict()["random_weights"] == {"a": meta["random_weights"], "b": meta["random_weights"]}


# ------------------------------------------------------------------ verify: NaN / ties


def test_nan_weights_fail_export_naming_the_first_tensor(tmp_path):
    from safetensors.torch import save_file

    from toolkit.export.verify import verify_onnx
    from toolkit.tasks.run import run

    model = build_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_file(model.model.state_dict(), str(tmp_path / "nan.safetensors"))
    proc = run_cli("export", str(tmp_path / "nan.safetensors"), "--config", "tiny", "-o", str(tmp_path / "nan.onnx"))
    assert proc.returncode != 0 and not (tmp_path / "nan.onnx").exists()
    assert "NaN/Inf in ORT output" in proc.stderr and "first non-finite tensor in the graph: initializer" in proc.stderr
    assert "Traceback" not in proc.stderr
    path = export_onnx(model, tmp_path / "unverified.onnx", verify=False).path
    report = verify_onnx(path, model)
    assert report.verdict == "disagree" and not report.ok
    problem = report.checks[0].problems[0]
    assert "ORT selection scores (NaN)" in problem
    name = problem.split("initializer '")[1].split("'")[0]
    init = next(i for i in onnx.load(str(path)).graph.initializer if i.name == name)
    assert np.isnan(onnx.numpy_helper.to_array(init)).any()  # the named weight really holds NaN
    with pytest.warns(RuntimeWarning, match="NaN or Inf on 4 of 4"):
        result = run(path, synthetic_images(tmp_path), tmp_path / "run", draw_images=False)
    assert result.warnings


def test_tied_export_is_written_but_inconclusive(tied):
    _, path, result = tied
    assert path.is_file() and result.verify.verdict == "inconclusive" and not result.verify.ok
    assert all(c.tied for c in result.verify.checks)
    assert "verify: INCONCLUSIVE" in result.verify.summary() and "PASS" not in result.verify.summary()


# ------------------------------------------------------------------ fixed batch dims


def _fixed_batch_copy(src, dst):
    """Outputs declared [1,...] and a batch of 1 baked into a Reshape before `scores`: what torch.onnx's dynamo
    exporter makes of the official model. It runs at batch 1 only."""
    model = onnx.load(str(src))
    producer = next(n for n in model.graph.node if "scores" in n.output)
    producer.output[list(producer.output).index("scores")] = "scores_unbaked"
    top_k = model.graph.output[2].type.tensor_type.shape.dim[1].dim_value
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, top_k], dtype=np.int64), "baked_shape"))
    model.graph.node.append(onnx.helper.make_node("Reshape", ["scores_unbaked", "baked_shape"], ["scores"], name="baked"))
    for out in model.graph.output:
        out.type.tensor_type.shape.dim[0].Clear()
        out.type.tensor_type.shape.dim[0].dim_value = 1
    kept = [p for p in model.metadata_props if p.key != "rtdetr_deploy_integrity"]  # edited on purpose (README)
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(dst))
    return dst


def test_fixed_batch_outputs_are_flagged_and_run_errors_are_typed(tiny_onnx, sample_images, tmp_path):
    import onnxruntime as ort

    from toolkit.tasks.inspect import inspect_file

    path = _fixed_batch_copy(tiny_onnx, tmp_path / "baked.onnx")
    images, sizes = sample_images
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):  # the reference: plain ONNX Runtime cannot run it at batch 2
        plain.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    assert any("declare a fixed batch" in w and "scores [1,100]" in w for w in inspect_file(path).warnings)
    assert not any("fixed batch" in w for w in inspect_file(tiny_onnx).warnings)
    with pytest.warns(RuntimeWarning, match="declare a fixed batch"):
        engine = toolkit.load(path, device="cpu")
    one = engine(images=images[:1], orig_target_sizes=sizes[:1])
    ref = plain.run(["scores"], {"images": images[:1].numpy(), "orig_target_sizes": sizes[:1].numpy()})[0]
    assert np.allclose(one["scores"].numpy(), ref)
    with pytest.raises(EngineError, match="Likely cause: outputs .* declare a fixed batch while this call has N=2"):
        engine(images=images, orig_target_sizes=sizes)
    proc = run_cli("compare", str(path), str(tiny_onnx))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Likely cause" in proc.stderr
    assert "fixed batch" in run_cli("inspect", str(path)).stdout


# ------------------------------------------------------------------ transformers modules


def _hf_reference(module, images, sizes_wh):
    """transformers' own postprocess (RTDetrImageProcessor), top-30 of the raw outputs, sizes as (h, w)."""
    from transformers import RTDetrImageProcessor

    from toolkit.numerics import tf32

    with torch.no_grad(), tf32(False):  # engines compute exact fp32 on CUDA too (cuDNN's default TF32 moves scores ~1e-3)
        raw = module.eval()(pixel_values=images)
    return RTDetrImageProcessor().post_process_object_detection(raw, threshold=0.0, target_sizes=sizes_wh.flip(1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["rt_detr", "rt_detr_v2"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformers_modules_load_in_train_and_eval_mode(kind, mode, device, sample_images):
    from toolkit.models.config import hf_config, load_config

    cfg = load_config("tiny")
    cfg.model_type = kind
    cls = getattr(__import__("transformers"), {"rt_detr": "RTDetrForObjectDetection", "rt_detr_v2": "RTDetrV2ForObjectDetection"}[kind])
    torch.manual_seed(0)
    module = cls(hf_config(cfg)).to(device)
    build = build_model("tiny", seed=0, tie_free=True)  # tie-free weights where the shapes agree (v1 and v2 tiny share them)
    module.load_state_dict({k: v for k, v in build.model.state_dict().items() if k in module.state_dict()
                            and module.state_dict()[k].shape == v.shape}, strict=False)
    getattr(module, mode)()
    images, sizes = sample_images
    images = images.to(device)
    for engine in (toolkit.load(module, device=device), toolkit.load(module, config="tiny", device=device)):
        out = engine(images=images, orig_target_sizes=sizes.to(device))
        ref = _hf_reference(module, images, sizes.to(device))
        k = ref[0]["scores"].numel()
        for i in range(len(images)):
            assert torch.allclose(out["scores"][i, :k], ref[i]["scores"], atol=1e-5)
            assert torch.equal(out["labels"][i, :k], ref[i]["labels"])
            assert torch.allclose(out["boxes"][i, :k], ref[i]["boxes"], atol=1e-3)
    assert toolkit.load_model(module).class_names == cfg.class_names
