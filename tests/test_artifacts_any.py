"""eval, bench, compare and validate take any artifact (.onnx, .pt2, .buckets, .ep, .engine) and a served URL.

Each verb runs through the CLI's own entry point (in process: the same argument parsing, error lines and exit codes as
the console script, without a Python start per call) on files built the way users build them, and its numbers are
checked against an independent reference: eager torch of the recorded model, local ONNX Runtime on the file the
server serves, Triton's own statistics, the weights hash of the file's record.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import toolkit
from toolkit.cli.main import main
from toolkit.runtime.sidecar import read_sidecar, sidecar_path, write_sidecar

_serving = all(importlib.util.find_spec(m) is not None for m in ("pytriton", "tritonclient"))
needs_server = pytest.mark.skipif(not _serving, reason="serving tests need pytriton and tritonclient: pip install 'rtdetr-deploy[serve]'")
# served (tests/conftest.py): one real tritonserver serving the trained fixture's ONNX (shapes_onnx) as m64 / m32


def _counts(server, model: str) -> tuple[int, int]:
    """Triton's own (inference_count, execution_count) of ``model``, read over plain HTTP."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.http}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def cli(capsys, *args: object) -> tuple[int, str, str]:
    """``rtdetr-deploy ARGS`` through the console entry point: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # (progress lines may come before it)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def config_onnx(tmp_path_factory) -> Path:
    """What `rtdetr-deploy export --config tiny` writes: it records the config its weights come from."""
    from toolkit.export.onnx import export_onnx

    path = tmp_path_factory.mktemp("cfg-onnx") / "tiny.onnx"
    export_onnx(None, path, config="tiny", verify=False)
    return path


@pytest.fixture(scope="module")
def orphan_pt2(tiny_config_pt2, tmp_path_factory) -> Path:
    """The same package with a sidecar that names no source model (as one compiled from an in-memory module)."""
    out = tmp_path_factory.mktemp("orphan") / "orphan.pt2"
    shutil.copyfile(tiny_config_pt2, out)
    meta = read_sidecar(tiny_config_pt2)
    write_sidecar(out, {**meta, "model_source": {"weights_sha256": meta["model_source"]["weights_sha256"]}})
    return out


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


# --- bench ------------------------------------------------------------------------------------------------------


def test_bench_pt2_times_the_file_and_rebuilds_peers_from_its_record(tiny_config_pt2, tmp_path, capsys):
    import onnx

    work = tmp_path / "work"
    code, out, err = cli(capsys, "bench", tiny_config_pt2, "--backends", "aoti,onnxruntime", "--batch", "1,8", "--iters", "2",
                         "--warmup", "0", "--device", "cpu", "--workdir", work, "--json", tmp_path / "b.json")
    assert code == 0, err
    rows = {(r["backend"], r["batch"]): r for r in _rows(tmp_path / "b.json")}
    assert set(rows) == {("aoti", 1), ("aoti", 8), ("onnxruntime", 1), ("onnxruntime", 8)}
    assert rows[("aoti", 1)]["status"] == "ok" and rows[("aoti", 1)]["median_ms"] > 0
    assert rows[("aoti", 8)]["status"] == "skipped" and "runs batch 1..4" in rows[("aoti", 8)]["reason"]  # built for 1..4
    assert all(rows[("onnxruntime", b)]["status"] == "ok" for b in (1, 8))
    assert not list(work.glob("*.pt2"))  # the given package was timed, nothing compiled
    (peer,) = work.glob("*.onnx")  # the peer, exported from the model the package records: the very same weights
    meta = {p.key: p.value for p in onnx.load(str(peer), load_external_data=False).metadata_props}
    assert meta["weights_sha256"] == read_sidecar(tiny_config_pt2)["model_source"]["weights_sha256"]
    assert "rebuilt from config tiny" in " ".join(out.split())


def test_bench_gate_checks_the_given_file_against_its_model(tiny_config_pt2, orphan_pt2, tmp_path, capsys):
    """--check-model: the given package is compared with eager torch of its recorded model; with no record it
    cannot be checked, so its rows are refused as inconclusive (never passed) and bench exits 1."""
    code, _, err = cli(capsys, "bench", tiny_config_pt2, "--backends", "aoti", "--batch", "1", "--iters", "1", "--warmup", "0",
                       "--device", "cpu", "--check-model", "tiny", "--check-images", "0", "--json", tmp_path / "a.json")
    (row,) = _rows(tmp_path / "a.json")  # the tie-free tiny weights: a faithful package agrees with eager torch
    assert (row["backend"], row["status"], code) == ("aoti", "ok", 0) and "compare agrees" in row["check"], (row, err)
    code, _, _ = cli(capsys, "bench", orphan_pt2, "--backends", "aoti", "--batch", "1", "--iters", "1", "--warmup", "0",
                     "--device", "cpu", "--check-model", "tiny", "--check-images", "0", "--json", tmp_path / "o.json")
    (row,) = _rows(tmp_path / "o.json")
    assert code == 1 and row["status"] == "refused" and row["median_ms"] is None
    assert row["reason"].startswith("inconclusive") and "records no source model" in row["reason"]


def test_bench_file_without_a_record_measures_only_its_own_rows(orphan_pt2, tiny_onnx, tmp_path, capsys):
    for path, own in ((orphan_pt2, "aoti"), (tiny_onnx, "onnxruntime")):
        code, out, err = cli(capsys, "bench", path, "--backends", f"{own},torch", "--batch", "1", "--iters", "1", "--warmup", "0",
                             "--device", "cpu", "--json", tmp_path / f"{own}.json")
        assert code == 0, err
        assert [(r["backend"], r["status"]) for r in _rows(tmp_path / f"{own}.json")] == [(own, "ok")]
        assert "no peers (torch)" in " ".join(out.split())


def test_refusals_are_one_line_exit_2(tiny_config_pt2, tiny_model, tmp_path, capsys):
    """A backend that cannot run the file; an engine where TensorRT is not installed (every verb)."""
    code, _, err = cli(capsys, "bench", tiny_config_pt2, "--backends", "onnxruntime", "--device", "cpu")
    _one_line_error(code, err, "tiny.pt2", "--backends aoti")
    code, _, err = cli(capsys, "validate", tiny_config_pt2, "--backends", "torch,onnxruntime")
    _one_line_error(code, err, "tiny.pt2", "add aoti")
    code, _, err = cli(capsys, "eval", tiny_config_pt2, "--backends", "onnxruntime", "--synthetic", "2")
    _one_line_error(code, err, "tiny.pt2", "--backends aoti")
    if importlib.util.find_spec("tensorrt") is None:
        engine = tmp_path / "m.engine"
        engine.write_bytes(b"not read")
        write_sidecar(engine, {"backend": "tensorrt", "signature": tiny_model.signature().to_dict()})
        for verb in (("bench", engine, "--device", "cpu"), ("eval", engine, "--synthetic", "2"), ("compare", engine, "tiny"),
                     ("validate", engine)):
            code, _, err = cli(capsys, *verb)
            _one_line_error(code, err, "m.engine", "TensorRT", "not installed")


@needs_server
def test_bench_url_is_the_load_test_counted_by_triton(served, tmp_path, capsys):
    url = f"grpc://127.0.0.1:{served.ports.grpc}/m64"
    before = _counts(served, "m64")
    code, out, err = cli(capsys, "bench", url, "--concurrency", "1,4", "--requests", "8", "--json", tmp_path / "u.json")
    assert code == 0, err
    levels = json.loads((tmp_path / "u.json").read_text())["levels"]
    assert [(lv["concurrency"], lv["requests"], lv["errors"]) for lv in levels] == [(1, 8, 0), (4, 8, 0)]
    inferences, executions = (a - b for a, b in zip(_counts(served, "m64"), before))
    assert inferences == 17  # 16 timed + 1 checked warm-up, as Triton itself counts them
    assert sum(lv["inferences"] for lv in levels) == 16 and 0 < sum(lv["executions"] for lv in levels) <= 16
    assert all(lv["p50_ms"] > 0 and lv["p99_ms"] >= lv["p50_ms"] for lv in levels)


# --- eval -------------------------------------------------------------------------------------------------------


def _torch_map(images: int) -> float:
    """Independent reference: eager torch of the `tiny` config's weights, through the same evaluation."""
    from toolkit.models.loading import load_model
    from toolkit.tasks.evaluate import evaluate

    engine = toolkit.load(load_model(None, config="tiny"), backend="torch", device="cpu")
    return evaluate({"torch": engine}, synthetic=images).rows[0].mAP


def test_eval_built_files_default_to_their_backend_and_match_eager_torch(tiny_config_pt2, config_onnx, tmp_path, capsys):
    reference = _torch_map(8)
    for path, own in ((tiny_config_pt2, "aoti"), (config_onnx, "onnxruntime")):
        code, _, err = cli(capsys, "eval", path, "--synthetic", "8", "--device", "cpu", "--json", tmp_path / f"{own}.json")
        assert code == 0, err
        (row,) = json.loads((tmp_path / f"{own}.json").read_text())["rows"]
        assert row["backend"] == own and row["error"] is None
        assert abs(row["mAP"] - reference) <= 0.005  # within 0.5 mAP points of eager torch


@needs_server
def test_eval_url_defaults_to_triton_and_matches_local_onnxruntime(served, shapes_onnx, tmp_path, capsys):
    from toolkit.tasks.evaluate import evaluate

    code, _, err = cli(capsys, "eval", f"grpc://127.0.0.1:{served.ports.grpc}/m64", "--synthetic", "8", "--json", tmp_path / "e.json")
    assert code == 0, err
    (row,) = json.loads((tmp_path / "e.json").read_text())["rows"]
    local = evaluate({"onnxruntime": toolkit.load(shapes_onnx["int64"], device="cpu")}, synthetic=8).rows[0]
    assert row["backend"] == "triton" and local.mAP > 0.1  # the trained fixture finds its shapes
    assert abs(row["mAP"] - local.mAP) <= 0.005


# --- compare ----------------------------------------------------------------------------------------------------


def test_compare_any_artifact_with_another(tiny_config_pt2, config_onnx, capsys):
    from toolkit.export.permutation import match_permutation
    from toolkit.export.verify import verification_images
    from toolkit.models.loading import load_model

    code, out, err = cli(capsys, "compare", tiny_config_pt2, config_onnx, "--device-b", "cpu")
    assert code == 0, out + err  # the same weights compiled two ways: they agree
    images = verification_images(2, (128, 128), seed=5)  # and, independently, match eager torch output for output
    feeds = {"images": images, "orig_target_sizes": torch.tensor([[128, 128]] * 2)}
    ref = toolkit.load(load_model(None, config="tiny"), backend="torch", device="cpu").infer(feeds)
    got = toolkit.load(tiny_config_pt2, device="cpu").infer(feeds)
    for i in range(2):
        m = match_permutation({k: v[i] for k, v in ref.items()}, {k: v[i] for k, v in got.items()}, score_band=1e-4)
        assert m.compared > 0 and m.label_mismatches == 0 and m.max_box_diff < 1e-2, m


@needs_server
def test_compare_url_with_the_file_it_serves(served, shapes_onnx, capsys):
    code, out, err = cli(capsys, "compare", f"grpc://127.0.0.1:{served.ports.grpc}/m64", shapes_onnx["int64"], "--device-b", "cpu")
    assert code == 0, out + err


# --- validate ---------------------------------------------------------------------------------------------------


def test_validate_a_package_against_the_model_it_records(tiny_config_pt2, orphan_pt2, tmp_path, capsys):
    code, _, err = cli(capsys, "validate", tiny_config_pt2, "--report", tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["preprocess", "torch", "aoti"]
    assert (code, report["verdict"], stages["aoti"]["status"]) == (0, "agree", "pass"), (err, stages["aoti"])
    assert stages["aoti"]["vs_torch"]["compared"] > 0
    code, _, _ = cli(capsys, "validate", orphan_pt2, "--report", tmp_path / "o")
    stages = {s["name"]: s for s in json.loads((tmp_path / "o" / "report.json").read_text())["stages"]}
    assert code == 3 and list(stages) == ["preprocess", "aoti"]  # nothing to judge it against: never a pass
    assert stages["aoti"]["status"] == "inconclusive" and "no reference" in stages["aoti"]["detail"]
    code, _, err = cli(capsys, "validate", orphan_pt2, "--backends", "aoti,torch")
    _one_line_error(code, err, "--backends torch", "records no source model")


def test_validate_onnx_judges_the_file_as_given(config_onnx, tmp_path, capsys):
    code, _, err = cli(capsys, "validate", config_onnx, "--workdir", tmp_path / "w", "--report", tmp_path / "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["preprocess", "torch", "onnxruntime"]
    assert code == {"agree": 0, "disagree": 1, "inconclusive": 3}[report["verdict"]], err
    assert report["stages"][2]["status"] != "fail" and not (tmp_path / "w" / "model.onnx").exists()  # no re-export


@needs_server
def test_validate_url_runs_its_stage_and_cannot_pass_without_a_reference(served, tmp_path, capsys):
    code, _, err = cli(capsys, "validate", f"grpc://127.0.0.1:{served.ports.grpc}/m64", "--report", tmp_path / "r")
    stages = {s["name"]: s for s in json.loads((tmp_path / "r" / "report.json").read_text())["stages"]}
    assert code == 3 and stages["triton"]["status"] == "inconclusive", err


# --- kinds that need a GPU or minutes of compiles -----------------------------------------------------------------


@pytest.mark.slow
def test_bench_and_eval_a_buckets_manifest(tmp_path, capsys):
    manifest = tmp_path / "tiny.buckets"
    assert main(["build", "--model", "tiny", "--backend", "aoti", "--device", "cpu", "--static", "--batch", "1,2",
                 "-o", str(manifest)]) == 0
    code, _, err = cli(capsys, "bench", manifest, "--backends", "aoti-static,torch", "--batch", "1,2", "--iters", "1",
                       "--warmup", "0", "--device", "cpu", "--json", tmp_path / "b.json")
    assert code == 0, err
    rows = {(r["backend"], r["batch"]): r["status"] for r in _rows(tmp_path / "b.json")}
    assert rows == {("aoti-static", 1): "ok", ("aoti-static", 2): "ok", ("torch", 1): "ok", ("torch", 2): "ok"}
    code, _, err = cli(capsys, "eval", manifest, "--synthetic", "8", "--device", "cpu", "--json", tmp_path / "e.json")
    (row,) = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert code == 0 and row["backend"] == "buckets" and abs(row["mAP"] - _torch_map(8)) <= 0.005


@pytest.mark.gpu
def test_bench_eval_validate_a_torch_tensorrt_program(tmp_path, capsys):
    pytest.importorskip("torch_tensorrt", reason="the .ep kind is written by Torch-TensorRT (pip install 'rtdetr-deploy[torch-tensorrt]')")
    program = tmp_path / "tiny.ep"
    assert main(["build", "--model", "tiny", "--backend", "torch-tensorrt", "--batch", "1,2,4", "-o", str(program)]) == 0
    assert read_sidecar(program)["model_source"]["source_config"] == "tiny" and sidecar_path(program).is_file()
    code, _, err = cli(capsys, "bench", program, "--backends", "torch-tensorrt,torch", "--batch", "1,2", "--iters", "5",
                       "--json", tmp_path / "b.json")
    assert code == 0, err
    assert {r["backend"] for r in _rows(tmp_path / "b.json") if r["status"] == "ok"} == {"torch-tensorrt", "torch"}
    code, _, err = cli(capsys, "eval", program, "--synthetic", "8", "--json", tmp_path / "e.json")
    (row,) = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert code == 0 and row["backend"] == "torch-tensorrt" and abs(row["mAP"] - _torch_map(8)) <= 0.005
    code, _, err = cli(capsys, "validate", program, "--report", tmp_path / "r")
    assert code in (0, 3), err
