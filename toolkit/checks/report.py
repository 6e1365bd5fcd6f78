"""The compare verdict (``CompareReport``: counts, disagreements, the JSON report) and the pictures of disagreements.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atomic import atomic_path
from ..errors import ComparisonError
from ..runtime.detections import draw
from .matching import ImageStats, Thresholds, _valid
from .sentinels import Finding
from .sides import Side

REPORT_FORMAT = "rtdetr-deploy/compare/2"
VERDICTS = ("agree", "disagree", "inconclusive")
EXIT_CODES = {"agree": 0, "disagree": 1, "inconclusive": 3}  # 2 is bad input (a ToolkitError)

if TYPE_CHECKING:
    from rich.table import Table


@dataclass
class CompareReport:
    """The verdict: ``ok`` (also ``bool(report)``) is True only when the sides agree on enough detections.

    ``verdict``: ``agree``, ``disagree`` (detections differ, or a sentinel fired) or ``inconclusive``: too
    little to judge (fewer than ``thresholds.min_compared`` detections matched even on the top-K fallback),
    outputs that differ while the model's query selection is tied (two correct backends may pick different
    queries), or NaN/Inf in the outputs. ``reason`` says which, in one line; ``compared`` is the number of
    matched detections the verdict rests on and ``selection`` which detections were compared (``score >= T``,
    or the top-K per image by score when too few were above the threshold).
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
    reason: str = ""
    compared: int = 0
    selection: str = ""
    random_weights: dict[str, str | None] = field(default_factory=dict)  # "a"/"b": how generated weights were made
    profile: str = "given"  # the tolerance profile (fp32, fp16, int8: toolkit.checks.matching.PROFILES) or "given"

    @property
    def ok(self) -> bool:
        return self.verdict == "agree"

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: 0 agree, 1 disagree, 3 inconclusive."""
        return EXIT_CODES[self.verdict]

    def headline(self) -> str:
        """One line: the verdict with the counts it rests on."""
        head = f"compare {self.backend_a} vs {self.backend_b}: {self.verdict.upper()}"
        if self.verdict == "agree":
            return f"{head}: agree on {self.compared} detections over {len(self.images)} images ({self.selection})"
        return f"{head}: {self.reason} ({self.compared} detections compared over {len(self.images)} images, {self.selection})"

    def __bool__(self) -> bool:
        return self.ok

    def raise_for_failure(self) -> None:
        """Raise :class:`~toolkit.errors.ComparisonError` with :meth:`summary` unless ``ok``."""
        if not self.ok:
            raise ComparisonError(self.summary())

    def summary(self) -> str:
        bad = [s for s in self.images if not s.ok]
        lines = [self.headline()]
        lines += [f"  sentinel: {f.message}" for f in self.sentinels]
        for s in bad:
            lines += [f"  {s.image}: {p}" for p in s.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Stable keys: format, ok, verdict, reason, compared, selection, random_weights, backend_a, backend_b,
        score_threshold, thresholds, profile, images (one dict per image: ImageStats fields plus ok), sentinels (backend,
        check, message, images), notes, files."""
        return {
            "format": REPORT_FORMAT, "ok": self.ok, "verdict": self.verdict, "reason": self.reason, "compared": self.compared,
            "selection": self.selection, "random_weights": dict(self.random_weights), "backend_a": self.backend_a,
            "backend_b": self.backend_b, "score_threshold": self.score_threshold, "thresholds": asdict(self.thresholds),
            "profile": self.profile,
            "images": [{**asdict(s), "ok": s.ok} for s in self.images], "sentinels": [f.to_dict() for f in self.sentinels],
            "notes": list(self.notes), "files": [str(p) for p in self.files],
        }

    def table(self) -> "Table":
        from rich.table import Table

        table = Table(title=self.headline())
        for col in ("image", "A", "B", "matched", "unmatched A/B", "labels", "IoU min/med", "shift px", "Δscore", ""):
            table.add_column(col)
        for s in self.images:
            iou = "-" if s.iou_min is None else f"{s.iou_min:.3f}/{s.iou_median:.3f}"
            table.add_row(s.image, str(s.a_count), str(s.b_count), f"{s.matched_fraction:.0%}", f"{s.unmatched_a}/{s.unmatched_b}",
                          str(s.label_disagreements), iou, _fmt(s.shift_median_px, ".2f"), _fmt(s.score_delta_max, ".3f"),
                          "[green]ok[/green]" if s.ok else "[red]FAIL[/red]")
        return table

    def markdown(self) -> str:
        lines = [f"# {self.backend_a} vs {self.backend_b}: {self.verdict.upper()}", "", self.headline(), "",
                 f"Compared: {self.selection}; score threshold {self.score_threshold}; thresholds: "
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


AGREEING_PICTURES = 3  # side-by-side pictures of agreeing images too: what agreement looks like


def _draw_disagreements(a: Side, b: Side, stats: list[ImageStats], score_threshold: float, out: Path,
                        agreeing: int = AGREEING_PICTURES) -> list[Path]:
    """Side-by-side pictures (A left, B right, each captioned with its side's name) of every disagreeing image
    and of the first ``agreeing`` agreeing ones, as ``images/NAME.compare.png``."""
    from torchvision.io import write_png

    from ..runtime.detections import captioned
    from ..runtime.preprocessing import read_image

    paths = a.paths or b.paths
    if paths is None:
        return []
    names = a.class_names or b.class_names
    files = []
    (out / "images").mkdir(parents=True, exist_ok=True)
    shown_ok = 0
    for s, path, da, db in zip(stats, paths, a.detections, b.detections):
        if s.ok:
            if shown_ok >= agreeing:
                continue
            shown_ok += 1
        image = read_image(path)
        left, right = (draw(image, _valid(d, score_threshold).above(score_threshold), names) for d in (da, db))
        verdict = "agree" if s.ok else "DISAGREE"
        left, right = captioned(left, f"A: {a.name} ({verdict})"), captioned(right, f"B: {b.name}")
        gap = torch.full((3, left.shape[1], max(4, left.shape[2] // 100)), 255, dtype=torch.uint8)
        target = out / "images" / f"{path.stem}.compare.png"
        with atomic_path(target) as tmp:
            write_png(torch.cat([left, gap, right], dim=2), str(tmp))
        files.append(target)
    return files
