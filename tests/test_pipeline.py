"""The image pipeline (toolkit.runtime.pipeline) on the CPU: its batches are toolkit.preprocess's, in input order, broken
files reported as read_image reports them; the GPU path's own code (JPEG header routing, batched decode_jpeg, EXIF
orientation, grouped resize) run on the CPU equals it too; run() through the pipeline equals the per-batch reference."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

import toolkit
from toolkit.errors import InputError
from toolkit.runtime.jpeg_header import orient, parse_jpeg_header
from toolkit.runtime.pipeline import ImagePipeline
from toolkit.runtime.preprocessing import preprocess, preprocess_one, read_image, resize_normalize
from toolkit.signature import PreprocessSpec

Image = pytest.importorskip("PIL.Image")

SPECS = [PreprocessSpec(size=(64, 64)), PreprocessSpec(size=(48, 80), resize="letterbox"),
         PreprocessSpec(size=(64, 64), resize="letterbox", channel_order="BGR", value_range=(-1.0, 1.0))]


def _scene(index: int, h: int = 96, w: int = 128) -> np.ndarray:
    from toolkit.data.shapes import render_sample

    return render_sample(7, index, (h, w), "val")[0]


def _jpeg(path: Path, img: np.ndarray, orientation: int | None = None, **kw) -> Path:
    extra = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    Image.fromarray(img).save(path, "JPEG", quality=kw.pop("quality", 90), **extra, **kw)
    return path


def write_fixture_images(d: Path, h: int = 96, w: int = 128) -> list[Path]:
    """Baseline, progressive, grayscale and CMYK JPEGs, EXIF-rotated ones (6 and 3), PNGs of two sizes; sorted names."""
    d.mkdir(parents=True, exist_ok=True)
    paths = [_jpeg(d / "a_base.jpg", _scene(0, h, w)),
             _jpeg(d / "b_rot6.jpg", _scene(1, h, w), orientation=6),
             Image.fromarray(_scene(2, h, w)).save(d / "c_plain.png") or d / "c_plain.png",
             _jpeg(d / "d_prog.jpg", _scene(3, h, w), progressive=True),
             _jpeg(d / "e_rot3.jpg", _scene(4, h, w), orientation=3),
             Image.fromarray(_scene(5, h // 2, w)).save(d / "f_wide.png") or d / "f_wide.png",
             _jpeg(d / "g_gray.jpg", _scene(6, h, w)[..., 0]),
             _jpeg(d / "h_base2.jpg", _scene(7, h, w))]
    Image.fromarray(_scene(8, h, w)).convert("CMYK").save(d / "i_cmyk.jpg", "JPEG", quality=90)
    return [*paths, d / "i_cmyk.jpg"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    return write_fixture_images(tmp_path_factory.mktemp("pipeline"))


def _collect(pipeline: ImagePipeline) -> tuple[list[Path], torch.Tensor, torch.Tensor, list[int]]:
    batches = list(pipeline)
    assert [b.index for b in batches] == list(range(len(batches)))
    return ([p for b in batches for p in b.paths], torch.cat([b.images for b in batches]), torch.cat([b.sizes for b in batches]),
            [len(b.paths) for b in batches])


@pytest.mark.parametrize("gpu_code", [False, True], ids=["cpu-path", "gpu-path-code-on-cpu"])
@pytest.mark.parametrize("spec", SPECS, ids=["stretch", "letterbox", "bgr-signed"])
def test_pipeline_equals_preprocess(files, spec, gpu_code):
    ref_images, ref_sizes = preprocess(files, spec)
    paths, images, sizes, counts = _collect(ImagePipeline(files, spec, 4, "cpu", gpu_decode=gpu_code))
    assert paths == files  # order kept
    assert counts == [4, 4, 1]
    assert sizes.dtype == torch.int64 and torch.equal(sizes, ref_sizes)
    assert images.dtype == torch.float32 and images.shape == ref_images.shape
    assert (images - ref_images).abs().max().item() <= 1e-6


def test_gpu_path_routes_only_plain_jpegs_and_applies_exif(files):
    routes = {p.name: parse_jpeg_header(p.read_bytes()) for p in files}
    assert {n for n, h in routes.items() if h.gpu_decodable} == {"a_base.jpg", "b_rot6.jpg", "d_prog.jpg", "e_rot3.jpg",
                                                                   "g_gray.jpg", "h_base2.jpg"}
    assert routes["b_rot6.jpg"].orientation == 6 and routes["e_rot3.jpg"].orientation == 3 and routes["a_base.jpg"].orientation == 1
    assert (routes["a_base.jpg"].width, routes["a_base.jpg"].height) == (128, 96)
    assert read_image(files[1]).shape == (3, 128, 96)  # the reference turns it upright too


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_equals_torchvision_exif(tmp_path, orientation):
    """Reference: torchvision's CPU decoder applying the EXIF orientation itself."""
    from torchvision.io import ImageReadMode, decode_jpeg

    path = _jpeg(tmp_path / "o.jpg", _scene(orientation, 74, 106), orientation=orientation)
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    header = parse_jpeg_header(path.read_bytes())
    assert header.gpu_decodable and header.orientation == orientation
    got = orient(decode_jpeg(data, mode=ImageReadMode.RGB), header.orientation)
    assert torch.equal(got, decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True))


@pytest.mark.parametrize("data", [b"", b"\xff\xd8", b"\xff\xd8not a jpeg", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe1\x00\x02\xff\xda"])
def test_malformed_headers_go_to_the_cpu_decoder(data):
    assert not parse_jpeg_header(data).gpu_decodable


@pytest.mark.parametrize("spec", SPECS[:2], ids=["stretch", "letterbox"])
def test_grouped_resize_equals_one_by_one(spec):
    images = torch.stack([torch.from_numpy(_scene(i, 66, 90).copy()).permute(2, 0, 1) for i in range(3)])
    ref = torch.stack([preprocess_one(im, spec)[0] for im in images])
    assert torch.equal(resize_normalize(images, spec), ref)


@pytest.mark.parametrize("gpu_code", [False, True], ids=["cpu-path", "gpu-path-code-on-cpu"])
def test_broken_files_are_reported_and_batches_stay_full(files, tmp_path, gpu_code):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(files[0].read_bytes()[:200])  # part of a header, then nothing
    raw = files[3].read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(raw[:raw.index(b"\xff\xda") + 400])  # a whole header, then part of the scan
    assert not parse_jpeg_header(cut.read_bytes()).gpu_decodable
    order = [files[0], tmp_path / "broken.jpg", files[1], files[2], tmp_path / "empty.png", files[3], trunc,
             tmp_path / "missing.jpg", files[4], cut, files[5]]
    expected_bad = {}
    for p in order:
        try:
            read_image(p)
        except InputError as e:
            expected_bad[p] = str(e)
    assert set(expected_bad) >= {tmp_path / "broken.jpg", tmp_path / "empty.png", tmp_path / "missing.jpg", cut}
    pipeline = ImagePipeline(order, SPECS[1], 2, "cpu", gpu_decode=gpu_code)
    paths, images, sizes, counts = _collect(pipeline)
    good = [p for p in order if p not in expected_bad]
    assert paths == good and counts == [2] * (len(good) // 2) + [1] * (len(good) % 2)
    assert pipeline.bad == expected_bad and list(pipeline.bad) == [p for p in order if p in expected_bad]
    ref = preprocess(good, SPECS[1])
    assert (images - ref[0]).abs().max().item() <= 1e-6 and torch.equal(sizes, ref[1])


def test_stopping_early_ends_the_threads(files):
    import threading

    before = threading.active_count()
    pipeline = ImagePipeline(files * 4, SPECS[0], 1, "cpu", prefetch=2)
    for i, _ in enumerate(pipeline):
        if i == 1:
            break
    del pipeline
    import gc

    gc.collect()
    assert threading.active_count() <= before


def test_pipeline_refuses_bad_batch_sizes(files):
    for bad in (0, -1, True, 2.0):
        with pytest.raises(InputError, match="batch size"):
            ImagePipeline(files, SPECS[0], bad)


def _reference_run(engine, paths, batch_size, threshold):
    """What run computed before the pipeline: read_image + preprocess per batch of readable files, then infer."""
    from toolkit.runtime.detections import split_batch
    from toolkit.runtime.preprocessing import engine_preprocess
    from toolkit.signature import INPUT_IMAGES, INPUT_SIZES

    spec, dets, records = engine_preprocess(engine), [], []
    for i in range(0, len(paths), batch_size):
        batch, sizes = preprocess([read_image(p) for p in paths[i:i + batch_size]], spec)
        dets += split_batch(engine.infer({INPUT_IMAGES: batch, INPUT_SIZES: sizes}))
    for i, (p, d) in enumerate(zip(paths, dets), 1):
        records += d.above(threshold).to_coco(i, p.name)
    return dets, records


def test_run_through_the_pipeline_equals_the_per_batch_reference(tiny_onnx, files, tmp_path):
    import json

    from toolkit.tasks.run import run

    engine = toolkit.load(tiny_onnx, device="cpu")
    d = tmp_path / "in"
    d.mkdir()
    for p in files[:5]:
        (d / p.name).write_bytes(p.read_bytes())
    (d / "zz_broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    good = sorted(p for p in d.iterdir() if p.name != "zz_broken.jpg")
    ref_dets, ref_records = _reference_run(engine, good, 3, 0.0)
    result = run(engine, [d], tmp_path / "out", batch_size=3, score_threshold=0.0, skip_bad=True, progress=False)
    assert result.images == good and list(result.skipped) == [d / "zz_broken.jpg"]
    assert len(result.detections) == len(ref_dets)
    for got, ref in zip(result.detections, ref_dets):
        assert torch.equal(got.boxes_xyxy, ref.boxes_xyxy) and torch.equal(got.scores, ref.scores) and torch.equal(got.labels, ref.labels)
    assert json.loads(result.results_path.read_text()) == json.loads(json.dumps(ref_records))
    assert len(result.files) == len(good) and all(f.is_file() for f in result.files)


def test_run_shows_a_progress_bar_with_images_per_second(tiny_onnx, files, tmp_path, capsys):
    from toolkit.tasks.run import run

    run(tiny_onnx, files[:3], tmp_path / "out", device="cpu", draw_images=False)
    err = capsys.readouterr().err
    assert "run: 100%" in err and "3/3" in err and "img/s" in err


def test_end_to_end_bench_measures_the_pipeline(tiny_onnx):
    from toolkit.tasks.end_to_end import end_to_end_images_per_s, synthetic_jpegs

    folder = synthetic_jpegs(4)
    assert len(list(folder.glob("*.jpg"))) == 4
    assert read_image(next(folder.glob("*.jpg"))).shape == (3, 480, 640)
    engine = toolkit.load(tiny_onnx, device="cpu")
    rate = end_to_end_images_per_s(engine, 2, torch.device("cpu"), batches=2, files=4)
    assert rate > 0 and np.isfinite(rate)


def test_io_bytes_roundtrip_is_not_needed():
    """parse_jpeg_header reads bytes, bytearrays and memoryviews alike (the reader hands it pinned memory)."""
    b = io.BytesIO()
    Image.fromarray(_scene(0, 64, 64)).save(b, "JPEG")
    raw = b.getvalue()
    assert parse_jpeg_header(raw) == parse_jpeg_header(memoryview(bytearray(raw))) == parse_jpeg_header(memoryview(np.frombuffer(raw, np.uint8)))


def test_bench_end_to_end_reports_pipeline_rate_beside_model_rate(tiny_model, tmp_path):
    from toolkit.tasks.bench import bench
    from toolkit.tasks.bench_report import table_rows

    report = bench(tiny_model, backends=("torch",), batches=(2,), warmup=1, iters=2, device="cpu", end_to_end=True,
                   workdir=tmp_path, progress=False)
    (row,) = report.rows
    assert row.status == "ok", row.reason
    assert row.images_per_s > 0 and row.end_to_end_images_per_s > 0  # both, in the same row
    (cells,) = table_rows(report.to_dict())
    assert f"{row.images_per_s:.0f} (e2e {row.end_to_end_images_per_s:.0f})" == cells[5]
    plain = report.to_dict()
    plain["rows"][0]["end_to_end_images_per_s"] = None  # what a bench without --end-to-end records
    assert table_rows(plain)[0][5] == f"{row.images_per_s:.0f}"


def test_a_batch_the_batched_decoder_refuses_is_decoded_file_by_file(files, monkeypatch):
    """The GPU path's fallback, run on the CPU: decode_jpeg failing on a batch sends it through read_image."""
    import torchvision.io

    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("unsupported bitstream")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuse)
    pipeline = ImagePipeline(files, SPECS[1], 4, "cpu", gpu_decode=True)
    paths, images, _, _ = _collect(pipeline)
    assert calls and not pipeline.bad and paths == files
    assert (images - preprocess(files, SPECS[1])[0]).abs().max().item() <= 1e-6
