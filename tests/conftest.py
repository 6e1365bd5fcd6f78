"""Shared fixtures: a tie-free tiny model and its exported ONNX files (built once per test session)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.models.config import build_model, make_tie_free_


def pytest_configure(config):
    """Built engines go to a per-session cache, never the user's ~/.cache."""
    import tempfile

    os.environ.setdefault("RTDETR_DEPLOY_CACHE", tempfile.mkdtemp(prefix="rtdetr-test-cache-"))


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs the real TensorRT library (not installable in this workplace)"))


@pytest.fixture(scope="session")
def tiny_model():
    """The `tiny` config with seeded, tie-free weights (its query selection has no ties, so outputs compare)."""
    return make_tie_free_(build_model("tiny", seed=0), seed=0)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    from toolkit.export.onnx import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(tiny_model, path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx_int32(tiny_model, tmp_path_factory) -> Path:
    from toolkit.export.onnx import export_onnx

    path = tmp_path_factory.mktemp("onnx32") / "tiny_int32.onnx"
    export_onnx(tiny_model, path, sizes_dtype="int32")
    return path


@pytest.fixture(scope="session")
def sample_images():
    """Two distinct structured images [2,3,128,128] in [0,1] and their (w,h) sizes."""
    from toolkit.export.verify import verification_images

    return verification_images(2, (128, 128), seed=7), torch.tensor([[640, 480], [320, 200]])


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def shifted_engine(inner, dx: float):
    """``inner`` with every box moved ``dx`` px to the right: the kind of bug compare and the bench gate must catch."""
    from toolkit.runtime.base import BaseEngine

    class Shifted(BaseEngine):
        backend = inner.backend

        def _run(self, bound):
            out = dict(inner._run(bound))
            out["boxes"] = out["boxes"] + torch.tensor([dx, 0.0, dx, 0.0], device=out["boxes"].device)
            return out

    return Shifted(inner.signature, inner.device, class_names=inner.class_names)


@pytest.fixture(scope="session")
def tiny_config_pt2(tmp_path_factory) -> Path:
    """What `rtdetr-deploy build --model tiny --backend aoti --device cpu --batch 1,2,4` writes (in process: the CLI's
    code path); its sidecar records the config it came from. Minutes of AOTInductor compile on CPU: build it once."""
    from toolkit.cli.main import main

    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    code = main(["build", "--model", "tiny", "--backend", "aoti", "--device", "cpu", "--batch", "1,2,4", "-o", str(path)])
    assert code == 0 and path.is_file()
    return path


SERVE_READY_S = 180


@pytest.fixture(scope="session")
def shapes_onnx(tmp_path_factory) -> dict[str, Path]:
    """The trained fixture exported twice: int64 sizes (official) and int32 sizes; each records its checkpoint."""
    import toolkit
    from toolkit.export.onnx import export_onnx

    fixture = Path(toolkit.__file__).parent / "fixtures" / "shapes"
    d = tmp_path_factory.mktemp("serve-onnx")
    out = {}
    for dtype in ("int64", "int32"):
        export_onnx(str(fixture), out.setdefault(dtype, d / f"shapes_{dtype}.onnx"), sizes_dtype=dtype, verify=False)
    return out


@pytest.fixture(scope="session")
def served(shapes_onnx, tmp_path_factory):
    """One real tritonserver (nvidia-pytriton's) on a python-backend repository (export-triton) holding m64 and m32,
    started once per session (it takes a minute) and stopped by its pid. Users see deltas of its statistics only."""
    if any(importlib.util.find_spec(m) is None for m in ("pytriton", "tritonclient")):
        pytest.skip("serving tests need pytriton and tritonclient: pip install 'rtdetr-deploy[serve]'")
    from toolkit.serve.repository import export_triton
    from toolkit.serve.server import Ports, free_port, start_tritonserver

    root = tmp_path_factory.mktemp("serve-repo")
    export_triton(shapes_onnx["int64"], root, backend="python", name="m64", max_batch=8, max_queue_delay_us=20000)
    export_triton(shapes_onnx["int32"], root, backend="python", name="m32", max_batch=8, max_queue_delay_us=20000)
    server = start_tritonserver(root, "m64", ports=Ports(free_port(), free_port(), free_port()))
    try:
        server.wait_ready(SERVE_READY_S)
        server.model = "m32"
        server.wait_ready(SERVE_READY_S)
        yield server
    finally:
        server.stop()  # SIGTERM to its pid, then wait
        status = Path(f"/proc/{server.pid}/status")  # a zombie has exited: it is only waiting to be reaped
        assert not (status.is_file() and "zombie" not in status.read_text())


def tensorrt_rtx_or_skip():
    """The TensorRT-RTX module as the toolkit's builder finds it (tensorrt_rtx, else tensorrt_rtx_bindings), else skip."""
    from toolkit.builders.tensorrt import _import
    from toolkit.errors import MissingDependencyError

    try:
        return _import("tensorrt-rtx", None)
    except MissingDependencyError as e:
        pytest.skip(str(e))
