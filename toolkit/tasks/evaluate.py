"""COCO mAP of a model on every backend, with a maintained evaluator (faster-coco-eval).

    rtdetr-deploy eval runs/shapes/model --synthetic 500
    rtdetr-deploy eval runs/shapes/model --data DATASET_DIR --backends torch,onnxruntime

One row per backend (mAP, mAP50, mAP75, images/s). The backends must agree within ``tolerance`` mAP points
(0.5 by default): the report says whether they do. Images are preprocessed once with
:mod:`toolkit.runtime.preprocessing` (the model's own spec) and fed to every engine alike.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import InputError, MissingDependencyError

SYNTHETIC_SEED = 20_260_101  # a seed training never uses: synthetic evaluation images are unseen


def _import_faster_coco_eval() -> Any:
    try:
        import faster_coco_eval
    except ImportError:
        raise MissingDependencyError("COCO evaluation needs faster-coco-eval: pip install 'rtdetr-deploy[eval]' "
                          "(or pip install 'faster-coco-eval>=1.6')") from None
    return faster_coco_eval


def coco_map(gt: Mapping[str, Any] | str | Path, results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """COCO bbox mAP@[.5:.95], mAP50, mAP75 of ``results`` (COCO result records) against ground truth ``gt``
    (a COCO dict or JSON path). No detections at all gives 0."""
    fce = _import_faster_coco_eval()
    gt_dict = json.loads(Path(gt).read_text()) if isinstance(gt, (str, Path)) else dict(gt)
    if not results or not gt_dict.get("annotations"):
        return {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = fce.COCO(gt_dict)
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = fce.COCOeval_faster(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(0.0, float(s)) for s in ev.stats[:3]]  # -1 means "no ground truth": reported as 0
    return {"mAP": stats[0], "mAP50": stats[1], "mAP75": stats[2]}


@dataclass
class EvalRow:
    backend: str
    mAP: float | None = None
    mAP50: float | None = None
    mAP75: float | None = None
    images_per_second: float | None = None
    device: str = ""
    error: str | None = None


@dataclass
class EvalReport:
    rows: list[EvalRow]
    num_images: int
    data: str
    tolerance: float = 0.5  # mAP points
    agree: bool = True
    max_difference: float = 0.0  # mAP points between the best and worst backend
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. a backend left out because it cannot run the file

    def row(self, backend: str) -> EvalRow:
        return next(r for r in self.rows if r.backend == backend)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{'backend':<14}{'device':<10}{'mAP':>8}{'mAP50':>8}{'mAP75':>8}{'img/s':>10}"]
        for r in self.rows:
            if r.error:
                lines.append(f"{r.backend:<14}{r.device:<10}  error: {r.error}")
            else:
                lines.append(f"{r.backend:<14}{r.device:<10}{r.mAP:>8.4f}{r.mAP50:>8.4f}{r.mAP75:>8.4f}{r.images_per_second:>10.1f}")
        return "\n".join(lines + [f"{self.num_images} images ({self.data}); {self.message}"] + [f"note: {n}" for n in self.notes])


def _load_dataset(data_dir: str | Path) -> tuple[dict[str, Any], list[Path]]:
    """A COCO JSON (images relative to its folder) or a dataset root with ``val.json`` (as make_shapes_dataset writes)."""
    p = Path(data_dir)
    ann = p if p.is_file() else p / "val.json"
    if not ann.is_file():
        raise InputError(f"{data_dir}: expected a COCO JSON file or a directory with val.json (toolkit.data.make_shapes_dataset writes one)")
    gt = json.loads(ann.read_text())
    paths = [ann.parent / im["file_name"] for im in gt["images"]]
    missing = [str(q) for q in paths if not q.is_file()]
    if missing:
        raise InputError(f"{ann}: {len(missing)} image files are missing, e.g. {missing[0]}")
    return gt, paths


def runnable_backends(source: Any, backends: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The backends of ``backends`` that can run ``source`` (all that can where None), and a note (in CLI words)
    for each left out: a built file runs on its own backend only, a checkpoint on torch and onnxruntime (exported
    on the fly). None left is an :class:`InputError` that says which ``--backends`` would work."""
    from ..runtime.engine import detect_backend

    native = detect_backend(source)
    can = ("torch", "onnxruntime") if native == "torch" else (native,)
    if backends is None:
        return list(can), []
    keep = [b for b in backends if b in can]
    what = str(source) if native != "torch" else "a checkpoint or config"
    notes = [f"--backends {b} left out: {what} runs on {', '.join(can)} only" + (
             " (pass the checkpoint or config it was built from to evaluate torch too)" if native != "torch" else "")
             for b in backends if b not in can]
    if not keep:
        raise InputError(f"none of --backends {','.join(backends)} can run {what}: use --backends {','.join(can)}")
    return keep, notes


def _engines(source: Any, backends: Sequence[str], device: str | torch.device | None, work: Path) -> list[tuple[str, Any]]:
    """(backend, engine or exception) for each backend; a model source is exported to ONNX for onnxruntime."""
    from ..runtime.base import BaseEngine
    from ..runtime.engine import detect_backend, load

    if isinstance(source, BaseEngine):
        return [(source.backend, source)]
    if isinstance(source, Mapping):  # backend -> engine or file
        return [(b, s if isinstance(s, BaseEngine) else _try(lambda s=s, b=b: load(s, backend=b, device=device))) for b, s in source.items()]
    native = detect_backend(source)
    out, deploy = [], None
    for b in backends:
        if b == native:
            out.append((b, _try(lambda b=b: load(source, backend=b, device=device))))
        elif native == "torch" and b == "onnxruntime":
            def export() -> Any:
                from ..export.onnx import export_onnx
                from ..models.loading import load_model

                nonlocal deploy
                deploy = deploy or load_model(source)
                path = work / "model.onnx"
                export_onnx(deploy.cpu(), path, verify=False)
                return load(path, backend="onnxruntime", device=device)
            out.append((b, _try(export)))
        else:  # runnable_backends leaves these out before; kept for direct callers
            out.append((b, InputError(f"{source} cannot run on {b}: build a {b} file (rtdetr-deploy build --backend {b})")))
    return out


def _try(fn: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # reported in the row, the other backends still run
        return e


def _run_engine(engine: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[Any], float]:
    from ..runtime.detections import split_batch
    from ..signature import INPUT_IMAGES, INPUT_SIZES

    def sync() -> None:
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)

    images, sizes = batches[0]
    engine.infer({INPUT_IMAGES: images.to(engine.device), INPUT_SIZES: sizes.to(engine.device)})  # warm-up
    sync()
    dets, elapsed = [], 0.0
    for images, sizes in batches:
        images, sizes = images.to(engine.device), sizes.to(engine.device)
        sync()
        t = time.perf_counter()
        out = engine.infer({INPUT_IMAGES: images, INPUT_SIZES: sizes})
        sync()
        elapsed += time.perf_counter() - t
        dets += split_batch(out)
    return dets, elapsed


def evaluate(model_or_engine_source: Any, data_dir: str | Path | None = None, synthetic: int | None = None,
             backends: Sequence[str] | None = None, device: str | torch.device | None = None, *,
             batch_size: int = 16, tolerance: float = 0.5, seed: int = SYNTHETIC_SEED, size: int | None = None,
             progress: bool = False, say: Any = None) -> EvalReport:
    """COCO mAP of a model (anything :func:`toolkit.load` takes, an Engine, or a {backend: engine or file} map)
    on each backend, over ``data_dir`` (COCO JSON / dataset root) or ``synthetic`` N fresh shapes images.

    ``backends`` None: every backend that can run the source (a built file: its own; a checkpoint: torch and
    onnxruntime). Backends given that cannot run a file are left out with a note, not an error row.
    ``progress``: a line per backend when it starts and when it ends (mAP, elapsed time), on stderr or to ``say``."""
    from ..errors import ToolkitError
    from ..runtime.engine import detect_backend
    from ..runtime.preprocessing import engine_preprocess, preprocess, read_image

    if (data_dir is None) == (synthetic is None):
        raise InputError("give either --data (a COCO JSON or dataset root) or --synthetic N, not both")
    if synthetic is not None and (isinstance(synthetic, bool) or not isinstance(synthetic, int) or synthetic < 1):
        raise InputError(f"--synthetic takes a number of images of at least 1, got {synthetic!r}")
    def tell(line: str) -> None:
        (say or (lambda text: print(f"eval: {text}", file=sys.stderr, flush=True)))(line)

    notes: list[str] = []
    if not isinstance(model_or_engine_source, Mapping) and not hasattr(model_or_engine_source, "infer"):
        backends, notes = runnable_backends(model_or_engine_source, None if backends is None else list(backends))
    elif backends is None:
        backends = ("torch", "onnxruntime")
    with tempfile.TemporaryDirectory(prefix="rtdetr-eval-") as tmp:
        work = Path(tmp)
        engines = _engines(model_or_engine_source, backends, device, work)
        built = isinstance(model_or_engine_source, (str, Path)) and detect_backend(model_or_engine_source) != "torch"
        failed = next((e for _, e in engines if isinstance(e, ToolkitError)), None)
        if built and failed is not None:  # a built file that cannot be loaded here: bad input, one line (no other row to show)
            raise failed
        first = next((e for _, e in engines if not isinstance(e, Exception)), None)
        if synthetic is not None:
            from ..data.shapes import write_split

            names = first.class_names if first is not None and first.class_names else None
            side = size or (engine_preprocess(first).size[0] if first is not None else 320)
            ann = write_split(work / "data", "val", int(synthetic), seed=seed, size=side, class_names=names)
            gt, paths = _load_dataset(ann)
            data = f"synthetic shapes, seed {seed}, {side}x{side}"
        else:
            gt, paths = _load_dataset(data_dir)
            data = str(data_dir)
        rows: list[EvalRow] = []
        cache: dict[Any, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        raw = [read_image(p) for p in paths]
        for backend, engine in engines:
            if isinstance(engine, Exception):
                rows.append(EvalRow(backend, error=f"{engine.__class__.__name__}: {str(engine).splitlines()[0] if str(engine) else ''}"))
                continue
            spec = engine_preprocess(engine)
            _, hi = engine.signature.bounds("N")
            step = min(batch_size, hi) if hi else batch_size
            key = (spec, step)
            if key not in cache:
                cache[key] = [preprocess(raw[i:i + step], spec) for i in range(0, len(raw), step)]
            started = time.perf_counter()
            if progress:
                tell(f"{backend}: {len(paths)} images ...")
            try:
                dets, elapsed = _run_engine(engine, cache[key])
            except Exception as e:
                rows.append(EvalRow(backend, device=str(engine.device), error=f"{e.__class__.__name__}: {e}"))
                continue
            results = []
            for im, d in zip(gt["images"], dets):
                results += d.to_coco(im["id"])
            m = coco_map(gt, results)
            rows.append(EvalRow(backend, m["mAP"], m["mAP50"], m["mAP75"], len(paths) / max(elapsed, 1e-9), str(engine.device)))
            if progress:
                tell(f"{backend}: mAP {m['mAP']:.4f} ({time.perf_counter() - started:.1f} s)")
            close = getattr(engine, "close", None)
            if close is not None and engine is not model_or_engine_source:
                close()
    ok = [r for r in rows if r.error is None]
    diff = 100 * (max(r.mAP for r in ok) - min(r.mAP for r in ok)) if len(ok) > 1 else 0.0
    agree = diff <= tolerance and len(ok) == len(rows)
    if len(ok) < len(rows):
        message = f"{len(rows) - len(ok)} backend(s) failed: {', '.join(r.backend for r in rows if r.error)}"
    elif len(ok) == 1:
        message = f"one backend ({ok[0].backend}): nothing to compare"
    elif agree:
        message = f"backends agree: mAP within {diff:.2f} points (tolerance {tolerance})"
    else:
        message = f"backends DISAGREE: mAP differs by {diff:.2f} points (tolerance {tolerance})"
    return EvalReport(rows, len(paths), data, tolerance, agree, round(diff, 4), message, notes=notes)
