"""Export-time patches shared by the families: each is a context manager active for one ``torch.export`` only,
and none changes a value the model computes.

* :func:`symbolic_len`: ``len`` shadowed in the model's transformers modules by one returning ``tensor.shape[0]``
  (a SymInt under export, the same int in eager); ``batch_size = len(source_flatten)`` otherwise pins the batch.
* :func:`batch_first_mask`: the RT-DETR / D-FINE backbone wrappers (``forward(pixel_values, pixel_mask)``)
  interpolate ``pixel_mask[None]`` ([1,N,H,W]: the batch in the channel dim), and on CUDA the upsample
  decomposition's channels-last heuristic (``n_channels < 4``) then guards the batch; ``pixel_mask[:, None]``
  gives the same mask. Only the named classes are patched: DEIMv2's ``Deimv2ConvEncoder`` takes no mask.
* :func:`torch_checks_off`: transformers' ``torch_compilable_check`` turns the deformable attention's
  shape check into a data-dependent guard that Inductor cannot lower (``'Equality' - 'Equality'``);
  ``TRANSFORMERS_DISABLE_TORCH_CHECK=1`` skips it, and is restored on exit.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sys
import types
from typing import Any, Iterator

import torch
from torch import nn


def _hf_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__module__.startswith("transformers.")]


@contextlib.contextmanager
def symbolic_len(model: nn.Module) -> Iterator[None]:
    def shape_len(obj: Any) -> Any:
        return obj.shape[0] if isinstance(obj, torch.Tensor) else builtins.len(obj)

    modules = {sys.modules[type(m).__module__] for m in _hf_modules(model)}
    saved = {m: m.__dict__["len"] for m in modules if "len" in m.__dict__}
    for m in modules:
        m.len = shape_len
    try:
        yield
    finally:
        for m in modules:
            if m in saved:
                m.len = saved[m]
            else:
                del m.len


def _mask_batch_first(self: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    features = self.model(pixel_values).feature_maps
    return [(f, nn.functional.interpolate(pixel_mask[:, None].float(), size=f.shape[-2:]).to(torch.bool)[:, 0]) for f in features]


@contextlib.contextmanager
def batch_first_mask(model: nn.Module, class_names: tuple[str, ...]) -> Iterator[None]:
    encoders = [m for m in _hf_modules(model) if type(m).__name__ in class_names and hasattr(m, "model") and "forward" not in m.__dict__]
    for m in encoders:
        m.forward = types.MethodType(_mask_batch_first, m)
    try:
        yield
    finally:
        for m in encoders:
            del m.forward


@contextlib.contextmanager
def torch_checks_off() -> Iterator[None]:
    key = "TRANSFORMERS_DISABLE_TORCH_CHECK"
    saved = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved
