"""Verbs for the stages that write artifacts: export, inspect, build, quantize."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import InputError
from .app import _print_signature, _size, app, console, err_console


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
    auto_islands: bool = typer.Option(True, "--auto-islands/--no-auto-islands",
                                      help="fp16: keep in fp32 the nodes that overflow, then (when the detection compare with fp32 "
                                           "still disagrees) the smallest node group found by a bounded search."),
    islands_device: str = typer.Option("auto", "--islands-device",
                                       help="Where the fp16 accuracy search runs the file: cuda (ONNX Runtime CUDA, the "
                                            "kernels it will run on), cpu (fp16 emulation), or auto (cuda when available)."),
) -> None:
    """Export a model behind the deploy contract to a verified ONNX file; exit 2 (nothing written) when verify finds a
    difference or NaN/Inf, 3 (file written) when it could not judge (tied query selection)."""
    from ..export.onnx import export_onnx

    if auto_islands and precision != "fp32":  # a bad --islands-device fails before any work
        from ..checks.island_search import resolve_search_device

        islands_device = resolve_search_device(islands_device)
    result = export_onnx(checkpoint, output, config=config, opset=opset, dynamic_batch=dynamic_batch, size=_size(size),
                         sizes_dtype=sizes_dtype, simplify=simplify, verify=verify, precision=precision,
                         progress=True, fold=fold, auto_islands=auto_islands)
    if auto_islands and precision != "fp32":
        from ..checks.island_search import repair_fp16

        search = repair_fp16(result.path, say=lambda line: console.print(line, highlight=False), device=islands_device)
        result.lints.append(search.summary("fp16"))
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


@app.command()
def inspect(
    file: Path = typer.Argument(..., help=".onnx file, or an engine / .pt2 with its sidecar."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print an artifact's I/O signature and metadata; warn on int64 inputs."""
    from ..tasks.inspect import inspect_file

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
    tune: bool = typer.Option(False, "--tune", help="aoti: Inductor max-autotune (GEMM/conv templates); minutes more, cached. Slower for RT-DETR-R50 on an H100: bench it first."),
    fused_deform_attn: bool = typer.Option(False, "--fused-deform-attn", help="aoti on cuda: the deformable attention as one "
                                           "fused Triton kernel (RT-DETR; experimental)."),
) -> None:
    """Build a TensorRT / TensorRT-RTX engine from an ONNX file, or an AOTInductor .pt2 (from the ONNX's model or --model)."""
    from ..builders.build import MODEL_BUILDERS, build_engine, build_from_model
    from ..errors import InputError

    try:
        parts = tuple(int(p) for p in batch.split(","))
    except ValueError:
        parts = ()
    if static:
        return _build_static(onnx, output, backend, precision, parts or batch, model, device, fold, tune, cache,
                             fused_deform_attn)
    if len(parts) != 3:
        raise InputError(f"--batch takes MIN,OPT,MAX such as 1,4,8, got {batch!r}")
    backend, output = _build_target(backend, output, from_model=model is not None)
    extra = _model_build_options(backend, fold, tune, fused_deform_attn)
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

            from ..runtime.backends.tensorrt import MODULE_NAMES

            have_trt = any(importlib.util.find_spec(name) is not None for name in MODULE_NAMES)
            backend = "tensorrt" if have_trt else "aoti"
            console.print(f"note: building with --backend {backend}"
                          + ("" if have_trt else " (TensorRT is not installed here: an AOTInductor package)"), highlight=False)
    return backend, output if output is not None else Path(_BUILD_OUTPUTS.get(backend, "model.engine"))


def _model_build_options(backend: str, fold: bool, tune: bool, fused: bool = False) -> dict[str, Any]:
    """--no-fold / --tune / --fused-deform-attn as builder options; only the builders that compile the torch model
    take them."""
    from ..builders.aoti import TUNE_INDUCTOR_CONFIGS
    from ..builders.build import MODEL_BUILDERS

    if tune and backend != "aoti":
        raise InputError(f"--tune runs Inductor's autotuning, for --backend aoti; {backend} tunes in its own builder")
    if fused and backend != "aoti":
        raise InputError(f"--fused-deform-attn compiles a Triton kernel into an AOTInductor package (--backend aoti), not {backend}")
    if backend not in MODEL_BUILDERS:
        if not fold:
            raise InputError(f"--no-fold is for the builders that compile the torch model ({', '.join(MODEL_BUILDERS)}); "
                             "for a TensorRT engine export the ONNX with 'rtdetr-deploy export --no-fold'")
        return {}
    return {**({"fold": False} if not fold else {}), **({"inductor_configs": dict(TUNE_INDUCTOR_CONFIGS)} if tune else {}),
            **({"fused_deform_attn": True} if fused else {})}


def _build_static(onnx: Optional[Path], output: Path, backend: str, precision: str, sizes: Any, model: Optional[str],
                  device: Optional[str], fold: bool, tune: bool, cache: bool, fused: bool = False) -> None:
    """build --static: one static package per batch size behind a .buckets manifest."""
    import torch

    from ..builders.buckets import build_buckets
    from ..builders.build import model_for_onnx

    if not isinstance(sizes, tuple):
        raise InputError(f"--batch with --static takes the bucket sizes such as 1,8,32, got {sizes!r}")
    options = _model_build_options(backend, fold, tune, fused)
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
    from ..errors import InputError

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--aoti-config takes KEY=VALUE, got {pair!r}")
        low = value.lower()
        options[key] = True if low in ("1", "true") else False if low in ("0", "false") else int(value) if value.isdigit() else value
    return options


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
    auto_islands: bool = typer.Option(True, "--auto-islands/--no-auto-islands",
                                      help="When the INT8 graph disagrees with fp32, search for the nodes to keep fp32 (bounded)."),
) -> None:
    """Post-training INT8 that is faster and as accurate as fp32, or refused with the figures (exit 1)."""
    from ..atomic import write_text
    from ..tasks.quantize import QuantizationRefused
    from ..tasks.quantize import quantize as run_quantize

    parts = [e for item in exclude for e in item.split(",") if e.strip()]
    try:
        report = run_quantize(model, output, calib, synthetic, method=method, exclude=parts, activations=activations, scope=scope,
                              eval_data=eval_data, eval_synthetic=eval_synthetic, max_map_drop=max_map_drop,
                              min_speedup=min_speedup, force=force, auto_islands=auto_islands, say=lambda line: console.print(line, highlight=False))
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
