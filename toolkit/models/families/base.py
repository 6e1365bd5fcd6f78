"""The :class:`Family` record every family module fills in (apart from the registry, so that family modules
and the registry import one way)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping

from torch import nn

Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std) per RGB channel
IMAGENET: Normalization = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _no_normalization(_hf_config: Any) -> Normalization | None:
    return None


def _no_patches(_model: nn.Module) -> ContextManager[None]:
    return contextlib.nullcontext()


def _no_trace_patches(_model: nn.Module, _size: tuple[int, int]) -> ContextManager[None]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Family:
    """One detector family: its transformers classes and the few facts the toolkit needs beyond them."""

    name: str
    description: str
    model_types: Mapping[str, str]  # transformers model_type -> class prefix ("d_fine" -> "DFine")
    normalization_for: Callable[[Any], Normalization | None] = _no_normalization  # from the transformers config
    export_patches_for: Callable[[nn.Module], ContextManager[None]] = _no_patches
    config_prefixes: tuple[str, ...] = field(default_factory=tuple)  # named configs of this family (configs/PREFIX*)
    # around any export (ONNX tracing included) at the model's fixed input size (H, W): RF-DETR's frozen position embedding
    trace_patches_for: Callable[[nn.Module, tuple[int, int]], ContextManager[None]] = _no_trace_patches
    # the decoder binds each selected proposal to its top-K slot's learned query (content and reference delta), so
    # the ORDER of the selection matters, not only its set (LW-DETR, RF-DETR); RT-DETR's family takes the content
    # from the selected memory itself and is permutation-equivariant over the selected queries
    slot_bound_queries: bool = False

    def normalization(self, hf_config: Any) -> Normalization | None:
        """(mean, std) the network expects its input normalized with, or None for [0, 1] input."""
        return self.normalization_for(hf_config)

    def export_patches(self, model: nn.Module) -> ContextManager[None]:
        """Patches that keep ``torch.export``'s batch symbolic; enter only around an export."""
        return self.export_patches_for(model)

    def trace_patches(self, model: nn.Module, size: tuple[int, int]) -> ContextManager[None]:
        """Patches every export of this family needs at input size ``size`` (H, W); enter only around an export."""
        return self.trace_patches_for(model, size)
