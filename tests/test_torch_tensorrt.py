"""Torch-TensorRT programs: refusals without the library or a GPU (always run), builds and parity on a GPU with it."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

import toolkit
from toolkit.builders.build import BuildError
from toolkit.runtime.engine import detect_backend
from toolkit.errors import EngineError
from toolkit.export.permutation import match_permutation
from toolkit.runtime.sidecar import sidecar_path, write_sidecar

HINT = "pip install 'rtdetr-deploy[torch-tensorrt]'"


@pytest.fixture
def no_torch_tensorrt(monkeypatch):
    """``import torch_tensorrt`` raises ImportError, even where it is installed."""
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)


@pytest.fixture
def fake_program(tiny_model, tmp_path):
    """Writes a placeholder ``.ep`` with a sidecar (``meta`` overrides it): enough for every check before loading."""

    def write(**meta):
        path = tmp_path / "model.ep"
        path.write_bytes(b"not a program")
        sidecar = {"backend": "torch-tensorrt", "device": "cuda", "gpu_name": "NVIDIA H100", "compute_capability": "9.0",
                   "torch_tensorrt_version": "2.14.0", "tensorrt_version": "11.1.0", "precision": "fp32",
                   "signature": tiny_model.signature().with_bounds(N=(1, 4)).to_dict()} | meta
        write_sidecar(path, sidecar)  # with the placeholder's size and sha256, as a build writes it
        return path

    return write


def test_suffix_selects_the_backend():
    assert detect_backend("model.ep") == "torch-tensorrt"


def test_build_without_the_library(tiny_model, tmp_path, no_torch_tensorrt):
    from toolkit.builders.torch_tensorrt import build_torch_tensorrt

    with pytest.raises(BuildError, match=r"Torch-TensorRT is not installed.*" + HINT.replace("[", r"\[")):
        build_torch_tensorrt(tiny_model, tmp_path / "m.ep", progress=False)
    assert not list(tmp_path.iterdir())


def test_build_refusals(tiny_model, tiny_onnx, tmp_path, monkeypatch):
    """Options are checked before the library is imported, the device right after it."""
    from toolkit.builders.build import build_engine
    from toolkit.builders.torch_tensorrt import build_torch_tensorrt

    with pytest.raises(BuildError, match="precision must be one of"):
        build_torch_tensorrt(tiny_model, tmp_path / "m.ep", precision="int8")
    with pytest.raises(BuildError, match="batch must satisfy"):
        build_torch_tensorrt(tiny_model, tmp_path / "m.ep", batch=(4, 2, 8))
    with pytest.raises(BuildError, match="min_block_size must be at least 1"):
        build_torch_tensorrt(tiny_model, tmp_path / "m.ep", min_block_size=0)
    with pytest.raises(BuildError, match=r"must end in \.ep"):
        build_torch_tensorrt(tiny_model, tmp_path / "m.pt2")
    with pytest.raises(BuildError, match="--model"):  # exported from an in-memory module: no model to compile
        build_engine(tiny_onnx, tmp_path / "m.ep", backend="torch-tensorrt")
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))  # imports; never called
    with pytest.raises(BuildError, match="NVIDIA GPUs only: device must be 'cuda', got 'cpu'"):
        build_torch_tensorrt(tiny_model, tmp_path / "m.ep", device="cpu")
    assert not list(tmp_path.iterdir())


def test_missing_sidecar(fake_program):
    path = fake_program()
    sidecar_path(path).unlink()
    with pytest.raises(EngineError, match=r"sidecar model\.ep\.json is missing"):
        toolkit.load(path)


def test_sidecar_of_another_backend(fake_program):
    path = fake_program(backend="aoti")
    with pytest.raises(EngineError, match="sidecar is for backend 'aoti', not a Torch-TensorRT program"):
        toolkit.load(path)


def test_cpu_refused(fake_program):
    with pytest.raises(EngineError, match="NVIDIA GPUs only: it cannot run on cpu"):
        toolkit.load(fake_program(), device="cpu")


def test_load_without_the_library(fake_program, no_torch_tensorrt):
    with pytest.raises(EngineError, match="needs Torch-TensorRT, which is not installed.*" + HINT.replace("[", r"\[")):
        toolkit.load(fake_program())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_no_gpu_refused(fake_program, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))  # imports; never called
    with pytest.raises(EngineError, match="need a CUDA GPU"):
        toolkit.load(fake_program())


# --- real builds: need a CUDA GPU and Torch-TensorRT -------------------------------------------------------


def _needs_torch_tensorrt():
    pytest.importorskip("torch_tensorrt", reason=f"needs Torch-TensorRT ({HINT}), not installable in this workplace")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none on this machine)")


@pytest.fixture(scope="module")
def tiny_ep(tiny_model, tmp_path_factory):
    _needs_torch_tensorrt()
    from toolkit.builders.torch_tensorrt import build_torch_tensorrt

    path = tmp_path_factory.mktemp("torch_tensorrt") / "tiny.ep"
    return build_torch_tensorrt(tiny_model, path, batch=(1, 2, 4), progress=False)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tiny_parity_with_eager(tiny_ep, tiny_model, sample_images):
    import torch_tensorrt

    from toolkit.runtime.sidecar import read_sidecar

    meta = read_sidecar(tiny_ep)
    assert meta["backend"] == "torch-tensorrt" and meta["precision"] == "fp32" and meta["compute_capability"]
    assert meta["torch_tensorrt_version"] == torch_tensorrt.__version__ and meta["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert meta["fold"]["folded_pairs"] == 57  # compiled from the folded copy; parity below is against the unfolded model
    assert not list(tiny_ep.parent.glob(".*"))  # no temporary left behind
    engine = toolkit.load(tiny_ep)
    assert engine.backend == "torch-tensorrt" and engine.device.type == "cuda"
    assert engine.class_names == tiny_model.class_names
    ref = toolkit.load(copy.deepcopy(tiny_model), backend="torch", device="cuda")  # the session fixture stays on the CPU
    images, sizes = sample_images
    for n in (1, 3):
        idx = torch.arange(n) % images.shape[0]
        feeds = {"images": images[idx].cuda(), "orig_target_sizes": sizes[idx].cuda()}
        out, expected = engine(**feeds), ref(**feeds)
        assert out["labels"].dtype == torch.int64 and out["boxes"].shape == (n, 100, 4)
        for i in range(n):
            m = match_permutation({k: v[i] for k, v in expected.items()}, {k: v[i] for k, v in out.items()}, score_band=1e-4)
            assert m.compared > 0 and m.label_mismatches == 0, m
            assert m.max_box_diff <= 0.1 and m.max_score_diff <= 1e-4, m


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_second_build_comes_from_the_cache(tiny_ep, tiny_model, tmp_path):
    from toolkit.builders.torch_tensorrt import build_torch_tensorrt

    again = build_torch_tensorrt(tiny_model, tmp_path / "again.ep", batch=(1, 2, 4), progress=False)
    assert again.read_bytes() == tiny_ep.read_bytes()


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_fp16_trained_fixture(tmp_path):
    """fp16 on the trained fixture (the tie-free tiny test model overflows in fp16), judged as users see it."""
    _needs_torch_tensorrt()
    from toolkit.builders.torch_tensorrt import build_torch_tensorrt
    from toolkit.tasks.demo import fixture_path

    path = build_torch_tensorrt(fixture_path(), tmp_path / "shapes_fp16.ep", precision="fp16", batch=(1, 2, 4), progress=False)
    engine = toolkit.load(path)
    assert engine.precision == "fp16"
    report = toolkit.compare(toolkit.load(fixture_path(), backend="torch", device="cuda"), engine)
    assert report.ok, report.summary()
