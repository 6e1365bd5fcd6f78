"""Every binder rule, against a signature like an engine's (int32 sizes, batch range 1..4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.runtime.binding import Binder, allocate_outputs
from toolkit.errors import BindingError
from toolkit.signature import PreprocessSpec, deploy_signature

SIG = deploy_signature(PreprocessSpec(size=(32, 48)), sizes_dtype="int32", top_k=10).with_bounds(N=(1, 4))


def feeds(n=2, sizes_dtype=torch.int64, **over):
    f = {"images": torch.rand(n, 3, 32, 48), "orig_target_sizes": torch.tensor([[640, 480]] * n, dtype=sizes_dtype)}
    f.update(over)
    return f


def test_safe_cast_int64_to_int32_keeps_values():
    bound = Binder(SIG, "cpu").bind(feeds())
    sizes = bound.tensors["orig_target_sizes"]
    assert sizes.dtype == torch.int32 and sizes.tolist() == [[640, 480], [640, 480]]
    assert bound.dims == {"N": 2}


def test_cast_none_refuses_with_the_fix():
    with pytest.raises(BindingError) as e:
        Binder(SIG, "cpu", cast="none").bind(feeds(n=1))
    msg = str(e.value)
    assert msg.startswith("orig_target_sizes: engine expects int32 [N,2] on cpu, got int64 [1,2] on cpu")
    assert "pass dtype=torch.int32" in msg and 'cast="safe"' in msg


def test_safe_cast_refuses_values_that_do_not_fit():
    with pytest.raises(BindingError, match=r"values in \[640, 4294967296\] do not fit int32"):
        Binder(SIG, "cpu").bind(feeds(orig_target_sizes=torch.tensor([[640, 2**32]] * 2)))


def test_float_narrowing_is_not_safe_but_widening_is():
    half = deploy_signature(PreprocessSpec(size=(32, 48)), sizes_dtype="int64", top_k=10)
    assert Binder(SIG, "cpu").bind(feeds(images=torch.rand(2, 3, 32, 48).half())).tensors["images"].dtype == torch.float32
    with pytest.raises(BindingError, match="float64 -> float32 is not lossless"):
        Binder(half, "cpu").bind(feeds(images=torch.rand(2, 3, 32, 48, dtype=torch.float64)))
    out = Binder(half, "cpu", cast="unsafe").bind(feeds(images=torch.rand(2, 3, 32, 48, dtype=torch.float64)))
    assert out.tensors["images"].dtype == torch.float32


def test_uint8_images_refused_with_preprocessing_hint():
    with pytest.raises(BindingError, match="toolkit.preprocess"):
        Binder(SIG, "cpu").bind(feeds(images=torch.zeros(2, 3, 32, 48, dtype=torch.uint8)))


@pytest.mark.parametrize("images,pattern", [
    (torch.rand(3, 32, 48), r"rank 3 instead of 4; add the batch dim"),
    (torch.rand(2, 3, 32, 40), r"dim 3 is 40, the engine fixes it at 48"),
    (torch.rand(5, 3, 32, 48), r"dim 0 \(N\) is 5, outside the engine's range \[1, 4\]"),
])
def test_shape_rules(images, pattern):
    n = images.shape[0] if images.ndim == 4 else 2
    with pytest.raises(BindingError, match=pattern):
        Binder(SIG, "cpu").bind(feeds(n=n, images=images))


def test_batch_must_agree_between_inputs():
    with pytest.raises(BindingError, match="another input set N=2"):
        Binder(SIG, "cpu").bind(feeds(orig_target_sizes=torch.tensor([[640, 480]])))


def test_missing_and_extra_names():
    with pytest.raises(BindingError, match=r"missing orig_target_sizes \(int32 \[N,2\]\); unexpected sizes"):
        Binder(SIG, "cpu").bind({"images": torch.rand(1, 3, 32, 48), "sizes": torch.tensor([[1, 1]])})


def test_non_contiguous_is_made_contiguous_and_numpy_accepted():
    images = torch.rand(2, 48, 32, 3).permute(0, 3, 2, 1)  # [2,3,32,48] view, not contiguous
    assert not images.is_contiguous()
    bound = Binder(SIG, "cpu").bind(feeds(images=images, orig_target_sizes=np.array([[640, 480]] * 2)))
    assert bound.tensors["images"].is_contiguous() and torch.equal(bound.tensors["images"], images)


def test_python_lists_are_refused():
    with pytest.raises(BindingError, match="expects a torch tensor int32 \\[N,2\\], got list"):
        Binder(SIG, "cpu").bind(feeds(orig_target_sizes=[[640, 480], [640, 480]]))


def test_nan_and_pixel_range_refused_unless_disabled():
    bad = torch.rand(2, 3, 32, 48)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(BindingError, match="NaN or Inf"):
        Binder(SIG, "cpu").bind(feeds(images=bad))
    with pytest.raises(BindingError, match="look like 0-255 pixels"):
        Binder(SIG, "cpu").bind(feeds(images=torch.rand(2, 3, 32, 48) * 255))
    Binder(SIG, "cpu", check_values=False).bind(feeds(images=bad))


@pytest.mark.gpu
def test_device_mismatch_refused_or_copied():
    sig = SIG
    with pytest.raises(BindingError, match="wrong device; move it with .to"):
        Binder(sig, "cuda").bind(feeds())
    bound = Binder(sig, "cuda", copy_to_device=True).bind(feeds())
    assert bound.tensors["images"].is_cuda


def test_device_mismatch_refused_on_meta_device():
    """A CPU tensor for an engine on another device is refused (meta stands in for a GPU here)."""
    with pytest.raises(BindingError, match="got float32 \\[2,3,32,48\\] on cpu: wrong device"):
        Binder(SIG, "meta").bind(feeds())


def test_output_buffers_are_checked():
    binder = Binder(SIG, "cpu")
    bound = binder.bind(feeds())
    outs = allocate_outputs(SIG, bound.dims, torch.device("cpu"))
    assert {k: tuple(v.shape) for k, v in outs.items()} == {"labels": (2, 10), "boxes": (2, 10, 4), "scores": (2, 10)}
    assert binder.check_outputs(outs, bound.dims)["boxes"] is outs["boxes"]
    outs["labels"] = torch.empty(2, 10, dtype=torch.int32)
    with pytest.raises(BindingError, match="output labels: engine writes int64"):
        binder.check_outputs(outs, bound.dims)
