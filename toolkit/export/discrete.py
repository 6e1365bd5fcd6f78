"""The tolerance that RT-DETRv2's discrete sampling (``decoder_method: "discrete"``, the official ``_dsp`` models) needs.

Discrete sampling rounds every sampling location to a feature-map pixel (``int(x * W + 0.5)``). A location that
fp32 puts within rounding noise of a half-pixel boundary lands on one pixel in torch and on its neighbour in ONNX
Runtime, and the detections that sample it move by a fraction of a pixel or more: both backends are right, and
the fp32 tolerance (which fits bilinear sampling) fails them. How far such flips can move the outputs is measured,
not guessed: fp32's error on a sampling location is measured against float64 (torch, the same images), and the
torch model runs in float64 (no flips of its own) with every location shifted by ``+delta`` and by ``-delta``
feature-map pixels before rounding, ``delta`` a few times that error. That flips every point close enough to a
boundary for fp32 to flip it, one way or the other; the spread of those runs around the unshifted one bounds what
the flips of any fp32 backend can do.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

from ..models.contract import DeployModel
from .permutation import match_permutation

MARGIN = 4.0  # delta = MARGIN x the measured fp32 error of a first-layer sampling location (later layers accumulate more)


def is_discrete(model: DeployModel) -> bool:
    """Whether the model's decoder samples discretely (transformers RT-DETRv2 ``decoder_method``)."""
    return getattr(getattr(model.model, "config", None), "decoder_method", "default") == "discrete"


@contextlib.contextmanager
def _sampler(delta: float = 0.0, record: list[torch.Tensor] | None = None) -> Iterator[None]:
    """Inside transformers' sampler: record each call's discrete sampling locations in feature-map pixels, and/or
    shift them by ``delta`` pixels (x and y) before they are rounded."""
    from transformers.models.rt_detr_v2 import modeling_rt_detr_v2 as m

    original = m.multi_scale_deformable_attention_v2

    def patched(value, shapes, locations, weights, points, method="default"):
        if method == "discrete":
            scale = torch.stack([torch.tensor([w, h], dtype=locations.dtype, device=locations.device)
                                 for (h, w), n in zip(shapes, points) for _ in range(n)])
            if record is not None:
                record.append((locations * scale).double().cpu())
            if delta:
                locations = locations + delta / scale
        return original(value, shapes, locations, weights, points, method)

    m.multi_scale_deformable_attention_v2 = patched
    try:
        yield
    finally:
        m.multi_scale_deformable_attention_v2 = original


def flip_spread(model: DeployModel, images: torch.Tensor, sizes: torch.Tensor) -> tuple[float, float, int]:
    """(box px, score, label mismatches): the largest change of the outputs when the points within fp32's error of a
    rounding boundary flip (see the module docstring). The error is measured: the first decoder layer's sampling
    locations in fp32 against float64, on these images."""
    ref_model = copy.deepcopy(model).double().eval()
    fp32, fp64 = [], []
    with torch.inference_mode():
        with _sampler(record=fp32):
            model(images, sizes)
        with _sampler(record=fp64):
            base = ref_model(images.double(), sizes)
        delta = MARGIN * max(float((fp32[0] - fp64[0]).abs().max()), 1e-9)
        runs = []
        for d in (delta, -delta):
            with _sampler(delta=d):
                runs.append(ref_model(images.double(), sizes))
    box = score = 0.0
    labels = 0
    for run in runs:
        for j in range(images.shape[0]):
            pm = match_permutation({k: v[j] for k, v in zip(("labels", "boxes", "scores"), base)},
                                   {k: v[j] for k, v in zip(("labels", "boxes", "scores"), run)}, score_band=1e-6)
            box, score, labels = max(box, pm.max_box_diff), max(score, pm.max_score_diff), max(labels, pm.label_mismatches)
    return box, score, labels
