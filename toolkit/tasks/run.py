"""``rtdetr-deploy run``: preprocess images, infer with any engine, write COCO results and annotated images.

Images are decoded (JPEGs on the GPU where the engine runs on CUDA) and preprocessed in the background while
the engine runs (toolkit.runtime.pipeline). Every input is checked before anything is written: a folder with
broken files is reported in full (each file and why), and processed without them only when asked (``skip_bad=True``, ``--skip-bad``), so a results
folder never holds partial results that look complete. Boxes refer to each image as it is displayed (its
EXIF orientation applied). Annotated images get distinct names (``a.jpg`` and ``a.png`` never share one).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..atomic import write_text
from ..errors import InputError
from ..runtime.base import BaseEngine
from ..runtime.detections import Detections, draw, split_batch
from ..runtime.engine import load
from ..runtime.pipeline import ImagePipeline
from ..runtime.preprocessing import engine_preprocess, list_images, read_image
from ..signature import INPUT_IMAGES, INPUT_SIZES


@dataclass
class RunResult:
    output_dir: Path
    detections: list[Detections]
    files: list[Path]
    results_path: Path
    skipped: dict[Path, str] = field(default_factory=dict)  # broken inputs left out (skip_bad=True): file -> why
    images: list[Path] = field(default_factory=list)  # the inputs the detections belong to, in order
    warnings: list[str] = field(default_factory=list)  # e.g. NaN/Inf in the outputs (also issued with warnings.warn)


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    return batch_size


def _pipeline(engine: BaseEngine, paths: Sequence[Path], batch_size: int) -> ImagePipeline:
    """Batches within the engine's batch range, decoded and preprocessed on the engine's device (GPU decode on CUDA)."""
    check_batch_size(batch_size)
    spec = engine_preprocess(engine)
    _, hi = engine.signature.bounds("N")
    step = min(batch_size, hi) if hi else batch_size
    return ImagePipeline(paths, spec, step, engine.device)


def _infer(engine: BaseEngine, pipeline: ImagePipeline, bar: Any = None) -> Iterator[tuple[Path, Detections]]:
    for batch in pipeline:
        out = engine.infer({INPUT_IMAGES: batch.images, INPUT_SIZES: batch.sizes})
        if bar is not None:
            bar.update(len(batch.paths))
        yield from zip(batch.paths, split_batch(out))
    if bar is not None and pipeline.bad:
        bar.update(len(pipeline.bad))


def infer_images(engine: BaseEngine, paths: Sequence[Path], batch_size: int = 8) -> list[Detections]:
    """Detections for each image file, batched within the engine's batch range; unreadable files raise one InputError."""
    pipeline = _pipeline(engine, paths, batch_size)
    dets = [d for _, d in _infer(engine, pipeline)]
    if pipeline.bad:
        raise InputError(f"{len(pipeline.bad)} of {len(paths)} images cannot be read: {'; '.join(pipeline.bad.values())}")
    return dets


def annotated_names(paths: Sequence[Path]) -> list[str]:
    """``STEM.det.png`` for each input, made distinct where stems repeat (``a.jpg``, ``a.png``, ``x/a.jpg``)."""
    stems: dict[str, int] = {}
    for p in paths:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    names, used = [], set()
    for p in paths:
        base = p.stem if stems[p.stem] == 1 else f"{p.stem}.{p.suffix.lstrip('.').lower() or 'noext'}"
        name, n = f"{base}.det.png", 1
        while name in used:
            n += 1
            name = f"{base}-{n}.det.png"
        used.add(name)
        names.append(name)
    return names


def _check_output(out_dir: Path) -> None:
    """Before any work: the output can be made (nothing is created yet: a refused run leaves no folder)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {out_dir} exists and is not a directory")
    probe = out_dir / "detections.json"
    if out_dir.is_dir():
        if not os.access(out_dir, os.W_OK) or (probe.exists() and not os.access(probe, os.W_OK)):
            raise InputError(f"output directory {out_dir} is not writable")
        return
    parent = out_dir.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"output directory {out_dir} cannot be created (Not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output directory {out_dir} cannot be created (Permission denied)")


def _prepare_output(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"output directory {out_dir} cannot be created ({e.strerror or e.__class__.__name__})") from None
    probe = out_dir / "detections.json"
    if not os.access(out_dir, os.W_OK) or (probe.exists() and not os.access(probe, os.W_OK)):
        raise InputError(f"output directory {out_dir} is not writable")


def run(model: Any, images: Sequence[str | Path], output_dir: str | Path, *, backend: str | None = None,
        device: str | None = None, score_threshold: float = 0.3, batch_size: int = 8, draw_images: bool = True,
        skip_bad: bool = False, progress: bool = True, **options: Any) -> RunResult:
    """Run ``model`` (anything :func:`toolkit.load` takes, or an Engine) on image files; write results to ``output_dir``.

    Images are decoded and preprocessed on the engine's device (JPEGs on the GPU with CUDA) while the engine
    runs the previous batch (:class:`~toolkit.runtime.pipeline.ImagePipeline`); ``progress`` shows a bar with
    img/s. Broken ones raise one :class:`InputError` listing them all, before anything is written; with
    ``skip_bad=True`` they are left out (``RunResult.skipped`` says why) and the rest run.
    """
    check_batch_size(batch_size)
    from tqdm import tqdm

    paths = list_images(images)
    out_dir = Path(output_dir)
    _check_output(out_dir)
    engine = model if isinstance(model, BaseEngine) else load(model, backend=backend, device=device, **options)
    results_path = out_dir / "detections.json"
    pipeline = _pipeline(engine, paths, batch_size)
    try:
        with tqdm(total=len(paths), desc="run", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            pairs = list(_infer(engine, pipeline, bar))
    except BaseException:
        if results_path.is_file():  # an earlier run's results must not pass for this run's if it fails midway
            results_path.unlink(missing_ok=True)
        raise
    bad = pipeline.bad
    if bad and not skip_bad:
        listing = "; ".join(bad.values())
        raise InputError(f"{len(bad)} of {len(paths)} images cannot be read: {listing}. Nothing was written; "
                         "fix or remove them, or pass --skip-bad (skip_bad=True) to process the others")
    if not pairs:
        raise InputError(f"none of the {len(paths)} images can be read: {'; '.join(bad.values())}")
    good, dets = [p for p, _ in pairs], [d for _, d in pairs]
    _prepare_output(out_dir)
    results_path.unlink(missing_ok=True)
    names = dict(zip(good, annotated_names(good)))
    records, files = [], []
    for i, (path, d) in enumerate(pairs, 1):
        kept = d.above(score_threshold)
        records += kept.to_coco(i, path.name)
        if draw_images:  # decoded again here: a large folder's images never sit in memory together
            draw(read_image(path), kept, engine.class_names, out_dir / names[path])
            files.append(out_dir / names[path])
    notes = []
    broken = [p.name for p, d in zip(good, dets) if not (d.scores.isfinite().all() and d.boxes_xyxy.isfinite().all())]
    if broken:  # NaN scores fail every threshold: without this the run would look like "0 detections"
        notes.append(f"the model's outputs hold NaN or Inf on {len(broken)} of {len(good)} image(s) "
                     f"({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}): those detections are dropped; "
                     "the weights may hold NaN, or an fp16 engine overflowed (verify with rtdetr-deploy validate)")
        warnings.warn(notes[-1], RuntimeWarning, stacklevel=2)
    results = write_text(results_path, json.dumps(records, indent=1))  # last: its presence means this run completed
    return RunResult(out_dir, dets, files, results, bad, good, notes)
