"""Weights files: reading a state dict safely (never unpickling objects), loading it strictly, hashing it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .contract import DeployModel, weights_sha256  # noqa: F401  (weights_sha256 is re-exported here)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError, or OSError for unreadable files
            raise CheckpointError(f"{path}: not a safetensors file ({e.__class__.__name__}: "
                                  f"{(str(e).strip().splitlines() or [''])[0]}); a pickled checkpoint needs a .pth/.pt name") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a weights-only checkpoint ({e.__class__.__name__}); "
                              "the toolkit never unpickles arbitrary objects: re-save it as a plain state dict") from None
    for key in ("ema", "model", "state_dict"):  # official checkpoints nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key].get("module", obj[key]) if key == "ema" else obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def load_weights(model: DeployModel, path: Path, state: dict[str, torch.Tensor] | None = None) -> DeployModel:
    """Load a state dict (safetensors or .pth; ``state`` if already read from ``path``) into a built model;
    any missing/unexpected/mis-shaped key is an error."""
    state = _read_state_dict(path) if state is None else state
    target = model.model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    misshaped = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or misshaped:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        lines = [f"{path}: the weights do not fit config {model.name!r}"]
        if missing:
            lines.append(f"missing keys: {few(missing)}")
        if unexpected:
            lines.append(f"unexpected keys: {few(unexpected)}")
        if misshaped:
            lines.append("mis-shaped keys: " + few([f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in misshaped]))
        raise CheckpointError("; ".join(lines))
    model.model.load_state_dict(state, strict=True)
    return model
