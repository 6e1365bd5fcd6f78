"""Eager torch behind the Engine protocol: drops into a training loop (no gradients, inference mode)."""

from __future__ import annotations

from typing import Any

import torch

from ..binding import BoundInputs
from ..engine import BaseEngine, default_device
from ..models import load_model
from ..signature import INPUT_IMAGES, INPUT_SIZES, OUTPUTS


class TorchEngine(BaseEngine):
    """Runs a :class:`~toolkit.contract.DeployModel` eagerly. Thread-safe: forward under inference mode only reads."""

    backend = "torch"

    def __init__(self, model: Any, device: torch.device, **options: Any) -> None:
        self.model = model.to(device).eval()
        super().__init__(model.signature(), device, class_names=model.class_names, **options)

    def _run(self, bound: BoundInputs) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = self.model(bound.tensors[INPUT_IMAGES], bound.tensors[INPUT_SIZES])
        result = dict(zip(OUTPUTS, out))
        if bound.outputs is not None:  # eager torch allocates its own results: copy into the caller's buffers
            for name, t in result.items():
                bound.outputs[name].copy_(t)
            return bound.outputs
        return result


def load(source: Any, device: torch.device | None = None, config: str | None = None, **options: Any) -> TorchEngine:
    return TorchEngine(load_model(source, config=config), device or default_device(), **options)
