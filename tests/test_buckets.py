"""Static shape buckets: dispatch to the smallest bucket, padding and slicing, both binders checking; the
reference is ONNX Runtime on the unfolded export."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch

import toolkit
from toolkit.builders.build import BuildError
from toolkit.errors import BindingError, EngineError
from toolkit.export.onnx import export_onnx
from toolkit.export.permutation import match_permutation
from toolkit.export.verify import verification_images
from toolkit.runtime.binding import Binder
from toolkit.runtime.buckets import BucketEngine

from .conftest import run_cli

SIZES = torch.tensor([[640, 480], [128, 128], [1000, 90], [300, 200], [64, 640]])


def _static(engine, batch):
    """A real (eager) engine whose signature fixes the batch, as a static package's does."""
    engine.signature = engine.signature.with_bounds(N=(batch, batch))
    engine.binder = Binder(engine.signature, engine.device)
    return engine


@pytest.fixture(scope="module")
def ort_reference(tiny_model, tmp_path_factory):
    path = export_onnx(tiny_model, tmp_path_factory.mktemp("plain") / "plain.onnx", fold=False).path
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images, sizes: dict(zip(["labels", "boxes", "scores"],
                                          sess.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})))


@pytest.fixture(scope="module")
def bucketed(tiny_model):
    return BucketEngine({b: _static(toolkit.load(tiny_model, backend="torch", device="cpu"), b) for b in (4, 1, 2)})


def _agree(out, ref, n):
    for i in range(n):
        m = match_permutation({k: torch.from_numpy(v[i]) for k, v in ref.items()}, {k: v[i] for k, v in out.items()})
        assert m.compared > 50 and m.label_mismatches == 0 and m.max_box_diff < 0.05 and m.max_score_diff < 1e-4


@pytest.mark.parametrize("n, bucket", [(1, 1), (2, 2), (3, 4), (4, 4)])
def test_smallest_bucket_that_fits_serves_the_call_and_padding_changes_nothing(bucketed, ort_reference, n, bucket):
    before = dict(bucketed.calls)
    images = verification_images(n, (128, 128), seed=30 + n)
    out = bucketed(images=images, orig_target_sizes=SIZES[:n])
    assert {b: bucketed.calls[b] - before[b] for b in bucketed.buckets} == {b: int(b == bucket) for b in (1, 2, 4)}
    assert {k: v.shape[0] for k, v in out.items()} == {"labels": n, "boxes": n, "scores": n}  # sliced back to n
    _agree(out, ort_reference(images, SIZES[:n]), n)


def test_both_binders_check(bucketed, tiny_model):
    assert bucketed.signature.bounds("N") == (1, 4)
    with pytest.raises(BindingError, match="outside the engine's range"):  # this engine's binder: larger than every bucket
        bucketed(images=verification_images(5, (128, 128), seed=1), orig_target_sizes=SIZES)
    with pytest.raises(BindingError):
        bucketed(images=verification_images(2, (64, 64), seed=1), orig_target_sizes=SIZES[:2])  # wrong image size
    dynamic = toolkit.load(tiny_model, backend="torch", device="cpu")
    with pytest.raises(EngineError, match="not the static 2"):
        BucketEngine({2: dynamic})
    # each bucket's own binder still checks the padded batch it is given
    with pytest.raises(BindingError, match="outside the engine's range"):
        bucketed.engines[4].infer({"images": verification_images(3, (128, 128), seed=1), "orig_target_sizes": SIZES[:3]})


def test_manifest_errors_are_one_line(tmp_path):
    bad = tmp_path / "m.buckets"
    bad.write_text(json.dumps({"buckets": {"2": "m.b2.pt2"}}))
    with pytest.raises(EngineError, match="missing beside it"):
        toolkit.load(bad)
    from torchvision.io import write_png

    (tmp_path / "imgs").mkdir()
    write_png((verification_images(1, (64, 64), seed=3)[0] * 255).to(torch.uint8), str(tmp_path / "imgs" / "a.png"))
    r = run_cli("run", str(bad), str(tmp_path / "imgs"))  # run reads its images before it loads the model
    assert r.returncode == 2 and "missing beside it" in r.stderr and "Traceback" not in r.stderr
    from toolkit.builders.buckets import build_buckets, check_buckets

    assert check_buckets(["8", 1, 32, 8]) == (1, 8, 32)
    with pytest.raises(BuildError, match="positive"):
        check_buckets([0, 4])
    with pytest.raises(BuildError, match="must end in .buckets"):
        build_buckets("tiny", tmp_path / "m.pt2", [1])


@pytest.mark.slow
def test_one_static_aoti_bucket_built_loaded_and_padded(tiny_model, ort_reference, tmp_path):
    """One real static AOTInductor package (CPU compile) behind a manifest: a batch of 1 runs padded to 2."""
    from toolkit.builders.buckets import build_buckets
    from toolkit.runtime.sidecar import read_sidecar

    manifest = build_buckets(tiny_model, tmp_path / "tiny.buckets", [2], device="cpu", progress=False)
    meta = json.loads(manifest.read_text())
    assert meta["buckets"] == {"2": "tiny.b2.pt2"} and meta["inner_backend"] == "aoti" and meta["fold"]["folded_pairs"] == 57
    assert read_sidecar(tmp_path / "tiny.b2.pt2")["batch"] == {"min": 2, "opt": 2, "max": 2}
    engine = toolkit.load(manifest)
    assert isinstance(engine, BucketEngine) and engine.signature.bounds("N") == (1, 2)
    for n in (1, 2):
        images = verification_images(n, (128, 128), seed=40 + n)
        _agree(engine(images=images, orig_target_sizes=SIZES[:n]), ort_reference(images, SIZES[:n]), n)
    assert engine.calls == {2: 2}
    # bench's aoti-static rows build the same static package (an engine-cache hit here) behind their own manifest
    from toolkit.tasks.bench import bench

    report = bench(tiny_model, backends=("aoti-static",), batches=(2,), warmup=1, iters=2, device="cpu",
                   workdir=tmp_path / "bench", progress=False)
    assert [(r.backend, r.batch, r.status) for r in report.rows] == [("aoti-static", 2, "ok")], report.rows
    assert list((tmp_path / "bench").glob("*.buckets"))


def test_cli_build_flags_refuse_clearly(tiny_onnx, tmp_path):
    cases = [(["--model", "tiny", "--backend", "aoti", "--static", "--batch", "2", "-o", str(tmp_path / "m.pt2")], "must end in .buckets"),
             (["--model", "tiny", "--backend", "aoti", "--static", "--batch", "1,x", "-o", str(tmp_path / "m.buckets")], "bucket sizes"),
             ([str(tiny_onnx), "--no-fold", "-o", str(tmp_path / "m.engine")], "export --no-fold"),
             ([str(tiny_onnx), "--tune", "-o", str(tmp_path / "m.engine")], "--tune")]
    for args, message in cases:
        r = run_cli("build", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not list(tmp_path.iterdir())
