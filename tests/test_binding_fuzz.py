"""Property-based fuzz of the binder: random dtypes, shapes, devices, strides and values.

Each call either returns exactly the values that came (in the engine's dtype, contiguous, on its device) or raises
:class:`BindingError`; nothing else escapes, nothing lossy gets through, and a well-formed input is never refused.
The reference for "lossless" is a round trip through the engine's dtype, computed here without the binder.
"""

from __future__ import annotations

import pytest
import torch

from toolkit.errors import BindingError
from toolkit.runtime.binding import Binder
from toolkit.signature import PreprocessSpec, Signature, TensorSpec

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
          torch.float64, torch.bool]
ENGINE_IMAGE_DTYPES = ["float32", "float16"]
ENGINE_SIZE_DTYPES = ["int64", "int32"]
H = W = 4


def _signature(images_dtype: str, sizes_dtype: str) -> Signature:
    return Signature(
        inputs=(TensorSpec("images", images_dtype, ("N", 3, H, W)), TensorSpec("orig_target_sizes", sizes_dtype, ("N", 2))),
        outputs=(TensorSpec("scores", "float32", ("N", 10)),),
        dim_bounds={"N": (1, 4)},
        preprocess=PreprocessSpec(size=(H, W)),
    )


@st.composite
def tensors(draw, n: int, shape_tail: tuple[int, ...], kind: str):
    """Mostly plausible tensors (so that acceptance is exercised), with every kind of damage mixed in."""
    natural = torch.float32 if kind == "images" else draw(st.sampled_from([torch.int64, torch.int32, torch.int16]))
    dtype = natural if draw(st.integers(0, 2)) else draw(st.sampled_from(DTYPES))
    rank_change = draw(st.sampled_from([0] * 8 + [-1, 1]))
    shape = (n, *shape_tail)
    if rank_change == -1:
        shape = shape[1:]
    elif rank_change == 1:
        shape = (*shape, 1)
    if kind == "sizes":
        plausible = [1, 2, 127, 128, 255, 256, 480, 640, 2000]
        damaged = [-5, 0, 2**15, 2**31, 2**40]
    else:
        plausible = [0.0, 0.25, 0.5, 1.0, 1 / 3, 1e-8]
        damaged = [2.0, 255.0, float("nan"), float("inf"), -1.0]
    pool = plausible + (damaged if draw(st.integers(0, 5)) == 0 else [])
    values = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))
    numel = 1
    for d in shape:
        numel *= d
    base = torch.tensor([values[i % len(values)] for i in range(numel * 2)] or [0.0], dtype=torch.float64)
    if draw(st.booleans()) and shape and numel:  # a strided view
        t = base[: numel * 2].reshape(*shape[:-1], shape[-1] * 2)[..., ::2]
    else:
        t = base[:numel].reshape(shape)
    if dtype == torch.bool:
        t = t != 0
    elif not dtype.is_floating_point:
        t = t.nan_to_num(0, 0, 0).clamp(-(2**62), 2**62).to(torch.int64).to(dtype)  # the caller's (maybe wrapped) values
    else:
        t = t.to(dtype)
    if draw(st.integers(0, 20)) == 0:
        t = t.to("meta")  # a tensor on another device
    return t


@st.composite
def feeds(draw):
    n = draw(st.integers(1, 4)) if draw(st.integers(0, 4)) else draw(st.sampled_from([0, 5, 6]))  # bounds are [1, 4]
    m = n if draw(st.integers(0, 5)) else draw(st.integers(0, 6))  # sometimes the batch sizes disagree
    return draw(tensors(n, (3, H, W), "images")), draw(tensors(m, (2,), "sizes"))


def _lossless(t: torch.Tensor, want: torch.dtype) -> bool:
    """The reference: the values survive a round trip through ``want`` exactly (and are finite)."""
    if t.device.type != "cpu":
        return False
    back = t.to(want).to(t.dtype)
    if t.is_floating_point() and not torch.isfinite(t.float()).all():
        return False
    return torch.equal(back, t)


OUTCOMES = {"accepted": 0, "refused": 0}


@settings(max_examples=400, deadline=None, derandomize=True)  # the same cases on every run: CI cannot flake
@given(pair=feeds(), images_dtype=st.sampled_from(ENGINE_IMAGE_DTYPES), sizes_dtype=st.sampled_from(ENGINE_SIZE_DTYPES))
def test_binder_returns_the_same_values_or_raises_binding_error(pair, images_dtype, sizes_dtype):
    images, sizes = pair
    binder = Binder(_signature(images_dtype, sizes_dtype), "cpu")
    try:
        bound = binder.bind({"images": images, "orig_target_sizes": sizes})
    except BindingError:
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["accepted"] += 1
    for name, t in (("images", images), ("orig_target_sizes", sizes)):
        out = bound.tensors[name]
        want = getattr(torch, binder.signature.input(name).dtype)
        assert out.dtype == want and out.is_contiguous() and out.device.type == "cpu" and out.shape == t.shape
        assert _lossless(t, want), f"{name}: a lossy {t.dtype} -> {want} conversion got through"
        assert torch.equal(out.to(torch.float64), t.to(torch.float64)), f"{name}: values changed"
    assert sizes.dtype not in (torch.uint8, torch.int8, torch.bool) and bool((sizes > 0).all())
    assert 1 <= images.shape[0] <= 4 and images.shape[0] == sizes.shape[0]


def test_the_fuzz_was_not_vacuous():
    """Runs after the fuzz (file order): both outcomes must have happened many times."""
    if sum(OUTCOMES.values()) == 0:
        pytest.skip("the fuzz test did not run in this session")
    assert OUTCOMES["accepted"] >= 30 and OUTCOMES["refused"] >= 30, OUTCOMES


@settings(max_examples=100, deadline=None, derandomize=True)
@given(n=st.integers(1, 4), sizes_dtype=st.sampled_from(ENGINE_SIZE_DTYPES), strided=st.booleans(),
       w=st.integers(1, 8192), h=st.integers(1, 8192))
def test_well_formed_inputs_are_always_accepted(n, sizes_dtype, strided, w, h):
    binder = Binder(_signature("float32", sizes_dtype), "cpu")
    images = torch.rand(n, 3, H, W * 2)[..., ::2] if strided else torch.rand(n, 3, H, W)
    sizes = torch.tensor([[w, h]] * n, dtype=torch.int64)
    bound = binder.bind({"images": images, "orig_target_sizes": sizes})
    assert torch.equal(bound.tensors["images"], images)
    assert bound.tensors["orig_target_sizes"].tolist() == [[w, h]] * n
