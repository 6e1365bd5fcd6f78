"""The ``Engine`` protocol and :func:`load`, which picks a backend from what it is given.

Every backend is a small module in :mod:`toolkit.backends` behind one base class: the base class runs
the binder (all checks live there), the backend only binds and runs. Outputs are a dict of torch
tensors named as the signature's outputs, on the engine's device, valid in the order of the current
torch stream once the call returns.
"""

from __future__ import annotations

import threading
from importlib import import_module
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from .binding import Binder, BoundInputs
from .errors import EngineError
from .signature import Signature

# backend name -> module in toolkit.backends exposing ``load(source, device, **options) -> Engine``
BACKENDS = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "torch": "torch", "aoti": "aoti",
            "torch-tensorrt": "torch_tensorrt"}
_SUFFIXES = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt", ".pt2": "aoti", ".ep": "torch-tensorrt"}


@runtime_checkable
class Engine(Protocol):
    """What every backend offers."""

    signature: Signature
    device: torch.device
    backend: str
    class_names: list[str]

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]: ...

    def __call__(self, **feeds: Any) -> dict[str, torch.Tensor]: ...


class BaseEngine:
    """Shared front half of every backend: binder checks, then the backend's ``_run``."""

    backend = "base"

    def __init__(self, signature: Signature, device: torch.device | str, *, class_names: list[str] | None = None,
                 cast: str = "safe", copy_to_device: bool = False, check_values: bool = True) -> None:
        self.signature = signature
        self.device = torch.device(device)
        self.class_names = list(class_names or [])
        self.binder = Binder(signature, self.device, cast=cast, copy_to_device=copy_to_device, check_values=check_values)
        self._local = threading.local()

    def infer(self, feeds: Mapping[str, Any], outputs: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Check ``feeds`` against the signature (raises BindingError), run, return the outputs by name.

        ``outputs``: optional pre-allocated tensors (exact dtype, shape, device, contiguous) that backends
        binding by pointer write into and return as they are; otherwise the engine allocates them.
        """
        bound = self.binder.bind(feeds)
        if outputs is not None:
            bound.outputs = self.binder.check_outputs(outputs, bound.dims)
        return self._run(bound)

    def __call__(self, **feeds: Any) -> dict[str, torch.Tensor]:
        return self.infer(feeds)

    def _run(self, bound: BoundInputs) -> dict[str, torch.Tensor]:  # pragma: no cover - every backend overrides
        raise EngineError(f"{type(self).__name__} does not implement _run")

    @staticmethod
    def _into_callers(result: dict[str, torch.Tensor], bound: BoundInputs) -> dict[str, torch.Tensor]:
        """For backends that allocate their own results: copy them into caller-provided ``outputs=`` buffers."""
        if bound.outputs is None:
            return result
        for name, t in result.items():
            bound.outputs[name].copy_(t)
        return bound.outputs

    def close(self) -> None:
        """Release what the backend holds; the engine is unusable afterwards."""

    def __enter__(self) -> "BaseEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ios = ", ".join(f"{n} {t}" for _, n, t, _ in self.signature.rows())
        return f"<{type(self).__name__} backend={self.backend} device={self.device} ({ios})>"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def detect_backend(source: Any) -> str:
    """The backend for a file (by suffix), a module, a checkpoint or a config name."""
    if isinstance(source, torch.nn.Module):
        return "torch"
    suffix = Path(str(source)).suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    return "torch"  # checkpoint directory, weights file or config name: the eager model


def load(source: Any, backend: str | None = None, device: str | torch.device | None = None, **options: Any) -> BaseEngine:
    """Load anything runnable as an :class:`Engine`.

    ``source``: ``.onnx`` (ONNX Runtime), ``.engine``/``.plan`` (TensorRT), ``.pt2`` (AOTInductor), ``.ep`` (Torch-TensorRT), an
    ``nn.Module``, checkpoint or config name (eager torch). ``options`` go to the backend and the binder
    (``cast``, ``copy_to_device``, ``check_values``; ``config`` for a weights file). ``cuda_graph=True``
    replays a CUDA graph per input shape (ONNX Runtime's own graphs, :class:`toolkit.cudagraph.CudaGraphEngine`
    for the others).
    """
    backend = backend or detect_backend(source)
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
    if not isinstance(source, torch.nn.Module) and isinstance(source, (str, Path)):
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
