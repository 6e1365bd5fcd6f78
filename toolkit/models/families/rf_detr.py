"""RF-DETR (roboflow/rf-detr) as transformers implements it: ``RfDetrForObjectDetection``, a windowed DINOv2
backbone with a C2f projector and a LW-DETR style decoder.

Why the family needs more than its classes:

* The network expects ImageNet mean/std normalized input (its own exporter feeds ``input`` normalized); the
  deploy wrapper applies that itself so the contract stays ``images`` in [0, 1].
* Under tracing, the DINOv2 embeddings always resample their position embedding with a bicubic *antialiased*
  upsample, which ``torch.onnx.export`` cannot export. :func:`frozen_position_embedding` replaces it, for the
  duration of one export only, by the embedding already resampled at the export size (the value eager torch
  computes at that size, so the graph computes the same thing; rf-detr's own exporter does the same). The
  exported graph is therefore fixed to its export size, which the contract's fixed input size already is.

Its own deploy contract (input ``input``, raw ``dets``/``labels``, 91 COCO ids) is not the toolkit's; the
transformers raw outputs (``logits``, ``pred_boxes``) feed the toolkit's postprocess (sigmoid, top-K).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, ContextManager, Iterator

import torch
from torch import nn

from ...errors import ConfigError
from .base import IMAGENET, Family, Normalization
from ._patches import symbolic_len


def normalization(_hf_config: Any) -> Normalization:
    return IMAGENET


def _embeddings(model: nn.Module, class_name: str) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == class_name and hasattr(m, "interpolate_pos_encoding")
            and "interpolate_pos_encoding" not in m.__dict__]


@contextlib.contextmanager
def frozen_position_embedding(model: nn.Module, size: tuple[int, int], class_name: str = "RfDetrDinov2Embeddings") -> Iterator[None]:
    """The DINOv2 position embedding resampled once, eagerly, at ``size`` (H, W), and returned as is while active.

    Other sizes still go through the original resampling (a traced graph only ever sees ``size``).
    """
    h, w = size
    patched = []
    for emb in _embeddings(model, class_name):
        original = emb.interpolate_pos_encoding
        pos = emb.position_embeddings
        grid = (h // emb.patch_size) * (w // emb.patch_size)
        with torch.no_grad():
            frozen = original(pos.new_zeros(1, grid + 1, pos.shape[-1]), h, w).detach().clone()

        def fixed(self: nn.Module, embeddings: torch.Tensor, height: int, width: int, _frozen: torch.Tensor = frozen,
                  _original: Any = original) -> torch.Tensor:
            if (int(height), int(width)) == (h, w):
                return _frozen.to(dtype=embeddings.dtype, device=embeddings.device)
            return _original(embeddings, height, width)

        emb.interpolate_pos_encoding = types.MethodType(fixed, emb)
        patched.append(emb)
    try:
        yield
    finally:
        for emb in patched:
            del emb.interpolate_pos_encoding


def trace_patches(model: nn.Module, size: tuple[int, int]) -> ContextManager[None]:
    if not _embeddings(model, "RfDetrDinov2Embeddings"):  # a transformers that renamed it: say so, not an opaque trace error
        import transformers

        raise ConfigError(f"RF-DETR export needs RfDetrDinov2Embeddings.interpolate_pos_encoding, which transformers "
                          f"{transformers.__version__} does not have (checked against 5.17 and 5.24)")
    return frozen_position_embedding(model, size)


def export_patches(model: nn.Module) -> ContextManager[None]:
    return symbolic_len(model)


FAMILY = Family(
    name="rf_detr",
    description="RF-DETR nano/small/medium/large (windowed DINOv2; ImageNet-normalized inside the wrapper)",
    model_types={"rf_detr": "RfDetr"},
    normalization_for=normalization,
    export_patches_for=export_patches,
    trace_patches_for=trace_patches,
    slot_bound_queries=True,
    config_prefixes=("rfdetr_",),
)
