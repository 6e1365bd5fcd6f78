"""Compare any two backends as detectors: optimal matching per image and label, sentinels, written reports.

Sides are anything :func:`toolkit.load` accepts, a loaded Engine, a COCO result file written by
``rtdetr-deploy run`` (``detections.json`` or its directory), or a reference bundle written by
:func:`save_reference`. Engines see identical image files through the single preprocessing (synthetic,
deterministic images when none are given); a bundle replays its stored preprocessed inputs.

Outputs are never compared elementwise: top-K positions reorder among near-equal scores. Per image and
label, detections are paired by an optimal assignment (``scipy.optimize.linear_sum_assignment``) over
``torchvision.ops.box_iou``; then matched fraction, unmatched detections, IoU, box shift, score deltas and
label disagreements decide (:class:`Thresholds`). Sentinels (:mod:`toolkit.checks.sentinels`) run on each side
alone. Three verdicts: ``agree`` (on at least ``Thresholds.min_compared`` matched detections; with fewer
above the score threshold, each image's top-K by score is compared instead and the report says so),
``disagree``, and ``inconclusive``: too little matched even then, outputs that differ while the model's
query selection is tied (flat scores of untrained weights: two correct backends may pick different
queries), or NaN/Inf in the outputs. Only ``agree`` is ``ok``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..atomic import write_text
from ..errors import InputError
from ..signature import INPUT_IMAGES
from .matching import TIE_GAP, Thresholds, match_image, profile_for
from .report import CompareReport, _draw_disagreements
from .sentinels import Finding, check_empty, check_outputs
from .sides import Side, _build_sides, _write_reference, selection_gap

if TYPE_CHECKING:
    from ..runtime.detections import Detections


def compare(
    a: Any,
    b: Any,
    images: Sequence[str | Path] | str | Path | None = None,
    *,
    score_threshold: float = 0.3,
    thresholds: Thresholds | None = None,
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
    ``thresholds``: None picks the tolerance profile of the lower precision the two sides record
    (:data:`~toolkit.checks.matching.PROFILES`: fp32, fp16, int8; fp16's when a side does not say); the report names it.
    """
    if isinstance(images, (str, Path)):
        images = [images]
    with tempfile.TemporaryDirectory() as tmp:
        side_a, side_b = _build_sides(a, b, images, tmp, (backend_a, backend_b), (device_a, device_b))
        if save_reference_dir is not None:
            if side_a.engine is None:
                raise InputError("--save-reference stores side A's inputs and outputs: A must be an engine, not a file")
            _write_reference(side_a, save_reference_dir)
        if thresholds is None:
            precisions = [getattr(s.engine, "precision", None) for s in (side_a, side_b)]
            profile, chosen = profile_for(*precisions)
            report = judge(side_a, side_b, score_threshold, chosen)
            report.profile = profile
            said = ", ".join(f"{s.name} {p or 'not recorded'}" for s, p in zip((side_a, side_b), precisions))
            report.notes.append(f"tolerances: the {profile} profile (precision: {said})")
        else:
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
    """Sentinels on each side, then per-image matching; the verdict of :func:`compare` for two aligned sides.

    ``agree`` needs at least ``thresholds.min_compared`` matched detections: when fewer score above
    ``score_threshold``, the images are matched again on their ``thresholds.fallback_top_k`` best-scoring
    detections (the threshold of each image is the lower of the two sides' k-th score) and the report says so.
    """
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
    selection = f"score >= {score_threshold}"
    compared = sum(s.matched for s in stats)
    if all(s.ok for s in stats) and compared < thresholds.min_compared:
        k = thresholds.fallback_top_k
        retry = [match_image(key, da, db, _kth_score(da, db, k), thresholds, sz)
                 for key, da, db, sz in zip(side_a.keys, side_a.detections, side_b.detections, sizes)]
        selection = (f"top-{k} per image by score, whatever the score: only {compared} detection(s) matched at "
                     f"score >= {score_threshold}")
        stats, compared = retry, sum(s.matched for s in retry)
    notes = _random_weight_notes(side_a, side_b)
    sizes_differ = _input_size_note(side_a, side_b)
    if sizes_differ:
        notes.append(sizes_differ)
    non_finite = [f for f in findings if f.check == "non_finite"]
    others = [f for f in findings if f.check != "non_finite"]
    bad = [s for s in stats if not s.ok]
    if others:
        verdict, reason = "disagree", others[0].message
    elif non_finite:
        verdict, reason = "inconclusive", f"NaN or Inf in the outputs: {non_finite[0].message}"
    elif bad:
        verdict, reason = "disagree", f"{len(bad)} of {len(stats)} images disagree"
        if sizes_differ:
            reason += " (the two models take different input sizes: see the note)"
        gap = _gap(side_a, side_b)
        if gap is not None and gap < TIE_GAP:
            verdict = "inconclusive"
            reason = (f"outputs differ on {len(bad)} of {len(stats)} images but the model's query selection is tied "
                      f"(top-K boundary gap {gap:.2e} < {TIE_GAP})")
            notes.append("tied query selection: the scores are too flat to judge, typical of untrained weights; two correct "
                         "backends may pick different queries. Compare with trained weights (or "
                         "toolkit.models.config.make_tie_free_ for tests).")
    elif compared < thresholds.min_compared:
        verdict = "inconclusive"
        reason = f"only {compared} detection(s) matched, fewer than the {thresholds.min_compared} a verdict needs"
    else:
        verdict, reason = "agree", f"agree on {compared} detections over {len(stats)} images"
    return CompareReport(side_a.name, side_b.name, verdict, score_threshold, thresholds, stats, findings, notes,
                         reason=reason, compared=compared, selection=selection,
                         random_weights={"a": side_a.random_weights, "b": side_b.random_weights})


def _kth_score(a: Detections, b: Detections, k: int) -> float:
    """The lower of the two sides' k-th best finite score (their lowest when they have fewer): a per-image threshold."""
    kth = []
    for d in (a, b):
        finite = d.scores[d.scores.isfinite() & d.boxes_xyxy.isfinite().all(-1)]
        if finite.numel():
            kth.append(float(finite.sort(descending=True).values[min(k, finite.numel()) - 1]))
    return min(kth) if kth else 0.0


def _random_weight_notes(a: Side, b: Side) -> list[str]:
    if a.random_weights and b.random_weights:
        return [f"both sides run generated random weights ({a.name}: {a.random_weights}; {b.name}: {b.random_weights}): "
                "this checks the deployment path, not a trained model's boxes"]
    return [f"{s.name} runs generated random weights ({s.random_weights}): its boxes mean nothing about accuracy"
            for s in (a, b) if s.random_weights]


def _input_size_note(a: Side, b: Side) -> str:
    """A note when the two sides resize images to different input sizes (H x W): then their boxes differ by the
    models, not by a deployment fault, and a verdict must say so."""
    def size(s: Side) -> tuple[int, int] | None:
        if s.inputs is not None and INPUT_IMAGES in s.inputs:
            return tuple(int(v) for v in s.inputs[INPUT_IMAGES].shape[-2:])  # type: ignore[return-value]
        return None
    sa, sb = size(a), size(b)
    if sa is None or sb is None or sa == sb:
        return ""
    return (f"input sizes differ: {a.name} takes {sa[0]}x{sa[1]}, {b.name} {sb[0]}x{sb[1]} (H x W); each sees the images "
            "resized to its own size, so the boxes compare two different models, not one model on two backends")


def _gap(a: Side, b: Side) -> float | None:
    for s in (a, b):
        if s.selection_gap is not None:
            return s.selection_gap
        if s.engine is not None and s.inputs is not None:
            gap = selection_gap(s.engine, s.inputs)
            if gap is not None:
                return gap
    return None
