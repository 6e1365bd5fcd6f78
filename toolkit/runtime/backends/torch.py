"""Eager torch behind the Engine protocol: drops into a training loop (no gradients, inference mode)."""

from __future__ import annotations

from typing import Any

import torch

from ... import numerics
from ...errors import EngineError
from ...models.loading import load_model
from ...signature import INPUT_IMAGES, INPUT_SIZES, OUTPUTS
from ..base import BaseEngine, default_device
from ..binding import BoundInputs


class TorchEngine(BaseEngine):
    """Runs a :class:`~toolkit.models.contract.DeployModel` eagerly. Thread-safe: forward under inference mode only reads.

    Computes in exact fp32 (TF32 off) unless ``tf32=True``; the caller's global TF32 settings are restored.
    ``precision="fp16"``/``"bf16"`` runs the network body under autocast; I/O and the postprocess stay fp32.
    """

    backend = "torch"

    def __init__(self, model: Any, device: torch.device, *, tf32: bool = False, precision: str = "fp32", **options: Any) -> None:
        if precision not in ("fp32", "fp16", "bf16"):
            raise EngineError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        self.autocast = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.model = model.to(device).eval()
        self.tf32 = tf32
        inner = getattr(model.model, "model", None)
        if getattr(inner, "anchors", None) is not None:  # plain attributes, not buffers: .to() leaves them on the CPU
            inner.anchors, inner.valid_mask = inner.anchors.to(device), inner.valid_mask.to(device)
        super().__init__(model.signature(), device, class_names=model.class_names, **options)
        self.random_weights = getattr(model, "random_weights", None)

    def _run(self, bound: BoundInputs) -> dict[str, torch.Tensor]:
        autocast = torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)
        with torch.inference_mode(), numerics.tf32(self.tf32), autocast:
            out = self.model(bound.tensors[INPUT_IMAGES], bound.tensors[INPUT_SIZES])
        return self._into_callers(dict(zip(OUTPUTS, out)), bound)


def load(source: Any, device: torch.device | None = None, config: str | None = None, **options: Any) -> TorchEngine:
    return TorchEngine(load_model(source, config=config), device or default_device(), **options)
