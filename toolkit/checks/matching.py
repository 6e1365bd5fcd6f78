"""Detection matching for compare: per-image pairing of two sides' detections (label, IoU, score), tie-aware.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..runtime.detections import Detections

TIE_GAP = 1e-4  # a query-selection boundary gap below this is a tie (see toolkit.export.verify)


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
    * ``min_compared`` 8: an agreement on fewer matched detections (over all images) is no evidence: the
      compare retries on each image's ``fallback_top_k`` 10 best-scoring detections, whatever their score,
      and is *inconclusive* if that still matches fewer. (A model whose scores stay below the threshold
      would otherwise agree on nothing.)
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
    min_compared: int = 8
    fallback_top_k: int = 10


#: One tolerance profile per precision, chosen by :func:`profile_for` from what the compared files record.
#: ``fp32``: both sides compute in fp32 (TF32 off): backends differ by ~1e-3 px and ~1e-5 in scores, so a 0.25 px
#: median shift or 0.02 of score is already a defect. ``fp16``: the defaults above (fp16 moves normalized
#: coordinates by ~2^-11 of the image side, scores by ~1e-3..1e-2). ``int8``: a few px of box movement and ~0.1-0.3
#: of score are quantization noise; a lost or relabelled confident detection is not (accuracy itself is judged by
#: mAP: ``rtdetr-deploy quantize``'s gate).
PROFILES: dict[str, Thresholds] = {
    "fp32": Thresholds(min_iou=0.98, median_iou=0.99, subpixel_px=0.1, median_shift_px=0.25, shift_fraction=0.0002,
                       max_score_delta=0.02),
    "fp16": Thresholds(),
    "int8": Thresholds(min_iou=0.80, median_iou=0.93, subpixel_px=1.0, median_shift_px=2.0, shift_fraction=0.004,
                       max_score_delta=0.35, score_margin=0.15, min_matched_fraction=0.9),
}
_ORDER = {"int8": 0, "fp16": 1, "bf16": 1, "fp32": 2}


def profile_for(*precisions: str | None) -> tuple[str, Thresholds]:
    """The profile of the lowest precision among the sides; ``fp16`` (the defaults) when any side does not say."""
    if not precisions or any(p not in _ORDER for p in precisions):
        return "fp16", PROFILES["fp16"]
    low = min(precisions, key=lambda p: _ORDER[p])  # type: ignore[arg-type]
    name = "fp16" if low == "bf16" else low
    return name, PROFILES[name]


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
