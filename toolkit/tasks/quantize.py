"""``rtdetr-deploy quantize``: post-training INT8 that gates its own output against the fp32 file.

    rtdetr-deploy quantize model.onnx --calib images/ -o model.int8.onnx
    rtdetr-deploy quantize model.onnx --synthetic 64 -o model.int8.onnx --method percentile

Calibration images go through the model's own preprocessing (:mod:`toolkit.runtime.preprocessing`), the graph
is quantized by :func:`toolkit.export.quantize.quantize_graph`, and then three gates decide whether the file is
written: the detection-aware compare against fp32 (INT8 tolerances, :data:`INT8_THRESHOLDS`), COCO mAP on
images disjoint from the calibration set (at most ``max_map_drop`` points below fp32), and speed (ONNX Runtime
CPU, one process, fp32 and INT8 interleaved, medians at each batch size: INT8 must be at least ``min_speedup``
times faster). A result that fails a gate raises :class:`QuantizationRefused` with the figures and nothing is
written, unless ``force=True``: then it is written with ``quantization_forced`` in its metadata naming the gates
it failed. Never a silent slow or wrong INT8 file.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..atomic import atomic_path, check_output_path
from ..checks.matching import PROFILES
from ..errors import InputError, ToolkitError

CALIBRATION_SEED = 20_261_203  # synthetic calibration images: neither training's seeds nor evaluation's
#: compare tolerances for INT8 against fp32: a few px of box movement and ~0.1 of score are quantization noise,
#: a lost or relabelled confident detection is not.
INT8_THRESHOLDS = PROFILES["int8"]
#: share of images that must agree under :data:`INT8_THRESHOLDS`. INT8 moves a few confident scores by more than any
#: per-image tolerance that would still catch a wrong box (on the fixture 87-90% of images agree with the default
#: recipe, boxes within 0.5 px); accuracy itself is judged by the mAP gate, this one catches broken geometry.
INT8_MIN_AGREEING = 0.8
MIN_REFERENCE_MAP = 0.05  # below this fp32 mAP the images say nothing about accuracy: the mAP gate is not judged


class QuantizationRefused(ToolkitError):
    """The INT8 graph failed a gate (accuracy or speed); nothing was written. ``report`` holds the figures."""

    def __init__(self, message: str, report: "QuantizeReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Gate:
    name: str
    passed: bool | None  # None: not judged (and then it says why)
    detail: str


@dataclass
class QuantizeReport:
    output: Path | None
    info: dict[str, Any]
    gates: list[Gate] = field(default_factory=list)
    speed: dict[str, dict[str, float]] = field(default_factory=dict)  # batch -> {fp32_ms, int8_ms, speedup}
    map: dict[str, float] = field(default_factory=dict)
    forced: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(g.passed is not False for g in self.gates) and any(g.passed for g in self.gates)

    def failed(self) -> list[Gate]:
        return [g for g in self.gates if g.passed is False]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output) if self.output else None
        d["ok"] = self.ok
        return d

    def table(self) -> str:
        lines = [f"{'gate':<10}{'result':<12}detail"]
        for g in self.gates:
            lines.append(f"{g.name:<10}{'pass' if g.passed else 'FAIL' if g.passed is False else 'not judged':<12}{g.detail}")
        fused = self.info.get("fused", {})
        lines.append(f"graph: {self.info.get('quantized_nodes')} nodes quantized, {self.info.get('fp32_nodes_kept')} kept fp32; "
                     f"ONNX Runtime runs {fused.get('QLinearConv', 0)} QLinearConv / {fused.get('Conv', 0) + fused.get('FusedConv', 0)} "
                     f"fp32 Conv, {fused.get('QLinearMatMul', 0)} QLinearMatMul / {fused.get('MatMul', 0) + fused.get('FusedMatMul', 0)} fp32 MatMul")
        return "\n".join(lines)


def _calibration_images(calib: str | Path | Sequence[str | Path] | None, synthetic: int | None, work: Path, size: int,
                        class_names: list[str] | None) -> list[Path]:
    from ..runtime.preprocessing import list_images

    if (calib is None) == (synthetic is None):
        raise InputError("give calibration images (--calib DIR) or --synthetic N, not both and not neither")
    if synthetic is not None:
        if synthetic < 1:
            raise InputError(f"--synthetic takes a positive number of images, got {synthetic}")
        from ..data.shapes import write_split

        write_split(work / "calib", "train", int(synthetic), seed=CALIBRATION_SEED, size=size, class_names=class_names)
        return sorted((work / "calib" / "train").glob("*.png"))
    return list_images([calib] if isinstance(calib, (str, Path)) else list(calib))


def _eval_set(eval_data: str | Path | None, eval_synthetic: int, work: Path, size: int, class_names: list[str] | None) -> tuple[Path, list[Path]]:
    """(COCO JSON, its image paths): the user's dataset, or synthetic shapes from evaluate's unseen seed."""
    from .evaluate import SYNTHETIC_SEED, _load_dataset

    if eval_data is None:
        from ..data.shapes import write_split

        if eval_synthetic < 1:
            raise InputError("the accuracy gate needs images: give --eval-data or a positive --eval-synthetic")
        ann = write_split(work / "eval", "val", int(eval_synthetic), seed=SYNTHETIC_SEED, size=size, class_names=class_names)
        eval_data = ann
    gt, paths = _load_dataset(eval_data)
    return (Path(eval_data) if Path(eval_data).is_file() else Path(eval_data) / "val.json"), paths


def _compare_gate(cmp: Any) -> Gate:
    """INT8 compare verdict: no sentinel on either side and at least :data:`INT8_MIN_AGREEING` of the images agree
    (the fp32 model's query-selection ties do not excuse INT8: its changes are far larger than a tie)."""
    n = len(cmp.images)
    agreeing = sum(1 for s in cmp.images if s.ok)
    share = agreeing / n if n else 0.0
    bad = [p for s in cmp.images if not s.ok for p in s.problems][:2]
    detail = (f"{agreeing}/{n} images agree ({share:.0%}, needs {INT8_MIN_AGREEING:.0%}; scores within "
              f"{INT8_THRESHOLDS.max_score_delta}, boxes IoU >= {INT8_THRESHOLDS.min_iou})")
    if cmp.sentinels:
        detail += f"; sentinel: {cmp.sentinels[0]}"
    elif bad and share < INT8_MIN_AGREEING:
        detail += f"; e.g. {bad[0]}"
    return Gate("compare", bool(n) and not cmp.sentinels and share >= INT8_MIN_AGREEING, detail)


def measure_speed(fp32: str | Path, int8: str | Path, feeds: dict[int, dict[str, Any]], rounds: int = 10,
                  warmup: int = 2, providers: Sequence[str] = ("CPUExecutionProvider",)) -> dict[str, dict[str, float]]:
    """Median latency of both files in one process on ONNX Runtime (CPU unless ``providers`` says otherwise), calls
    interleaved round by round so that a busy machine slows both alike; returns ``{batch: {fp32_ms, int8_ms, speedup}}``."""
    import numpy as np
    import onnxruntime as ort

    def session(path: str | Path) -> Any:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=list(providers))

    sessions = {"fp32": session(fp32), "int8": session(int8)}
    out: dict[str, dict[str, float]] = {}
    for batch, feed in feeds.items():
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(warmup):
            for s in sessions.values():
                s.run(None, feed)
        for _ in range(rounds):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t)
        a, b = (1000 * float(np.median(times[k])) for k in ("fp32", "int8"))
        out[str(batch)] = {"fp32_ms": round(a, 2), "int8_ms": round(b, 2), "speedup": round(a / b, 3)}
    return out


def quantize(
    model: str | Path,
    output: str | Path,
    calib: str | Path | Sequence[str | Path] | None = None,
    synthetic: int | None = None,
    *,
    method: str = "minmax",
    exclude: Sequence[str] = (),
    activations: str = "uint8",
    scope: str = "body",
    batch_size: int = 4,
    eval_data: str | Path | None = None,
    eval_synthetic: int = 100,
    max_map_drop: float = 1.0,
    min_speedup: float | None = 1.0,
    speed_batches: Sequence[int] = (1, 4),
    speed_rounds: int = 10,
    force: bool = False,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    auto_islands: bool = True,
    island_evals: int = 16,
) -> QuantizeReport:
    """Quantize the fp32 ONNX ``model`` to INT8 Q/DQ at ``output`` and gate it (see the module docstring).

    ``min_speedup=None`` skips the speed gate (reported as not judged: the accuracy gates still decide);
    ``max_map_drop`` is in mAP points. ``auto_islands``: when the INT8 graph's compare with fp32 disagrees on (up to 16
    of) the calibration images, :func:`toolkit.checks.island_search.run_search` looks for the nodes to keep fp32
    (at most ``island_evals`` evaluations); the file written is the Q/DQ graph with those nodes reading fp32. Raises :class:`QuantizationRefused` when a gate fails and not ``force``.
    """
    import onnx
    import torch

    from ..checks.compare import compare
    from ..export.calibration import feeds_from_batches
    from ..export.quantize import fused_ops, mark_metadata, quantize_graph
    from ..runtime.engine import load
    from ..runtime.preprocessing import engine_preprocess, preprocess
    from .evaluate import evaluate

    start = time.perf_counter()
    say = say or (lambda line: None)
    output = check_output_path(output)
    model = Path(model)
    if model.suffix.lower() != ".onnx" or not model.is_file():
        raise InputError(f"{model}: quantize takes an fp32 .onnx file written by rtdetr-deploy export")
    precision = next((p.value for p in onnx.load(str(model), load_external_data=False).metadata_props if p.key == "precision"), "fp32")
    if precision != "fp32":
        raise InputError(f"{model} is a {precision} graph; quantize the fp32 export")
    fp32 = load(model, backend="onnxruntime", device="cpu")
    spec = engine_preprocess(fp32)
    sizes_dtype = fp32.signature.input("orig_target_sizes").dtype
    with tempfile.TemporaryDirectory(prefix="rtdetr-quantize-") as tmp:
        work = Path(tmp)
        paths = _calibration_images(calib, synthetic, work, spec.size[0], fp32.class_names or None)
        batches = [preprocess(paths[i:i + batch_size], spec, getattr(torch, sizes_dtype)) for i in range(0, len(paths), batch_size)]
        say(f"calibrating on {len(paths)} images ({method}, {activations} activations, scope {scope})")
        with atomic_path(output) as out_tmp:
            info = quantize_graph(model, out_tmp, feeds_from_batches(batches, sizes_dtype), method=method, activations=activations,
                                  scope=scope, exclude=exclude, progress=progress)
            search = None
            if auto_islands:
                search = _search_islands(model, out_tmp, paths[:16], work, island_evals, say)
                if search.needed and search.agrees:  # the graph the search judged was written over out_tmp
                    info.islands = list(search.islands)
                    info.fused = fused_ops(out_tmp)
                    mark_metadata(out_tmp, {"quantization": json.dumps(info.to_dict(), sort_keys=True)})
            report = QuantizeReport(None, info.to_dict())
            if search is not None:
                report.info["island_search"] = search.to_dict()
                say(search.summary("int8"))
            int8 = load(out_tmp, backend="onnxruntime", device="cpu")
            ann, eval_paths = _eval_set(eval_data, eval_synthetic, work, spec.size[0], fp32.class_names or None)
            say(f"accuracy gates on {len(eval_paths)} images disjoint from the calibration set")
            report.gates.append(_compare_gate(compare(fp32, int8, eval_paths, thresholds=INT8_THRESHOLDS)))
            ev = evaluate({"fp32": fp32, "int8": int8}, data_dir=ann, tolerance=max_map_drop)
            m32, m8 = ev.row("fp32").mAP, ev.row("int8").mAP
            if m32 is None or m8 is None:
                report.gates.append(Gate("mAP", False, f"evaluation failed: {ev.message}"))
            else:
                report.map = {"fp32": round(m32, 4), "int8": round(m8, 4)}
                drop = 100 * (m32 - m8)
                if m32 < MIN_REFERENCE_MAP:
                    report.gates.append(Gate("mAP", None, f"fp32 mAP {m32:.3f} on these images is too low to judge accuracy; "
                                                          "give --eval-data with your own labelled images"))
                else:
                    report.gates.append(Gate("mAP", drop <= max_map_drop, f"fp32 {m32:.4f}, int8 {m8:.4f}: "
                                                                          f"{drop:+.2f} points drop (allowed {max_map_drop})"))
            if min_speedup is None:
                report.gates.append(Gate("speed", None, "not measured (min_speedup=None)"))
            else:
                say(f"speed gate: ONNX Runtime CPU, batches {', '.join(map(str, speed_batches))}, {speed_rounds} interleaved rounds")
                feeds = {}
                for b in speed_batches:
                    imgs = torch.cat([x for x, _ in batches])[:b]
                    imgs = imgs.repeat((b + len(imgs) - 1) // len(imgs), 1, 1, 1)[:b]
                    feeds[b] = feeds_from_batches([(imgs, torch.full((b, 2), spec.size[0]))], sizes_dtype)[0]
                report.speed = measure_speed(model, out_tmp, feeds, rounds=speed_rounds)
                worst = min(v["speedup"] for v in report.speed.values())
                detail = ", ".join(f"b{b} {v['fp32_ms']:.1f} -> {v['int8_ms']:.1f} ms ({v['speedup']:.2f}x)" for b, v in report.speed.items())
                report.gates.append(Gate("speed", worst >= min_speedup, f"{detail}; needs >= {min_speedup:.2f}x"))
            for engine in (int8,):
                getattr(engine, "close", lambda: None)()
            report.seconds = time.perf_counter() - start
            if not report.ok:
                failed = ", ".join(f"{g.name} ({g.detail})" for g in report.failed()) or "no gate could be judged"
                if not force:
                    raise QuantizationRefused(f"INT8 result refused, nothing written to {output}: failed {failed}. "
                                              "Use --force to write it anyway (labelled in its metadata).", report)
                report.forced = True
                mark_metadata(out_tmp, {"quantization_forced": json.dumps([g.name for g in report.failed()] or ["unjudged"])})
            mark_metadata(out_tmp, {"quantization_gates": json.dumps({"gates": [asdict(g) for g in report.gates],
                                                                      "speed": report.speed, "map": report.map}),
                                    "int8_islands": json.dumps(info.islands)})
        report.output = output
    return report


def _search_islands(model: Path, int8_path: Path, images: Sequence[Path], work: Path, max_evals: int,
                    say: Callable[[str], None]) -> Any:
    """The compare-driven search for INT8: reference the prepared fp32 graph (same node and tensor names as the
    Q/DQ graph), candidates the nodes that read through a DequantizeLinear, each set tried by rewiring them to fp32
    (:func:`toolkit.export.quantize.dequantize_nodes`) without a new calibration."""
    import onnx

    from ..checks.island_search import run_search
    from ..export.quantize import _save_sealed, dequantize_nodes, prepare_graph, quantized_compute_nodes

    prepared = prepare_graph(onnx.load(str(model)))
    ref = work / "search.fp32.onnx"
    _save_sealed(prepared, ref)
    qmodel = onnx.load(str(int8_path))
    count = [0]

    def build(nodes: list[str]) -> Path:
        count[0] += 1
        out = work / f"search.{count[0]}.onnx"
        _save_sealed(dequantize_nodes(qmodel, prepared, nodes), out)
        return out

    search = run_search(ref, int8_path, quantized_compute_nodes(qmodel), build, list(images), INT8_THRESHOLDS,
                        agree=lambda rep: bool(_compare_gate(rep).passed), bisect_rtol=5e-2, max_evals=max_evals, say=say)
    if search.needed and search.agrees:  # write the graph that was judged (re-quantizing with the nodes excluded
        _save_sealed(dequantize_nodes(qmodel, prepared, search.islands), int8_path)  # would still quantize their inputs)
    return search
