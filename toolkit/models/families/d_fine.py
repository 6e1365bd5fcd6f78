"""D-FINE (Peterande/D-FINE) as transformers implements it: ``DFineForObjectDetection``, HGNetV2 backbones.

Input in [0, 1] (its official ``export_onnx.py`` feeds the images as is), and the same deploy contract as
RT-DETR: ``enc_score_head`` selects the queries, sigmoid + top-K over queries x classes. Its deformable
attention's shape check needs transformers' torch checks off under ``torch.export`` (Inductor cannot lower
the data-dependent guard), so the export-time patches include that.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

from torch import nn

from .base import Family
from ._patches import batch_first_mask, symbolic_len, torch_checks_off


def export_patches(model: nn.Module) -> ContextManager[None]:
    stack = contextlib.ExitStack()
    stack.enter_context(symbolic_len(model))
    stack.enter_context(batch_first_mask(model, ("DFineConvEncoder",)))
    stack.enter_context(torch_checks_off())
    return stack


FAMILY = Family(
    name="d_fine",
    description="D-FINE N/S/M/L/X (HGNetV2 backbones)",
    model_types={"d_fine": "DFine"},
    export_patches_for=export_patches,
    config_prefixes=("dfine_",),
)
