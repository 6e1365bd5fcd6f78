"""Sentinels: checks on one backend's output alone, so they fire even when both sides are wrong the same way.

Comparing two backends cannot catch a bug they share (both bound an int64 ``orig_target_sizes`` to an
int32 input, say). These checks look at a single output for the fingerprints of known deployment bugs
and name the backend and the likely cause:

* every box zero, or one axis collapsed (every y, or every x, zero or constant): ``orig_target_sizes``
  read with the wrong dtype (an int64 ``(w, h)`` read as int32 gives ``(w, 0)`` on little-endian devices);
* degenerate boxes (``x2 <= x1`` or ``y2 <= y1``) among confident detections: a box format mix-up;
* NaN / Inf anywhere: fp16 overflow or an output buffer that was never written;
* boxes far outside the image: ``orig_target_sizes`` does not describe the image;
* scores outside [0, 1] (logits, sigmoid missing) or all equal (output independent of the input);
* labels outside the class range;
* no confident detection on an image where the other backend has some (:func:`check_empty`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from ..runtime.detections import Detections

FAR_OUTSIDE = 1.0  # boxes may reach this many image sizes beyond the image (sigmoid cxcywh reaches 0.5)


@dataclass
class Finding:
    """One sentinel that fired: which backend, which check, a message with the likely cause, the images concerned."""

    backend: str
    check: str
    message: str
    images: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _few(keys: Sequence[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _dtype_hint(sizes_dtype: str | None) -> str:
    if sizes_dtype is None:
        return "an int64 (w, h) read as int32 gives (w, 0); check the binding"
    return f"engine expects {sizes_dtype}, check the binding"


def check_outputs(
    backend: str,
    detections: Sequence[Detections],
    keys: Sequence[str],
    *,
    score_threshold: float,
    sizes_wh: Sequence[tuple[int, int]] | None = None,
    num_classes: int | None = None,
    sizes_dtype: str | None = None,
) -> list[Finding]:
    """Every sentinel that fires on one backend's detections (one :class:`Detections` per image, named by ``keys``).

    ``detections`` may be the full top-K output or only what a result file kept; geometric checks use the
    detections scoring at least ``score_threshold``. ``sizes_wh``: each original image's (w, h), when known;
    ``sizes_dtype``: the engine's declared dtype of ``orig_target_sizes``, named in the messages when known.
    """
    found: list[Finding] = []

    def fire(check: str, message: str, images: Sequence[str] = ()) -> None:
        found.append(Finding(backend, check, f"backend {backend}: {message}", list(images)))

    bad = [k for k, d in zip(keys, detections) if not (torch.isfinite(d.scores).all() and torch.isfinite(d.boxes_xyxy).all())]
    if bad:
        fire("non_finite", f"NaN or Inf in the scores or boxes of {len(bad)} image(s) ({_few(bad)}). Likely an fp16 overflow "
             "(keep LayerNorm/softmax in fp32, export with opset 17) or an output buffer that was never written.", bad)
    finite = [d.scores.isfinite() & d.boxes_xyxy.isfinite().all(-1) for d in detections]
    scores = torch.cat([d.scores[f] for d, f in zip(detections, finite)]) if detections else torch.zeros(0)
    if scores.numel() and (scores.min() < 0 or scores.max() > 1):
        fire("score_range", f"scores range from {scores.min().item():.3g} to {scores.max().item():.3g}, outside [0, 1]: "
             "the engine returns logits (sigmoid missing from the exported postprocess?).")
    if scores.numel() > 1 and bool((scores == scores[0]).all()):
        fire("scores_equal", f"every score is {scores[0].item():.4g}: the output does not depend on the input "
             "(inputs all zero or unbound? weights not loaded?).")
    if num_classes is not None:
        out = [k for k, d in zip(keys, detections) if len(d.labels) and (d.labels.min() < 0 or d.labels.max() >= num_classes)]
        if out:
            fire("label_range", f"labels outside 0..{num_classes - 1} on {len(out)} image(s) ({_few(out)}): the engine's class "
                 "count differs from the model's (wrong config?), or labels are query indices (labels = index % num_classes).", out)
    confident = [d.boxes_xyxy[f & (d.scores >= score_threshold)] for d, f in zip(detections, finite)]
    boxes = torch.cat(confident) if confident else torch.zeros(0, 4)
    if len(boxes) == 0:
        return found
    hint = _dtype_hint(sizes_dtype)
    if bool((boxes == 0).all()):
        fire("zero_boxes", f"every box is (0, 0, 0, 0). orig_target_sizes probably reached the engine as zeros ({hint}).")
        return found
    collapsed = False
    if len(boxes) > 1:
        for axis, cols, size_name in (("y", [1, 3], "height"), ("x", [0, 2], "width")):
            values = boxes[:, cols]
            if bool((values == 0).all()):
                fire(f"zero_{axis}", f"every {axis} coordinate is 0. orig_target_sizes was probably read with the wrong dtype "
                     f"({hint}).")
                collapsed = True
            elif bool((values == values[0, 0]).all()):
                fire(f"constant_{axis}", f"every {axis} coordinate is {values[0, 0].item():.4g}: the {size_name} in "
                     f"orig_target_sizes is probably wrong ({hint}).")
                collapsed = True
    if not collapsed:
        degenerate = int(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).sum())
        if degenerate:
            fire("degenerate_boxes", f"{degenerate} of {len(boxes)} confident boxes have x2 <= x1 or y2 <= y1: boxes are "
                 "probably cxcywh or xywh where xyxy is expected, or their coordinates are reordered.")
    if sizes_wh is not None:
        far = []
        for key, b, (w, h) in zip(keys, confident, sizes_wh):
            lim = torch.tensor([w, h, w, h], dtype=b.dtype) * FAR_OUTSIDE
            size = torch.tensor([w, h, w, h], dtype=b.dtype)
            if len(b) and bool(((b < -lim) | (b > size + lim)).any()):
                far.append(key)
        if far:
            fire("far_outside", f"confident boxes lie far outside the image on {len(far)} image(s) ({_few(far)}): "
                 f"orig_target_sizes does not describe the image ({hint}; an int32 (w, h) read as int64 "
                 "gives a huge width).", far)
    return found


def check_empty(backend: str, detections: Sequence[Detections], reference_name: str, reference: Sequence[Detections],
                keys: Sequence[str], *, score_threshold: float, margin: float) -> list[Finding]:
    """Images where ``backend`` has nothing above ``score_threshold - margin`` but the reference has confident detections."""
    empty = [k for k, d, r in zip(keys, detections, reference)
             if not bool((d.scores >= score_threshold - margin).any()) and bool((r.scores >= score_threshold + margin).any())]
    if not empty:
        return []
    return [Finding(backend, "empty_output", f"backend {backend}: no detection on {len(empty)} image(s) ({_few(empty)}) where "
                    f"{reference_name} has confident ones: inputs not preprocessed like the model expects (0-255 vs 0-1, "
                    "BGR vs RGB), outputs read before the engine finished, or scores scaled differently.", empty)]
