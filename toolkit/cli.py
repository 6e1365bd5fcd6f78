"""``rtdetr-deploy``: a thin command line over the Python API (each verb calls one public function).

Errors the user can cause print one line and exit with code 2; ``--verbose`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export, build, run and compare RT-DETR detectors.")
console = Console()
err_console = Console(stderr=True)
_state = {"verbose": False}


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")) -> None:
    _state["verbose"] = verbose


def _size(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise InputError(f"--size takes H,W or one positive number, got {value!r}")
    return parts[0], parts[1]


@app.command()
def export(
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint directory or weights file; omit to build --config with random weights."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Config name in configs/ (or a JSON path)."),
    output: Path = typer.Option(Path("model.onnx"), "--output", "-o", help="ONNX file to write."),
    opset: int = typer.Option(17, help="ONNX opset."),
    dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static-batch", help="Symbolic batch dim N."),
    size: Optional[str] = typer.Option(None, help="Input size H,W (default: the config's)."),
    sizes_dtype: str = typer.Option("int64", help="dtype of orig_target_sizes: int64 (official) or int32."),
    simplify: bool = typer.Option(False, help="Simplify with onnxslim (verified like the original)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Verify the file in ONNX Runtime against torch."),
    precision: str = typer.Option("fp32", help="Body precision: fp32, or fp16 (I/O and postprocess stay fp32)."),
    fold: bool = typer.Option(True, "--fold/--no-fold", help="Fold BatchNorm into the convolutions and precompute constants (verified)."),
) -> None:
    """Export a model behind the deploy contract to a verified ONNX file; exit 2 (nothing written) when verify finds a
    difference or NaN/Inf, 3 (file written) when it could not judge (tied query selection)."""
    from .export.onnx import export_onnx

    result = export_onnx(checkpoint, output, config=config, opset=opset, dynamic_batch=dynamic_batch, size=_size(size),
                         sizes_dtype=sizes_dtype, simplify=simplify, verify=verify, precision=precision,
                         progress=True, fold=fold)
    if result.fold is not None:
        console.print(result.fold.summary(), highlight=False)
    if result.verify is not None:
        console.print(result.verify.summary())
    for note in result.lints:
        console.print(f"[yellow]lint:[/yellow] {escape(note)}")
    _print_signature(result.signature)
    console.print(f"wrote {result.path} in {result.seconds:.1f} s")
    if result.verify is not None and result.verify.verdict == "inconclusive":
        raise typer.Exit(3)


def _print_signature(signature) -> None:
    table = Table(title="I/O signature")
    for col in ("", "name", "dtype", "shape"):
        table.add_column(col)
    for row in signature.rows():
        table.add_row(*row)
    console.print(table)


@app.command()
def inspect(
    file: Path = typer.Argument(..., help=".onnx file, or an engine / .pt2 with its sidecar."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print an artifact's I/O signature and metadata; warn on int64 inputs."""
    from .tasks.inspect import inspect_file

    report = inspect_file(file)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return
    _print_signature(report.signature)
    meta = Table(title=f"{report.kind} metadata")
    meta.add_column("key")
    meta.add_column("value", overflow="fold")
    for k, v in sorted(report.metadata.items()):
        meta.add_row(escape(k), escape(v if isinstance(v, str) else json.dumps(v)))
    console.print(meta)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")


@app.command()
def run(
    model: str = typer.Argument(..., help="Engine, ONNX, .pt2, checkpoint or config name."),
    images: List[Path] = typer.Argument(..., help="Image files or directories."),
    output: Path = typer.Option(Path("runs/detect"), "--output", "-o", help="Output directory."),
    backend: Optional[str] = typer.Option(None, help="onnxruntime, tensorrt, aoti, torch (default: from the file)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: the GPU if the backend can use it)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Config for a weights file."),
    score_threshold: float = typer.Option(0.3, help="Keep detections scoring at least this."),
    batch_size: int = typer.Option(8, help="Images per engine call."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out images that cannot be read (listed) instead of stopping."),
) -> None:
    """Run a model on images; write detections.json (COCO results) and annotated images.

    Boxes refer to each image as displayed (EXIF orientation applied). Unreadable images stop the run before
    anything is written, all of them listed; --skip-bad processes the others.
    """
    from .tasks.run import run as run_images

    options = {"config": config} if config else {}
    result = run_images(model, images, output, backend=backend, device=device, score_threshold=score_threshold,
                        batch_size=batch_size, skip_bad=skip_bad, **options)
    for path, why in result.skipped.items():
        err_console.print(f"[yellow]skipped:[/yellow] {escape(why)}", highlight=False, soft_wrap=True)
    n = sum(len(d.above(score_threshold).scores) for d in result.detections)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False, soft_wrap=True)
    skipped = f" ({len(result.skipped)} unreadable skipped)" if result.skipped else ""
    console.print(f"{len(result.detections)} images{skipped}, {n} detections >= {score_threshold}: {escape(str(result.results_path))}",
                  highlight=False)


@app.command()
def compare(
    a: str = typer.Argument(..., help="Engine, ONNX, .pt2, checkpoint, config name, result file (detections.json) or reference bundle."),
    b: str = typer.Argument(..., help="The other side, same kinds as A."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image files or directories (default: synthetic images)."),
    score_threshold: float = typer.Option(0.3, help="Detections scoring at least this are compared."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write report.json, report.md and side-by-side images here."),
    backend_a: Optional[str] = typer.Option(None, help="Backend for A (default: from the file)."),
    backend_b: Optional[str] = typer.Option(None, help="Backend for B (default: from the file)."),
    device_a: Optional[str] = typer.Option(None, help="Device for A."),
    device_b: Optional[str] = typer.Option(None, help="Device for B."),
    save_reference: Optional[Path] = typer.Option(None, "--save-reference", help="Store A's inputs and outputs as a reference bundle."),
) -> None:
    """Compare two backends as detectors; exit 0 agree, 1 disagree (or a sentinel fires), 2 bad input, 3 inconclusive."""
    from .checks.compare import compare as compare_backends

    result = compare_backends(a, b, images, score_threshold=score_threshold, report_dir=report, backend_a=backend_a,
                              backend_b=backend_b, device_a=device_a, device_b=device_b, save_reference_dir=save_reference)
    console.print(result.table())
    console.print(result.summary(), highlight=False, soft_wrap=True)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command()
def validate(
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint directory or weights file; omit to use --config with random weights."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Config name (or JSON path)."),
    backends: str = typer.Option("torch,onnxruntime", help="Comma-separated stages after preprocess: torch,onnxruntime,aoti,tensorrt."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image files or directories (default: synthetic images)."),
    workdir: Optional[Path] = typer.Option(None, help="Keep exported and built files here."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write report.json and report.md here."),
) -> None:
    """Run every stage (preprocess, torch, ONNX Runtime, built engines); name the first broken one (exit 1), or the first
    that could not be judged (exit 3)."""
    from .checks.validate import validate as validate_stages

    result = validate_stages(checkpoint, tuple(b.strip() for b in backends.split(",") if b.strip()), images, workdir, config=config)
    if report is not None:
        result.write(report)
    console.print(result.table())
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command()
def build(
    onnx: Optional[Path] = typer.Argument(None, help="ONNX file (from 'rtdetr-deploy export'); optional with --model."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Engine file to write (a .json sidecar goes beside it); default model.engine / model.pt2 / model.ep."),
    backend: Optional[str] = typer.Option(None, help="tensorrt, tensorrt-rtx, or a backend that compiles the model: aoti "
                                          "(default: from -o's suffix, else TensorRT where installed, else aoti)."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or bf16 (checked in the built engine; TensorRT 11/RTX need an fp16 ONNX)."),
    batch: str = typer.Option("1,1,8", help="MIN,OPT,MAX of the dynamic batch dim (with --static: the bucket sizes, e.g. 1,8,32)."),
    workspace: Optional[float] = typer.Option(None, help="TensorRT: workspace memory pool limit in GiB."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="TensorRT: timing cache file to read and update."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse an identical engine from ~/.cache/rtdetr-deploy/engines."),
    model: Optional[str] = typer.Option(None, "--model", help="aoti: checkpoint or config to compile (default: the model the ONNX was exported from)."),
    device: Optional[str] = typer.Option(None, help="aoti: cpu or cuda (default: the GPU if present)."),
    fold: bool = typer.Option(True, "--fold/--no-fold", help="aoti, torch-tensorrt: fold BatchNorm into the convolutions first (verified)."),
    static: bool = typer.Option(False, "--static", help="aoti, torch-tensorrt: one static package per --batch size and a .buckets manifest (-o)."),
    tune: bool = typer.Option(False, "--tune", help="aoti: Inductor max-autotune (GEMM/conv templates); minutes more, cached."),
) -> None:
    """Build a TensorRT / TensorRT-RTX engine from an ONNX file, or an AOTInductor .pt2 (from the ONNX's model or --model)."""
    from .builders.build import MODEL_BUILDERS, build_engine, build_from_model
    from .errors import InputError

    try:
        parts = tuple(int(p) for p in batch.split(","))
    except ValueError:
        parts = ()
    if static:
        return _build_static(onnx, output, backend, precision, parts or batch, model, device, fold, tune, cache)
    if len(parts) != 3:
        raise InputError(f"--batch takes MIN,OPT,MAX such as 1,4,8, got {batch!r}")
    backend, output = _build_target(backend, output, from_model=model is not None)
    extra = _model_build_options(backend, fold, tune)
    if model is not None:
        if backend not in MODEL_BUILDERS:
            raise InputError(f"--model is for backends that compile the torch model ({', '.join(MODEL_BUILDERS)}); "
                             f"{backend} builds from the ONNX file")
        source, config = (model, None) if Path(model).exists() else (None, model)
        result = build_from_model(source, output, backend=backend, config=config, precision=precision, batch=parts,
                                  device=device, cache=cache, **extra)
    elif onnx is None:
        raise InputError("give the ONNX file to build (or --model for a backend that compiles the torch model)")
    else:
        result = build_engine(onnx, output, backend=backend, precision=precision, batch=parts, workspace_gib=workspace,
                              timing_cache=timing_cache, cache=cache, device=device, **extra)
    for note in result.warnings:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    _print_signature(result.signature)
    if result.metadata.get("orig_target_sizes_note"):
        console.print(escape(result.metadata["orig_target_sizes_note"]))
    if isinstance(result.metadata.get("fold"), dict):
        console.print(f"folded {result.metadata['fold']['folded_pairs']} conv-norm pair(s) into the compiled model")
    console.print(escape(result.summary()))


_BUILD_SUFFIXES = {".engine": "tensorrt", ".plan": "tensorrt", ".pt2": "aoti", ".ep": "torch-tensorrt"}
_BUILD_OUTPUTS = {"tensorrt": "model.engine", "tensorrt-rtx": "model.engine", "aoti": "model.pt2", "torch-tensorrt": "model.ep"}


def _build_target(backend: Optional[str], output: Optional[Path], from_model: bool = False) -> tuple[str, Path]:
    """The backend (given, else from the output's suffix, else the best one installed, said in a note) and the output."""
    if backend is None:
        if output is not None and output.suffix.lower() in _BUILD_SUFFIXES:
            backend = _BUILD_SUFFIXES[output.suffix.lower()]
        elif from_model:  # --model: a backend that compiles the torch model
            backend = "aoti"
        else:
            import importlib.util

            from .runtime.backends.tensorrt import MODULE_NAMES

            have_trt = any(importlib.util.find_spec(name) is not None for name in MODULE_NAMES)
            backend = "tensorrt" if have_trt else "aoti"
            console.print(f"note: building with --backend {backend}"
                          + ("" if have_trt else " (TensorRT is not installed here: an AOTInductor package)"), highlight=False)
    return backend, output if output is not None else Path(_BUILD_OUTPUTS.get(backend, "model.engine"))


def _model_build_options(backend: str, fold: bool, tune: bool) -> dict[str, Any]:
    """--no-fold / --tune as builder options; only the builders that compile the torch model take them."""
    from .builders.aoti import TUNE_INDUCTOR_CONFIGS
    from .builders.build import MODEL_BUILDERS

    if tune and backend != "aoti":
        raise InputError(f"--tune runs Inductor's autotuning, for --backend aoti; {backend} tunes in its own builder")
    if backend not in MODEL_BUILDERS:
        if not fold:
            raise InputError(f"--no-fold is for the builders that compile the torch model ({', '.join(MODEL_BUILDERS)}); "
                             "for a TensorRT engine export the ONNX with 'rtdetr-deploy export --no-fold'")
        return {}
    return {**({"fold": False} if not fold else {}), **({"inductor_configs": dict(TUNE_INDUCTOR_CONFIGS)} if tune else {})}


def _build_static(onnx: Optional[Path], output: Path, backend: str, precision: str, sizes: Any, model: Optional[str],
                  device: Optional[str], fold: bool, tune: bool, cache: bool) -> None:
    """build --static: one static package per batch size behind a .buckets manifest."""
    import torch

    from .builders.buckets import build_buckets
    from .builders.build import model_for_onnx

    if not isinstance(sizes, tuple):
        raise InputError(f"--batch with --static takes the bucket sizes such as 1,8,32, got {sizes!r}")
    options = _model_build_options(backend, fold, tune)
    if model is not None:
        source, config = (model, None) if Path(model).exists() else (None, model)
    elif onnx is not None:
        source, config = model_for_onnx(onnx), None
    else:
        raise InputError("give the ONNX file to build (or --model CHECKPOINT)")
    path = build_buckets(source, output, sizes, backend=backend, config=config, precision=precision, cache=cache,
                         device=device or ("cuda" if torch.cuda.is_available() else "cpu"), **options)
    console.print(f"{path}: {backend} {precision} static buckets {', '.join(str(s) for s in sorted(set(sizes)))}")


def _inductor_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings as torch._inductor options: 1/0/true/false are booleans, digits ints, the rest strings."""
    from .errors import InputError

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--aoti-config takes KEY=VALUE, got {pair!r}")
        low = value.lower()
        options[key] = True if low in ("1", "true") else False if low in ("0", "false") else int(value) if value.isdigit() else value
    return options


@app.command()
def bench(
    model: str = typer.Argument("rtdetr_r50vd", help="Checkpoint or config name (random weights are fine for speed)."),
    backends: str = typer.Option("torch,onnxruntime,aoti,tensorrt,torch-compile", help="Comma-separated backends (torch-compile: the torch.compile peer)."),
    batch: str = typer.Option("1,8,32", help="Comma-separated batch sizes."),
    precision: str = typer.Option("fp32", help="Comma-separated precisions: fp32, fp16."),
    cuda_graphs: str = typer.Option("off", help="off, on, or both (CUDA only)."),
    warmup: int = typer.Option(10, help="Untimed calls before timing."),
    iters: int = typer.Option(50, help="Timed calls per configuration."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the GPU if present)."),
    check_model: Optional[str] = typer.Option(None, help="Trained model each configuration must pass compare on first."),
    end_to_end: bool = typer.Option(False, "--end-to-end", help="Include JPEG decode + resize on the device."),
    workdir: Optional[Path] = typer.Option(None, help="Where built artifacts go (reused between runs)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
    plot: Optional[Path] = typer.Option(None, help="Write latency/throughput curves as PNG."),
    profile: bool = typer.Option(False, "--profile", help="CUDA: profile each measured row (top kernels, GPU-idle share) into the JSON."),
    check_images: int = typer.Option(100, help="Synthetic images for the COCO mAP part of the accuracy check (0: compare only)."),
    aoti_config: List[str] = typer.Option([], "--aoti-config", help="KEY=VALUE torch._inductor option for the AOTInductor builds (repeatable), e.g. freezing=1."),
) -> None:
    """Benchmark every backend, precision and batch size in one process (CUDA events, medians)."""
    from .tasks.bench import bench as run_bench
    from .tasks.bench_report import TABLE_HEADER, table_rows

    choices = {"off": (False,), "on": (True,), "both": (False, True)}
    if cuda_graphs not in choices:
        raise InputError(f"--cuda-graphs takes off, on or both, got {cuda_graphs!r}")
    graphs = choices[cuda_graphs]
    try:
        batches = [int(b) for b in batch.split(",")]
    except ValueError:
        raise InputError(f"--batch takes comma-separated batch sizes such as 1,8,32, got {batch!r}") from None
    report = run_bench(model, backends=backends.split(","), batches=batches,
                       precisions=precision.split(","), cuda_graphs=graphs, warmup=warmup, iters=iters, device=device,
                       check_model=check_model, end_to_end=end_to_end, workdir=workdir, json_path=json_path, plot_path=plot,
                       profile=profile, check_images=check_images, aoti_configs=_inductor_options(aoti_config))
    table = Table(title=f"bench on {report.environment.get('gpu', report.environment['device'])}")
    for col in TABLE_HEADER:
        table.add_column(col)
    for row in table_rows(report.to_dict()):
        table.add_row(*(escape(str(c)) for c in row))
    console.print(table)
    if report.binder_overhead_us is not None:
        console.print(f"binder overhead per call: {report.binder_overhead_us:.1f} us (median)")
    for p in report.profiles:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in list(p["by_kind_ms"].items())[:3])
        console.print(f"profile {p['config']} b{p['batch']}: kernels {p['kernel_ms_per_call']:.2f} ms of {p['wall_ms_per_call']:.2f} ms "
                      f"wall (GPU idle {p['gpu_idle_share']:.0%}, {p['kernel_launches_per_call']} launches); {kinds}")
    for note in report.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    if not any(r.status == "ok" for r in report.rows):
        err_console.print("[red]error:[/red] no configuration could be measured (every row above failed, was refused "
                          "or cannot run here)", highlight=False)
        raise typer.Exit(1)


@app.command(name="eval")
def eval_(
    model: str = typer.Argument(..., help="Checkpoint dir, weights file, config name, .onnx/.engine/.pt2 file."),
    data: Optional[Path] = typer.Option(None, help="COCO JSON, or a dataset root with val.json."),
    synthetic: Optional[int] = typer.Option(None, help="Evaluate on N fresh shapes images from an unseen seed (default 500)."),
    backends: str = typer.Option("torch,onnxruntime", help="Comma-separated backends."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda."),
    tolerance: float = typer.Option(0.5, help="mAP points the backends may differ by."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
) -> None:
    """COCO mAP on every backend, one row each; exit 1 if the backends disagree by more than the tolerance."""
    from .atomic import write_text
    from .tasks.evaluate import evaluate

    if data is None and synthetic is None:
        synthetic = 500
    report = evaluate(model, data, synthetic, tuple(b for b in backends.split(",") if b), device, tolerance=tolerance, progress=True)
    console.print(escape(report.table()), highlight=False)
    if json_path is not None:
        write_text(json_path, json.dumps(report.to_dict(), indent=1))
    if not report.agree:
        raise typer.Exit(1)


@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), "--output", "-o", help="Results folder."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the GPU if present)."),
    eval_images: int = typer.Option(100, help="Synthetic images for the COCO evaluation."),
) -> None:
    """The whole toolkit on the shipped trained fixture: export, verify, build, run, compare, eval, report."""
    from .tasks.demo import demo as run_demo

    report = run_demo(output, device=device, eval_images=eval_images, say=lambda line: console.print(escape(line), highlight=False))
    console.print(escape(report.eval_table), highlight=False)
    console.print(f"demo {'PASS' if report.ok else 'FAIL'}: {report.output_dir / 'report.md'}")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="fp32 .onnx file written by 'rtdetr-deploy export'."),
    output: Path = typer.Option(..., "--output", "-o", help="INT8 ONNX file to write (Q/DQ in the graph)."),
    calib: Optional[List[Path]] = typer.Option(None, "--calib", help="Calibration images (files or directories)."),
    synthetic: Optional[int] = typer.Option(None, "--synthetic", help="Calibrate on N synthetic shapes images instead."),
    method: str = typer.Option("minmax", help="Calibration: minmax, entropy or percentile."),
    exclude: List[str] = typer.Option([], "--exclude", help="Op type or (part of a) node name kept fp32; repeatable or comma-separated."),
    activations: str = typer.Option("uint8", help="uint8 (ONNX Runtime CPU: fuses into QLinearConv) or int8 (TensorRT's symmetric form)."),
    scope: str = typer.Option("body", help="body (backbone + encoder in INT8; decoder, heads, postprocess fp32) or all."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="COCO JSON or dataset root for the mAP gate (default: synthetic shapes)."),
    eval_synthetic: int = typer.Option(100, help="Synthetic images for the accuracy gates when --eval-data is not given."),
    max_map_drop: float = typer.Option(1.0, help="mAP points INT8 may lose against fp32."),
    min_speedup: float = typer.Option(1.0, help="INT8 must be at least this many times faster than fp32 (ONNX Runtime CPU)."),
    force: bool = typer.Option(False, "--force", help="Write a result that fails a gate (labelled so in its metadata)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the gate report as JSON."),
) -> None:
    """Post-training INT8 that is faster and as accurate as fp32, or refused with the figures (exit 1)."""
    from .atomic import write_text
    from .tasks.quantize import QuantizationRefused
    from .tasks.quantize import quantize as run_quantize

    parts = [e for item in exclude for e in item.split(",") if e.strip()]
    try:
        report = run_quantize(model, output, calib, synthetic, method=method, exclude=parts, activations=activations, scope=scope,
                              eval_data=eval_data, eval_synthetic=eval_synthetic, max_map_drop=max_map_drop,
                              min_speedup=min_speedup, force=force, say=lambda line: console.print(line, highlight=False))
    except QuantizationRefused as e:
        console.print(e.report.table(), highlight=False)
        if json_path is not None:
            write_text(json_path, json.dumps(e.report.to_dict(), indent=1))
        err_console.print(f"[red]refused:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(report.table(), highlight=False)
    if json_path is not None:
        write_text(json_path, json.dumps(report.to_dict(), indent=1))
    label = " [yellow](forced: failed gates are recorded in its metadata)[/yellow]" if report.forced else ""
    console.print(f"wrote {report.output} in {report.seconds:.1f} s{label}")


# --- serving on Triton Inference Server (toolkit.serve): serve, export-triton, serve-bench ---------------------


def _devices(text: Optional[str]) -> Optional[list[int]]:
    from .serve.repository import parse_devices

    return parse_devices(text)


@app.command()
def serve(
    model: str = typer.Argument(..., help="ONNX, engine, .pt2, checkpoint directory or config name (anything toolkit.load takes)."),
    backend: Optional[str] = typer.Option(None, help="How the server runs it: onnxruntime, torch, aoti, tensorrt (default: from the file)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda[:N] (default: cpu; --devices picks GPUs)."),
    name: Optional[str] = typer.Option(None, help="Model name on the server (default: from the file or directory name)."),
    max_batch: int = typer.Option(32, help="Largest batch the dynamic batcher forms (capped by the engine's profile)."),
    max_queue_delay_us: int = typer.Option(1000, help="How long the batcher may hold a request to merge it (microseconds)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    http_port: int = typer.Option(8000, help="HTTP/REST port (health: /v2/health/ready)."),
    grpc_port: int = typer.Option(8001, help="gRPC port."),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port (/metrics)."),
    instances: int = typer.Option(1, help="Model instances per device."),
    devices: Optional[str] = typer.Option(None, help="GPU indices such as 0,1: one instance group per GPU."),
    threads: Optional[int] = typer.Option(None, help="torch threads per CPU instance (default 1; scale with --instances)."),
    ready_timeout: float = typer.Option(120.0, help="Seconds to wait for the model to load."),
) -> None:
    """Serve a model on NVIDIA Triton Inference Server (dynamic batching, HTTP/gRPC, metrics) until SIGINT/SIGTERM."""
    from .serve.serve import serve as serve_model

    serve_model(model, backend=backend, device=device, name=name, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
                host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, instances=instances,
                devices=_devices(devices), threads=threads, ready_timeout_s=ready_timeout, say=lambda line: console.print(line, highlight=False))


@app.command(name="export-triton")
def export_triton(
    model: str = typer.Argument(..., help=".onnx (onnxruntime), .engine (tensorrt), or anything toolkit.load takes (python)."),
    output: Path = typer.Option(..., "--output", "-o", help="Model repository directory (NAME/ is written inside)."),
    backend: str = typer.Option("python", help="Triton backend: onnxruntime, tensorrt or python."),
    name: Optional[str] = typer.Option(None, help="Model name (default: from the file or directory name)."),
    max_batch: int = typer.Option(32, help="max_batch_size (capped by the engine's profile)."),
    max_queue_delay_us: int = typer.Option(1000, help="Dynamic batcher delay (microseconds)."),
    instances: int = typer.Option(1, help="Instances per device."),
    devices: Optional[str] = typer.Option(None, help="GPU indices such as 0,1: one KIND_GPU instance group each (default: KIND_CPU)."),
    engine_backend: Optional[str] = typer.Option(None, "--engine-backend", help="python: how toolkit.load runs the model inside Triton."),
) -> None:
    """Write a Triton model repository: config.pbtxt from the model's signature, the model in 1/."""
    from .serve.repository import export_triton as write_repository

    repo = write_repository(model, output, backend=backend, name=name, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
                            instances=instances, devices=_devices(devices), engine_backend=engine_backend)
    _print_signature(repo.signature)
    console.print(f"wrote {repo.model_dir} ({repo.kind}): config.pbtxt checked against Triton's ModelConfig", highlight=False)


@app.command(name="serve-bench")
def serve_bench(
    url: str = typer.Argument(..., help="A served model: grpc://HOST:8001/MODEL or http://HOST:8000/MODEL."),
    concurrency: str = typer.Option("1,8,32", help="Comma-separated client thread counts."),
    requests: int = typer.Option(256, help="Requests per concurrency level (batch 1 each)."),
    max_seconds: float = typer.Option(60.0, help="Time bound per level."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
) -> None:
    """Requests/s and p50/p99 latency against a served model, with the dynamic batcher's mean batch."""
    from .atomic import write_text
    from .serve.loadtest import HEADER, load_test, to_dict

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise InputError(f"--concurrency takes numbers such as 1,8,32, got {concurrency!r}") from None
    results = load_test(url, levels, requests, max_seconds)
    table = Table(title=f"serve-bench {url}")
    for col in HEADER:
        table.add_column(col)
    for level in results:
        table.add_row(*level.row())
    console.print(table)
    if json_path is not None:
        write_text(json_path, json.dumps({"url": url, "levels": to_dict(results)}, indent=1))


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point: ToolkitError -> one line on stderr, exit 2."""
    from .atomic import install_signal_handlers, restore_signal_handlers

    previous = install_signal_handlers()  # SIGTERM/SIGHUP/SIGINT: unfinished files removed, one line, exit 128+n
    try:
        return _main_body(argv)
    finally:
        restore_signal_handlers(previous)


def _main_body(argv: Optional[list[str]]) -> int:
    from .atomic import Interrupted
    from .errors import ToolkitError

    try:
        code = app(args=argv, standalone_mode=False)  # typer.Exit(n) comes back as the return value here
    except ToolkitError as e:
        if _state["verbose"]:
            raise
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except Interrupted as e:  # the handler already printed its line
        return int(e.code)
    except KeyboardInterrupt:
        err_console.print("rtdetr-deploy: stopped by SIGINT", highlight=False)
        return 130
    except (typer.Exit, SystemExit) as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except typer.Abort:
        return 1
    except Exception as e:  # usage errors: typer bundles its own click, so match both
        if type(e).__name__ in ("UsageError", "BadParameter", "NoSuchOption", "MissingParameter", "BadOptionUsage",
                                "BadArgumentUsage") or hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            return 2
        raise
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
