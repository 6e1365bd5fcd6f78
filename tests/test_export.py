"""Real exports of the tiny config, verified in real ONNX Runtime sessions against torch."""

from __future__ import annotations

import json
import os

import onnx
import onnxruntime as ort
import pytest
import torch

from toolkit.errors import CheckpointError, ConfigError, ExportError, InputError
from toolkit.export.onnx import export_onnx
from toolkit.export.permutation import match_permutation
from toolkit.models.config import build_model
from toolkit.models.loading import load_model, save_model
from toolkit.signature import PreprocessSpec
from toolkit.export.verify import verify_onnx

from .conftest import run_cli


def _ort(path, images, sizes):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(["labels", "boxes", "scores"], sess.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})))


@pytest.mark.parametrize("batch", [1, 3])
def test_one_dynamic_file_matches_torch_at_batch_1_and_3(tiny_model, tiny_onnx, batch):
    from toolkit.export.verify import verification_images

    images = verification_images(batch, (128, 128), seed=11)
    sizes = torch.tensor([[640, 480], [128, 128], [1000, 90]][:batch])
    out = _ort(tiny_onnx, images, sizes)
    with torch.no_grad():
        labels, boxes, scores = tiny_model(images, sizes)
    assert out["boxes"].shape == (batch, 100, 4)
    for i in range(batch):
        m = match_permutation({"labels": labels[i], "boxes": boxes[i], "scores": scores[i]},
                              {k: torch.from_numpy(v[i]) for k, v in out.items()})
        assert m.compared > 50 and m.label_mismatches == 0
        assert m.max_box_diff < 0.05 and m.max_score_diff < 1e-4
    # an independent reference for the box scaling: y coordinates scale with h, x with w
    assert (out["boxes"][..., 1::2] <= sizes[:, None, 1:2].numpy() * 1.5).all()


def test_inputs_outputs_and_metadata_round_trip(tiny_onnx):
    model = onnx.load(str(tiny_onnx))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    assert types == {"images": onnx.TensorProto.FLOAT, "orig_target_sizes": onnx.TensorProto.INT64}
    assert [o.name for o in model.graph.output] == ["labels", "boxes", "scores"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"]) == ["circle", "square", "triangle", "star"]
    assert json.loads(meta["input_size"]) == [128, 128] and meta["config_name"] == "tiny"
    assert meta["contract_version"] == "1" and meta["toolkit_version"]
    assert json.loads(meta["preprocess"])["resize"] == "stretch"


def test_int32_sizes_really_declared_int32(tiny_onnx_int32, sample_images):
    model = onnx.load(str(tiny_onnx_int32))
    sizes_in = next(v for v in model.graph.input if v.name == "orig_target_sizes")
    assert sizes_in.type.tensor_type.elem_type == onnx.TensorProto.INT32
    images, sizes = sample_images
    a = _ort(tiny_onnx_int32, images, sizes.int())
    with pytest.raises(Exception, match="int32"):  # ORT itself refuses the wrong dtype
        _ort(tiny_onnx_int32, images, sizes)
    assert a["boxes"].shape == (2, 100, 4)


def test_verify_reports_ties_of_default_initialisation(tmp_path):
    from toolkit.models.config import build_model

    path = tmp_path / "rand.onnx"
    result = export_onnx(build_model("tiny", seed=0), path)  # transformers' plain initialisation: tied
    assert result.verify.verdict == "inconclusive" and not result.verify.ok and path.is_file()
    assert all(c.tied for c in result.verify.checks)
    assert "tied at its top-K boundary" in result.verify.summary()
    assert all(c.selection_max_diff is not None and c.selection_max_diff < 1e-3 for c in result.verify.checks)


def test_verify_catches_a_wrong_graph(tiny_model, tiny_onnx, tmp_path):
    """A torch model that differs from the file (one weight changed) must fail verification."""
    import copy

    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.model.model.enc_score_head.bias.add_(0.5)
    report = verify_onnx(tiny_onnx, other)
    assert not report.ok and "selection scores differ" in report.summary()


def test_letterbox_boxes_map_back_to_original_pixels(tmp_path):
    """A box covering the whole letterboxed content maps to the whole original image."""
    model = build_model("tiny", seed=0)
    model.preprocess = PreprocessSpec(size=(128, 128), resize="letterbox")
    from toolkit.models.contract import postprocess

    w, h = 640, 320  # content occupies 128x64 centred: rows 32..96
    logits = torch.full((1, 1, 4), 5.0)
    cxcywh = torch.tensor([[[0.5, 0.5, 1.0, 64 / 128]]])
    _, boxes, _ = postprocess(logits, cxcywh, torch.tensor([[w, h]]), 1, model.preprocess)
    assert torch.allclose(boxes[0, 0], torch.tensor([0.0, 0.0, w, h]), atol=1e-3)


def test_preprocess_travels_with_the_file(tiny_onnx):
    from toolkit.signature import from_onnx

    assert from_onnx(tiny_onnx).preprocess.size == (128, 128)


def test_lints_name_int64_and_gridsample(tiny_onnx):
    from toolkit.export.onnx import lint
    from toolkit.signature import from_onnx

    notes = lint(onnx.load(str(tiny_onnx)), from_onnx(tiny_onnx))
    assert any("int64" in n and "[[640,0]]" in n for n in notes)
    assert any("GridSample" in n for n in notes)


def test_hf_checkpoint_directory_round_trip(tiny_model, tmp_path, sample_images):
    save_model(tiny_model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.class_names == tiny_model.class_names and loaded.preprocess.size == (128, 128)
    images, sizes = sample_images
    with torch.no_grad():
        assert torch.equal(loaded(images, sizes)[1], tiny_model(images, sizes)[1])


# ---- bad input: a clear error and no file left behind ----

def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        export_onnx(tmp_path / "nope.safetensors", tmp_path / "m.onnx", config="tiny")
    assert not list(tmp_path.iterdir())


def test_unknown_config_lists_known(tmp_path):
    with pytest.raises(ConfigError, match="known configs: .*tiny"):
        export_onnx(None, tmp_path / "m.onnx", config="tinyy")


def test_weights_that_do_not_fit_the_config(tiny_model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_model.model.state_dict().items()}
    state.pop(next(iter(state)))
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: .*unexpected keys: extra.weight"):
        export_onnx(tmp_path / "w.safetensors", tmp_path / "m.onnx", config="tiny")
    assert not (tmp_path / "m.onnx").exists()


def test_output_path_problems(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        export_onnx(None, tmp_path, config="tiny")
    with pytest.raises(InputError, match="does not exist"):
        export_onnx(None, tmp_path / "missing" / "m.onnx", config="tiny")


def test_unwritable_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    target = d if os.geteuid() != 0 else "/proc"  # root may write anywhere but into /proc
    with pytest.raises(InputError, match="not writable"):
        export_onnx(None, f"{target}/m.onnx", config="tiny")


def test_opset_the_exporter_cannot_do_leaves_nothing(tmp_path):
    with pytest.raises(ExportError, match="opset 99"):
        export_onnx(None, tmp_path / "m.onnx", config="tiny", opset=99)
    assert not list(tmp_path.iterdir())


def test_image_file_that_is_not_an_image(tmp_path):
    from toolkit.runtime.preprocessing import read_image

    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(InputError, match="not a readable image"):
        read_image(tmp_path / "x.png")


# ---- CLI via subprocess ----

def test_cli_export_and_inspect(tmp_path):
    out = tmp_path / "m.onnx"
    r = run_cli("export", "--config", "tiny", "-o", str(out), "--sizes-dtype", "int32")
    assert r.returncode == 0, r.stderr
    assert "verify: PASS" in r.stdout and out.is_file()
    r = run_cli("inspect", str(out), "--json")
    data = json.loads(r.stdout)
    assert [i["dtype"] for i in data["signature"]["inputs"]] == ["float32", "int32"]
    assert data["signature"]["inputs"][0]["shape"] == ["N", 3, 128, 128]
    assert data["metadata"]["class_names"][0] == "circle" and data["warnings"] == []


def test_cli_inspect_warns_on_int64(tiny_onnx):
    r = run_cli("inspect", str(tiny_onnx))
    assert r.returncode == 0
    assert "declared int64" in r.stdout and "[[640,0]]" in r.stdout
    assert "orig_target_sizes" in r.stdout and "[N,2]" in r.stdout


@pytest.mark.parametrize("args,pattern", [
    (["export", "--config", "nope", "-o", "{tmp}/m.onnx"], "unknown config 'nope'; known configs:"),
    (["export", "{tmp}/missing.pth", "--config", "tiny", "-o", "{tmp}/m.onnx"], "no such file"),
    (["export", "--config", "tiny", "-o", "{tmp}"], "is a directory"),
    (["inspect", "{tmp}/missing.onnx"], "no such file"),
])
def test_cli_bad_input_exit_2(tmp_path, args, pattern):
    r = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert pattern in r.stderr and "Traceback" not in r.stderr


@pytest.mark.gpu
def test_export_from_a_cuda_model(tiny_model, tmp_path):
    import copy

    model = copy.deepcopy(tiny_model).cuda()
    result = export_onnx(model, tmp_path / "cuda.onnx")
    assert result.verify.ok and not any(c.tied for c in result.verify.checks)


def test_export_at_another_size_leaves_the_callers_model_alone(tiny_model, tmp_path):
    """export(size=...) resizes a copy: the caller's model (here the session fixture other tests share) keeps its
    input size and its anchors."""
    inner = tiny_model.model.model
    size, anchors = tiny_model.preprocess.size, inner.anchors.clone()
    result = export_onnx(tiny_model, tmp_path / "s96.onnx", size=(96, 96), verify=False)
    assert result.signature.input("images").shape[2:] == (96, 96)
    assert tiny_model.preprocess.size == size and torch.equal(inner.anchors, anchors)
