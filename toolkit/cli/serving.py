"""Verbs for serving on Triton Inference Server: serve, export-triton, serve-bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import InputError
from .app import _print_signature, app, console


def _devices(text: Optional[str]) -> Optional[list[int]]:
    from ..serve.repository import parse_devices

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
    from ..serve.serve import serve as serve_model

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
    from ..serve.repository import export_triton as write_repository

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
    """Requests/s and p50/p99 latency against a served model, with the dynamic batcher's mean batch (also: bench URL)."""
    load_test_report(url, concurrency, requests, max_seconds, json_path)


def load_test_report(url: str, concurrency: str, requests: int, max_seconds: float, json_path: Optional[Path]) -> None:
    """The load test of ``serve-bench`` and ``bench URL``: one table, the same JSON (url, levels)."""
    from ..atomic import write_text
    from ..serve.loadtest import HEADER, load_test, to_dict

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise InputError(f"--concurrency takes numbers such as 1,8,32, got {concurrency!r}") from None
    results = load_test(url, levels, requests, max_seconds)
    table = Table(title=f"bench {url}")
    for col in HEADER:
        table.add_column(col)
    for level in results:
        table.add_row(*level.row())
    console.print(table)
    console.print("mean batch: Triton's inference_count over execution_count during the level (the dynamic batcher's merging)",
                  highlight=False)
    if json_path is not None:
        write_text(json_path, json.dumps({"url": url, "levels": to_dict(results)}, indent=1))
