"""The ``Engine`` protocol and :func:`load`, which picks a backend from what it is given.

Every backend is a small module in :mod:`toolkit.runtime.backends` behind one base class: the base class runs
the binder (all checks live there), the backend only binds and runs. Outputs are a dict of torch
tensors named as the signature's outputs, on the engine's device, valid in the order of the current
torch stream once the call returns.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from ..errors import EngineError
from .base import BaseEngine

# backend name -> module in toolkit.runtime.backends exposing ``load(source, device, **options) -> Engine``
BACKENDS = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "torch": "torch", "aoti": "aoti",
            "torch-tensorrt": "torch_tensorrt", "torch-compile": "torch_compile",
            "triton": "triton"}
_SUFFIXES = {".buckets": "buckets", ".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt", ".pt2": "aoti", ".ep": "torch-tensorrt"}


def detect_backend(source: Any) -> str:
    """The backend for a file (by suffix), a module, a checkpoint or a config name."""
    if isinstance(source, torch.nn.Module):
        return "torch"
    if isinstance(source, str) and source.split("://", 1)[0].lower() in ("grpc", "http") and "://" in source:
        return "triton"  # a model served by Triton Inference Server
    suffix = Path(str(source)).suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    return "torch"  # checkpoint directory, weights file or config name: the eager model


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """``cpu``, ``cuda``, ``cuda:1``... as a torch.device; anything else is an :class:`EngineError` naming it."""
    if device is None or isinstance(device, torch.device):
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise EngineError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise EngineError(f"device {device!r} is not supported here; use cpu, cuda or cuda:N")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} asked for a CUDA GPU, and this torch sees none; use --device cpu")
    return parsed


def load(source: Any, backend: str | None = None, device: str | torch.device | None = None, **options: Any) -> BaseEngine:
    """Load anything runnable as an :class:`Engine`.

    ``source``: ``.onnx`` (ONNX Runtime), ``.engine``/``.plan`` (TensorRT), ``.pt2`` (AOTInductor), ``.ep`` (Torch-TensorRT),
    ``.buckets`` (static packages per batch size: :mod:`toolkit.runtime.buckets`), an ``nn.Module``, checkpoint or
    config name (eager torch; ``backend="torch-compile"`` compiles it with ``torch.compile``), ``grpc://host:8001/MODEL`` or
    ``http://host:8000/MODEL`` (a model served by Triton: its signature comes from the server's metadata). ``options`` go to the backend and the binder
    (``cast``, ``copy_to_device``, ``check_values``; ``config`` for a weights file). ``cuda_graph=True``
    replays a CUDA graph per input shape (ONNX Runtime's own graphs, :class:`toolkit.runtime.cudagraph.CudaGraphEngine`
    for the others). A file the toolkit wrote is first checked against its recorded size and sha256
    (:mod:`toolkit.integrity`): a changed file raises :class:`~toolkit.errors.IntegrityError` naming it.
    """
    parse_device(device)  # an unknown device is an error before anything is read
    backend = backend or detect_backend(source)
    if backend not in BACKENDS and backend != "buckets":
        raise EngineError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
    if backend == "triton" or detect_backend(source) == "triton":
        if backend != "triton" or detect_backend(source) != "triton":
            raise EngineError(f"{source}: the triton backend takes a grpc:// or http:// URL, and a URL needs the triton backend")
    elif not isinstance(source, torch.nn.Module) and isinstance(source, (str, Path)):
        p = Path(source)
        if p.suffix.lower() in _SUFFIXES and not p.exists():
            raise EngineError(f"{p}: no such file")
        if p.suffix.lower() in _SUFFIXES and _SUFFIXES[p.suffix.lower()] != backend and backend != "torch":
            raise EngineError(f"{p} is a {_SUFFIXES[p.suffix.lower()]} file; it cannot be loaded by the {backend} backend")
    if backend == "buckets":
        return _load_buckets(Path(source), device, options)
    module = import_module(f".backends.{BACKENDS[backend]}", __package__)
    # ONNX Runtime and torch.compile (reduce-overhead) capture their own CUDA graphs
    graph = backend not in ("onnxruntime", "torch-compile") and bool(options.pop("cuda_graph", False))
    if graph and backend == "aoti":
        options["run_single_threaded"] = True  # the default AOTI runner synchronizes in ways stream capture refuses
    engine = module.load(source, device=parse_device(device), **options)
    if graph:
        from .cudagraph import CudaGraphEngine

        engine = CudaGraphEngine(engine)
    return engine


def _load_buckets(path: Path, device: str | torch.device | None, options: dict[str, Any]) -> BaseEngine:
    """A ``.buckets`` manifest: every static package it names (loaded with ``options``, ``cuda_graph`` included)
    behind one :class:`toolkit.runtime.buckets.BucketEngine`, whose binder takes the binder options too."""
    from .buckets import BucketEngine, read_manifest

    meta = read_manifest(path)
    engines = {b: load(p, backend=meta.get("inner_backend"), device=device, **options) for b, p in meta["buckets"].items()}
    return BucketEngine(engines, **{k: options[k] for k in ("cast", "copy_to_device", "check_values") if k in options})
