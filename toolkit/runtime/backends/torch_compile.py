"""``torch.compile`` behind the Engine protocol: the peer a user would pick instead of a deployment build.

The deploy model as every build gets it (BatchNorm folded, position embedding precomputed:
:func:`toolkit.models.fold.fold_model`), its network body in ``precision`` with half weights (not autocast),
channels_last on CUDA, compiled with ``torch.compile(mode="reduce-overhead", dynamic=False)``: static shapes,
Inductor kernels and CUDA graphs, one compile per input shape, at its first call. The seconds each compile took
are kept apart in :attr:`TorchCompileEngine.compile_s` so that a benchmark reports them beside, never inside,
its timings.

The graphs that reduce-overhead captures reuse their output memory on the next call, so outputs are copied
out (three small tensors) before they are returned. The engine captures its own CUDA graphs: ``cuda_graph=True``
adds nothing (:func:`toolkit.runtime.engine.load` leaves it out). Not thread-safe (one compiled callable).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from ... import numerics
from ...errors import EngineError
from ...models.contract import PRECISIONS, DeployModel, ReducedPrecision
from ...models.fold import fold_model
from ...models.loading import load_model
from ...signature import INPUT_IMAGES, INPUT_SIZES, OUTPUTS
from ..base import BaseEngine, default_device
from ..binding import BoundInputs

COMPILE_BACKEND = "inductor"
"""The ``torch.compile`` backend; tests on a CPU set ``"aot_eager"`` (no C++ compile, the same graph capture)."""
MODE = "reduce-overhead"


class _Body(nn.Module):
    """The network body in ``dtype`` (half weights), channels_last images where convolutions prefer it."""

    def __init__(self, deploy: DeployModel, dtype: torch.dtype, channels_last: bool) -> None:
        super().__init__()
        self.inner = ReducedPrecision(deploy, dtype)
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.inner(images, sizes)


class TorchCompileEngine(BaseEngine):
    """A :class:`~toolkit.models.contract.DeployModel` compiled by ``torch.compile`` (see the module docstring).

    ``precision``: fp32 (exact: TF32 off unless ``tf32=True``), fp16 or bf16 (CUDA). ``fold``: fold the model
    first (default). ``mode``: the ``torch.compile`` mode (ignored by backends other than Inductor).
    ``cuda_graph`` is accepted and changes nothing: reduce-overhead captures CUDA graphs itself.
    """

    backend = "torch-compile"

    def __init__(self, model: DeployModel, device: torch.device, *, precision: str = "fp32", fold: bool = True,
                 mode: str = MODE, tf32: bool = False, cuda_graph: bool = False, **options: Any) -> None:
        if precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and device.type != "cuda":
            raise EngineError(f"{precision} torch.compile is for CUDA; on {device.type} use precision='fp32'")
        model = model.eval()
        deploy, self.fold = fold_model(model) if fold else (copy.deepcopy(model), None)  # a copy either way
        inner = getattr(deploy.model, "model", None)
        if getattr(inner, "anchors", None) is not None:  # plain attributes, not buffers: .to() leaves them on the CPU
            inner.anchors, inner.valid_mask = inner.anchors.to(device), inner.valid_mask.to(device)
        body = _Body(deploy, PRECISIONS[precision], channels_last=device.type == "cuda").to(device).eval()
        if device.type == "cuda":
            body = body.to(memory_format=torch.channels_last)
        self.precision, self.tf32 = precision, tf32
        kwargs: dict[str, Any] = {"mode": mode} if COMPILE_BACKEND == "inductor" else {}
        self.compiled = torch.compile(body, backend=COMPILE_BACKEND, dynamic=False, **kwargs)
        self._copy_out = device.type == "cuda" and COMPILE_BACKEND == "inductor" and "reduce-overhead" in mode
        self.compile_s: dict[tuple[int, ...], float] = {}  # input shape -> seconds its first (compiling) call took
        super().__init__(model.signature(), device, class_names=model.class_names, **options)

    def _run(self, bound: BoundInputs) -> dict[str, torch.Tensor]:
        images, sizes = bound.tensors[INPUT_IMAGES], bound.tensors[INPUT_SIZES]
        shape = tuple(images.shape)
        first = shape not in self.compile_s
        start = time.perf_counter()
        with torch.inference_mode(), numerics.tf32(self.tf32):
            if self._copy_out:
                torch.compiler.cudagraph_mark_step_begin()
            out = self.compiled(images, sizes)
            if self._copy_out:
                out = tuple(t.clone() for t in out)
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_s[shape] = time.perf_counter() - start
        return self._into_callers(dict(zip(OUTPUTS, out)), bound)

    def close(self) -> None:
        self.compiled = None


def load(source: Any, device: torch.device | None = None, config: str | None = None, **options: Any) -> TorchCompileEngine:
    return TorchCompileEngine(load_model(source, config=config), device or default_device(), **options)
