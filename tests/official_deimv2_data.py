"""Synthetic official DEIMv2 weights from a manifest (shared by tests/test_official_deimv2.py and
tools/official_deimv2.py, which recorded tests/data/official_deimv2/*_outputs.json with the official model code).

The tensors follow D-FINE's recipe (:func:`tests.official_dfine_data.synthetic_state`: seeded, scaled so that
activations stay finite, ``up`` / ``reg_scale`` at their official values); only the manifests differ.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.official_dfine_data import manifest as _manifest, parity_image, synthetic_state as _synthetic_state

MANIFESTS = Path(__file__).parent / "data" / "official_deimv2"

__all__ = ["MANIFESTS", "manifest", "parity_image", "synthetic_state"]


def manifest(name: str) -> dict:
    return _manifest(name, MANIFESTS)


def synthetic_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return _synthetic_state(name, seed, MANIFESTS)
