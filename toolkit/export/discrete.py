"""The tolerance that RT-DETRv2's discrete sampling (``decoder_method: "discrete"``, the official ``_dsp`` models) needs.

Discrete sampling rounds every sampling location to a feature-map pixel (``int(x * W + 0.5)``). A location that
fp32 puts within rounding noise of a half-pixel boundary lands on one pixel in torch and on its neighbour in ONNX
Runtime, and the detections that sample it move by a fraction of a pixel or more: both backends are right, and
the fp32 tolerance (which fits bilinear sampling) fails them. How far such flips can move the outputs is measured,
not guessed: the torch model runs in float64 (no flips of its own) with every location shifted by ``+delta`` and
by ``-delta`` feature-map pixels before rounding, which flips every point within ``delta`` of a boundary one way
or the other. ``delta`` is well above fp32's error on a location, so any flip fp32 makes is among them, and the
spread of those runs around the unshifted one bounds what the flips can do.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

from ..models.contract import DeployModel
from .permutation import match_permutation

DELTA = 1e-3  # feature-map pixels; fp32 puts a location within ~1e-4 px of where float64 does


def is_discrete(model: DeployModel) -> bool:
    """Whether the model's decoder samples discretely (transformers RT-DETRv2 ``decoder_method``)."""
    return getattr(getattr(model.model, "config", None), "decoder_method", "default") == "discrete"


@contextlib.contextmanager
def _shifted_rounding(delta: float) -> Iterator[None]:
    """Shift every discrete sampling location by ``delta`` feature-map pixels (x and y) inside transformers' sampler."""
    from transformers.models.rt_detr_v2 import modeling_rt_detr_v2 as m

    original = m.multi_scale_deformable_attention_v2

    def shifted(value, shapes, locations, weights, points, method="default"):
        if method == "discrete":
            per_point = [torch.tensor([w, h], dtype=locations.dtype, device=locations.device)
                         for (h, w), n in zip(shapes, points) for _ in range(n)]
            locations = locations + delta / torch.stack(per_point)
        return original(value, shapes, locations, weights, points, method)

    m.multi_scale_deformable_attention_v2 = shifted
    try:
        yield
    finally:
        m.multi_scale_deformable_attention_v2 = original


def flip_spread(model: DeployModel, images: torch.Tensor, sizes: torch.Tensor, delta: float = DELTA) -> tuple[float, float, int]:
    """(box px, score, label mismatches): the largest change of the outputs when boundary points flip (see module doc)."""
    ref_model = copy.deepcopy(model).double().eval()
    images = images.double()
    with torch.inference_mode():
        base = ref_model(images, sizes)
        runs = []
        for d in (delta, -delta):
            with _shifted_rounding(d):
                runs.append(ref_model(images, sizes))
    box = score = 0.0
    labels = 0
    for run in runs:
        for j in range(images.shape[0]):
            pm = match_permutation({k: v[j] for k, v in zip(("labels", "boxes", "scores"), base)},
                                   {k: v[j] for k, v in zip(("labels", "boxes", "scores"), run)}, score_band=1e-6)
            box, score, labels = max(box, pm.max_box_diff), max(score, pm.max_score_diff), max(labels, pm.label_mismatches)
    return box, score, labels
