"""``validate``: "verify each stage" as one call, with a table of stages and the first one that went wrong.

Stages, in order: ``preprocess`` (finite, in the declared value range, sizes equal to the decoded
images, deterministic), ``torch`` (eager; sentinels only, it is the reference), ``onnxruntime`` (the file
written by :func:`toolkit.export.onnx.export_onnx`), then each further backend built by ``toolkit.builders.build`` when
that module is importable and the backend's library is installed (otherwise the stage is listed as
skipped with the reason). Every model stage is compared with the one before and with torch by
:func:`toolkit.checks.compare.judge`. ``perturb`` breaks a stage on purpose (tests, demos): a callable per stage
name applied to that stage's output (``{images, orig_target_sizes}`` for ``preprocess``, ``{labels,
boxes, scores}`` for a model stage).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from ..atomic import write_text
from ..errors import InputError, MissingDependencyError, ToolkitError
from ..runtime.base import BaseEngine
from ..runtime.detections import split_batch
from ..runtime.engine import load
from ..signature import INPUT_IMAGES, INPUT_SIZES
from .compare import judge
from .matching import Thresholds
from .report import CompareReport
from .sentinels import check_outputs
from .sides import Side, _replay, synthetic_images

if TYPE_CHECKING:
    from rich.table import Table

REPORT_FORMAT = "rtdetr-deploy/validate/1"
BUILT_BACKENDS = {"aoti": ".pt2", "tensorrt": ".engine"}  # built by toolkit.builders.build from the ONNX file
Perturb = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class StageResult:
    """One stage: ``status`` is ``pass``, ``fail``, ``inconclusive`` (its comparison could not judge: too few
    detections, a tied query selection, NaN/Inf) or ``skipped``; comparisons are None where not run."""

    name: str
    status: str
    detail: str = ""
    vs_previous: CompareReport | None = None
    vs_torch: CompareReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "vs_previous": self.vs_previous.to_dict() if self.vs_previous else None,
                "vs_torch": self.vs_torch.to_dict() if self.vs_torch else None}


@dataclass
class ValidateReport:
    """Stages in order; ``first_failure`` names the first broken one; ``ok`` only when every stage that ran passed.

    ``verdict``: ``disagree`` when a stage failed, else ``inconclusive`` when one could not be judged, else ``agree``."""

    stages: list[StageResult]
    workdir: Path
    files: list[Path] = field(default_factory=list)

    @property
    def first_failure(self) -> str | None:
        return next((s.name for s in self.stages if s.status == "fail"), None)

    @property
    def verdict(self) -> str:
        if self.first_failure is not None:
            return "disagree"
        return "inconclusive" if any(s.status == "inconclusive" for s in self.stages) else "agree"

    @property
    def ok(self) -> bool:
        return self.verdict == "agree"

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: 0 agree, 1 a stage failed, 3 a stage could not be judged."""
        return {"agree": 0, "disagree": 1, "inconclusive": 3}[self.verdict]

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        unjudged = next((s.name for s in self.stages if s.status == "inconclusive"), None)
        head = ("validate: PASS" if self.ok else f"validate: FAIL, first broken stage: {self.first_failure}" if self.first_failure
                else f"validate: INCONCLUSIVE, first stage that could not be judged: {unjudged}")
        return "\n".join([head] + [f"  {s.name}: {s.status}" + (f": {s.detail}" if s.detail else "") for s in self.stages])

    def to_dict(self) -> dict[str, Any]:
        """Stable keys: format, ok, first_failure, workdir, stages (name, status, detail, vs_previous, vs_torch)."""
        return {"format": REPORT_FORMAT, "ok": self.ok, "verdict": self.verdict, "first_failure": self.first_failure,
                "workdir": str(self.workdir),
                "stages": [s.to_dict() for s in self.stages]}

    def table(self) -> "Table":
        from rich.table import Table

        table = Table(title=self.summary().splitlines()[0])
        for col in ("stage", "status", "vs previous", "vs torch", "detail"):
            table.add_column(col, overflow="fold")
        colours = {"pass": "green", "fail": "red", "skipped": "yellow", "inconclusive": "yellow"}
        for s in self.stages:
            table.add_row(s.name, f"[{colours[s.status]}]{s.status}[/{colours[s.status]}]", _verdict(s.vs_previous),
                          _verdict(s.vs_torch), s.detail)
        return table

    def markdown(self) -> str:
        lines = [f"# {self.summary().splitlines()[0]}", "", "| stage | status | vs previous | vs torch | detail |", "|---|---|---|---|---|"]
        lines += [f"| {s.name} | {s.status} | {_verdict(s.vs_previous)} | {_verdict(s.vs_torch)} | {s.detail} |" for s in self.stages]
        return "\n".join(lines) + "\n"

    def write(self, directory: str | Path) -> list[Path]:
        """report.json and report.md in ``directory``, written atomically."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.files = [write_text(out / "report.json", json.dumps(self.to_dict(), indent=2) + "\n"),
                      write_text(out / "report.md", self.markdown())]
        return self.files


def _verdict(report: CompareReport | None) -> str:
    return "-" if report is None else f"{report.verdict} on {report.compared}"


def _check_inputs(inputs: dict[str, torch.Tensor], decoded_wh: list[tuple[int, int]], again: dict[str, torch.Tensor],
                  value_range: tuple[float, float]) -> list[str]:
    images, sizes = inputs[INPUT_IMAGES], inputs[INPUT_SIZES]
    problems = []
    if not torch.isfinite(images).all():
        problems.append("images contain NaN or Inf")
    lo, hi = value_range
    if images.numel() and (images.min() < lo - 1e-3 or images.max() > hi + 1e-3):
        problems.append(f"images range {images.min().item():.3g}..{images.max().item():.3g}, outside the declared {lo}..{hi}")
    if [tuple(map(int, s)) for s in sizes.tolist()] != decoded_wh:
        problems.append(f"orig_target_sizes {sizes.tolist()} differ from the decoded images' (w, h) {decoded_wh}")
    if any(not torch.equal(inputs[k], again[k]) for k in inputs):
        problems.append("preprocessing the same files twice gave different tensors")
    return problems


def _build(name: str, model: Any, onnx_path: Path, workdir: Path, trt_module: Any) -> tuple[BaseEngine | None, str]:
    """(engine, "") or (None, why it is skipped): TensorRT from the ONNX file, AOTInductor from the model."""
    try:
        if name == "aoti":
            from ..builders.build import build_from_model

            built = build_from_model(model, workdir / "model.pt2")
            return load(built.path, backend="aoti"), ""
        from ..builders.build import build_engine
    except ImportError as e:
        return None, f"toolkit.builders.build cannot build {name} here ({e})"
    options = {"trt_module": trt_module} if trt_module is not None else {}
    try:
        built = build_engine(onnx_path, workdir / f"model{BUILT_BACKENDS[name]}", backend=name, **options)
    except (MissingDependencyError, ImportError) as e:
        return None, f"cannot build {name} here: {e}"
    return load(built.path, backend=name, **options), ""


def _model(checkpoint: Any, config: str | None, load_model: Any) -> tuple[Any, str | None, str]:
    """(the torch model validate starts from, or None; the built file's backend, or None; why there is no model).

    A built file (``.onnx``, ``.pt2``, ``.ep``, ``.buckets``, ``.engine``, a served URL) is validated as given: its
    stage is judged against the torch stage of the model it records (:mod:`toolkit.builders.sources`, weights
    hash checked); a file that records none gets no torch stage, and its own stage cannot be judged (inconclusive)."""
    from ..runtime.engine import detect_backend

    native = detect_backend(checkpoint) if isinstance(checkpoint, (str, Path)) else "torch"
    if native == "torch":
        return load_model(checkpoint, config=config), None, ""
    if native == "onnxruntime":
        from ..integrity import check_onnx

        if not Path(checkpoint).is_file():
            raise InputError(f"{checkpoint}: no such ONNX file")
        check_onnx(Path(checkpoint))
    from ..builders.sources import recorded_model

    found = recorded_model(checkpoint, native)
    return found.model, native, found.why


def validate(
    checkpoint: Any,
    backends: Sequence[str] | None = None,
    images: Sequence[str | Path] | str | Path | None = None,
    workdir: str | Path | None = None,
    *,
    config: str | None = None,
    score_threshold: float = 0.3,
    thresholds: Thresholds = Thresholds(),
    perturb: Mapping[str, Perturb] | None = None,
    trt_module: Any = None,
    progress: bool = False,
) -> ValidateReport:
    """Run every stage of the deployment path on the same images and judge each; see the module docstring.

    ``checkpoint``: anything :func:`toolkit.models.loading.load_model` accepts (``config`` for a weights file or a
    config name with random weights), or a built file or served URL (see :func:`_model`). ``backends`` None: torch
    and onnxruntime for a model; a built file's own backend (and torch where the file records its model). ``workdir``
    keeps the exported and built files (a temporary directory, deleted afterwards, when None). The torch stage always
    runs where there is a model: it is the reference. ``trt_module``
    injects a TensorRT module (e.g. :func:`toolkit.testing.fake_tensorrt.make_fake_tensorrt`). ``progress``: a
    line on stderr when each stage starts and ends, with its elapsed time (builds take minutes).
    """
    from ..export.onnx import export_onnx
    from ..models.loading import load_model
    from ..progress import Steps
    from ..runtime.preprocessing import engine_preprocess, list_images, preprocess, read_image

    perturb = dict(perturb or {})
    steps = Steps("validate", enabled=progress)
    with steps.step("loading the model"):
        model, native, why = _model(checkpoint, config, load_model)
    if backends is None:
        backends = ("torch", "onnxruntime") if native is None else ("torch", native) if model is not None else (native,)
    known = ("torch", "onnxruntime", *BUILT_BACKENDS, *([native] if native else []))
    unknown = [b for b in backends if b not in known]
    if unknown:
        raise InputError(f"unknown --backends {', '.join(unknown)}; choose from {', '.join(dict.fromkeys(known))}")
    if native is not None and native not in backends:
        raise InputError(f"{checkpoint} is a {native} file, and --backends {','.join(backends)} leaves its stage out: add {native}")
    if model is None and [b for b in backends if b != native]:
        raise InputError(f"the --backends {','.join(b for b in backends if b != native)} stage(s) need the model {checkpoint} was built from: "
                         f"{why}; use --backends {native}, or validate the checkpoint or config it was built from")
    given = None if native is None else load(checkpoint, backend=native)  # the file as given: its own stage
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if isinstance(images, (str, Path)):
            images = [images]
        paths = list_images(images) if images is not None else synthetic_images(tmp)
        keys = [p.name for p in paths]
        decoded = [read_image(p) for p in paths]
        spec = model.preprocess if model is not None else engine_preprocess(given)
        batch, sizes = preprocess(decoded, spec)
        inputs = {INPUT_IMAGES: batch, INPUT_SIZES: sizes}
        if "preprocess" in perturb:
            inputs = perturb["preprocess"](inputs)
        again = dict(zip((INPUT_IMAGES, INPUT_SIZES), preprocess(decoded, spec)))
        problems = _check_inputs(inputs, [(int(im.shape[-1]), int(im.shape[-2])) for im in decoded], again, spec.value_range)
        stages = [StageResult("preprocess", "fail" if problems else "pass", "; ".join(problems))]

        def run_stage(name: str, engine: BaseEngine) -> Side:
            side = _replay(engine, name, inputs, keys)
            if name in perturb:
                out = {"labels": torch.stack([d.labels for d in side.detections]),
                       "boxes": torch.stack([d.boxes_xyxy for d in side.detections]),
                       "scores": torch.stack([d.scores for d in side.detections])}
                side.detections = split_batch(perturb[name](out))
            return side

        if model is None:  # nothing to judge the file against: its sentinels alone, never a pass
            assert given is not None and native is not None
            stages.append(_unjudged_stage(native, run_stage(native, given), keys, score_threshold, why))
            return ValidateReport(stages, work)
        with steps.step("torch stage"):
            torch_side = run_stage("torch", load(model, backend="torch", device="cpu"))
        fired = check_outputs("torch", torch_side.detections, keys, score_threshold=score_threshold,
                              sizes_wh=torch_side.sizes_wh, num_classes=model.num_classes, sizes_dtype=torch_side.sizes_dtype)
        only_nan = bool(fired) and all(f.check == "non_finite" for f in fired)  # NaN/Inf: nothing can be judged
        stages.append(StageResult("torch", "inconclusive" if only_nan else "fail" if fired else "pass",
                                  "; ".join(f.message for f in fired)))
        previous = torch_side
        onnx_path = Path(checkpoint) if native == "onnxruntime" else work / "model.onnx"  # a given .onnx: as given
        order = ["onnxruntime", *BUILT_BACKENDS, *([native] if native not in ("onnxruntime", *BUILT_BACKENDS, None) else [])]
        for name in [b for b in order if b in backends]:
            try:
                if name == native:  # the given file's own stage
                    engine, why = given, ""
                elif not onnx_path.exists():  # every later stage is built from the exported file
                    with steps.step("export to ONNX"):
                        export_onnx(model, onnx_path)
                with steps.step(f"{name} stage: build and load"):
                    if name == native:
                        pass
                    elif name == "onnxruntime":
                        engine: BaseEngine | None = load(onnx_path, backend="onnxruntime", device="cpu")
                        why = ""
                    else:
                        engine, why = _build(name, model, onnx_path, work, trt_module)
            except ToolkitError as e:
                stages.append(StageResult(name, "fail", f"{e.__class__.__name__}: {str(e).splitlines()[0]}"))
                continue
            if engine is None:
                stages.append(StageResult(name, "skipped", why))
                continue
            with steps.step(f"{name} stage: run and judge"):
                side = run_stage(name, engine)
                vs_prev = judge(previous, side, score_threshold, thresholds)
                vs_torch = vs_prev if previous is torch_side else judge(torch_side, side, score_threshold, thresholds)
            failed = [r for r in (vs_prev, vs_torch) if r.verdict == "disagree"]
            unjudged = [r for r in (vs_prev, vs_torch) if r.verdict == "inconclusive"]
            worst = failed or unjudged
            detail = (" ".join(line.strip() for line in worst[0].summary().splitlines()[:2]) if worst
                      else f"{vs_prev.reason} ({vs_prev.selection})")
            stages.append(StageResult(name, "fail" if failed else "inconclusive" if unjudged else "pass", detail, vs_prev, vs_torch))
            previous = side
        return ValidateReport(stages, work)


def _unjudged_stage(name: str, side: Side, keys: list[str], score_threshold: float, why: str) -> StageResult:
    """A built file's stage with no reference to judge it against: ``fail`` if a sentinel fires, else ``inconclusive``."""
    fired = check_outputs(name, side.detections, keys, score_threshold=score_threshold, sizes_wh=side.sizes_wh,
                          num_classes=len(side.class_names) or None, sizes_dtype=side.sizes_dtype)
    if fired and not all(f.check == "non_finite" for f in fired):
        return StageResult(name, "fail", "; ".join(f.message for f in fired))
    return StageResult(name, "inconclusive", f"no reference to judge it against: {why}" +
                       (f"; {'; '.join(f.message for f in fired)}" if fired else "; its sentinels found nothing wrong"))
