"""Compare any two backends as detectors: optimal matching per image and label, sentinels, written reports.

Sides are anything :func:`toolkit.load` accepts, a loaded Engine, a COCO result file written by
``rtdetr-deploy run`` (``detections.json`` or its directory), or a reference bundle written by
:func:`save_reference`. Engines see identical image files through the single preprocessing (synthetic,
deterministic images when none are given); a bundle replays its stored preprocessed inputs.

Outputs are never compared elementwise: top-K positions reorder among near-equal scores. Per image and
label, detections are paired by an optimal assignment (``scipy.optimize.linear_sum_assignment``) over
``torchvision.ops.box_iou``; then matched fraction, unmatched detections, IoU, box shift, score deltas and
label disagreements decide (:class:`Thresholds`). Sentinels (:mod:`toolkit.sentinels`) run on each side
alone. When outputs disagree and the model's query selection is tied (flat scores of untrained weights),
the verdict is ``too_flat``: not judged, not failed.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .atomic import atomic_path, write_bytes, write_text
from .detections import Detections, draw, split_batch
from .engine import BaseEngine, load
from .errors import ComparisonError, InputError
from .sentinels import Finding, check_empty, check_outputs
from .signature import INPUT_IMAGES, INPUT_SIZES

if TYPE_CHECKING:
    from rich.table import Table

REPORT_FORMAT = "rtdetr-deploy/compare/1"
REFERENCE_FORMAT = "rtdetr-deploy/reference/1"
REFERENCE_META = "reference.json"
RESULTS_FILE = "detections.json"
TIE_GAP = 1e-4  # a query-selection boundary gap below this is a tie (see toolkit.verify)


@dataclass(frozen=True)
class Thresholds:
    """When two backends agree. Defaults and why (IoU of a box shifted along one axis, measured with box_iou):

    ====== ======= ======= ======= ======= ======= =======
    side    8 px   16 px   32 px   50 px   100 px  200 px
    1 px   0.778   0.882   0.939   0.961   0.980   0.990
    2 px   0.600   0.778   0.882   0.923   0.961   0.980
    ====== ======= ======= ======= ======= ======= =======

    * ``min_iou`` 0.95: any matched pair below fails: a 2 px shift of a box up to ~80 px across. Pairs
      whose every coordinate moved at most ``subpixel_px`` 0.5 px are exempt: fp16 rounding of a
      normalized coordinate (2^-11 of the image side, ~0.3 px at 640) must not fail tiny boxes.
    * ``median_iou`` 0.98 and ``median_shift_px`` 1.0: the median over matched pairs of the largest
      coordinate difference (px of the original image) must stay within
      ``max(median_shift_px, shift_fraction * longer image side)`` (``shift_fraction`` 0.001: fp16 needs
      ~1 px per 2000 px of image). A systematic 2 px shift of every box fails on images up to 2000 px,
      large boxes included (a 200 px box shifted 2 px keeps IoU 0.98). fp16 vs fp32 noise on a trained
      model is a few tenths of a pixel at 640 and centred: its median stays far below 1 px.
    * A uniform 1 px shift is the documented edge: the median shift passes (1.0 <= 1.0), so it passes when
      every box is at least ~40 px on the shifted axis and fails on smaller boxes by ``min_iou``.
    * ``max_score_delta`` 0.05: fp16 moves sigmoid scores by ~1e-3..1e-2; a wrong input moves them by tenths.
    * ``score_margin`` 0.05: detections scoring within this of the threshold cross it legitimately; they
      are matched against the other side's detections down to ``threshold - score_margin`` and may stay
      unmatched without failing.
    * ``match_iou`` 0.5: pairs below are no match at all; ``label_iou`` 0.9: an unmatched detection whose
      box matches one of another label this well is a label disagreement.
    * ``min_matched_fraction`` 1.0: every confident detection (outside the margin) must be matched.
    """

    min_iou: float = 0.95
    median_iou: float = 0.98
    subpixel_px: float = 0.5
    median_shift_px: float = 1.0
    shift_fraction: float = 0.001
    max_score_delta: float = 0.05
    score_margin: float = 0.05
    match_iou: float = 0.5
    label_iou: float = 0.9
    min_matched_fraction: float = 1.0


@dataclass
class ImageStats:
    """One image's comparison; ``None`` statistics when nothing was matched."""

    image: str
    a_count: int
    b_count: int
    matched: int
    matched_fraction: float
    unmatched_a: int
    unmatched_b: int
    near_threshold: int  # unmatched, tolerated: within the score margin of the threshold
    label_disagreements: int
    iou_min: float | None  # raw IoU of matched pairs; the verdict counts pairs within subpixel_px as IoU 1
    iou_median: float | None
    shift_median_px: float | None
    score_delta_max: float | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Side:
    """What one backend produced for the compared images, and what is known about it."""

    name: str
    keys: list[str]
    detections: list[Detections]
    class_names: list[str] = field(default_factory=list)
    sizes_wh: list[tuple[int, int]] | None = None
    sizes_dtype: str | None = None
    engine: BaseEngine | None = None
    inputs: dict[str, torch.Tensor] | None = None  # preprocessed inputs the engine saw
    paths: list[Path] | None = None  # image files, when known (drawing)
    selection_gap: float | None = None  # stored with a reference bundle


@dataclass
class CompareReport:
    """The verdict: ``ok`` (also ``bool(report)``) is False when the sides disagree or a sentinel fired.

    ``verdict``: ``agree``, ``disagree`` or ``too_flat`` (outputs differ but the model's query selection is
    tied, so two correct backends may differ: not judged, not failed; use trained weights).
    """

    backend_a: str
    backend_b: str
    verdict: str
    score_threshold: float
    thresholds: Thresholds
    images: list[ImageStats]
    sentinels: list[Finding]
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verdict != "disagree" and not self.sentinels

    def __bool__(self) -> bool:
        return self.ok

    def raise_for_failure(self) -> None:
        """Raise :class:`~toolkit.errors.ComparisonError` with :meth:`summary` unless ``ok``."""
        if not self.ok:
            raise ComparisonError(self.summary())

    def summary(self) -> str:
        bad = [s for s in self.images if not s.ok]
        lines = [f"compare {self.backend_a} vs {self.backend_b}: {'PASS' if self.ok else 'FAIL'} ({self.verdict}), "
                 f"{len(self.images)} images, {len(bad)} disagree"]
        lines += [f"  sentinel: {f.message}" for f in self.sentinels]
        for s in bad:
            lines += [f"  {s.image}: {p}" for p in s.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Stable keys: format, ok, verdict, backend_a, backend_b, score_threshold, thresholds, images (one
        dict per image: ImageStats fields plus ok), sentinels (backend, check, message, images), notes, files."""
        return {
            "format": REPORT_FORMAT, "ok": self.ok, "verdict": self.verdict, "backend_a": self.backend_a,
            "backend_b": self.backend_b, "score_threshold": self.score_threshold, "thresholds": asdict(self.thresholds),
            "images": [{**asdict(s), "ok": s.ok} for s in self.images], "sentinels": [f.to_dict() for f in self.sentinels],
            "notes": list(self.notes), "files": [str(p) for p in self.files],
        }

    def table(self) -> "Table":
        from rich.table import Table

        table = Table(title=f"{self.backend_a} vs {self.backend_b}: {'PASS' if self.ok else 'FAIL'} ({self.verdict})")
        for col in ("image", "A", "B", "matched", "unmatched A/B", "labels", "IoU min/med", "shift px", "Δscore", ""):
            table.add_column(col)
        for s in self.images:
            iou = "-" if s.iou_min is None else f"{s.iou_min:.3f}/{s.iou_median:.3f}"
            table.add_row(s.image, str(s.a_count), str(s.b_count), f"{s.matched_fraction:.0%}", f"{s.unmatched_a}/{s.unmatched_b}",
                          str(s.label_disagreements), iou, _fmt(s.shift_median_px, ".2f"), _fmt(s.score_delta_max, ".3f"),
                          "[green]ok[/green]" if s.ok else "[red]FAIL[/red]")
        return table

    def markdown(self) -> str:
        lines = [f"# {self.backend_a} vs {self.backend_b}: {'PASS' if self.ok else 'FAIL'} ({self.verdict})", "",
                 f"Score threshold {self.score_threshold}; thresholds: "
                 + ", ".join(f"{k} {v}" for k, v in asdict(self.thresholds).items()), ""]
        if self.sentinels:
            lines += ["## Sentinels", ""] + [f"- {f.message}" for f in self.sentinels] + [""]
        lines += ["## Images", "", "| image | A | B | matched | unmatched A/B | label disagreements | IoU min | IoU median "
                  "| shift px | max Δscore | ok |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in self.images:
            lines.append(f"| {s.image} | {s.a_count} | {s.b_count} | {s.matched_fraction:.0%} | {s.unmatched_a}/{s.unmatched_b} "
                         f"| {s.label_disagreements} | {_fmt(s.iou_min, '.3f')} | {_fmt(s.iou_median, '.3f')} "
                         f"| {_fmt(s.shift_median_px, '.2f')} | {_fmt(s.score_delta_max, '.3f')} | {'yes' if s.ok else 'NO'} |")
        problems = [f"- {s.image}: {p}" for s in self.images for p in s.problems]
        if problems:
            lines += ["", "## Problems", ""] + problems
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _valid(d: Detections, min_score: float) -> Detections:
    keep = d.scores.isfinite() & d.boxes_xyxy.isfinite().all(-1) & (d.scores >= min_score)
    return Detections(d.labels[keep], d.boxes_xyxy[keep].double(), d.scores[keep].double())


def _effective_iou(a: torch.Tensor, b: torch.Tensor, th: Thresholds) -> torch.Tensor:
    """IoU [len(a), len(b)], with pairs whose coordinates all moved at most ``th.subpixel_px`` counted as 1."""
    from torchvision.ops import box_iou

    close = (a[:, None, :] - b[None, :, :]).abs().amax(-1) <= th.subpixel_px
    return torch.where(close, torch.ones_like(close, dtype=a.dtype), box_iou(a, b))


def match_image(key: str, a: Detections, b: Detections, score_threshold: float, th: Thresholds,
                size_wh: tuple[int, int] | None = None) -> ImageStats:
    """Pair one image's detections of two backends (per label, optimal assignment on IoU) and judge them."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_iou

    pool = score_threshold - th.score_margin
    A, B = _valid(a, pool), _valid(b, pool)
    pair_a = torch.full((len(A.scores),), -1, dtype=torch.long)
    pair_b = torch.full((len(B.scores),), -1, dtype=torch.long)
    for label in torch.unique(torch.cat([A.labels, B.labels])).tolist():
        ia, ib = (A.labels == label).nonzero().flatten(), (B.labels == label).nonzero().flatten()
        if len(ia) == 0 or len(ib) == 0:
            continue
        iou = _effective_iou(A.boxes_xyxy[ia], B.boxes_xyxy[ib], th)
        cost = (1 - iou) + (A.scores[ia, None] - B.scores[None, ib]).abs() + 1e6 * (iou < th.match_iou)
        rows, cols = linear_sum_assignment(cost.numpy())
        for r, c in zip(rows.tolist(), cols.tolist()):
            if iou[r, c] >= th.match_iou:
                pair_a[ia[r]], pair_b[ib[c]] = ib[c], ia[r]
    counted_a, counted_b = A.scores >= score_threshold, B.scores >= score_threshold
    pairs = [(i, int(j)) for i, j in enumerate(pair_a.tolist()) if j >= 0 and (counted_a[i] or counted_b[j])]
    problems: list[str] = []
    near = labels = missing_a = missing_b = 0
    for side, mine, other, pair, counted, other_pair in (("A", A, B, pair_a, counted_a, pair_b), ("B", B, A, pair_b, counted_b, pair_a)):
        lacking, relabelled = [], []
        for i in ((pair < 0) & counted).nonzero().flatten().tolist():
            if mine.scores[i] < score_threshold + th.score_margin:
                near += 1
                continue
            others = ((other.labels != mine.labels[i]) & (other_pair < 0)).nonzero().flatten()  # unmatched, other label
            what = (f"label {int(mine.labels[i])} score {mine.scores[i]:.3f} box "
                    f"{[round(v, 1) for v in mine.boxes_xyxy[i].tolist()]}")
            if len(others) and _effective_iou(mine.boxes_xyxy[i:i + 1], other.boxes_xyxy[others], th).max() > th.label_iou:
                relabelled.append(what)
            else:
                lacking.append(what)
        labels += len(relabelled)
        missing_a, missing_b = (missing_a + len(lacking), missing_b) if side == "A" else (missing_a, missing_b + len(lacking))
        if relabelled:
            problems.append(f"label disagreement: {len(relabelled)} {side} detection(s) sit on a box the other backend labels "
                            f"differently (e.g. {relabelled[0]})")
        if lacking:
            problems.append(f"{side} has {len(lacking)} confident detection(s) the other backend lacks (e.g. {lacking[0]})")
    n_counted = int(counted_a.sum() + counted_b.sum()) - near  # near-threshold detections may stay unmatched
    n_matched = sum(int(counted_a[i]) + int(counted_b[j]) for i, j in pairs)
    fraction = n_matched / n_counted if n_counted else 1.0
    stats = ImageStats(key, int(counted_a.sum()), int(counted_b.sum()), len(pairs), fraction,
                       int(((pair_a < 0) & counted_a).sum()), int(((pair_b < 0) & counted_b).sum()), near, labels,
                       None, None, None, None, problems)
    if fraction < th.min_matched_fraction and not missing_a + missing_b + labels:
        problems.append(f"only {fraction:.0%} of confident detections matched (min {th.min_matched_fraction:.0%})")
    if not pairs:
        return stats
    ia = torch.tensor([p[0] for p in pairs])
    ib = torch.tensor([p[1] for p in pairs])
    ious = box_iou(A.boxes_xyxy[ia], B.boxes_xyxy[ib]).diagonal()
    shifts = (A.boxes_xyxy[ia] - B.boxes_xyxy[ib]).abs().amax(-1)
    judged = torch.where(shifts <= th.subpixel_px, torch.ones_like(ious), ious)
    deltas = (A.scores[ia] - B.scores[ib]).abs()
    stats.iou_min, stats.iou_median = float(ious.min()), float(ious.median())
    stats.shift_median_px, stats.score_delta_max = float(shifts.median()), float(deltas.max())
    poor = judged < th.min_iou
    if poor.any():
        problems.append(f"{int(poor.sum())} matched box(es) moved more than {th.subpixel_px} px with IoU below {th.min_iou} "
                        f"(lowest {float(ious[poor].min()):.3f})")
    if float(judged.median()) < th.median_iou:
        problems.append(f"median IoU {float(judged.median()):.3f} below {th.median_iou} (pairs within {th.subpixel_px} px count as 1)")
    shift_tol = max(th.median_shift_px, th.shift_fraction * max(size_wh)) if size_wh else th.median_shift_px
    if stats.shift_median_px > shift_tol:
        problems.append(f"boxes moved by {stats.shift_median_px:.2f} px (median over matches; tolerance {shift_tol:.2f} px)")
    if stats.score_delta_max > th.max_score_delta:
        problems.append(f"scores differ by up to {stats.score_delta_max:.3f} (max {th.max_score_delta})")
    return stats


# ---------------------------------------------------------------- sides


def synthetic_images(directory: str | Path) -> list[Path]:
    """Four deterministic structured PNGs (two 320x240, two 240x320) from :func:`toolkit.verify.verification_images`."""
    from torchvision.io import write_png

    from .verify import verification_images

    out = []
    for j, size in enumerate(((240, 320), (320, 240))):
        batch = (verification_images(2, size, seed=11 + j) * 255).round().to(torch.uint8)
        for i, image in enumerate(batch):
            path = Path(directory) / f"synthetic_{2 * j + i}.png"
            write_png(image, str(path))
            out.append(path)
    return out


def _run_engine(engine: BaseEngine, name: str, paths: list[Path], batch_size: int = 8) -> Side:
    from .preprocessing import preprocess, read_image
    from .run import engine_preprocess

    spec = engine_preprocess(engine)
    decoded = [read_image(p) for p in paths]
    images, sizes = preprocess(decoded, spec)
    side = _replay(engine, name, {INPUT_IMAGES: images, INPUT_SIZES: sizes}, [p.name for p in paths], batch_size)
    side.paths = paths
    return side


def _replay(engine: BaseEngine, name: str, inputs: dict[str, torch.Tensor], keys: list[str], batch_size: int = 8) -> Side:
    _, hi = engine.signature.bounds("N")
    step = min(batch_size, hi) if hi else batch_size
    dets: list[Detections] = []
    for i in range(0, len(keys), step):
        out = engine.infer({k: v[i:i + step].to(engine.device) for k, v in inputs.items()})
        dets += split_batch(out)
    sizes = inputs[INPUT_SIZES]
    return Side(name, keys, dets, engine.class_names, [tuple(map(int, s)) for s in sizes.tolist()],
                engine.signature.input(INPUT_SIZES).dtype, engine, inputs)


def _results_path(source: Any) -> Path | None:
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_file() and p.suffix == ".json":
            return p
        if p.is_dir() and (p / RESULTS_FILE).is_file():
            return p / RESULTS_FILE
    return None


def _reference_dir(source: Any) -> Path | None:
    if isinstance(source, (str, Path)) and (Path(source) / REFERENCE_META).is_file():
        return Path(source)
    return None


def _read_results(path: Path, name: str) -> Side:
    """A COCO results file from ``rtdetr-deploy run``, grouped per image (by file_name, else image_id)."""
    try:
        records = json.loads(path.read_text())
        per_image: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            per_image.setdefault(str(r.get("file_name", r["image_id"])), []).append(r)
        dets = {}
        for key, recs in per_image.items():
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in recs)], dtype=torch.float32)
            dets[key] = Detections(torch.tensor([int(r["category_id"]) for r in recs], dtype=torch.int64), boxes.reshape(-1, 4),
                                   torch.tensor([float(r["score"]) for r in recs], dtype=torch.float32))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a COCO results file written by 'rtdetr-deploy run' ({e.__class__.__name__}: {e})") from None
    keys = sorted(dets)
    return Side(name, keys, [dets[k] for k in keys])


def _read_reference(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / REFERENCE_META).read_text())
        inputs, outputs = load_file(str(directory / "inputs.safetensors")), load_file(str(directory / "outputs.safetensors"))
    except Exception as e:  # json, safetensors and OS errors alike
        raise InputError(f"{directory}: not a readable reference bundle ({e.__class__.__name__}: {e})") from None
    if meta.get("format") != REFERENCE_FORMAT:
        raise InputError(f"{directory}: reference format {meta.get('format')!r}, expected {REFERENCE_FORMAT!r}")
    return meta, inputs, outputs


def _reference_side(directory: Path, name: str) -> Side:
    meta, inputs, outputs = _read_reference(directory)
    keys = list(meta["images"])
    return Side(name, keys, split_batch(outputs), meta.get("class_names", []),
                [tuple(map(int, s)) for s in inputs[INPUT_SIZES].tolist()], meta.get("sizes_dtype"), None, inputs,
                selection_gap=meta.get("selection_gap"))


def save_reference(engine: BaseEngine, images: Sequence[str | Path] | None, directory: str | Path) -> Path:
    """Store a known-good engine's preprocessed inputs and outputs plus metadata in ``directory``.

    Files: ``inputs.safetensors`` (``images``, ``orig_target_sizes`` as given to the engine),
    ``outputs.safetensors`` (``labels``, ``boxes``, ``scores``), ``reference.json`` (format, backend,
    class_names, images, sizes_dtype, signature, selection_gap, toolkit_version). ``compare(directory, engine)``
    replays the inputs into another engine with the same verdict logic.
    """
    from .preprocessing import list_images

    with tempfile.TemporaryDirectory() as tmp:
        paths = list_images(images) if images is not None else synthetic_images(tmp)
        side = _run_engine(engine, engine.backend, paths)
    return _write_reference(side, directory)


def _write_reference(side: Side, directory: str | Path) -> Path:
    from safetensors.torch import save

    from . import __version__

    engine, inputs = side.engine, side.inputs
    if engine is None or inputs is None:
        raise InputError(f"{side.name}: a reference bundle needs an engine and the inputs it ran on")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    outputs = {k: torch.stack([getattr(d, attr) for d in side.detections]).contiguous()
               for k, attr in (("labels", "labels"), ("boxes", "boxes_xyxy"), ("scores", "scores"))}
    meta = {"format": REFERENCE_FORMAT, "backend": engine.backend, "device": str(engine.device), "class_names": engine.class_names,
            "images": side.keys, "sizes_dtype": side.sizes_dtype, "signature": engine.signature.to_dict(),
            "selection_gap": selection_gap(engine, inputs), "toolkit_version": __version__}
    write_bytes(out / "inputs.safetensors", save({k: v.contiguous().cpu() for k, v in inputs.items()}))
    write_bytes(out / "outputs.safetensors", save(outputs))
    write_text(out / REFERENCE_META, json.dumps(meta, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- flat scores


def selection_gap(engine: BaseEngine, inputs: dict[str, torch.Tensor]) -> float | None:
    """Smallest gap, over images, at the top-K boundary of the encoder's query selection; None when not reachable.

    Reachable for eager torch models with an ``enc_score_head`` and for ONNX files whose selection TopK is
    found (see :mod:`toolkit.verify`). A gap below ``TIE_GAP`` means two correct backends may pick different
    queries, so their outputs cannot be judged against each other.
    """
    from .verify import _selection_node_output, _torch_selection_scores

    images, sizes = inputs[INPUT_IMAGES], inputs[INPUT_SIZES]
    model = getattr(engine, "model", None)
    path = getattr(engine, "path", None)
    if model is not None and hasattr(model, "model"):
        num_queries = getattr(getattr(model.model, "config", None), "num_queries", None)
        _, scores = _torch_selection_scores(model, images.to(engine.device), sizes.to(engine.device))
    elif path is not None and Path(path).suffix == ".onnx":
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        graph = onnx.load(str(path))
        name = _selection_node_output(graph)
        topk = next((n for n in graph.graph.node if n.op_type == "TopK" and name is not None and n.input[0] == name), None)
        consts = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
        consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
        if topk is None or topk.input[1] not in consts:
            return None
        num_queries = int(consts[topk.input[1]].reshape(-1)[0])
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {INPUT_IMAGES: images.cpu().numpy(), INPUT_SIZES: sizes.cpu().to(torch.int64).numpy()}
        want = engine.signature.input(INPUT_SIZES).dtype
        feeds[INPUT_SIZES] = feeds[INPUT_SIZES].astype(want)
        scores = torch.from_numpy(session.run([name], feeds)[0])
    else:
        return None
    if scores is None or not num_queries or scores.shape[1] <= num_queries:
        return None
    ordered = scores.float().sort(dim=1, descending=True).values
    return float((ordered[:, num_queries - 1] - ordered[:, num_queries]).min())


# ---------------------------------------------------------------- compare


def _open(source: Any, backend: str | None, device: str | None, label: str) -> tuple[str, Any]:
    """(kind, value): ``engine`` (a BaseEngine), ``results`` (a Path) or ``reference`` (a directory)."""
    if isinstance(source, BaseEngine):
        return "engine", source
    if (ref := _reference_dir(source)) is not None:
        return "reference", ref
    if (res := _results_path(source)) is not None:
        return "results", res
    if isinstance(source, (str, Path)) and Path(source).suffix == ".json" and not Path(source).exists():
        raise InputError(f"{label}: {source}: no such file")
    return "engine", load(source, backend=backend, device=device)


def _side_name(kind: str, value: Any) -> str:
    if kind == "engine":
        return value.backend
    if kind == "reference":
        return f"reference {value.name}"
    return f"results {value.parent.name}/{value.name}"


def _align(a: Side, b: Side) -> tuple[Side, Side]:
    common = [k for k in a.keys if k in set(b.keys)]
    if not common:
        raise InputError(f"{a.name} and {b.name} share no image: {', '.join(a.keys[:3])} vs {', '.join(b.keys[:3])}")

    def pick(s: Side) -> Side:
        idx = [s.keys.index(k) for k in common]
        return Side(s.name, common, [s.detections[i] for i in idx], s.class_names,
                    [s.sizes_wh[i] for i in idx] if s.sizes_wh else None, s.sizes_dtype, s.engine, s.inputs,
                    [s.paths[i] for i in idx] if s.paths else None, s.selection_gap)
    return pick(a), pick(b)


def _build_sides(a: Any, b: Any, images: Sequence[str | Path] | None, tmp: str, backends: tuple[str | None, str | None],
                 devices: tuple[str | None, str | None]) -> tuple[Side, Side]:
    from .preprocessing import list_images, read_image

    opened = [_open(s, bk, dv, label) for s, bk, dv, label in zip((a, b), backends, devices, ("A", "B"))]
    names = [_side_name(k, v) for k, v in opened]
    if names[0] == names[1]:
        names = [f"{names[0]} (A)", f"{names[1]} (B)"]
    refs = [v for k, v in opened if k == "reference"]
    paths = list_images(images) if images is not None else None
    sides: list[Side | None] = [None, None]
    for i, (kind, value) in enumerate(opened):
        if kind == "reference":
            sides[i] = _reference_side(value, names[i])
        elif kind == "results":
            sides[i] = _read_results(value, names[i])
    for i, (kind, value) in enumerate(opened):
        if kind != "engine":
            continue
        if refs:
            ref = sides[1 - i]
            sides[i] = _replay(value, names[i], ref.inputs, ref.keys)
        else:
            if paths is None and any(k == "results" for k, _ in opened):
                raise InputError("comparing an engine with a result file needs the images the results were made from (--images)")
            sides[i] = _run_engine(value, names[i], paths if paths is not None else synthetic_images(tmp))
    a_side, b_side = _align(sides[0], sides[1])
    if paths is not None:  # result files: sizes and drawings come from the image files
        by_name = {p.name: p for p in paths}
        for s in (a_side, b_side):
            if s.paths is None and all(k in by_name for k in s.keys):
                s.paths = [by_name[k] for k in s.keys]
                if s.sizes_wh is None:
                    s.sizes_wh = [(int(im.shape[-1]), int(im.shape[-2])) for im in map(read_image, s.paths)]
    return a_side, b_side


def _draw_disagreements(a: Side, b: Side, stats: list[ImageStats], score_threshold: float, out: Path) -> list[Path]:
    from torchvision.io import write_png

    from .preprocessing import read_image

    paths = a.paths or b.paths
    if paths is None:
        return []
    names = a.class_names or b.class_names
    files = []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for s, path, da, db in zip(stats, paths, a.detections, b.detections):
        if s.ok:
            continue
        image = read_image(path)
        left, right = (draw(image, _valid(d, score_threshold).above(score_threshold), names) for d in (da, db))
        target = out / "images" / f"{path.stem}.compare.png"
        with atomic_path(target) as tmp:
            write_png(torch.cat([left, right], dim=2), str(tmp))
        files.append(target)
    return files


def compare(
    a: Any,
    b: Any,
    images: Sequence[str | Path] | str | Path | None = None,
    *,
    score_threshold: float = 0.3,
    thresholds: Thresholds = Thresholds(),
    report_dir: str | Path | None = None,
    backend_a: str | None = None,
    backend_b: str | None = None,
    device_a: str | None = None,
    device_b: str | None = None,
    save_reference_dir: str | Path | None = None,
) -> CompareReport:
    """Compare two backends on the same images; see the module docstring. Usable in tests: ``assert report.ok, report.summary()``.

    ``images``: files or directories (synthetic deterministic images when None and both sides are engines).
    ``report_dir``: write report.json, report.md and side-by-side images of disagreeing images there.
    ``save_reference_dir``: also store side A (an engine) as a reference bundle (:func:`save_reference`).
    """
    if isinstance(images, (str, Path)):
        images = [images]
    with tempfile.TemporaryDirectory() as tmp:
        side_a, side_b = _build_sides(a, b, images, tmp, (backend_a, backend_b), (device_a, device_b))
        if save_reference_dir is not None:
            if side_a.engine is None:
                raise InputError("--save-reference stores side A's inputs and outputs: A must be an engine, not a file")
            _write_reference(side_a, save_reference_dir)
        report = judge(side_a, side_b, score_threshold, thresholds)
        if report_dir is not None:
            out = Path(report_dir)
            out.mkdir(parents=True, exist_ok=True)
            report.files = _draw_disagreements(side_a, side_b, report.images, score_threshold, out)
            report.files += [out / "report.json", out / "report.md"]
            write_text(out / "report.md", report.markdown())
            write_text(out / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def judge(side_a: Side, side_b: Side, score_threshold: float, thresholds: Thresholds) -> CompareReport:
    """Sentinels on each side, then per-image matching; the verdict of :func:`compare` for two aligned sides."""
    findings: list[Finding] = []
    for s in (side_a, side_b):
        findings += check_outputs(s.name, s.detections, s.keys, score_threshold=score_threshold, sizes_wh=s.sizes_wh,
                                  num_classes=len(s.class_names) or None, sizes_dtype=s.sizes_dtype)
    for s, r in ((side_a, side_b), (side_b, side_a)):
        findings += check_empty(s.name, s.detections, r.name, r.detections, s.keys, score_threshold=score_threshold,
                                margin=thresholds.score_margin)
    sizes = side_a.sizes_wh or side_b.sizes_wh or [None] * len(side_a.keys)
    stats = [match_image(k, da, db, score_threshold, thresholds, sz)
             for k, da, db, sz in zip(side_a.keys, side_a.detections, side_b.detections, sizes)]
    verdict, notes = "agree", []
    if any(not s.ok for s in stats):
        verdict = "disagree"
        gap = _gap(side_a, side_b)
        if gap is not None and gap < TIE_GAP:
            verdict = "too_flat"
            notes.append(f"the model's query selection is tied (top-K boundary gap {gap:.2e} < {TIE_GAP}): its scores are "
                         "too flat to judge, typical of untrained weights; two correct backends may pick different "
                         "queries. Compare with trained weights (or toolkit.models.make_tie_free_ for tests).")
    return CompareReport(side_a.name, side_b.name, verdict, score_threshold, thresholds, stats, findings, notes)


def _gap(a: Side, b: Side) -> float | None:
    for s in (a, b):
        if s.selection_gap is not None:
            return s.selection_gap
        if s.engine is not None and s.inputs is not None:
            gap = selection_gap(s.engine, s.inputs)
            if gap is not None:
                return gap
    return None
