"""LW-DETR (Atten4Vis/LW-DETR) as transformers implements it: ``LwDetrForObjectDetection``, a plain ViT with
interleaved window/global attention, a C2f projector and a shallow deformable decoder.

The network expects ImageNet mean/std normalized input (the original repository's transforms normalize
before the model, as transformers' image processor for it does), which the deploy wrapper applies itself so
that the contract stays ``images`` in [0, 1]. Its position embedding is resampled with a plain (not
antialiased) bicubic upsample, which ONNX exports as is: only the ``len`` patch applies under ``torch.export``.
Raw outputs ``logits`` / ``pred_boxes`` feed the toolkit's postprocess (sigmoid, top-K over queries x classes).
"""

from __future__ import annotations

from typing import Any, ContextManager

from torch import nn

from .base import IMAGENET, Family, Normalization
from ._patches import symbolic_len


def normalization(_hf_config: Any) -> Normalization:
    return IMAGENET


def export_patches(model: nn.Module) -> ContextManager[None]:
    return symbolic_len(model)


FAMILY = Family(
    name="lw_detr",
    description="LW-DETR tiny/small/medium/large/xlarge (ViT backbones; ImageNet-normalized inside the wrapper)",
    model_types={"lw_detr": "LwDetr"},
    normalization_for=normalization,
    export_patches_for=export_patches,
    slot_bound_queries=True,
    config_prefixes=("lwdetr_",),
)
