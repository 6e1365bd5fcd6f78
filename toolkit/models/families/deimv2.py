"""DEIMv2 (Intellindust-AI-Lab/DEIMv2) as transformers implements it: ``Deimv2ForObjectDetection``.

Two backbone kinds: HGNetV2 (Atto, Femto, Pico, N) takes [0, 1] input; DINOv3 (S, M, L, X: a ViT plus the
spatial tuning adapter) expects ImageNet mean/std normalized input, which the deploy wrapper applies itself
so that the contract stays ``images`` in [0, 1]. Same postprocess as D-FINE. Its backbone wrappers take no
pixel mask, so only the ``len`` patch and the torch-check switch apply under ``torch.export``.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

from torch import nn

from .base import IMAGENET, Family, Normalization
from ._patches import symbolic_len, torch_checks_off


def normalization(hf_config: Any) -> Normalization | None:
    backbone = getattr(hf_config, "backbone_config", None)
    backbone_type = getattr(backbone, "model_type", None) or (backbone.get("model_type") if isinstance(backbone, dict) else None)
    return IMAGENET if backbone_type == "dinov3_vit" else None


def export_patches(model: nn.Module) -> ContextManager[None]:
    stack = contextlib.ExitStack()
    stack.enter_context(symbolic_len(model))
    stack.enter_context(torch_checks_off())
    return stack


FAMILY = Family(
    name="deimv2",
    description="DEIMv2 Atto/Femto/Pico/N (HGNetV2) and S/M/L/X (DINOv3, ImageNet-normalized inside the wrapper)",
    model_types={"deimv2": "Deimv2"},
    normalization_for=normalization,
    export_patches_for=export_patches,
    config_prefixes=("deimv2_",),
)
