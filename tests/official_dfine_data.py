"""Synthetic official D-FINE weights from a manifest (shared by tests/test_official_dfine.py and the script that
recorded tests/data/official_dfine/*_outputs.json with the official model code; DEIMv2 reuses them with
its own manifests, tests/official_deimv2_data.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

MANIFESTS = Path(__file__).parent / "data" / "official_dfine"


def manifest(name: str, root: Path = MANIFESTS) -> dict:
    return json.loads((root / f"{name}.json").read_text())


def synthetic_state(name: str, seed: int = 0, root: Path = MANIFESTS) -> dict[str, torch.Tensor]:
    """Random tensors of the manifest's names/shapes/dtypes, scaled so that activations stay finite and the
    query selection untied. The official buffers that define the box decoding (``up``, ``reg_scale``) keep
    D-FINE's values: random ones would make the distribution-to-box integral meaningless."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, spec in manifest(name, root)["tensors"].items():
        shape, dtype = spec["shape"], getattr(torch, spec["dtype"])
        if key.endswith((".up", "decoder.up")):
            state[key] = torch.full(shape, 0.5)
        elif key.endswith("reg_scale"):
            state[key] = torch.full(shape, 4.0)
        elif dtype == torch.bool:
            state[key] = torch.ones(shape, dtype=torch.bool)
        elif not dtype.is_floating_point:
            state[key] = torch.zeros(shape, dtype=dtype)
        elif len(shape) >= 2:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(("weight", "running_var", "scale")):
            state[key] = torch.rand(shape, generator=gen) * 0.5 + 0.75
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1
    return state


def parity_image(size: int = 640) -> torch.Tensor:
    """One deterministic structured image [1,3,size,size] in [0,1]."""
    gen = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([xx, yy, (xx + yy) / 2])
    for _ in range(6):
        x0, y0 = (torch.rand(2, generator=gen) * size * 0.7).int().tolist()
        w, h = (torch.rand(2, generator=gen) * size * 0.3 + 8).int().tolist()
        img[:, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=gen)
    return img.clamp(0, 1)[None]
