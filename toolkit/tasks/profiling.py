"""Where the time of an engine call goes on the GPU: top kernels and GPU-idle time (launch gaps).

Used by ``rtdetr-deploy bench --profile`` to explain a latency target that is missed: if the kernels'
summed time is far below the wall time, the call is bound by launches and host work (CUDA graphs help);
if it is close, the kernels themselves (listed by total time and grouped by kind) are what to speed up.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

# substrings of kernel names -> kind, first match wins (cuDNN layout transposes and convolutions before GEMMs: cuDNN's
# implicit-GEMM convolutions have 'gemm' in their names; nvjet is cuBLAS's Hopper GEMM family)
_KINDS = (("nchwtonhwc", "layout transposes (NCHW<->NHWC)"), ("nhwctonchw", "layout transposes (NCHW<->NHWC)"),
          ("grid_sampler", "deformable attention (grid sample)"), ("sdpa", "attention"), ("flash", "attention"),
          ("conv", "convolution"), ("winograd", "convolution"), ("fprop_implicit_gemm", "convolution"),
          ("nvjet", "matmul (GEMM)"), ("gemm", "matmul (GEMM)"), ("cutlass", "matmul (GEMM)"), ("xmma", "matmul (GEMM)"),
          ("triton", "Triton fused kernels"), ("memcpy", "memory copies"), ("memset", "memory copies"),
          ("reduce", "reductions"), ("sort", "sort / top-K"), ("topk", "sort / top-K"))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for key, kind in _KINDS if key in low), "other")


def profile_call(call: Callable[[], Any], device: torch.device, *, iters: int = 10, top: int = 12) -> dict[str, Any]:
    """Profile ``iters`` calls of ``call`` (already warmed up) on ``device`` (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            call()
        torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / iters
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, [0.0, 0])
            entry[0] += event.device_time / 1e3 / iters  # device_time: microseconds
            entry[1] += 1
    busy_ms = sum(t for t, _ in kernels.values())
    kinds: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    return {
        "wall_ms_per_call": round(wall_ms, 3),
        "kernel_ms_per_call": round(busy_ms, 3),
        "gpu_idle_share": round(max(0.0, 1 - busy_ms / wall_ms), 3) if wall_ms else None,
        "kernel_launches_per_call": sum(n for _, n in kernels.values()) // iters,
        "by_kind_ms": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:120], "kind": kernel_kind(name), "ms_per_call": round(ms, 3), "calls": n // iters}
                        for name, (ms, n) in ranked[:top]],
    }
