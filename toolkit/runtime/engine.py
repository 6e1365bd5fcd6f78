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
            "torch-tensorrt": "torch_tensorrt", "triton": "triton"}
_SUFFIXES = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt", ".pt2": "aoti", ".ep": "torch-tensorrt"}


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


def load(source: Any, backend: str | None = None, device: str | torch.device | None = None, **options: Any) -> BaseEngine:
    """Load anything runnable as an :class:`Engine`.

    ``source``: ``.onnx`` (ONNX Runtime), ``.engine``/``.plan`` (TensorRT), ``.pt2`` (AOTInductor), ``.ep`` (Torch-TensorRT), an
    ``nn.Module``, checkpoint or config name (eager torch), ``grpc://host:8001/MODEL`` or ``http://host:8000/MODEL``
    (a model served by Triton: its signature comes from the server's metadata). ``options`` go to the backend and the binder
    (``cast``, ``copy_to_device``, ``check_values``; ``config`` for a weights file). ``cuda_graph=True``
    replays a CUDA graph per input shape (ONNX Runtime's own graphs, :class:`toolkit.runtime.cudagraph.CudaGraphEngine`
    for the others).
    """
    backend = backend or detect_backend(source)
    if backend not in BACKENDS:
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
    module = import_module(f".backends.{BACKENDS[backend]}", __package__)
    graph = backend != "onnxruntime" and bool(options.pop("cuda_graph", False))  # ONNX Runtime captures its own
    if graph and backend == "aoti":
        options["run_single_threaded"] = True  # the default AOTI runner synchronizes in ways stream capture refuses
    engine = module.load(source, device=torch.device(device) if device is not None else None, **options)
    if graph:
        from .cudagraph import CudaGraphEngine

        engine = CudaGraphEngine(engine)
    return engine
