"""Synthetic official DEIMv2 weights from a manifest (shared by tests/test_official_deimv2.py and
tools/official_deimv2.py, which recorded tests/data/official_deimv2/*_outputs.json with the official model code).

The tensors follow D-FINE's recipe (:func:`tests.official_dfine_data.synthetic_state`: seeded, scaled so that
activations stay finite, ``up`` / ``reg_scale`` at their official values); only the manifests differ. The DINOv3
backbones' buffers that are not learned keep their official values too: the RoPE ``periods`` (those of base 100,
as the official model computes them) and the DINOv3 ViT's key-bias mask (ones, zeros over the key part, as in
DINOv3's pretrained weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.official_dfine_data import manifest as _manifest, parity_image, synthetic_state as _synthetic_state

MANIFESTS = Path(__file__).parent / "data" / "official_deimv2"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

__all__ = ["MANIFESTS", "manifest", "normalized", "parity_image", "synthetic_state"]


def manifest(name: str) -> dict:
    return _manifest(name, MANIFESTS)


def synthetic_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    state = _synthetic_state(name, seed, MANIFESTS)
    for key, value in state.items():
        if key.startswith("backbone.dinov3.") and key.endswith("rope_embed.periods"):
            quarter = value.shape[0]  # head_dim // 4
            state[key] = 100.0 ** (2 * torch.arange(quarter, dtype=torch.float32) / (2 * quarter))
        elif key.startswith("backbone.dinov3.") and key.endswith("attn.qkv.bias_mask"):
            third = value.shape[0] // 3
            state[key] = torch.cat([torch.ones(third), torch.zeros(third), torch.ones(third)])
    return state


def normalized(image: torch.Tensor) -> torch.Tensor:
    """``image`` in [0, 1] with ImageNet mean/std applied: what the official DINOv3 models take (the official
    inference normalizes before the model), and what the toolkit's wrapper applies itself."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (image - mean) / std
