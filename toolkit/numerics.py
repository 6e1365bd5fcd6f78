"""fp32 that is really fp32 on the GPU.

torch lets cuDNN convolutions use TF32 by default (10-bit mantissa), which moves RT-DETR boxes by
pixels against a CPU or ONNX Runtime reference. Engines and verification compute in exact fp32
unless the caller opts into TF32.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Set TF32 for cuDNN and cuBLAS inside the block, restoring the previous settings afterwards."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=enabled):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
