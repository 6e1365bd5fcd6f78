"""Serving on a real Triton Inference Server (the ``tritonserver`` inside nvidia-pytriton) on 127.0.0.1.

Every server is started on free ports inside the test, waited for with a bound, and stopped by its process
id; request loops are bounded. The reference is the local ONNX Runtime engine on the same file, and Triton's
own metadata, statistics and error answers (read with a raw tritonclient, not the toolkit's client).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import toolkit
from toolkit.errors import BindingError, EngineError, InputError

_missing = [m for m in ("pytriton", "tritonclient") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"serving tests need {', '.join(_missing)}: pip install 'rtdetr-deploy[serve]'")

FIXTURE = Path(toolkit.__file__).parent / "fixtures" / "shapes"
READY_S = 180


# shapes_onnx and served (one tritonserver for the session, shared with tests/test_artifacts_any.py): tests/conftest.py


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")  # a zombie has exited: it is only waiting to be reaped
    return status.is_file() and "zombie" not in status.read_text()


def _url(server, model: str, scheme: str = "grpc") -> str:
    return f"{scheme}://127.0.0.1:{server.ports.grpc if scheme == 'grpc' else server.ports.http}/{model}"


def _feeds(n: int = 2, sizes_dtype=torch.int64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(n, 3, 320, 320, generator=g), "orig_target_sizes": torch.tensor([[320, 240]] * n, dtype=sizes_dtype)}


def _counts(server, model: str) -> tuple[int, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.http}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


# --- the repository, structurally (Triton's own protobuf definitions) -----------------------------------------


@pytest.mark.parametrize("dtype,want", [("int64", "TYPE_INT64"), ("int32", "TYPE_INT32")])
def test_config_declares_the_artifacts_dtypes(shapes_onnx, tmp_path, dtype, want):
    from tritonclient.grpc import model_config_pb2

    from toolkit.serve.config import parse
    from toolkit.signature import from_onnx

    repo = toolkit.export_triton(shapes_onnx[dtype], tmp_path, backend="onnxruntime", max_batch=16, devices=[0, 1], instances=2)
    cfg = parse((repo.model_dir / "config.pbtxt").read_text())
    assert (repo.model_dir / "1" / "model.onnx").is_file()
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 16 and cfg.HasField("dynamic_batching")
    sig = from_onnx(shapes_onnx[dtype])
    types = {t.name: model_config_pb2.DataType.Name(t.data_type) for t in list(cfg.input) + list(cfg.output)}
    assert types["orig_target_sizes"] == want == "TYPE_" + {"int64": "INT64", "int32": "INT32"}[sig.input("orig_target_sizes").dtype]
    assert types["labels"] == "TYPE_INT64" and types["images"] == "TYPE_FP32"
    assert [list(t.dims) for t in cfg.input] == [list(s.shape[1:]) for s in sig.inputs]  # dims without the batch
    assert [(g.kind, list(g.gpus), g.count) for g in cfg.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_GPU, [0], 2),
                                                                             (model_config_pb2.ModelInstanceGroup.KIND_GPU, [1], 2)]


def test_tensorrt_repository_from_an_engine_and_its_sidecar(shapes_onnx, tmp_path):
    """TensorRT is not installable here: the repository is checked structurally (plan file, INT32 as built)."""
    from toolkit.runtime.sidecar import write_sidecar
    from toolkit.serve.config import parse
    from toolkit.signature import from_onnx

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan bytes")
    sig = from_onnx(shapes_onnx["int32"]).with_bounds(N=(1, 4))
    write_sidecar(engine, {"signature": sig.to_dict(), "class_names": ["a", "b"]})  # with the engine's size and sha256
    repo = toolkit.export_triton(engine, tmp_path / "repo", backend="tensorrt", max_batch=32)
    cfg = parse((repo.model_dir / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan" and (repo.model_dir / "1" / "model.plan").read_bytes() == b"plan bytes"
    assert cfg.max_batch_size == 4  # the engine's profile caps the request
    with pytest.raises(InputError, match="built engine"):
        toolkit.export_triton(shapes_onnx["int32"], tmp_path / "repo2", backend="tensorrt")


def test_export_triton_cli_writes_or_refuses_in_one_line(shapes_onnx, tmp_path):
    cli = [sys.executable, "-m", "toolkit.cli", "export-triton"]
    ok = subprocess.run(cli + [str(shapes_onnx["int32"]), "-o", str(tmp_path), "--backend", "python", "--name", "m"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "m" / "1" / "model.py").is_file() and (tmp_path / "m" / "1" / shapes_onnx["int32"].name).is_file()
    assert "TYPE_INT32" in (tmp_path / "m" / "config.pbtxt").read_text()
    for args, message in ((["missing.onnx", "--backend", "onnxruntime"], "missing.onnx: no such file"),
                          ([str(shapes_onnx["int32"]), "--backend", "foo"], "unknown --backend 'foo'"),
                          ([str(shapes_onnx["int32"]), "--devices", "0,x"], "--devices takes GPU indices")):
        bad = subprocess.run(cli + args + ["-o", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


# --- a real server ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model,dtype", [("m64", "INT64"), ("m32", "INT32")])
def test_metadata_publishes_exact_datatypes_and_batch_dims(served, model, dtype):
    with urllib.request.urlopen(f"http://127.0.0.1:{served.ports.http}/v2/models/{model}", timeout=10) as r:
        meta = json.loads(r.read())
    by_name = {t["name"]: t for t in meta["inputs"] + meta["outputs"]}
    assert by_name["orig_target_sizes"] == {"name": "orig_target_sizes", "datatype": dtype, "shape": [-1, 2]}
    assert by_name["images"]["shape"] == [-1, 3, 320, 320] and by_name["labels"]["datatype"] == "INT64"
    engine = toolkit.load(_url(served, model, "http"))
    assert engine.signature.input("orig_target_sizes").dtype == dtype.lower()
    assert engine.signature.bounds("N") == (1, 8) and engine.class_names == ["circle", "square", "triangle", "star"]


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_served_outputs_equal_local_onnxruntime(served, shapes_onnx, scheme):
    report = toolkit.compare(shapes_onnx["int32"], _url(served, "m32", scheme))
    assert report.ok and report.verdict == "agree", report.summary()
    assert sum(s.matched for s in report.images) > 0 and all(s.a_count == s.b_count == s.matched for s in report.images)
    local = toolkit.load(shapes_onnx["int32"], device="cpu").infer(_feeds(3, torch.int32))
    remote = toolkit.load(_url(served, "m32", scheme)).infer(_feeds(3, torch.int32))
    for name in ("labels", "boxes", "scores"):
        assert remote[name].dtype == local[name].dtype and remote[name].shape == local[name].shape
    assert torch.equal(remote["labels"], local["labels"]) and torch.allclose(remote["boxes"], local["boxes"], atol=1e-3)


def test_binder_converts_or_refuses_before_sending(served):
    engine = toolkit.load(_url(served, "m32"))
    before = _counts(served, "m32")
    converted = engine.infer(_feeds(1, torch.int64))  # int64 sizes for a TYPE_INT32 model: narrowed after a value check
    same = engine.infer(_feeds(1, torch.int32))
    assert torch.equal(converted["labels"], same["labels"]) and torch.equal(converted["boxes"], same["boxes"])
    with pytest.raises(BindingError, match="do not fit int32"):
        engine.infer({**_feeds(1), "orig_target_sizes": torch.tensor([[2**40, 5]])})
    with pytest.raises(BindingError, match="outside the engine's range"):
        engine.infer(_feeds(9))  # max_batch 8
    with pytest.raises(BindingError, match="0-255"):
        engine.infer({**_feeds(1), "images": torch.rand(1, 3, 320, 320) * 255})
    time.sleep(0.5)  # Triton updates its statistics just after it answers
    assert _counts(served, "m32")[0] == before[0] + 2  # the refused requests never reached the server


def test_raw_client_mismatches_are_refused_by_the_server(served):
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{served.ports.grpc}")

    def send(images, sizes, datatype):
        a = grpcclient.InferInput("images", list(images.shape), "FP32")
        a.set_data_from_numpy(images)
        b = grpcclient.InferInput("orig_target_sizes", list(sizes.shape), datatype)
        b.set_data_from_numpy(sizes)
        return client.infer("m32", [a, b])

    images = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    ok = send(images, np.array([[320, 240]], dtype=np.int32), "INT32")
    assert ok.as_numpy("boxes").shape == (1, 100, 4)
    with pytest.raises(InferenceServerException, match="(?i)INT64|data.?type"):
        send(images, np.array([[320, 240]], dtype=np.int64), "INT64")  # the seed's bug, sent raw: refused by Triton
    with pytest.raises(InferenceServerException, match="0-255"):
        send(images * 255, np.array([[320, 240]], dtype=np.int32), "INT32")  # re-checked by the model's binder
    with pytest.raises(InferenceServerException, match="(?i)batch"):
        send(np.repeat(images, 9, 0), np.array([[320, 240]] * 9, dtype=np.int32), "INT32")


def _settled_counts(server, model: str) -> tuple[int, int]:
    """The counts once two reads 0.2 s apart agree (earlier tests' last answers counted)."""
    last, now = None, _counts(server, model)
    while now != last:
        time.sleep(0.2)
        last, now = now, _counts(server, model)
    return now


def test_concurrent_requests_are_merged_by_the_dynamic_batcher(served):
    engine = toolkit.load(_url(served, "m64"))
    before = _settled_counts(served, "m64")  # before the reference call: Triton counts an answer just after sending it
    want = engine.infer(_feeds(1, seed=5))
    results, errors = [], []
    lock = threading.Lock()

    def client(k: int) -> None:
        for _ in range(8):
            try:
                out = engine.infer(_feeds(1, seed=5))
                with lock:
                    results.append(out)
            except Exception as e:  # counted, and the assertion below names it
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    [t.start() for t in threads]
    [t.join(240) for t in threads]
    assert not errors and len(results) == 64
    assert all(torch.equal(r["labels"], want["labels"]) and torch.allclose(r["boxes"], want["boxes"], atol=1e-4) for r in results)
    deadline = time.monotonic() + 10  # Triton updates its statistics just after it answers
    while _counts(served, "m64")[0] - before[0] < 65 and time.monotonic() < deadline:
        time.sleep(0.1)
    inferences, executions = (a - b for a, b in zip(_counts(served, "m64"), before))
    assert inferences == 65 and executions < inferences  # the reference call and the 64: the batcher merged requests


def test_run_cli_on_a_served_model(served, shapes_onnx, tmp_path):
    from toolkit.checks.sides import synthetic_images
    from toolkit.tasks.run import infer_images

    images = synthetic_images(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "run", _url(served, "m64"), str(tmp_path), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = json.loads((tmp_path / "out" / "detections.json").read_text())
    local = toolkit.load(shapes_onnx["int64"], device="cpu")  # the same file in local ONNX Runtime
    expected = sum(len(d.above(0.3).scores) for d in infer_images(local, images))
    assert len(records) == expected > 0


def test_empty_outputs_are_an_error_never_a_result(served):
    """What a numpy >= 2 stub answers (shapes, no bytes), as a real gRPC response message."""
    from tritonclient.grpc import InferResult, service_pb2

    from toolkit.runtime.backends.triton import check_response

    engine = toolkit.load(_url(served, "m64"))
    response = service_pb2.ModelInferResponse(model_name="m64", model_version="1")
    for spec, shape in zip(engine.signature.outputs, ([1, 100], [1, 100, 4], [1, 100])):
        out = response.outputs.add(name=spec.name, datatype={"int64": "INT64", "float32": "FP32"}[spec.dtype])
        out.shape.extend(shape)
        response.raw_output_contents.append(b"")
    with pytest.raises(EngineError, match="0 bytes instead of 800.*numpy >= 2"):
        check_response(InferResult(response), engine.signature, {"N": 1}, engine.url)
    response.raw_output_contents[0] = b"\0" * 800
    response.raw_output_contents[1] = b"\0" * 1596  # 4 bytes short of [1,100,4] fp32
    response.raw_output_contents[2] = b"\0" * 400
    with pytest.raises(EngineError, match="boxes .*1596 bytes instead of 1600"):
        check_response(InferResult(response), engine.signature, {"N": 1}, engine.url)


def test_unreachable_server_and_busy_port_are_clear_errors(served):
    from toolkit.serve.server import free_port

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=rf"grpc://127.0.0.1:{port}/m64: not reachable or not ready after 1 s"):
        toolkit.load(f"grpc://127.0.0.1:{port}/m64", timeout_s=1)
    assert time.monotonic() - t0 < 15
    with pytest.raises(EngineError, match="not ready"):
        toolkit.load(_url(served, "nosuchmodel"), timeout_s=1)
    with pytest.raises(InputError, match=f"grpc port {served.ports.grpc} on 127.0.0.1 is in use"):
        toolkit.serve(str(FIXTURE), http_port=free_port(), grpc_port=served.ports.grpc, metrics_port=free_port(), block=False)
    with pytest.raises(EngineError, match="grpc://HOST:PORT/MODEL"):
        toolkit.load("grpc://127.0.0.1:8001/")


# --- the CLI server: readiness, in-flight requests at SIGTERM, nothing left behind ----------------------------------


@pytest.mark.slow
def test_serve_cli_answers_in_flight_requests_on_sigterm(shapes_onnx, tmp_path):
    from toolkit.serve.server import free_port

    ports = [free_port() for _ in range(3)]
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", str(shapes_onnx["int64"]), "--name", "shapes",
                                 "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                                 "--max-batch", "4"], stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_S
        while "metrics http" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        text = log.read_text()
        assert f"grpc://127.0.0.1:{ports[1]}/shapes" in text and f"http://127.0.0.1:{ports[2]}/metrics" in text, text
        server_pid = int(re.search(r"tritonserver \(pid (\d+)\)", text).group(1))
        assert urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=5).status == 200
        assert "nv_inference_count" in urllib.request.urlopen(f"http://127.0.0.1:{ports[2]}/metrics", timeout=5).read().decode()
        engine = toolkit.load(f"grpc://127.0.0.1:{ports[1]}/shapes")
        done: list[tuple[float, object]] = []

        def request(seed: int) -> None:
            try:
                out = engine.infer(_feeds(4, seed=seed))
                done.append((time.monotonic(), out["boxes"].shape))
            except Exception as e:
                done.append((time.monotonic(), e))

        def pending() -> int:  # Triton's gauge of requests queued for execution (the executing one not counted)
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[2]}/metrics", timeout=5) as r:
                m = re.search(r'^nv_inference_pending_request_count\{model="shapes".*?\}\s+(\d+)', r.read().decode(), re.M)
            return int(m.group(1)) if m else 0

        threads = [threading.Thread(target=request, args=(k,)) for k in range(6)]
        [t.start() for t in threads]
        deadline = time.monotonic() + 60
        while pending() + len(done) < 5 and time.monotonic() < deadline:  # max batch 4: one executes, the rest queue
            time.sleep(0.02)
        held = pending()
        os.kill(proc.pid, signal.SIGTERM)
        [t.join(120) for t in threads]
        assert held > 0, "no request was in flight when SIGTERM was sent"
        assert [r for _, r in done] == [torch.Size([4, 100, 4])] * 6  # every in-flight request answered
        assert proc.wait(120) == 0
        assert "tritonserver stopped (exit code 0)" in log.read_text()
        assert not _alive(server_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _numpy2_directory(tmp_path: Path) -> Path | None:
    """A directory holding only a numpy >= 2 for this Python: one on sys.path, in the base interpreter's site-packages
    (a virtual environment's parent often has one), or RTDETR_DEPLOY_TEST_NUMPY2; None if there is none."""
    import sysconfig

    candidates = [*(p for p in sys.path if p), os.environ.get("RTDETR_DEPLOY_TEST_NUMPY2", ""),
                  sysconfig.get_path("purelib", vars={"base": sys.base_prefix, "platbase": sys.base_prefix})]
    found = next((Path(p) for p in candidates if p and _numpy_version_at(p) >= 2), None)
    if found is None:
        return None
    only = tmp_path / "numpy2"
    only.mkdir()
    for name in ("numpy", "numpy.libs"):  # the package and its bundled libraries, nothing else of that environment
        if (found / name).exists():
            os.symlink(found / name, only / name)
    return only


def test_a_numpy2_stub_serves_the_local_engines_outputs(shapes_onnx, tmp_path):
    """numpy >= 2 in Triton's python stub: a model answering through numpy gets empty contents back (the trap), the
    toolkit's model passes tensors by DLPack and answers the local engine's outputs, bit for bit."""
    from toolkit.serve.repository import export_triton
    from toolkit.serve.server import Ports, free_port, start_tritonserver

    numpy2 = _numpy2_directory(tmp_path)
    if numpy2 is None:
        pytest.skip("no numpy >= 2 for this Python (set RTDETR_DEPLOY_TEST_NUMPY2 to a directory holding one)")
    path = [str(numpy2), *(p for p in sys.path if p and _numpy_version_at(p) < 2)]  # numpy 2 first: the stub imports it
    repo = export_triton(shapes_onnx["int64"], tmp_path / "repo", backend="python", name="np2")
    server = start_tritonserver(repo.root, "np2", ports=Ports(free_port(), free_port(), free_port()), python_path=path)
    try:
        server.wait_ready(READY_S)
        feeds = _feeds(2, seed=5)
        out = toolkit.load(server.grpc_url).infer(feeds)
        want = toolkit.load(shapes_onnx["int64"], device="cpu").infer(feeds)
        assert set(out) == set(want)
        for name in want:
            assert out[name].dtype == want[name].dtype and torch.equal(out[name], want[name]), name
    finally:
        server.stop()
    assert not _alive(server.pid)
    # the same repository answering through numpy instead: empty contents, so the stub above really ran numpy 2
    trap = export_triton(shapes_onnx["int64"], tmp_path / "trap", backend="python", name="np2trap")
    model_py = trap.root / "np2trap" / "1" / "model.py"
    dlpack = "pb_utils.Tensor.from_dlpack(name, self.torch.utils.dlpack.to_dlpack(part))"
    assert dlpack in model_py.read_text()
    model_py.write_text(model_py.read_text().replace(dlpack, "pb_utils.Tensor(name, part.numpy())"))
    server = start_tritonserver(trap.root, "np2trap", ports=Ports(free_port(), free_port(), free_port()), python_path=path)
    try:
        server.wait_ready(READY_S)
        with pytest.raises(EngineError, match="0 bytes instead of"):
            toolkit.load(server.grpc_url).infer(feeds)
    finally:
        server.stop()


def _numpy_version_at(entry: str) -> int:
    init = Path(entry) / "numpy" / "version.py"
    if not init.is_file():
        return -1
    m = re.search(r"""^(?:__version__|version)\s*[:=].*?["'](\d+)\.""", init.read_text(), re.M)
    return int(m.group(1)) if m else -1


@pytest.mark.gpu
@pytest.mark.slow
def test_serve_on_gpus_one_instance_group_each(shapes_onnx):
    """On a GPU host: a CUDA engine behind Triton, one KIND_GPU instance group per visible GPU, same detections."""
    from toolkit.serve.server import free_port

    gpus = list(range(torch.cuda.device_count()))
    with toolkit.serve(str(shapes_onnx["int64"]), devices=gpus, http_port=free_port(), grpc_port=free_port(),
                       metrics_port=free_port(), block=False, ready_timeout_s=READY_S) as server:
        assert server.repository.config_text.count("KIND_GPU") == len(gpus)
        report = toolkit.compare(shapes_onnx["int64"], server.grpc_url)
        assert report.ok and sum(s.matched for s in report.images) > 0, report.summary()
        out = toolkit.load(server.grpc_url, device="cuda").infer(_feeds(2))
        assert out["boxes"].is_cuda and out["boxes"].shape == (2, 100, 4)
    assert not _alive(server.pid)


@pytest.mark.gpu
def test_serve_a_torch_checkpoint_on_cuda():
    """The trained fixture's checkpoint (a torch engine) served with ``device="cuda"``: Triton hands the python
    backend its inputs on the host, and the model moves them to the engine's GPU (before, every request was
    refused: "engine expects float32 [N,3,320,320] on cuda:0, got ... on cpu")."""
    from toolkit.serve.server import free_port
    from toolkit.tasks.demo import fixture_path

    with toolkit.serve(str(fixture_path()), device="cuda", http_port=free_port(), grpc_port=free_port(),
                       metrics_port=free_port(), block=False, ready_timeout_s=READY_S) as server:
        report = toolkit.compare(toolkit.load(fixture_path(), device="cuda"), server.grpc_url)
        assert report.ok and report.verdict == "agree" and sum(s.matched for s in report.images) > 0, report.summary()
    assert not _alive(server.pid)


# --- faults: the server dies under load ------------------------------------------------------------------------


def test_killing_the_server_mid_load_gives_errors_never_partial_results(shapes_onnx, tmp_path):
    """SIGKILL tritonserver while 4 clients send requests: every call either returned a complete answer (the
    local engine's boxes) or raised an EngineError naming the URL; a call after the kill fails fast and bounded."""
    from toolkit.serve.repository import export_triton
    from toolkit.serve.server import Ports, free_port, start_tritonserver

    export_triton(shapes_onnx["int64"], tmp_path / "repo", backend="python", name="k64", max_batch=4, max_queue_delay_us=2000)
    server = start_tritonserver(tmp_path / "repo", "k64", ports=Ports(free_port(), free_port(), free_port()))
    try:
        server.wait_ready(READY_S)
        engine = toolkit.load(server.grpc_url, timeout_s=5)
        want = toolkit.load(shapes_onnx["int64"], device="cpu").infer(_feeds(2, seed=7))
        answers: list[dict] = []
        failures: list[BaseException] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    out = engine.infer(_feeds(2, seed=7))
                except BaseException as e:  # noqa: BLE001 - every failure is inspected below
                    with lock:
                        failures.append(e)
                    return
                with lock:
                    answers.append(out)

        threads = [threading.Thread(target=client) for _ in range(4)]
        [t.start() for t in threads]
        deadline = time.monotonic() + 120
        while len(answers) < 8 and not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(answers) >= 8 and not failures, f"the load never got going: {failures}"
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(30)
        killed_at = time.monotonic()
        [t.join(90) for t in threads]
        stop.set()
        assert not any(t.is_alive() for t in threads), "a client hung after the server died"
        assert len(failures) == 4, "every client's next call after the kill must fail"
        for e in failures:
            assert isinstance(e, EngineError) and server.grpc_url in str(e), repr(e)
        for out in answers:  # complete answers only: the right shapes and the local engine's detections
            assert out["boxes"].shape == want["boxes"].shape and torch.equal(out["labels"], want["labels"])
            assert torch.allclose(out["boxes"], want["boxes"], atol=1e-3)
        assert time.monotonic() - killed_at < 60
        t0 = time.monotonic()
        with pytest.raises(EngineError, match="k64"):
            engine.infer(_feeds(1))
        assert time.monotonic() - t0 < 30, "a call to a dead server must give up within its bounded retry"
        assert _group_members(server.pid), "the killed server's python stub should still be there before stop()"
    finally:
        server.stop()
    assert not _alive(server.pid)
    deadline = time.monotonic() + 10  # the stub the killed server left behind: stop() ended it too
    while _group_members(server.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_members(server.pid), _group_members(server.pid)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found
