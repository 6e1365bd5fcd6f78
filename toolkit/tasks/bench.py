"""``rtdetr-deploy bench``: every backend, precision and batch size in one process and one run.

GPU timing uses CUDA events around each call after a warm-up (median / p90 / p99 over the calls); the
CPU uses wall-clock time. Each configuration can first be checked for accuracy against the fp32 ONNX
Runtime reference on a check model (the trained fixture where it exists): a configuration that fails
is refused, with the reason, and its timings are not reported. Speed never at the cost of boxes.
A built file is timed as given on the backend that runs it, its peers built from the model it records
(:mod:`toolkit.tasks.bench_sources`); a served model's load test is ``rtdetr-deploy bench URL``.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..atomic import write_text
from ..errors import InputError, ToolkitError
from ..models.loading import load_model
from ..runtime.base import BaseEngine
from ..signature import INPUT_IMAGES, INPUT_SIZES
from .bench_report import plot_bench
from .bench_sources import BenchSource, bench_source, plan_backends, recorded_device
from .timing import environment, percentile as _percentile, time_calls

__all__ = ["BACKENDS", "JSON_KEYS", "BenchReport", "BenchRow", "bench", "binder_overhead_us", "environment", "time_calls"]

BACKENDS = ("torch", "onnxruntime", "aoti", "tensorrt", "torch-compile", "aoti-static")
JSON_KEYS = ("backend", "precision", "cuda_graph", "batch", "device", "status", "reason", "median_ms", "p90_ms",
             "p99_ms", "images_per_s", "peak_torch_memory_mb", "build_s", "first_call_s", "end_to_end", "check", "compile_s",
             "end_to_end_images_per_s")


@dataclass
class BenchRow:
    backend: str
    precision: str
    cuda_graph: bool
    batch: int
    device: str
    status: str = "ok"  # ok | skipped (not runnable here) | refused (failed its accuracy check) | failed
    reason: str = ""
    check: str = ""  # what the accuracy check found (compare verdict, mAP against fp32 ONNX Runtime)
    median_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    images_per_s: float | None = None
    peak_torch_memory_mb: float | None = None
    first_call_s: float | None = None
    end_to_end: bool = False
    end_to_end_images_per_s: float | None = None  # --end-to-end: JPEG files to outputs (toolkit.tasks.end_to_end), beside images_per_s
    build_s: float | None = None
    compile_s: float | None = None  # torch-compile: its compile at this batch size (the first call), apart from the timings

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}" + (" +graph" if self.cuda_graph else "")


@dataclass
class BenchReport:
    rows: list[BenchRow]
    environment: dict[str, Any]
    binder_overhead_us: float | None = None
    notes: list[str] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)  # bench(profile=True): see toolkit.tasks.profiling

    def to_dict(self) -> dict[str, Any]:
        return {"environment": self.environment, "binder_overhead_us": self.binder_overhead_us, "notes": self.notes,
                "rows": [asdict(r) for r in self.rows], "profiles": self.profiles}


class _Artifacts:
    """Builds (once, in ``workdir``) what each backend needs from the model (ONNX files, .pt2 packages, engines)
    and keeps the loaded engine of the configuration being measured, so each package is loaded once per run."""

    def __init__(self, model: Any, workdir: Path, device: torch.device, max_batch: int,
                 aoti_configs: dict[str, Any] | None = None, buckets: Sequence[int] | None = None,
                 given: BenchSource | None = None) -> None:
        self.model, self.workdir, self.device, self.max_batch = model, workdir, device, max_batch
        self.given = given if given is not None and given.path is not None else None  # a built file, timed as given
        self.buckets = tuple(sorted(set(buckets or (max_batch,))))  # aoti-static: one static package per size
        self.aoti_configs = dict(aoti_configs or {})
        self._onnx: dict[str, Path] = {}
        self._engines: dict[tuple[str, str, bool], BaseEngine] = {}

    def onnx(self, precision: str) -> Path:
        if precision not in self._onnx:
            from ..export.onnx import export_onnx

            path = self.workdir / f"{self.model.name}.{precision}.onnx"
            if not path.exists():
                export_onnx(copy.deepcopy(self.model).cpu(), path, verify=False, precision=precision)
            self._onnx[precision] = path
        return self._onnx[precision]

    def artifact(self, backend: str, precision: str) -> Any:
        """The file ``backend`` loads (built on first use: export, AOTI compile, engine build), or the model."""
        if self.given is not None and self.given.owns(backend, precision):
            return self.given.path
        if self.model is None:
            raise ToolkitError(f"{backend} {precision}: no model to build it from ({self.given.why if self.given else 'none given'})")
        if backend in ("torch", "torch-compile"):  # torch-compile compiles at its first call per shape (compile_s)
            return self.model
        if backend == "onnxruntime":
            return self.onnx(precision)
        tag = "".join(f".{k}={v}" for k, v in sorted(self.aoti_configs.items()))  # other options, another package
        if backend == "aoti":
            from ..builders.aoti import build_aoti

            path = self.workdir / f"{self.model.name}.{precision}.{self.device.type}{tag}.pt2"
            if not path.exists():
                build_aoti(copy.deepcopy(self.model).cpu(), path, precision=precision, device=self.device.type,
                           batch=(1, max(2, min(8, self.max_batch)), max(2, self.max_batch)), progress=False,
                           inductor_configs=self.aoti_configs)
            return path
        if backend == "aoti-static":  # static packages per batch size behind a manifest (toolkit.runtime.buckets)
            from ..builders.buckets import build_buckets

            path = self.workdir / f"{self.model.name}.{precision}.{self.device.type}{tag}.buckets"
            if not path.exists():
                build_buckets(copy.deepcopy(self.model).cpu(), path, self.buckets, precision=precision, device=self.device.type,
                              progress=False, inductor_configs=self.aoti_configs)
            return path
        if backend == "tensorrt":
            from ..builders.build import build_engine

            path = self.workdir / f"{self.model.name}.{precision}.engine"
            if not path.exists():
                build_engine(self.onnx(precision), path, backend="tensorrt", precision=precision,
                             batch=(1, min(8, self.max_batch), self.max_batch), progress=False)
            return path
        raise ToolkitError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")

    def engine(self, backend: str, precision: str, cuda_graph: bool) -> BaseEngine:
        from ..runtime import engine as engine_mod

        key = (backend, precision, cuda_graph)
        if key not in self._engines:
            source = self.artifact(backend, precision)
            options: dict[str, Any] = {"check_values": False, "cuda_graph": cuda_graph}
            if backend in ("torch", "torch-compile"):
                source, options["precision"] = copy.deepcopy(source), precision
            loader = "buckets" if backend.endswith("-static") else backend
            self._engines[key] = engine_mod.load(source, backend=loader, device=self.device, **options)
        return self._engines[key]

    def release(self) -> None:
        self._engines.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _runnable(backend: str, device: torch.device, cuda_graph: bool) -> str | None:
    """Why ``backend`` cannot run here, or None."""
    import importlib.util

    if backend == "tensorrt" and not any(importlib.util.find_spec(m) for m in ("tensorrt",)):
        return "TensorRT is not installed (pip install 'rtdetr-deploy[tensorrt]')"
    if backend == "onnxruntime" and device.type == "cuda":
        from ..runtime.backends.onnxruntime import cuda_available

        if not cuda_available():
            return "onnxruntime has no CUDAExecutionProvider (pip install 'rtdetr-deploy[gpu]')"
    if cuda_graph and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if cuda_graph and backend == "torch-compile":
        return "torch.compile(mode='reduce-overhead') captures its own CUDA graphs: see its row without +graph"
    return None


def binder_overhead_us(engine: BaseEngine, feeds: dict[str, torch.Tensor], iters: int = 2000) -> float:
    """Median cost of the binder's checks and conversions per call, in microseconds (no engine work)."""
    for _ in range(50):
        engine.binder.bind(feeds)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        engine.binder.bind(feeds)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def _inputs(size: tuple[int, int], batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    from ..export.verify import verification_images

    h, w = size
    return {INPUT_IMAGES: verification_images(batch, (h, w), seed=batch).to(device),
            INPUT_SIZES: torch.tensor([[w, h]] * batch, device=device)}


def _end_to_end_call(engine: BaseEngine, model: Any, batch: int, device: torch.device) -> float:
    """Images/s from JPEG files to outputs: GPU decode and preprocess overlapped with inference (toolkit.tasks.end_to_end)."""
    from .end_to_end import end_to_end_images_per_s

    return end_to_end_images_per_s(engine, batch, device, spec=getattr(model, "preprocess", None))  # None: the engine's own spec


def accuracy_check(artifacts: _Artifacts, backend: str, precision: str, cuda_graph: bool, images: int = 100,
                   reference: tuple[str, str] = ("onnxruntime", "fp32")) -> tuple[str | None, str]:
    """(why the configuration fails, None if it passes; what was checked) against the fp32 ONNX Runtime reference of the
    check model: ``compare`` detection by detection, then COCO mAP on ``images`` synthetic images within 0.5 points.
    ``reference``: another (backend, precision) of ``artifacts`` to check against (a built file: eager torch of its model)."""
    from ..checks.compare import compare
    from .evaluate import evaluate

    ref_name = "fp32 ONNX Runtime" if reference == ("onnxruntime", "fp32") else f"{reference[0]} {reference[1]}"
    ref = artifacts.engine(reference[0], reference[1], False)
    candidate = artifacts.engine(backend, precision, cuda_graph)
    try:
        report = compare(ref, candidate)
        if report.verdict == "inconclusive":  # never reported as passing: too little, tied or NaN to judge
            return f"inconclusive: {report.reason}", "compare inconclusive"
        if not report.ok:
            return report.summary().splitlines()[0], "compare failed"
        if not images:
            return None, f"compare agrees ({report.reason})"
        ev = evaluate({"reference": ref, "candidate": candidate}, synthetic=images, tolerance=0.5)
    finally:
        artifacts.release()
    maps = {r.backend: r.mAP for r in ev.rows}
    done = f"compare agrees; mAP {maps.get('candidate', float('nan')):.4f} vs {maps.get('reference', float('nan')):.4f} ({ref_name}) on {images} images; compare matched {report.compared} detections"
    return (None if ev.agree else ev.message), done


def check_bench_arguments(batches: Sequence[int], warmup: int, iters: int, check_images: int = 0) -> None:
    """Counts that would make a table of nothing (or crash a median) are refused up front."""
    for name, values, least in (("--batch sizes", list(batches) or [0], 1), ("--iters", [iters], 1), ("--warmup", [warmup], 0),
                                ("--check-images", [check_images], 0)):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in values):
            raise InputError(f"{name} must be integers of at least {least}, got {', '.join(map(repr, values))}")


def bench(
    model: Any,
    *,
    backends: Sequence[str] | None = None,
    batches: Sequence[int] = (1, 8, 32),
    precisions: Sequence[str] = ("fp32",),
    cuda_graphs: Sequence[bool] = (False,),
    warmup: int = 10,
    iters: int = 50,
    device: str | torch.device | None = None,
    config: str | None = None,
    check_model: Any = None,
    end_to_end: bool = False,
    workdir: str | Path | None = None,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    profile: bool = False,
    check_images: int = 100,
    aoti_configs: dict[str, Any] | None = None,
    progress: bool = True,
    default_backends: Sequence[str] = BACKENDS,
) -> BenchReport:
    """Benchmark ``model`` (anything :func:`toolkit.models.loading.load_model` takes, or a built file: timed as given,
    see :mod:`toolkit.tasks.bench_sources`) on every runnable configuration of ``backends`` (None: ``default_backends``;
    for a built file, its own backend first).

    ``check_model``: a model with meaningful (trained) weights on which each configuration must pass
    ``compare`` against fp32 ONNX Runtime, and keep its COCO mAP on ``check_images`` synthetic images within
    0.5 points of it, before its timings are reported; None skips the check (noted).
    ``profile`` (CUDA): after timing, profile each measured row (top kernels, GPU-idle share) into ``profiles``.
    ``aoti_configs``: ``torch._inductor`` options for the AOTInductor builds (e.g. ``force_layout_optimization``,
    ``freezing``, ``max_autotune``), recorded in the report's environment.
    """
    check_bench_arguments(batches, warmup, iters, check_images)
    from tqdm import tqdm

    device = device if device is not None else recorded_device(model)  # a package runs where it was compiled for
    dev = torch.device(device) if device is not None else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    source = bench_source(model, config, dev)
    backends, plan_notes = plan_backends(source, None if backends is None else list(backends), default_backends)
    deploy = source.model
    size = source.size or tuple(deploy.preprocess.size)
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="rtdetr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    artifacts = _Artifacts(deploy, work, dev, max(batches), aoti_configs, buckets=batches, given=source)
    checker = _Artifacts(load_model(check_model).eval(), work / "check", dev, 8, aoti_configs) if check_model is not None else None
    if checker is not None:
        checker.workdir.mkdir(exist_ok=True)
    report = BenchReport([], environment(dev))
    report.notes += source.notes + plan_notes
    if aoti_configs:
        report.environment["aoti_configs"] = dict(aoti_configs)
    if checker is None:
        report.notes.append("no check model: configurations were not checked for accuracy")
    from .bench_int8 import int8_rows  # --precision int8: the quantizer's file, reported through its gates
    report.rows += int8_rows(lambda: artifacts.onnx("fp32"), backends, batches, dev, work, iters, check_images, BenchRow) if "int8" in precisions else []
    configs = [(b, p, g) for b in backends for p in ([source.precision] if b == source.backend else precisions) for g in cuda_graphs
               if p != "int8" and not (g and b == "onnxruntime" and dev.type != "cuda")]
    bar = tqdm(total=len(configs) * len(batches), desc="bench", disable=not progress)
    for backend, precision, graph in configs:
        reason = _runnable(backend, dev, graph)
        status = "skipped" if reason else "ok"
        check = ""
        owned = source.owns(backend, precision)
        if status == "ok" and checker is not None and owned and deploy is None:  # nothing to check the file against
            status, reason = "refused", f"inconclusive: {source.why}, so its boxes cannot be checked"
        elif status == "ok" and checker is not None:
            try:  # the given file itself against eager torch of its model; a peer configuration on the check model
                failure, check = (accuracy_check(artifacts, backend, precision, graph, check_images, reference=("torch", "fp32"))
                                  if owned else accuracy_check(checker, backend, precision, graph, check_images))
                if failure:
                    status, reason = "refused", (failure if failure.startswith("inconclusive: ") else
                                                 f"accuracy check against fp32 ONNX Runtime failed: {failure}")
            except ToolkitError as e:  # the configuration cannot run at all (e.g. not capturable in a CUDA graph)
                status, reason = "failed", str(e).splitlines()[0]
        build_s = None
        if status == "ok":
            try:
                start = time.perf_counter()
                artifacts.artifact(backend, precision)  # export / compile / build: not part of the first call
                build_s = time.perf_counter() - start
            except (ToolkitError, RuntimeError) as e:
                status, reason = "failed", f"build failed: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        for batch in batches:
            bar.set_postfix_str(f"{backend} {precision}{' graph' if graph else ''} b{batch}")
            outside = source.outside(batch) if owned and status == "ok" else None
            row = BenchRow(backend, precision, graph, batch, str(dev), status="skipped" if outside else status,
                           reason=outside or reason or "", end_to_end=end_to_end, build_s=build_s, check=check)
            if row.status == "ok":
                measured = _measure(row, artifacts, size, dev, warmup, iters)
                if profile and measured is not None and dev.type == "cuda":
                    from .profiling import profile_call

                    report.profiles.append({"config": row.label, "batch": batch, **profile_call(measured, dev)})
            report.rows.append(row)
            bar.update()
        if backend == "torch" and precision == "fp32" and not graph and status == "ok" and report.binder_overhead_us is None:
            feeds = _inputs(size, 1, dev)
            feeds[INPUT_SIZES] = feeds[INPUT_SIZES].to(torch.int64)
            report.binder_overhead_us = binder_overhead_us(artifacts.engine("torch", "fp32", False), feeds)
        artifacts.release()
        if json_path is not None:  # after every configuration: a long run that is cut short keeps what it measured
            write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    bar.close()
    if plot_path is not None:
        plot_bench(report.to_dict(), plot_path)
    return report


def _measure(row: BenchRow, artifacts: _Artifacts, size: tuple[int, int], dev: torch.device, warmup: int, iters: int) -> Callable[[], Any] | None:
    """Time one row and return its (warm) call, or None if it failed; ``first_call_s`` is the load (on a
    configuration's first batch size) plus the first call at this batch size (graph capture, lazy initialisation)."""
    try:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        start = time.perf_counter()
        engine = artifacts.engine(row.backend, row.precision, row.cuda_graph)
        feeds = _inputs(size, row.batch, dev)
        call = functools.partial(engine.infer, feeds)
        call()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        row.first_call_s = time.perf_counter() - start
        row.compile_s = getattr(engine, "compile_s", {}).get(tuple(feeds[INPUT_IMAGES].shape))
        times = time_calls(call, dev, warmup, iters)
        row.median_ms = statistics.median(times)
        row.p90_ms = _percentile(times, 0.90)
        row.p99_ms = _percentile(times, 0.99)
        row.images_per_s = row.batch * 1e3 / row.median_ms
        if row.end_to_end:
            row.end_to_end_images_per_s = _end_to_end_call(engine, artifacts.model, row.batch, dev)
        if dev.type == "cuda":
            row.peak_torch_memory_mb = torch.cuda.max_memory_allocated(dev) / 2**20
        return call
    except (ToolkitError, RuntimeError) as e:
        row.status, row.reason = "failed", f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None


