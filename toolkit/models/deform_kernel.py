"""Multi-scale deformable attention as one fused Triton kernel, registered as the custom op ``rtdetr::ms_deform_attn``.

Why: in an AOTInductor package of RT-DETR-R50 at batch 32 (H100, fp16), the decoder's deformable attention is one
``grid_sample`` per level plus a weighted sum, which Inductor compiles to a grid-sample kernel and a reduction
(4.5 ms of 22.7 ms of kernels, ``docs/benchmarks.md``). Each sampled value is written to memory and read back once
per level. The kernel here computes, per (batch, head, block of queries), every level's and point's bilinear
sample and the attention-weighted sum in registers, reading each value row once per corner and writing only the
output.

It is the same function as transformers' ``MultiScaleDeformableAttention`` (``grid_sample``, bilinear, zero
padding, ``align_corners=False``), accumulated in fp32 whatever the input dtype. ``torch.library.triton_op`` makes
the kernel visible to ``torch.export`` and Inductor, so an AOTInductor package compiles it in; the op's CPU kernel
is the reference formula (the ONNX path never sees the op: :func:`fused_deformable_attention` is applied to AOTI
builds only, where ``build --fused-deform-attn`` asks for it).

Triton is imported on first use: ``import toolkit`` does not load it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch

OP = "rtdetr::ms_deform_attn"


def reference(value: torch.Tensor, shapes: torch.Tensor, starts: torch.Tensor, locations: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    """transformers' ``MultiScaleDeformableAttention`` on the same arguments, accumulated in fp32 as the kernel does.

    value [B, S, H, D]; shapes [L, 2] (height, width) int64; starts [L] int64; locations [B, Q, H, L, P, 2] in
    [0, 1] (x, y); weights [B, Q, H, L, P]. Returns [B, Q, H*D] in value's dtype."""
    from transformers.models.rt_detr.modeling_rt_detr import MultiScaleDeformableAttention

    out = MultiScaleDeformableAttention()(value.float(), shapes, [tuple(hw) for hw in shapes.tolist()], starts,
                                          locations.float(), weights.float(), 64)
    return out.to(value.dtype)


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # pragma: no cover - torch's Linux wheels bring triton
        raise ImportError("the fused deformable-attention kernel needs triton (it comes with torch's CUDA wheels)") from e

    @triton.jit
    def ms_deform_attn_kernel(value, shapes, starts, loc, attw, out, Q, S,
                              HEADS: tl.constexpr, DIM: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr,
                              BLOCK_Q: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // HEADS
        h = bh % HEADS
        qs = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qmask = qs < Q
        d = tl.arange(0, DIM)
        acc = tl.full((BLOCK_Q, DIM), 0.0, tl.float32)
        row = (b * Q + qs) * HEADS + h  # [BLOCK_Q] index of (b, q, h)
        for lvl in tl.static_range(LEVELS):
            hl = tl.load(shapes + 2 * lvl).to(tl.int32)
            wl = tl.load(shapes + 2 * lvl + 1).to(tl.int32)
            start = tl.load(starts + lvl).to(tl.int32)
            for p in tl.static_range(POINTS):
                k = (row * LEVELS + lvl) * POINTS + p
                x = tl.load(loc + 2 * k, mask=qmask, other=0.0).to(tl.float32) * wl - 0.5
                y = tl.load(loc + 2 * k + 1, mask=qmask, other=0.0).to(tl.float32) * hl - 0.5
                a = tl.load(attw + k, mask=qmask, other=0.0).to(tl.float32)
                x0f = tl.floor(x)
                y0f = tl.floor(y)
                fx = x - x0f
                fy = y - y0f
                x0 = x0f.to(tl.int32)
                y0 = y0f.to(tl.int32)
                for corner in tl.static_range(4):
                    cx = x0 + (corner % 2)
                    cy = y0 + (corner // 2)
                    wx = fx if corner % 2 == 1 else 1.0 - fx
                    wy = fy if corner // 2 == 1 else 1.0 - fy
                    ok = qmask & (cx >= 0) & (cx < wl) & (cy >= 0) & (cy < hl)
                    src = ((b * S + start + cy * wl + cx) * HEADS + h) * DIM
                    v = tl.load(value + src[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                    acc += v * (a * wx * wy)[:, None]
        dst = ((b * Q + qs) * HEADS + h) * DIM
        tl.store(out + dst[:, None] + d[None, :], acc.to(out.dtype.element_ty), mask=qmask[:, None])

    return ms_deform_attn_kernel


def launch(value: torch.Tensor, shapes: torch.Tensor, starts: torch.Tensor, locations: torch.Tensor,
           weights: torch.Tensor, block_q: int = 32, wrap: Any = None) -> torch.Tensor:
    """Run the Triton kernel (on CUDA tensors; on CPU tensors under ``TRITON_INTERPRET=1``). Same arguments and
    result as :func:`reference`. ``wrap``: ``torch.library.wrap_triton`` inside the custom op."""
    b, s, heads, dim = value.shape
    _, q, _, levels, points, _ = locations.shape
    if dim & (dim - 1):
        raise ValueError(f"the fused kernel needs a power-of-two head dimension, got {dim}")
    value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
    out = torch.empty(b, q, heads * dim, dtype=value.dtype, device=value.device)
    kernel = _kernel()
    grid = (b * heads, (q + block_q - 1) // block_q)
    (wrap(kernel) if wrap is not None else kernel)[grid](
        value, shapes.contiguous(), starts.contiguous(), locations, weights, out, q, s,
        HEADS=heads, DIM=dim, LEVELS=levels, POINTS=points, BLOCK_Q=block_q)
    return out


@functools.lru_cache(maxsize=None)
def register() -> Any:
    """Register ``rtdetr::ms_deform_attn`` once per process: the Triton kernel on CUDA (visible to torch.export and
    Inductor through ``triton_op``), the reference formula on the CPU. Returns the op."""
    from torch.library import triton_op, wrap_triton

    @triton_op(OP, mutates_args=())
    def ms_deform_attn(value: torch.Tensor, shapes: torch.Tensor, starts: torch.Tensor, locations: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
        return launch(value, shapes, starts, locations, weights, wrap=wrap_triton)

    @ms_deform_attn.register_kernel("cpu")
    def _(value, shapes, starts, locations, weights):  # noqa: ANN001 - the op's schema types them
        return reference(value, shapes, starts, locations, weights)

    return torch.ops.rtdetr.ms_deform_attn.default


def _fused_forward(self: Any, value: torch.Tensor, value_spatial_shapes: torch.Tensor, value_spatial_shapes_list: Any,
                   level_start_index: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   im2col_step: int = 64) -> torch.Tensor:
    return register()(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)


def deformable_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """transformers' ``MultiScaleDeformableAttention`` kernels in ``model`` (RT-DETR's; D-FINE and DEIMv2 sample
    with their own discrete v2 formula and are left alone)."""
    return [m for m in model.modules() if type(m).__name__ == "MultiScaleDeformableAttention"]


@contextlib.contextmanager
def fused_deformable_attention(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, ``model``'s multi-scale deformable attention runs the fused op; yields how many modules
    were swapped (0: the model has none, nothing changes). The modules are restored afterwards."""
    found = deformable_modules(model)
    if found:
        register()
    for m in found:
        m.forward = _fused_forward.__get__(m)
    try:
        yield len(found)
    finally:
        for m in found:
            m.__dict__.pop("forward", None)
