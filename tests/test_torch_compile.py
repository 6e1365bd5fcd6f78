"""The torch.compile peer: its engine against ONNX Runtime on the unfolded export, and its bench rows (CPU, aot_eager)."""

from __future__ import annotations

import json
import re

import onnxruntime as ort
import pytest
import torch

import toolkit
from toolkit.errors import EngineError
from toolkit.export.onnx import export_onnx
from toolkit.export.permutation import match_permutation
from toolkit.export.verify import verification_images
from toolkit.tasks.bench import JSON_KEYS, bench
from toolkit.tasks.bench_report import table_rows


@pytest.fixture
def aot_eager(monkeypatch):
    """Graph capture and AOT autograd as Inductor gets them, without a C++ compile on this CPU."""
    import toolkit.runtime.backends.torch_compile as tc

    torch._dynamo.reset()
    monkeypatch.setattr(tc, "COMPILE_BACKEND", "aot_eager")
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def unfolded_onnx(tiny_model, tmp_path_factory):
    return export_onnx(tiny_model, tmp_path_factory.mktemp("plain") / "plain.onnx", fold=False).path


@pytest.mark.slow
def test_engine_matches_ort_on_the_unfolded_export_and_keeps_compile_time_apart(tiny_model, unfolded_onnx, aot_eager):
    engine = toolkit.load(tiny_model, backend="torch-compile", device="cpu")
    assert engine.backend == "torch-compile" and engine.fold.folded == 57
    sess = ort.InferenceSession(str(unfolded_onnx), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 3):
        images = verification_images(batch, (128, 128), seed=batch)
        sizes = torch.tensor([[640, 480], [128, 128], [1000, 90]][:batch])
        out = engine(images=images, orig_target_sizes=sizes)
        ref = dict(zip(["labels", "boxes", "scores"], sess.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})))
        for i in range(batch):
            m = match_permutation({k: torch.from_numpy(v[i]) for k, v in ref.items()}, {k: v[i] for k, v in out.items()})
            assert m.compared > 50 and m.label_mismatches == 0 and m.max_box_diff < 0.05 and m.max_score_diff < 1e-4
    assert set(engine.compile_s) == {(1, 3, 128, 128), (3, 3, 128, 128)}  # one compile per static shape, the repeat reuses it
    assert all(s > 0 for s in engine.compile_s.values())
    with pytest.raises(EngineError, match="CUDA"):
        toolkit.load(tiny_model, backend="torch-compile", device="cpu", precision="fp16")


@pytest.mark.slow
def test_bench_writes_torch_compile_rows_with_compile_time(tiny_model, tmp_path, aot_eager):
    report = bench(tiny_model, backends=("torch-compile", "onnxruntime"), batches=(1, 2), warmup=1, iters=3, device="cpu",
                   check_model=tiny_model, check_images=0, workdir=tmp_path, json_path=tmp_path / "b.json", progress=False)
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert all(set(JSON_KEYS) <= set(r) for r in rows)
    compiled = [r for r in rows if r["backend"] == "torch-compile"]
    assert [r["batch"] for r in compiled] == [1, 2] and all(r["status"] == "ok" for r in compiled), compiled
    agreed = [re.fullmatch(r"compare agrees \(agree on (\d+) detections over \d+ images\)", r["check"]) for r in compiled]
    assert all(m and int(m.group(1)) > 0 for m in agreed), compiled  # passed the gate against fp32 ONNX Runtime, with its count
    assert all(r["compile_s"] > 0 and r["median_ms"] > 0 for r in compiled)
    assert all(r["compile_s"] is None for r in rows if r["backend"] == "onnxruntime")
    assert all("compile " in t[-1] for t in table_rows(report.to_dict()) if t[0].startswith("torch-compile"))
