"""Verbs for the jobs: run, bench, eval and the demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import InputError
from .app import app, console, err_console
from .stages import _inductor_options


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
    from ..tasks.run import run as run_images

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
def bench(
    model: str = typer.Argument("rtdetr_r50vd", help="Checkpoint, config name (random weights are fine for speed), a built file "
                                "(.onnx, .pt2, .ep, .buckets, .engine: timed as given) or a served model (grpc://HOST:8001/MODEL, http://...)."),
    backends: Optional[str] = typer.Option(None, help="Comma-separated backends (default: torch,onnxruntime,aoti,tensorrt,torch-compile; "
                                           "a built file: its own first, the others built from the model it records)."),
    batch: str = typer.Option("1,8,32", help="Comma-separated batch sizes."),
    precision: str = typer.Option("fp32", help="Comma-separated precisions: fp32, fp16, int8 (onnxruntime on the CPU: the quantizer's file, through its gates)."),
    cuda_graphs: str = typer.Option("off", help="off, on, or both (CUDA only)."),
    warmup: int = typer.Option(10, help="Untimed calls before timing."),
    iters: int = typer.Option(50, help="Timed calls per configuration."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the GPU if present)."),
    check_model: Optional[str] = typer.Option(None, help="Trained model each configuration must pass compare on first."),
    end_to_end: bool = typer.Option(False, "--end-to-end", help="Also measure JPEG files to outputs (GPU decode overlapped with inference): e2e img/s beside img/s."),
    workdir: Optional[Path] = typer.Option(None, help="Where built artifacts go (reused between runs)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
    plot: Optional[Path] = typer.Option(None, help="Write latency/throughput curves as PNG."),
    profile: bool = typer.Option(False, "--profile", help="CUDA: profile each measured row (top kernels, GPU-idle share) into the JSON."),
    check_images: int = typer.Option(100, help="Synthetic images for the COCO mAP part of the accuracy check (0: compare only)."),
    aoti_config: List[str] = typer.Option([], "--aoti-config", help="KEY=VALUE torch._inductor option for the AOTInductor builds (repeatable), e.g. freezing=1."),
    concurrency: str = typer.Option("1,8,32", help="A served model: comma-separated client thread counts."),
    requests: int = typer.Option(256, help="A served model: requests per concurrency level (batch 1 each)."),
    max_seconds: float = typer.Option(60.0, help="A served model: time bound per level."),
) -> None:
    """Benchmark every backend, precision and batch size in one process (CUDA events, medians); a built file as given;
    a served model: requests/s and p50/p99 latency per concurrency, with the dynamic batcher's effect."""
    from ..runtime.engine import detect_backend
    from ..tasks.bench import bench as run_bench
    from ..tasks.bench_report import TABLE_HEADER, table_rows

    if detect_backend(model) == "triton":
        from .serving import load_test_report

        return load_test_report(model, concurrency, requests, max_seconds, json_path)

    choices = {"off": (False,), "on": (True,), "both": (False, True)}
    if cuda_graphs not in choices:
        raise InputError(f"--cuda-graphs takes off, on or both, got {cuda_graphs!r}")
    graphs = choices[cuda_graphs]
    try:
        batches = [int(b) for b in batch.split(",")]
    except ValueError:
        raise InputError(f"--batch takes comma-separated batch sizes such as 1,8,32, got {batch!r}") from None
    chosen = [b.strip() for b in backends.split(",") if b.strip()] if backends is not None else None
    report = run_bench(model, backends=chosen, default_backends=("torch", "onnxruntime", "aoti", "tensorrt", "torch-compile"), batches=batches,
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
    model: str = typer.Argument(..., help="Checkpoint dir, weights file, config name, a built file (.onnx, .pt2, .ep, .buckets, "
                                ".engine) or a served model (grpc://HOST:8001/MODEL, http://HOST:8000/MODEL)."),
    data: Optional[Path] = typer.Option(None, help="COCO JSON, or a dataset root with val.json."),
    synthetic: Optional[int] = typer.Option(None, help="Evaluate on N fresh shapes images from an unseen seed (default 500)."),
    backends: Optional[str] = typer.Option(None, help="Comma-separated backends (default: those that can run MODEL: "
                                           "torch,onnxruntime for a checkpoint, the file's own for a built file, triton for a URL)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda."),
    tolerance: float = typer.Option(0.5, help="mAP points the backends may differ by."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
) -> None:
    """COCO mAP on every backend, one row each; exit 1 if the backends disagree by more than the tolerance."""
    from ..atomic import write_text
    from ..tasks.evaluate import evaluate

    if data is None and synthetic is None:
        synthetic = 500
    chosen = tuple(b for b in backends.split(",") if b) if backends is not None else None
    report = evaluate(model, data, synthetic, chosen, device, tolerance=tolerance, progress=True)
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
    from ..tasks.demo import demo as run_demo

    report = run_demo(output, device=device, eval_images=eval_images, say=lambda line: console.print(escape(line), highlight=False))
    console.print(escape(report.eval_table), highlight=False)
    console.print(f"demo {'PASS' if report.ok else 'FAIL'}: {report.output_dir / 'report.md'}")
    if not report.ok:
        raise typer.Exit(1)
