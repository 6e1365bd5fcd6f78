"""RT-DETR v1 and v2 (lyuwenyu/RT-DETR) as transformers implements them: ``RTDetr*`` and ``RTDetrV2*``.

Input in [0, 1] (no normalization), the official deploy postprocess; see :mod:`toolkit.models.official` for
the official checkpoints.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

from torch import nn

from .base import Family
from ._patches import batch_first_mask, symbolic_len


def export_patches(model: nn.Module) -> ContextManager[None]:
    stack = contextlib.ExitStack()
    stack.enter_context(symbolic_len(model))
    stack.enter_context(batch_first_mask(model, ("RTDetrConvEncoder", "RTDetrV2ConvEncoder")))
    return stack


FAMILY = Family(
    name="rt_detr",
    description="RT-DETR and RT-DETRv2 (ResNet-vd backbones)",
    model_types={"rt_detr": "RTDetr", "rt_detr_v2": "RTDetrV2"},
    export_patches_for=export_patches,
    config_prefixes=("rtdetr_", "rtdetrv2_"),
)
