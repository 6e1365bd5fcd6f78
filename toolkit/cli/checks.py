"""Verbs that judge: compare (two models, detection by detection) and validate (every stage)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import app, console


@app.command()
def compare(
    a: str = typer.Argument(..., help="A built file (.onnx, .pt2, .ep, .buckets, .engine), served model (grpc://HOST:8001/MODEL), "
                            "checkpoint, config name, result file (detections.json) or reference bundle."),
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
    from ..checks.compare import compare as compare_backends

    result = compare_backends(a, b, images, score_threshold=score_threshold, report_dir=report, backend_a=backend_a,
                              backend_b=backend_b, device_a=device_a, device_b=device_b, save_reference_dir=save_reference)
    console.print(result.table())
    console.print(result.summary(), highlight=False, soft_wrap=True)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command()
def validate(
    checkpoint: Optional[str] = typer.Argument(None, help="Checkpoint directory, weights file, or a built file (.onnx, .pt2, .ep, "
                                               ".buckets, .engine) or served URL, judged as given against the model it records; "
                                               "omit to use --config with random weights."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Config name (or JSON path)."),
    backends: Optional[str] = typer.Option(None, help="Comma-separated stages after preprocess: torch,onnxruntime,aoti,tensorrt "
                                           "(default: torch,onnxruntime; a built file: torch and its own)."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image files or directories (default: synthetic images)."),
    workdir: Optional[Path] = typer.Option(None, help="Keep exported and built files here."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write report.json and report.md here."),
) -> None:
    """Run every stage (preprocess, torch, ONNX Runtime, built engines); name the first broken one (exit 1), or the first
    that could not be judged (exit 3)."""
    from ..checks.validate import validate as validate_stages

    chosen = tuple(b.strip() for b in backends.split(",") if b.strip()) if backends is not None else None
    result = validate_stages(checkpoint, chosen, images, workdir, config=config,
                            progress=True)
    if report is not None:
        result.write(report)
    console.print(result.table())
    if result.exit_code:
        raise typer.Exit(result.exit_code)
