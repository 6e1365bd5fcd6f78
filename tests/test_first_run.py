"""Issue 17 "first run": eval/bench/validate take any artifact; an ONNX from --config NAME rebuilds its model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import run_cli
from toolkit.errors import InputError, ToolkitError


@pytest.fixture(scope="module")
def config_onnx(tmp_path_factory):
    """What `rtdetr-deploy export --config tiny` writes: no checkpoint, the config's seeded weights."""
    from toolkit.export.onnx import export_onnx

    path = tmp_path_factory.mktemp("cfg") / "tiny.onnx"
    export_onnx(None, path, config="tiny", verify=False)
    return path


def test_eval_onnx_default_backends_runs_only_onnxruntime(tiny_onnx):
    import onnxruntime as ort

    from toolkit.tasks.evaluate import evaluate

    report = evaluate(str(tiny_onnx), synthetic=4)
    assert [r.backend for r in report.rows] == ["onnxruntime"] and report.rows[0].error is None
    assert report.notes == []
    # explicit torch: said once as a note in CLI words, not an error row
    report = evaluate(str(tiny_onnx), synthetic=4, backends=("torch", "onnxruntime"))
    assert [r.backend for r in report.rows] == ["onnxruntime"]
    assert len(report.notes) == 1 and "--backends torch" in report.notes[0] and "{" not in report.notes[0]
    # the mAP is that of plain ONNX Runtime on the same images (independent reference)
    assert ort.InferenceSession(str(tiny_onnx)).get_inputs()[0].name  # the file is a plain ONNX Runtime model
    with pytest.raises(InputError, match="--backends onnxruntime"):
        evaluate(str(tiny_onnx), synthetic=2, backends=("torch",))


@pytest.mark.slow  # CLI subprocess
def test_eval_onnx_cli(tiny_onnx):
    r = run_cli("eval", str(tiny_onnx), "--synthetic", "3")
    assert r.returncode == 0, r.stderr
    assert "onnxruntime" in r.stdout and "error" not in r.stdout
    r = run_cli("eval", str(tiny_onnx), "--synthetic", "3", "--backends", "torch")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--backends onnxruntime" in r.stderr + r.stdout


def test_config_onnx_rebuilds_exact_model(config_onnx):
    """The ONNX from --config NAME records the config; the rebuilt model matches the file's outputs (ONNX Runtime)."""
    import onnxruntime as ort

    from toolkit.builders.build import model_for_onnx
    from toolkit.export.verify import verification_images

    meta = {p.key: p.value for p in onnx.load(str(config_onnx), load_external_data=False).metadata_props}
    assert meta["source_config"] == "tiny" and "source" not in meta
    deploy = model_for_onnx(config_onnx).eval()
    images = verification_images(2, tuple(deploy.preprocess.size), seed=3)
    sizes = torch.tensor([[640, 480], [320, 200]])
    sess = ort.InferenceSession(str(config_onnx))
    names = [i.name for i in sess.get_inputs()]
    dtype = np.int64 if "int64" in sess.get_inputs()[1].type else np.int32
    ref = sess.run(None, {names[0]: images.numpy(), names[1]: sizes.numpy().astype(dtype)})
    with torch.no_grad():
        out = deploy(images, sizes)
    out = list(out.values()) if isinstance(out, dict) else list(out)
    boxes_ref = next(a for a in ref if a.ndim == 3 and a.shape[-1] == 4)
    boxes = next(t for t in out if t.ndim == 3 and t.shape[-1] == 4)
    np.testing.assert_allclose(boxes.numpy(), boxes_ref, atol=0.05)  # pixels; another model is off by 100s


def test_config_onnx_wrong_weights_refused_with_fix(config_onnx, tmp_path):
    from toolkit.builders.build import model_for_onnx

    m = onnx.load(str(config_onnx))
    for p in m.metadata_props:
        if p.key == "weights_sha256":
            p.value = "0" * 64
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(ToolkitError, match="--model CHECKPOINT"):
        model_for_onnx(bad)


@pytest.mark.slow  # CLI subprocess
def test_build_aoti_from_config_onnx_cli_refuses_tampered(config_onnx, tmp_path):
    """CLI: a config ONNX whose weights record does not match is refused in one line (no AOTI compile here)."""
    m = onnx.load(str(config_onnx))
    for p in m.metadata_props:
        if p.key == "weights_sha256":
            p.value = "0" * 64
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    r = run_cli("build", str(bad), "--backend", "aoti", "-o", str(tmp_path / "x.pt2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not (tmp_path / "x.pt2").exists()


def test_bench_onnx_rebuilds_model_and_times_file(config_onnx, tmp_path):
    from toolkit.tasks.bench import bench

    report = bench(str(config_onnx), backends=("onnxruntime",), batches=(1,), warmup=1, iters=2, device="cpu",
                   workdir=tmp_path, check_images=0, progress=False)
    assert any(r.status == "ok" for r in report.rows)
    assert any("rebuilt from config tiny" in n and "as given" in n for n in report.notes)
    assert not list(tmp_path.glob("*.fp32.onnx"))  # the given file was timed, not a re-export


def test_bench_and_validate_refuse_a_package_without_its_sidecar(tmp_path):
    """Built files are benched and validated as given (tests/test_artifacts_any.py); one without the sidecar that
    declares its signature is refused, naming the file and the fix."""
    from toolkit.checks.validate import validate
    from toolkit.errors import ToolkitError
    from toolkit.tasks.bench import bench

    pt2 = tmp_path / "m.pt2"
    pt2.write_bytes(b"not read")
    with pytest.raises(ToolkitError, match=r"m\.pt2: its sidecar m\.pt2\.json is missing"):
        bench(str(pt2), backends=("aoti",), batches=(1,), warmup=1, iters=1, check_images=0, progress=False)
    with pytest.raises(ToolkitError, match=r"m\.pt2: its sidecar m\.pt2\.json is missing"):
        validate(str(pt2), backends=("torch", "aoti"))


@pytest.mark.slow  # CLI subprocess
def test_bench_cli_built_file_one_line(tmp_path):
    pt2 = tmp_path / "m.pt2"
    pt2.write_bytes(b"not read")
    r = run_cli("bench", str(pt2), "--backends", "aoti", "--batch", "1", "--iters", "1", "--check-images", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "m.pt2" in r.stderr


@pytest.fixture(scope="module")
def onnx_two_sizes(tiny_model, tmp_path_factory):
    from toolkit.export.onnx import export_onnx

    d = tmp_path_factory.mktemp("sizes")
    export_onnx(tiny_model, d / "s128.onnx", verify=False)
    export_onnx(tiny_model, d / "s160.onnx", verify=False, size=(160, 160))
    return d / "s128.onnx", d / "s160.onnx"


def test_compare_different_input_sizes_says_so(onnx_two_sizes, tiny_onnx):
    import toolkit

    a, b = onnx_two_sizes
    report = toolkit.compare(str(a), str(b))
    assert any("input sizes differ" in n and "128x128" in n and "160x160" in n for n in report.notes), report.notes
    if report.verdict == "disagree":  # honest: the reason points at the sizes, not at a backend
        assert "input sizes" in report.reason
    assert "input sizes differ" in report.markdown()
    same = toolkit.compare(str(a), str(tiny_onnx))
    assert not any("input sizes differ" in n for n in same.notes)


@pytest.mark.slow  # CLI subprocess
def test_compare_different_input_sizes_cli(onnx_two_sizes):
    a, b = onnx_two_sizes
    r = run_cli("compare", str(a), str(b))
    assert r.returncode in (0, 1, 3) and "Traceback" not in r.stderr
    assert "input sizes differ" in " ".join((r.stdout + r.stderr).split())


ELAPSED = r"done \(\d+\.\d s\)"


def test_validate_progress_each_stage(capsys):
    import re

    from toolkit.checks.validate import validate

    validate(None, ("torch", "onnxruntime"), config="tiny", progress=True)
    err = capsys.readouterr().err
    for stage in ("torch stage", "onnxruntime stage: build and load", "onnxruntime stage: run and judge"):
        assert re.search(rf"validate: {re.escape(stage)} ...", err), err
        assert re.search(rf"validate: {re.escape(stage)} {ELAPSED}", err), err


@pytest.mark.slow  # CLI subprocess
def test_validate_progress_cli_without_terminal():
    import re

    r = run_cli("validate", "--config", "tiny", "--backends", "torch,onnxruntime")  # stdout/stderr are pipes
    assert "Traceback" not in r.stderr
    assert re.search(rf"validate: onnxruntime stage: run and judge {ELAPSED}", r.stderr), r.stderr


def test_eval_progress_lines_with_elapsed(tiny_onnx):
    import re

    from toolkit.tasks.evaluate import evaluate

    lines: list[str] = []
    evaluate(str(tiny_onnx), synthetic=2, progress=True, say=lines.append)
    assert lines[0] == "onnxruntime: 2 images ..."
    assert re.fullmatch(r"onnxruntime: mAP \d\.\d{4} \(\d+\.\d s\)", lines[1]), lines


def test_demo_steps_print_start_and_elapsed():
    """The demo's steps (build, COCO evaluation) go through Steps into the demo's own output lines."""
    import re

    from toolkit.progress import Steps
    from toolkit.tasks.demo import _Say

    lines: list[str] = []
    steps = Steps("demo", stream=_Say(lines.append), heartbeat_s=0.05)
    import time
    with steps.step("[2] build engines"):
        time.sleep(0.12)
    assert lines[0] == "demo: [2] build engines ..."
    assert any(line.startswith("demo: still [2] build engines (") for line in lines[1:-1])  # heartbeat while it runs
    assert re.fullmatch(rf"demo: \[2\] build engines {ELAPSED}", lines[-1])


def _filled_label_pixels(image: torch.Tensor, color: str, box_top: int, x0: int, x1: int) -> int:
    rgb = torch.tensor([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=torch.uint8).view(3, 1, 1)
    region = image[:, :box_top, x0:x1]  # above the box: only the label box is drawn there
    return int((region == rgb).all(0).sum())


@pytest.mark.parametrize("side", [160, 800])
def test_draw_label_box_filled_and_scaled(side):
    from toolkit.runtime.detections import PALETTE, Detections, draw, label_font_size

    image = torch.zeros(3, side, side, dtype=torch.uint8)
    top = side // 2
    dets = Detections(torch.tensor([1]), torch.tensor([[side * 0.2, top, side * 0.8, side * 0.9]]), torch.tensor([0.9]))
    out = draw(image, dets, ["cat", "dog"])
    assert out.shape == image.shape and out.dtype == torch.uint8
    font = label_font_size(side, side)
    filled = _filled_label_pixels(out, PALETTE[1], top, 0, side)
    assert filled >= 4 * font * font  # a filled box at least about a line of text tall and a few letters wide
    assert font >= 12 and (side < 400 or font >= 20)  # the font grows with the image


def test_compare_pictures_captioned_for_disagreeing_and_some_agreeing(tiny_onnx, tmp_path):
    """Side-by-side pictures: one per disagreeing image, plus a few agreeing ones; each with a caption strip."""
    from torchvision.io import read_image

    import toolkit
    from tests.conftest import shifted_engine
    from toolkit.checks.sides import synthetic_images

    (tmp_path / "imgs").mkdir()
    paths = synthetic_images(tmp_path / "imgs")
    same = toolkit.compare(str(tiny_onnx), str(tiny_onnx), paths, report_dir=tmp_path / "same")
    pics = sorted((tmp_path / "same" / "images").glob("*.compare.png"))
    assert same.ok and len(pics) == min(3, len(paths))  # agreeing images: a few, not all
    pic, src = read_image(str(pics[0])), read_image(str(paths[0]))
    assert pic.shape[2] > 2 * src.shape[2] and pic.shape[1] > src.shape[1]  # two halves side by side, a caption strip on top
    strip = pic[:, : pic.shape[1] - src.shape[1]]
    assert (strip == 32).all(0).float().mean() > 0.5 and (strip > 200).any()  # dark strip with white caption text
    shifted = shifted_engine(toolkit.load(str(tiny_onnx)), 40.0)
    bad = toolkit.compare(toolkit.load(str(tiny_onnx)), shifted, paths, report_dir=tmp_path / "bad")
    n_bad = sum(not s.ok for s in bad.images)
    assert n_bad and len(list((tmp_path / "bad" / "images").glob("*.compare.png"))) == n_bad + min(3, len(paths) - n_bad)
