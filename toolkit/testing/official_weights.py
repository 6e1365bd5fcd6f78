"""Seeded official-format RT-DETR state dicts and inputs: the same weights with or without the official code.

No real official weights can be downloaded where the toolkit is tested, so parity with lyuwenyu/RT-DETR is shown on
seeded random weights: ``tools/official_parity.py`` loads :func:`official_state_dict` into the OFFICIAL model
(strictly), runs it, and stores the outputs; CI rebuilds the identical state dict here (same manifest, seed and
size; :func:`state_sha256` proves it) and loads it through the toolkit's remap. Only torch is imported.

Why not transformers' or the official initialisation: both make the encoder's class scores nearly constant, so
its top-K query selection is an exact tie that two correct implementations break differently. These weights
are scaled random tensors (every parameter perturbed away from any symmetric init); the parity tool checks that
the selection has a clear gap at its top-K boundary before it stores anything.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

ANCHOR_KEYS = ("decoder.anchors", "decoder.valid_mask")  # RT-DETRv2's precomputed anchors: depend on the input size


def read_manifest(path: str | Path) -> dict[str, dict[str, Any]]:
    """The ``tensors`` of a manifest (``tests/data/official_manifests/NAME.json``): name -> shape, dtype, in state-dict order."""
    return json.loads(Path(path).read_text())["tensors"]


def official_anchors(size: Sequence[int], strides: Sequence[int] = (8, 16, 32), grid_size: float = 0.05,
                     eps: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """RT-DETRv2's ``decoder.anchors`` / ``decoder.valid_mask`` buffers for an input size, as the official
    ``RTDETRTransformerv2._generate_anchors`` computes them (logit anchors, +inf where invalid)."""
    h, w = size
    levels = []
    for lvl, s in enumerate(strides):
        fh, fw = int(h / s), int(w / s)
        gy, gx = torch.meshgrid(torch.arange(fh), torch.arange(fw), indexing="ij")
        xy = (torch.stack([gx, gy], -1).unsqueeze(0) + 0.5) / torch.tensor([fw, fh], dtype=torch.float32)
        levels.append(torch.cat([xy, torch.ones_like(xy) * grid_size * 2.0 ** lvl], -1).reshape(-1, fh * fw, 4))
    anchors = torch.cat(levels, 1)
    valid = ((anchors > eps) * (anchors < 1 - eps)).all(-1, keepdim=True)
    return torch.where(valid, torch.log(anchors / (1 - anchors)), torch.inf), valid


def official_state_dict(tensors: Mapping[str, Mapping[str, Any]], seed: int, size: Sequence[int] = (640, 640),
                        num_levels: int = 3) -> dict[str, torch.Tensor]:
    """A seeded official-format state dict for the names/shapes/dtypes of ``tensors`` (a manifest), in its order.

    Matrices and convolutions: N(0, 1/fan_in). Norm scales and running variances: U(0.75, 1.25). Other vectors:
    N(0, 0.1). RT-DETRv2's ``num_points_scale`` is the real buffer (``1/n`` for ``n`` points on each of
    ``num_levels`` levels), its anchors are computed for ``size``; step counters are 0.
    """
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, spec in tensors.items():
        shape, dtype = list(spec["shape"]), getattr(torch, spec["dtype"])
        if key in ANCHOR_KEYS:
            state[key] = official_anchors(size)[ANCHOR_KEYS.index(key)]
        elif key.endswith("num_points_scale"):
            n = shape[0] // num_levels
            state[key] = torch.full(shape, 1.0 / n, dtype=dtype)
        elif not dtype.is_floating_point:
            state[key] = torch.zeros(shape, dtype=dtype)
        elif len(shape) >= 2:
            state[key] = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(("weight", "running_var")):
            state[key] = (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.5 + 0.75).to(dtype)
        else:
            state[key] = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    return state


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes in state-dict order: the same number means the same weights."""
    h = hashlib.sha256()
    for key, t in state.items():
        h.update(f"{key}|{t.dtype}|{list(t.shape)}".encode())
        t = t.detach().cpu().contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def parity_inputs(seed: int, size: Sequence[int], orig_sizes: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded images (smooth gradients, rectangles, noise; [N,3,H,W] in [0,1]) and ``orig_target_sizes`` (w, h) int64."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    images = []
    for _ in orig_sizes:
        img = torch.stack([xx, yy, (xx + yy) / 2]) * torch.rand(3, 1, 1, generator=gen)
        for _ in range(6):
            x0, y0 = int(torch.rand(1, generator=gen) * w * 0.7), int(torch.rand(1, generator=gen) * h * 0.7)
            bw, bh = int(torch.rand(1, generator=gen) * w * 0.3) + 4, int(torch.rand(1, generator=gen) * h * 0.3) + 4
            img[:, y0:y0 + bh, x0:x0 + bw] = torch.rand(3, 1, 1, generator=gen)
        images.append(img + 0.05 * torch.rand(3, h, w, generator=gen))
    return torch.stack(images).clamp(0, 1), torch.tensor([list(s) for s in orig_sizes], dtype=torch.int64)
