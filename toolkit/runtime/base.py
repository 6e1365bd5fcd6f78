"""The ``Engine`` protocol and the base class every backend derives from: it binds inputs through the
signature (the single source of truth), runs the backend and checks the outputs.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from ..errors import EngineError
from ..signature import Signature
from .binding import Binder, BoundInputs


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
    random_weights: str | None = None  # how the weights were generated, when the artifact says they are random

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
