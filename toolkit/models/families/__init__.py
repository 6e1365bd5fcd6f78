"""The model-family registry: one module per detector family, one :class:`Family` entry each.

Every family here is a transformers implementation of a real-time DETR whose raw outputs (``logits``,
``pred_boxes``) fit the deploy contract's postprocess (sigmoid, top-K over queries x classes). What differs
between families lives in its module and is looked up here, never by ``if model_type == ...`` elsewhere:

* the transformers classes per ``model_type`` (:func:`transformers_classes`);
* the input normalization the network expects (ImageNet mean/std for DINOv3 backbones), which the deploy
  wrapper applies itself so that the contract's ``images`` stay in [0, 1] (:meth:`Family.normalization`);
* the patches every export needs at the fixed input size (RF-DETR's frozen position embedding:
  :meth:`Family.trace_patches`, :func:`trace_patches`);
* the ``torch.export``-time patches that keep the batch symbolic (:meth:`Family.export_patches`), active
  for the duration of an export only;

May import what :mod:`toolkit.models` may (the top-level helpers).
"""

from __future__ import annotations

from torch import nn

from ...errors import ConfigError
import contextlib
from typing import ContextManager

from . import d_fine, deimv2, lw_detr, rf_detr, rt_detr
from ._patches import symbolic_len, torch_checks_off
from .base import IMAGENET, Family, Normalization

__all__ = ["IMAGENET", "Family", "Normalization", "families", "family_for", "family_of", "model_types", "symbolic_len",
           "torch_checks_off", "trace_patches", "transformers_classes"]


_FAMILIES: dict[str, Family] = {f.name: f for f in (rt_detr.FAMILY, d_fine.FAMILY, deimv2.FAMILY, rf_detr.FAMILY, lw_detr.FAMILY)}


def families() -> dict[str, Family]:
    """Every registered family by name."""
    return dict(_FAMILIES)


def model_types() -> dict[str, Family]:
    """transformers ``model_type`` -> its family, for every supported model type."""
    return {mt: fam for fam in families().values() for mt in fam.model_types}


def family_for(model_type: str) -> Family:
    """The family of a transformers ``model_type``; a :class:`ConfigError` naming the supported ones otherwise."""
    types = model_types()
    if model_type not in types:
        raise ConfigError(f"model_type must be one of {', '.join(types)}, got {model_type!r}")
    return types[model_type]


def family_of(model: nn.Module) -> Family | None:
    """The family of a transformers model (``model.config.model_type``), None for anything else."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_types().get(model_type) if isinstance(model_type, str) else None


def transformers_classes(model_type: str) -> tuple[type, type]:
    """(Config class, ForObjectDetection class) of a supported ``model_type``."""
    import transformers

    prefix = family_for(model_type).model_types[model_type]
    try:
        return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForObjectDetection")
    except AttributeError:
        raise ConfigError(f"model_type {model_type!r} needs {prefix}ForObjectDetection, which transformers "
                          f"{transformers.__version__} does not have; upgrade transformers") from None


def detectors(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers detectors of a registered family inside ``model`` (their submodules share the config)."""
    found, prefixes = [], []
    for name, m in model.named_modules():
        if family_of(m) is not None and not any(name == p or name.startswith(p + ".") for p in prefixes):
            found.append(m)
            prefixes.append(name)
    return found


def trace_patches(model: nn.Module, size: tuple[int, int]) -> ContextManager[None]:
    """Every detector's :meth:`Family.trace_patches` at input size ``size`` (H, W), for the duration of one export."""
    stack = contextlib.ExitStack()
    for m in detectors(model):
        stack.enter_context(family_of(m).trace_patches(m, size))
    return stack
