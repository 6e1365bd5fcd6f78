"""bench on the tiny config (CPU here; the CUDA-graph test runs on the GPU machine). No timing thresholds."""

from __future__ import annotations

import json

import pytest
import torch

import toolkit
from toolkit.tasks.bench import JSON_KEYS, bench, binder_overhead_us
from toolkit.runtime.sidecar import read_sidecar
from tests.conftest import shifted_engine


def test_bench_writes_json_with_documented_keys_and_a_plot(tiny_model, tmp_path):
    report = bench(tiny_model, backends=("torch", "onnxruntime", "tensorrt"), batches=(1, 2), warmup=1, iters=3,
                   device="cpu", workdir=tmp_path / "work", json_path=tmp_path / "b.json", plot_path=tmp_path / "b.png",
                   progress=False)
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"environment", "rows", "binder_overhead_us", "notes"} <= set(data)
    assert all(set(JSON_KEYS) <= set(r) for r in data["rows"])
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {(r["backend"], r["batch"]) for r in ok} == {("torch", 1), ("torch", 2), ("onnxruntime", 1), ("onnxruntime", 2)}
    assert all(r["median_ms"] > 0 and r["p99_ms"] >= r["median_ms"] and r["images_per_s"] > 0 for r in ok)
    trt = [r for r in data["rows"] if r["backend"] == "tensorrt"]
    assert trt and all(r["status"] == "skipped" and "TensorRT" in r["reason"] for r in trt)
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert report.binder_overhead_us is not None and report.binder_overhead_us > 0


def test_bench_refuses_a_configuration_that_fails_its_accuracy_check(tiny_model, tmp_path, monkeypatch):
    """A configuration whose boxes are wrong is refused, with the reason, and gets no timings."""
    import toolkit.tasks.bench as b

    monkeypatch.setattr(b, "accuracy_check", lambda artifacts, backend, precision, graph, images:
                        ("every y coordinate is 0" if backend == "torch" else None, "checked"))
    report = bench(tiny_model, backends=("torch", "onnxruntime"), batches=(1,), warmup=0, iters=2, device="cpu",
                   check_model=tiny_model, workdir=tmp_path, progress=False)
    rows = {r.backend: r for r in report.rows}
    assert rows["torch"].status == "refused" and "every y coordinate is 0" in rows["torch"].reason
    assert rows["torch"].median_ms is None and rows["onnxruntime"].status == "ok"


def test_accuracy_check_on_the_fixture_passes_a_faithful_backend_and_fails_shifted_boxes(tmp_path):
    """The real check (compare, then COCO mAP against fp32 ONNX Runtime) on the trained fixture."""
    from toolkit.tasks.bench import _Artifacts, accuracy_check
    from toolkit.tasks.demo import fixture_path
    from toolkit.models.loading import load_model

    art = _Artifacts(load_model(fixture_path()), tmp_path, torch.device("cpu"), 2)
    failure, done = accuracy_check(art, "torch", "fp32", False, images=24)
    assert failure is None and "compare agrees; mAP" in done

    faithful = art.engine("torch", "fp32", False)

    art._engines[("torch", "fp32", False)] = shifted_engine(faithful, 5.0)
    failure, done = accuracy_check(art, "torch", "fp32", False, images=24)
    assert failure and done == "compare failed"


def test_binder_microbenchmark_runs(tiny_onnx):
    engine = toolkit.load(tiny_onnx, device="cpu", check_values=False)
    feeds = {"images": torch.rand(1, 3, 128, 128), "orig_target_sizes": torch.tensor([[640, 480]])}
    assert 0 < binder_overhead_us(engine, feeds, iters=200) < 1e5


@pytest.mark.gpu
def test_eager_torch_cannot_be_captured_and_says_so(tiny_model, sample_images):
    """transformers' eager RT-DETR copies host values to the GPU inside forward: capture fails with a clear error
    (AOTInductor packages are captured instead: tests/test_aoti.py::test_gpu_package)."""
    import copy

    from toolkit.runtime.cudagraph import CudaGraphEngine

    images, sizes = (t.cuda() for t in sample_images)
    graph = CudaGraphEngine(toolkit.load(copy.deepcopy(tiny_model), device="cuda"))
    with pytest.raises(toolkit.EngineError, match="cannot be captured in a CUDA graph"):
        graph(images=images, orig_target_sizes=sizes)


@pytest.mark.gpu
def test_ort_cuda_graph_is_refused_clearly_for_rt_detr(tiny_onnx):
    from toolkit.runtime.backends.onnxruntime import cuda_available

    if not cuda_available():
        pytest.skip("onnxruntime has no CUDAExecutionProvider")
    # RT-DETR's graph keeps shape nodes on the CPU, so ORT refuses graph capture for it: a clear error, not a hang
    with pytest.raises(toolkit.EngineError, match="graph capture"):
        toolkit.load(tiny_onnx, device="cuda", cuda_graph=True)


def test_bench_aoti_with_inductor_options_on_cpu(tiny_model, tmp_path):
    """AOTInductor rows on CPU, built with extra inductor options (freezing folds BatchNorm into the convolutions);
    the package gets its own name and still matches eager torch."""
    from toolkit.export.verify import verification_images

    report = bench(tiny_model, backends=("aoti",), batches=(1, 2), warmup=1, iters=2, device="cpu", workdir=tmp_path,
                   aoti_configs={"freezing": True}, progress=False)
    assert [r.status for r in report.rows] == ["ok", "ok"] and report.environment["aoti_configs"] == {"freezing": True}
    (package,) = tmp_path.glob("*.pt2")
    assert "freezing=True" in package.name and read_sidecar(package)["inductor_configs"] == {"freezing": True}
    images = verification_images(2, tiny_model.preprocess.size, seed=1)
    sizes = torch.tensor([[640, 480], [320, 240]])
    out = toolkit.load(package)(images=images, orig_target_sizes=sizes)
    ref = toolkit.load(tiny_model, backend="torch", device="cpu")(images=images, orig_target_sizes=sizes)
    from tests.test_aoti import _assert_detections_close

    # up to the order of equal scores: the folded package swaps two detections scoring 0.5391 at ranks 28/29
    _assert_detections_close(out, ref, box_atol=1e-2, score_atol=1e-4)


def test_table_gives_each_row_its_ratio_to_both_peers_of_the_same_run():
    """vs ORT and vs compile: the peer's median at the same precision and batch over the row's; never across precisions,
    batches or from a peer row that did not measure (refused), so a missing peer leaves the cell empty."""
    from toolkit.tasks.bench_report import TABLE_HEADER, table_rows

    def row(backend, precision, batch, ms, graph=False, status="ok"):
        return {"backend": backend, "precision": precision, "batch": batch, "cuda_graph": graph, "status": status,
                "reason": "" if status == "ok" else "accuracy check failed", "median_ms": ms, "p90_ms": ms, "p99_ms": ms,
                "images_per_s": batch * 1e3 / ms, "first_call_s": 1.0, "build_s": None, "compile_s": None}

    rows = [row("aoti", "fp16", 1, 2.0, graph=True), row("aoti", "fp16", 32, 20.0, graph=True), row("aoti", "bf16", 1, 2.5, graph=True),
            row("torch-compile", "fp16", 1, 3.0), row("torch-compile", "fp16", 32, 50.0, status="refused"),
            row("onnxruntime", "fp16", 1, 16.0), row("onnxruntime", "fp16", 32, 120.0)]
    table = {(t[0], t[1]): dict(zip(TABLE_HEADER, t)) for t in table_rows({"rows": rows})}
    assert table[("aoti fp16 +graph", "1")]["vs ORT"] == "8.00x" and table[("aoti fp16 +graph", "1")]["vs compile"] == "1.50x"
    assert table[("aoti fp16 +graph", "32")]["vs ORT"] == "6.00x"
    assert table[("aoti fp16 +graph", "32")]["vs compile"] == ""  # the compile row was refused: no ratio to it
    assert table[("aoti bf16 +graph", "1")]["vs ORT"] == table[("aoti bf16 +graph", "1")]["vs compile"] == ""  # no bf16 peers
    assert table[("torch-compile fp16", "1")]["vs compile"] == "1.00x"
    assert table[("torch-compile fp16", "32")]["median ms"] == "refused"


def test_bench_table_off_a_terminal_keeps_config_names_whole():
    """Piped into a log, rich drew 80 columns and the run-D table read "aoti-…" and "torch…"; the CLI's console
    now draws wide tables where stdout is not a terminal. Rendered from the stored run-D report in docs/data."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import json; from toolkit.cli.app import console; from toolkit.tasks.bench_report import TABLE_HEADER, table_rows; "
            "from rich.table import Table; t = Table(); [t.add_column(c) for c in TABLE_HEADER]; "
            "[t.add_row(*map(str, r)) for r in table_rows(json.load(open('docs/data/bench_h100_run_d_2026-12-07.json')))]; console.print(t)")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, timeout=120).stdout
    lines = out.splitlines()
    assert any("aoti-static fp16 +graph" in line and "1465" in line for line in lines), out
    assert "…" not in out, out
