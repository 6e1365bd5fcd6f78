"""The fused multi-scale deformable attention kernel (``rtdetr::ms_deform_attn``) against transformers' own module.

On the CPU the Triton kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``): the same kernel code, the same
index arithmetic and masks, executed with numpy. The GPU test compiles it into an AOTInductor package."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (it comes with torch's Linux wheels)")

from toolkit.models import deform_kernel  # noqa: E402


def _inputs(dtype=torch.float32, batch=2, queries=37, heads=2, dim=8, points=3, seed=0, spread=0.2):
    """Three levels with odd sizes; sampling locations spread past [0, 1] so that corners fall outside (zero
    padding) and on every border."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[7, 9], [4, 5], [2, 3]])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(batch, s, heads, dim, generator=g).to(dtype)
    loc = (torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g) * (1 + 2 * spread) - spread).to(dtype)
    w = torch.rand(batch, queries, heads, len(shapes), points, generator=g).softmax(-1).to(dtype)
    return value, shapes, starts, loc, w


def _transformers(value, shapes, starts, loc, w):
    from transformers.models.rt_detr.modeling_rt_detr import MultiScaleDeformableAttention

    return MultiScaleDeformableAttention()(value.float(), shapes, [tuple(map(int, hw)) for hw in shapes], starts,
                                           loc.float(), w.float(), 64)


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    deform_kernel._kernel.cache_clear()
    yield
    deform_kernel._kernel.cache_clear()


def test_the_ops_cpu_kernel_is_transformers_formula():
    """The registered op dispatches CPU tensors to transformers' own formula (fp16 inputs: accumulated in fp32)."""
    op = deform_kernel.register()
    for dtype in (torch.float32, torch.float16):
        args = _inputs(dtype)
        got = op(*args)
        assert got.dtype == dtype and torch.allclose(got.float(), _transformers(*args), atol=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_matches_transformers_in_the_interpreter(interpreted, dtype):
    args = _inputs(dtype)
    ref = _transformers(*args)
    got = deform_kernel.launch(*args, block_q=16)  # 37 queries: the last block is partly masked
    assert got.dtype == dtype and got.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # fp16 inputs; both accumulate in fp32
    assert torch.allclose(got.float(), ref, atol=tol), (got.float() - ref).abs().max()
    # the edges matter: some corners were outside the feature maps, and results there are not all zero
    assert (args[3] < 0).any() and (args[3] > 1).any()


def test_kernel_refuses_a_head_dimension_it_cannot_tile(interpreted):
    value, shapes, starts, loc, w = _inputs(dim=6)
    with pytest.raises(ValueError, match="power-of-two head dimension"):
        deform_kernel.launch(value, shapes, starts, loc, w)


def test_fused_attention_on_the_fixture_changes_nothing_on_cpu():
    """The swap wires transformers' arguments to the op (the CPU kernel is the reference formula): the fixture's
    outputs stay the same, and the modules get their own forward back afterwards."""
    from toolkit.models.loading import load_model
    from toolkit.tasks.demo import fixture_path

    model = load_model(fixture_path()).eval()
    images = torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[320, 320], [640, 480]])
    with torch.inference_mode():
        ref = model(images, sizes)
        with deform_kernel.fused_deformable_attention(model) as swapped:
            got = model(images, sizes)
    assert swapped == len(deform_kernel.deformable_modules(model)) > 0
    assert torch.equal(got[0], ref[0]) and torch.allclose(got[1], ref[1], atol=1e-3) and torch.allclose(got[2], ref[2], atol=1e-5)
    assert all("forward" not in m.__dict__ for m in deform_kernel.deformable_modules(model))


def test_build_refuses_the_fused_kernel_where_it_cannot_compile(tmp_path):
    """The fused kernel is a Triton kernel compiled into a CUDA package: asked for on the CPU, or for a backend that
    does not compile the torch model, it is one clear error (exit 2) and nothing is written."""
    from tests.conftest import run_cli

    out = tmp_path / "m.pt2"
    r = run_cli("build", "--model", "toolkit/fixtures/shapes", "--backend", "aoti", "--device", "cpu", "--fused-deform-attn",
                "-o", str(out))
    assert r.returncode == 2 and "needs --device cuda" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("build", "x.onnx", "--backend", "tensorrt", "--fused-deform-attn", "-o", str(tmp_path / "m.engine"))
    assert r.returncode == 2 and "--fused-deform-attn" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_gpu_fused_kernel_package_matches_eager(tmp_path):
    """On a GPU: the fixture's fp32 AOTInductor package built with the fused kernel against eager torch, detection
    by detection, and the kernel itself against transformers' module on CUDA."""
    import toolkit
    from toolkit.builders.aoti import build_aoti
    from toolkit.tasks.demo import fixture_path

    args = [t.cuda() for t in _inputs(queries=300, heads=8, dim=32, points=4)]
    assert torch.allclose(deform_kernel.launch(*args), _transformers(*args), atol=1e-4)
    path = build_aoti(fixture_path(), tmp_path / "fused.pt2", device="cuda", batch=(1, 4, 8), fused_deform_attn=True,
                      cache=False)
    from toolkit.runtime.sidecar import read_sidecar

    assert read_sidecar(path)["fused_deform_attn"] > 0
    report = toolkit.compare(toolkit.load(fixture_path(), backend="torch", device="cuda"), toolkit.load(path, device="cuda"))
    assert report.ok and report.verdict == "agree" and sum(s.matched for s in report.images) > 0, report.summary()
