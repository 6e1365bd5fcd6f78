"""D-FINE and DEIMv2 served on a real Triton Inference Server (the ``tritonserver`` inside nvidia-pytriton), CPU.

The pattern of tests/test_serve.py: free ports, a bounded wait, the server stopped by its process id. The
reference is the local ONNX Runtime engine on the same exported file; the models are the tiny configs with
seeded, tie-free weights (as tests/test_families.py builds them).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import toolkit
from toolkit.models.config import build_model, make_tie_free_

_missing = [m for m in ("pytriton", "tritonclient") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"serving tests need {', '.join(_missing)}: pip install 'rtdetr-deploy[serve]'")

MODELS = ("dfine_tiny", "deimv2_tiny")
NOISE = 0.2  # as tests/test_families.py
READY_S = 180


@pytest.fixture(scope="module")
def family_onnx(tmp_path_factory) -> dict[str, Path]:
    from toolkit.export.onnx import export_onnx

    d = tmp_path_factory.mktemp("serve-families")
    out = {}
    for name in MODELS:
        out[name] = d / f"{name}.onnx"
        result = export_onnx(make_tie_free_(build_model(name, seed=0), seed=0, std=NOISE), out[name])
        assert result.verify.ok, result.verify.summary()  # the file itself agrees with torch before it is served
    return out


@pytest.fixture(scope="module")
def served(family_onnx, tmp_path_factory):
    """One tritonserver on a python-backend repository holding both models; stopped by pid."""
    from toolkit.serve.repository import export_triton
    from toolkit.serve.server import Ports, free_port, start_tritonserver

    root = tmp_path_factory.mktemp("serve-families-repo")
    for name, path in family_onnx.items():
        export_triton(path, root, backend="python", name=name, max_batch=4, max_queue_delay_us=1000)
    server = start_tritonserver(root, MODELS[0], ports=Ports(free_port(), free_port(), free_port()))
    try:
        for name in MODELS:
            server.model = name
            server.wait_ready(READY_S)
        yield server
    finally:
        server.stop()


@pytest.mark.slow  # about 2 minutes on two shared cores (two exports, a server start): pytest -m slow
@pytest.mark.parametrize("name", MODELS)
def test_served_family_equals_the_local_engine(served, family_onnx, name):
    url = f"grpc://127.0.0.1:{served.ports.grpc}/{name}"
    report = toolkit.compare(family_onnx[name], url)
    assert report.ok and report.verdict == "agree", report.summary()
    assert sum(s.matched for s in report.images) > 0 and all(s.a_count == s.b_count == s.matched for s in report.images)
    g = torch.Generator().manual_seed(3)
    size = toolkit.load(family_onnx[name], device="cpu").signature.preprocess.size
    feeds = {"images": torch.rand(2, 3, *size, generator=g), "orig_target_sizes": torch.tensor([[size[1], size[0]]] * 2)}
    local = toolkit.load(family_onnx[name], device="cpu").infer(feeds)
    remote = toolkit.load(url).infer(feeds)
    for key in ("labels", "boxes", "scores"):
        assert remote[key].dtype == local[key].dtype and remote[key].shape == local[key].shape
    assert torch.equal(remote["labels"], local["labels"]) and torch.allclose(remote["boxes"], local["boxes"], atol=1e-3)
