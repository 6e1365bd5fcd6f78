"""Hostile inputs against the CLI and the Python API: each is a correct result or one clear line (exit 2), never a
silent wrong output or a traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import toolkit
from tests.conftest import run_cli
from toolkit.errors import BindingError, CheckpointError, ConfigError, EngineError, InputError, MissingDependencyError
from toolkit.runtime.sidecar import sidecar_path, write_sidecar
from toolkit.tasks.run import run

FIXTURE_DIR = Path(toolkit.__file__).parent / "fixtures" / "shapes"


def _one_line_error(out, *needles: str) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], out.stderr  # progress lines may come before the one error line
    text = " ".join(out.stderr.split())
    for n in needles:
        assert n in text, (n, out.stderr)


def _scene(h: int = 96, w: int = 128) -> np.ndarray:
    """An RGB picture with a few filled shapes (uint8 HWC)."""
    img = np.full((h, w, 3), 30, np.uint8)
    img[10:50, 12:60] = (220, 40, 40)
    img[40:90, 70:120] = (40, 200, 60)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - 70) ** 2 + (xx - 30) ** 2 < 15 ** 2] = (240, 240, 30)
    return img


def _png(path: Path, img: np.ndarray) -> Path:
    from torchvision.io import write_png

    write_png(torch.from_numpy(img).permute(2, 0, 1).contiguous(), str(path))
    return path


def _png16(path: Path, img16: np.ndarray) -> Path:
    """A 16-bit RGB PNG written byte by byte (the decoder under test must not be the writer)."""
    h, w, _ = img16.shape
    raw = b"".join(b"\x00" + img16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def engine(tiny_onnx):
    return toolkit.load(tiny_onnx, device="cpu")


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _png(d / "a.png", _scene())
    _png(d / "b.png", _scene()[::-1].copy())
    return d


def _coco(result_dir: Path) -> list[dict]:
    return json.loads((result_dir / "detections.json").read_text())


# --- silent wrong outputs --------------------------------------------------------------------------------------------


def test_batch_size_must_be_positive(tiny_onnx, images, tmp_path):
    for bad in (-1, 0):
        with pytest.raises(InputError, match="batch size must be a positive integer"):
            run(tiny_onnx, [images], tmp_path / "out", batch_size=bad)
    assert not (tmp_path / "out").exists()
    _one_line_error(run_cli("run", str(tiny_onnx), str(images), "-o", str(tmp_path / "out"), "--batch-size", "-1"),
                    "batch size must be a positive integer, got -1")
    assert not (tmp_path / "out").exists()


def test_hf_directory_with_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="carries its own config"):
        toolkit.export_onnx(FIXTURE_DIR, tmp_path / "m.onnx", config="tiny")
    _one_line_error(run_cli("export", str(FIXTURE_DIR), "--config", "tiny", "-o", str(tmp_path / "m.onnx")),
                    "checkpoint directory", "drop --config tiny")
    assert not (tmp_path / "m.onnx").exists()


def test_exif_orientation_is_applied(tmp_path):
    """Reference: Pillow's exif_transpose, what image viewers show."""
    Image = pytest.importorskip("PIL.Image")
    from PIL import ImageOps

    from toolkit.runtime.preprocessing import preprocess, read_image

    im = Image.fromarray(_scene(60, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "phone.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    got = read_image(path).permute(1, 2, 0).numpy()
    assert got.shape == shown.shape == (100, 60, 3)
    assert np.abs(got.astype(int) - shown.astype(int)).max() <= 2
    from toolkit.signature import PreprocessSpec

    _, sizes = preprocess([path], PreprocessSpec(size=(64, 64)))
    assert sizes.tolist() == [[60, 100]]  # (w, h) of the displayed image: boxes land on what users see


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.bool])
def test_narrow_size_dtypes_are_refused(engine, sample_images, dtype):
    images, _ = sample_images
    sizes = torch.tensor([[640, 480], [320, 200]]).to(dtype)  # uint8 already wrapped 640 to 128
    with pytest.raises(BindingError, match=rf"orig_target_sizes: .*{str(dtype)[6:]} cannot hold image sizes.*dtype=torch.int64"):
        engine(images=images, orig_target_sizes=sizes)


@pytest.mark.parametrize("sizes", [[[640, -480], [320, 200]], [[0, 480], [320, 200]]])
def test_non_positive_sizes_are_refused(engine, sample_images, sizes):
    images, _ = sample_images
    with pytest.raises(BindingError, match="image sizes must be positive"):
        engine(images=images, orig_target_sizes=torch.tensor(sizes))
    wide = engine(images=images, orig_target_sizes=torch.tensor([[640, 480], [320, 200]], dtype=torch.int16))
    ref = engine(images=images, orig_target_sizes=torch.tensor([[640, 480], [320, 200]]))
    assert torch.equal(wide["boxes"], ref["boxes"])  # int16 is wide enough: converted losslessly


@pytest.mark.slow  # CLI subprocesses: >10 s on the loaded 2-core machine
def test_inspect_empty_onnx_and_random_artifacts(tmp_path, tiny_model):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _one_line_error(run_cli("inspect", str(empty)), str(empty), "empty (0 bytes)")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07")  # parses as a ModelProto with ir_version 7 and no graph
    from toolkit.tasks.inspect import inspect_file

    with pytest.raises(InputError, match=r"junk\.onnx: not an ONNX model"):
        inspect_file(junk)
    fake = tmp_path / "model.pt2"
    fake.write_bytes(os.urandom(1000))
    sidecar_path(fake).write_text(json.dumps({"backend": "aoti", "device": "cpu", "signature": tiny_model.signature().to_dict()}))
    _one_line_error(run_cli("inspect", str(fake)), str(fake), "records no size and sha256")


def test_annotated_outputs_never_overwrite_each_other(engine, tmp_path):
    d = tmp_path / "same"
    d.mkdir()
    _png(d / "a.png", _scene())
    from torchvision.io import write_jpeg

    write_jpeg(torch.from_numpy(_scene()[:, ::-1].copy()).permute(2, 0, 1).contiguous(), str(d / "a.jpg"))
    result = run(engine, [d], tmp_path / "out")
    assert len(set(result.files)) == 2 and all(f.is_file() for f in result.files)
    assert sorted(f.name for f in result.files) == ["a.jpg.det.png", "a.png.det.png"]


@pytest.mark.slow  # CLI subprocesses: >10 s on the loaded 2-core machine
def test_bench_with_nothing_measured_exits_nonzero_and_eval_synthetic_zero(tmp_path):
    out = run_cli("bench", "tiny", "--backends", "tensorrt", "--batch", "1", "--iters", "1", "--warmup", "0", "--device", "cpu",
                  "--check-images", "0", "--workdir", str(tmp_path / "w"))
    assert out.returncode == 1 and "no configuration could be measured" in out.stderr and "Traceback" not in out.stderr
    assert "rtdetr-deploy[tensorrt]" in out.stdout  # Rich markup does not eat the extra's name
    _one_line_error(run_cli("eval", "tiny", "--synthetic", "0"), "--synthetic takes a number of images of at least 1")


# --- crashes that are one-line errors ----------------------------------------------------------------------------------


@pytest.mark.slow  # CLI subprocesses: >10 s on the loaded 2-core machine
def test_bad_devices_and_bench_counts(tiny_onnx, images, tmp_path):
    with pytest.raises(EngineError, match="unknown device 'banana'"):
        toolkit.load(tiny_onnx, device="banana")
    _one_line_error(run_cli("run", str(tiny_onnx), str(images), "--device", "banana", "-o", str(tmp_path / "o")),
                    "unknown device 'banana'")
    _one_line_error(run_cli("bench", "tiny", "--batch", "a"), "--batch takes comma-separated batch sizes", "'a'")
    _one_line_error(run_cli("bench", "tiny", "--iters", "0"), "iters must be integers of at least 1, got 0")
    from toolkit.tasks.bench import bench

    with pytest.raises(InputError, match="batch sizes"):
        bench("tiny", batches=[0], device="cpu", progress=False)


@pytest.mark.slow  # CLI subprocesses: >10 s on the loaded 2-core machine
def test_unwritable_output_directory(tiny_onnx, images, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot be created"):
        run(tiny_onnx, [images], blocker / "out")
    if os.geteuid() != 0:  # root writes anywhere: the read-only case needs a normal user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        _one_line_error(run_cli("run", str(tiny_onnx), str(images), "-o", str(ro / "out")), str(ro / "out"))
    _one_line_error(run_cli("run", str(tiny_onnx), str(images), "-o", "/proc/rtdetr-readonly/out"), "/proc/rtdetr-readonly/out")


@pytest.mark.slow  # CLI subprocesses: >10 s on the loaded 2-core machine
def test_pickle_named_safetensors(tmp_path):
    fake = tmp_path / "weights.safetensors"
    fake.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match=rf"{fake}: not a safetensors file"):
        toolkit.load(fake, config="tiny")
    _one_line_error(run_cli("export", str(fake), "--config", "tiny", "-o", str(tmp_path / "m.onnx")), str(fake), "not a safetensors file")


def test_malformed_sidecars(tmp_path, tiny_model):
    path = tmp_path / "m.pt2"
    path.write_bytes(b"PK")
    sidecar_path(path).write_text("[1, 2]")
    with pytest.raises(EngineError, match=r"m\.pt2\.json: a sidecar is a JSON object, this one is a JSON list"):
        toolkit.load(path)
    write_sidecar(path, {"backend": "aoti", "device": "cpu"})
    with pytest.raises(EngineError, match=r"m\.pt2\.json: the sidecar has no 'signature'"):
        toolkit.load(path)
    _one_line_error(run_cli("inspect", str(path)), "has no 'signature'")


def _rewrite_metadata(src: Path, dst: Path, **changes: str) -> Path:
    """A copy with edited metadata and no integrity seal: what a hand-edited (not a corrupted) file looks like."""
    import onnx

    from toolkit.integrity import ONNX_KEY

    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props if p.key != ONNX_KEY} | changes
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("key,value,needle", [
    ("preprocess", "{not json", "metadata preprocess is not valid JSON"),
    ("preprocess", '{"resize": "squash"}', "metadata preprocess does not describe a preprocessing"),
    ("preprocess", "[1, 2]", "metadata preprocess must be a JSON object"),
    ("class_names", "{oops", "metadata class_names is not valid JSON"),
    ("class_names", '{"a": 1}', "metadata class_names must be a JSON list of strings"),
])
def test_bad_onnx_metadata_names_the_file(tiny_onnx, tmp_path, key, value, needle):
    bad = _rewrite_metadata(tiny_onnx, tmp_path / "bad.onnx", **{key: value})
    with pytest.raises(EngineError, match=rf"bad\.onnx.*{needle}"):
        toolkit.load(bad, device="cpu")
    if key == "preprocess":
        from toolkit.tasks.inspect import inspect_file

        with pytest.raises(InputError, match=rf"bad\.onnx: {needle}"):
            inspect_file(bad)


@pytest.mark.slow  # CLI subprocesses: >10 s on the loaded 2-core machine
def test_random_engine_names_the_file(tmp_path, images):
    eng = tmp_path / "random.engine"
    eng.write_bytes(os.urandom(512))
    _one_line_error(run_cli("run", str(eng), str(images), "-o", str(tmp_path / "o")), str(eng), "sidecar random.engine.json is missing")
    write_sidecar(eng, {"backend": "tensorrt", "signature": {"inputs": [], "outputs": []}})
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(MissingDependencyError, match=rf"{eng} is a TensorRT engine, and TensorRT is not installed.*--backend aoti"):
            toolkit.load(eng)


def test_16_bit_png_and_bmp_give_the_8_bit_detections(engine, tmp_path):
    """Reference: the same pixels as an 8-bit PNG."""
    img = _scene()
    ref = run(engine, [_png(tmp_path / "ref.png", img)], tmp_path / "r").detections[0]
    got16 = run(engine, [_png16(tmp_path / "deep.png", img.astype(np.uint16) * 257)], tmp_path / "d").detections[0]
    assert torch.equal(got16.boxes_xyxy, ref.boxes_xyxy) and torch.equal(got16.labels, ref.labels)
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(img).save(tmp_path / "pic.bmp")
    from toolkit.runtime.preprocessing import list_images

    assert list_images([tmp_path]) and tmp_path / "pic.bmp" in list_images([tmp_path])
    got_bmp = run(engine, [tmp_path / "pic.bmp"], tmp_path / "b").detections[0]
    assert torch.equal(got_bmp.boxes_xyxy, ref.boxes_xyxy)


@pytest.mark.slow  # CLI subprocesses: >10 s on the loaded 2-core machine
def test_folder_with_broken_files(tiny_onnx, images, tmp_path):
    (images / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    (images / "empty.png").write_bytes(b"")
    out_dir = tmp_path / "out"
    with pytest.raises(InputError, match=r"2 of 4 images cannot be read: .*broken\.jpg.*empty\.png.*--skip-bad") as e:
        run(tiny_onnx, [images], out_dir)
    assert "Nothing was written" in str(e.value) and not out_dir.exists()
    cli = run_cli("run", str(tiny_onnx), str(images), "-o", str(out_dir))
    _one_line_error(cli, "broken.jpg", "empty.png", "--skip-bad")
    assert not out_dir.exists()
    cli = run_cli("run", str(tiny_onnx), str(images), "-o", str(out_dir), "--skip-bad")
    assert cli.returncode == 0, cli.stderr
    assert "skipped:" in cli.stderr and "broken.jpg" in cli.stderr and "empty.png" in cli.stderr
    records = _coco(out_dir)
    assert {r["file_name"] for r in records} <= {"a.png", "b.png"}
    good = run(tiny_onnx, [images / "a.png", images / "b.png"], tmp_path / "ref")
    assert records == _coco(tmp_path / "ref") and good.skipped == {}


def test_threads_share_one_engine(engine, sample_images):
    """200 calls from 8 threads on one engine equal the single-threaded result (the integrity cache and binder are shared)."""
    images, sizes = sample_images
    ref = engine(images=images, orig_target_sizes=sizes)
    errors = []

    def work():
        try:
            for _ in range(25):
                out = engine(images=images, orig_target_sizes=sizes)
                assert torch.equal(out["boxes"], ref["boxes"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_loading_the_same_file_from_threads(tiny_onnx, tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(tiny_onnx, path)
    from toolkit import integrity

    integrity.forget(path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(integrity.check_onnx(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8


def test_inspect_warns_about_int64_only_for_tensorrt(tmp_path, tiny_model):
    """A .pt2 binds through torch: TensorRT's int64 narrowing is irrelevant there."""
    import zipfile

    from toolkit.tasks.inspect import inspect_file

    pt2 = tmp_path / "m.pt2"
    with zipfile.ZipFile(pt2, "w") as z:
        z.writestr("m/version", b"1")
    write_sidecar(pt2, {"backend": "aoti", "device": "cpu", "signature": tiny_model.signature().to_dict()})
    report = inspect_file(pt2)
    assert report.signature.input("orig_target_sizes").dtype == "int64" and report.warnings == []
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"plan")
    write_sidecar(eng, {"backend": "tensorrt", "signature": tiny_model.signature().to_dict()})
    assert any("int64" in w for w in inspect_file(eng).warnings)


def test_animated_gif_reads_its_first_frame(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from toolkit.runtime.preprocessing import read_image

    first, second = Image.fromarray(_scene()), Image.fromarray(_scene()[::-1].copy())
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second], duration=100)
    img = read_image(tmp_path / "anim.gif")
    ref = np.asarray(Image.open(tmp_path / "anim.gif").convert("RGB"))  # Pillow opens at frame 0
    assert img.shape == (3, 96, 128) and np.array_equal(img.permute(1, 2, 0).numpy(), ref)


def test_a_run_failing_midway_leaves_no_results_that_look_complete(engine, images, tmp_path):
    from toolkit.runtime.base import BaseEngine

    out = tmp_path / "out"
    run(engine, [images], out)
    assert (out / "detections.json").is_file()

    class Failing(BaseEngine):
        def _run(self, bound):
            raise EngineError("the GPU fell off the bus")

    with pytest.raises(EngineError, match="fell off"):
        run(Failing(engine.signature, engine.device, class_names=engine.class_names), [images], out)
    assert not (out / "detections.json").exists()  # the earlier run's file must not pass for this run's
