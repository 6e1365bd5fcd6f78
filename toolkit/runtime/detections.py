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


PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def label_font_size(h: int, w: int) -> int:
    """A font size readable on the image at its own scale: 1/40 of the shorter side, at least 12 px."""
    return max(12, round(min(h, w) / 40))


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font without a font file
    except TypeError:
        return ImageFont.load_default()


def _text_color(hex_color: str) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"


def draw(image: torch.Tensor, dets: Detections, class_names: list[str], path: str | Path | None = None) -> torch.Tensor:
    """Annotate a uint8 [3,H,W] image with boxes and "name score" labels; write a PNG/JPEG if ``path`` is given.

    Labels sit in a box filled with the box's colour (readable on busy images), their font sized to the image
    (:func:`label_font_size`), above the box where there is room, else just inside it."""
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = image.shape[-2:]
    boxes = dets.boxes_xyxy.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    names = [f"{class_names[l] if 0 <= l < len(class_names) else l} {s:.2f}" for l, s in zip(dets.labels.tolist(), dets.scores.tolist())]
    colors = [PALETTE[int(l) % len(PALETTE)] for l in dets.labels.tolist()]
    out = image
    if len(boxes):
        pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
        canvas = ImageDraw.Draw(pil)
        size = label_font_size(h, w)
        font, width, pad = _font(size), max(2, round(min(h, w) / 300)), max(2, size // 5)
        for box, name, color in zip(boxes.tolist(), names, colors):
            canvas.rectangle(box, outline=color, width=width)
        for box, name, color in zip(boxes.tolist(), names, colors):  # labels last: never under another box's line
            left, top, right, bottom = canvas.textbbox((0, 0), name, font=font)
            tw, th = right - left + 2 * pad, bottom - top + 2 * pad
            x = min(max(0, box[0]), max(0, w - tw))
            y = box[1] - th if box[1] - th >= 0 else box[1]
            canvas.rectangle([x, y, x + tw, y + th], fill=color)
            canvas.text((x + pad - left, y + pad - top), name, fill=_text_color(color), font=font)
        out = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()
    if path is not None:
        from torchvision.io import write_jpeg, write_png

        from ..atomic import atomic_path

        with atomic_path(path) as tmp:
            (write_png if str(path).lower().endswith(".png") else write_jpeg)(out, str(tmp))
    return out


def captioned(image: torch.Tensor, caption: str) -> torch.Tensor:
    """``image`` (uint8 [3,H,W]) under a dark strip carrying ``caption`` in white (e.g. "A: onnxruntime")."""
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = image.shape[-2:]
    size = label_font_size(h, w)
    font, pad = _font(size), max(2, size // 4)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, _, _ = probe.textbbox((0, 0), caption, font=font)
    _, line_top, _, line_bottom = probe.textbbox((0, 0), "Ag|", font=font)  # one height for any text: halves line up
    strip = Image.new("RGB", (w, line_bottom - line_top + 2 * pad), "#202020")
    ImageDraw.Draw(strip).text((pad - left, pad - line_top), caption, fill="#ffffff", font=font)
    top_strip = torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)
    return torch.cat([top_strip, image], dim=1)
