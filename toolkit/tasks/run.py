"""``rtdetr-deploy run``: preprocess images, infer with any engine, write COCO results and annotated images."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..atomic import write_text
from ..errors import InputError
from ..runtime.base import BaseEngine
from ..runtime.detections import Detections, draw, split_batch
from ..runtime.engine import load
from ..runtime.preprocessing import (
    engine_preprocess,
    list_images,
    preprocess,
    read_image,
)
from ..signature import INPUT_IMAGES, INPUT_SIZES


@dataclass
class RunResult:
    output_dir: Path
    detections: list[Detections]
    files: list[Path]
    results_path: Path
    warnings: list[str] = field(default_factory=list)  # e.g. NaN/Inf in the outputs (also issued with warnings.warn)


def infer_images(engine: BaseEngine, paths: Sequence[Path], batch_size: int = 8) -> list[Detections]:
    """Detections for each image file, batched within the engine's batch range."""
    spec = engine_preprocess(engine)
    _, hi = engine.signature.bounds("N")
    step = min(batch_size, hi) if hi else batch_size
    dets: list[Detections] = []
    for i in range(0, len(paths), step):
        images, sizes = preprocess([read_image(p) for p in paths[i:i + step]], spec)
        out = engine.infer({INPUT_IMAGES: images.to(engine.device), INPUT_SIZES: sizes.to(engine.device)})
        dets += split_batch(out)
    return dets


def run(model: Any, images: Sequence[str | Path], output_dir: str | Path, *, backend: str | None = None,
        device: str | None = None, score_threshold: float = 0.3, batch_size: int = 8, draw_images: bool = True,
        **options: Any) -> RunResult:
    """Run ``model`` (anything :func:`toolkit.load` takes, or an Engine) on image files; write results to ``output_dir``."""
    engine = model if isinstance(model, BaseEngine) else load(model, backend=backend, device=device, **options)
    paths = list_images(images)
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    dets = infer_images(engine, paths, batch_size)
    notes = []
    broken = [p.name for p, d in zip(paths, dets) if not (d.scores.isfinite().all() and d.boxes_xyxy.isfinite().all())]
    if broken:  # NaN scores fail every threshold: without this the run would look like "0 detections"
        notes.append(f"the model's outputs hold NaN or Inf on {len(broken)} of {len(paths)} image(s) "
                     f"({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}): those detections are dropped; "
                     "the weights may hold NaN, or an fp16 engine overflowed (verify with rtdetr-deploy validate)")
        warnings.warn(notes[-1], RuntimeWarning, stacklevel=2)
    records, files = [], []
    for image_id, (path, d) in enumerate(zip(paths, dets), start=1):
        kept = d.above(score_threshold)
        records += kept.to_coco(image_id, path.name)
        if draw_images:
            target = out_dir / f"{path.stem}.det.png"
            draw(read_image(path), kept, engine.class_names, target)
            files.append(target)
    results = write_text(out_dir / "detections.json", json.dumps(records, indent=1))
    return RunResult(out_dir, dets, files, results, notes)
