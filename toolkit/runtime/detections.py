"""Detections of one image with documented units, COCO result records, and drawing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Detections:
    """One image's detections: ``labels`` int64 [K], ``boxes_xyxy`` float32 [K,4] in original-image pixels, ``scores`` [K]."""

    labels: torch.Tensor
    boxes_xyxy: torch.Tensor
    scores: torch.Tensor

    def above(self, threshold: float) -> "Detections":
        keep = self.scores >= threshold
        return Detections(self.labels[keep], self.boxes_xyxy[keep], self.scores[keep])

    def to_coco(self, image_id: int, file_name: str | None = None) -> list[dict[str, Any]]:
        """COCO results records: ``bbox`` is [x, y, w, h] in pixels, ``category_id`` the model's class index."""
        out = []
        for label, box, score in zip(self.labels.tolist(), self.boxes_xyxy.tolist(), self.scores.tolist()):
            rec = {"image_id": image_id, "category_id": int(label),
                   "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)}
            if file_name is not None:
                rec["file_name"] = file_name
            out.append(rec)
        return out


def split_batch(outputs: dict[str, torch.Tensor]) -> list[Detections]:
    """Engine outputs (``labels``/``boxes``/``scores`` with a batch dim) -> one Detections per image, on the CPU."""
    labels, boxes, scores = (outputs[k].detach().cpu() for k in ("labels", "boxes", "scores"))
    return [Detections(labels[i], boxes[i].float(), scores[i].float()) for i in range(labels.shape[0])]


def draw(image: torch.Tensor, dets: Detections, class_names: list[str], path: str | Path | None = None) -> torch.Tensor:
    """Annotate a uint8 [3,H,W] image with boxes and "name score" labels; write a PNG/JPEG if ``path`` is given."""
    from torchvision.utils import draw_bounding_boxes

    h, w = image.shape[-2:]
    boxes = dets.boxes_xyxy.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    names = [f"{class_names[l] if 0 <= l < len(class_names) else l} {s:.2f}" for l, s in zip(dets.labels.tolist(), dets.scores.tolist())]
    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    colors = [palette[int(l) % len(palette)] for l in dets.labels.tolist()]
    out = draw_bounding_boxes(image, boxes, labels=names, colors=colors, width=2) if len(boxes) else image
    if path is not None:
        from torchvision.io import write_jpeg, write_png

        from ..atomic import atomic_path

        with atomic_path(path) as tmp:
            (write_png if str(path).lower().endswith(".png") else write_jpeg)(out, str(tmp))
    return out
