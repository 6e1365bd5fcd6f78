"""CUDA graphs for any engine whose run is capturable (eager torch, AOTInductor, TensorRT).

Per input shape, the wrapped engine's ``_run`` is captured once into a graph over static input
buffers and replayed afterwards. The binder still checks every user tensor before its values are
copied into the static inputs, so a wrongly typed ``orig_target_sizes`` is converted or refused exactly
as without graphs: the seed bug stays impossible. ONNX Runtime has its own graph support
(``toolkit.load(path, cuda_graph=True)``) and is not wrapped here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EngineError
from .base import BaseEngine
from .binding import BoundInputs


@dataclass
class _Captured:
    graph: Any
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


class CudaGraphEngine(BaseEngine):
    """Replays a captured CUDA graph of ``engine`` per input shape.

    ``copy_outputs=True`` (default) returns fresh tensors; ``False`` returns the graph's static output
    buffers, which the next call overwrites (faster; the caller owns the timing of their use).
    """

    def __init__(self, engine: BaseEngine, *, copy_outputs: bool = True, warmup: int = 2) -> None:
        if engine.device.type != "cuda":
            raise EngineError(f"CUDA graphs need a CUDA engine; this {engine.backend} engine runs on {engine.device}")
        if engine.backend == "onnxruntime":
            raise EngineError("ONNX Runtime captures its own graphs: toolkit.load(path, device='cuda', cuda_graph=True)")
        if engine.backend == "aoti" and not getattr(engine, "run_single_threaded", False):
            raise EngineError("the AOTInductor runner's thread synchronization cannot be captured: load the package "
                              "with toolkit.load(path, device='cuda', cuda_graph=True) (run_single_threaded=True)")
        binder = engine.binder
        super().__init__(engine.signature, engine.device, class_names=engine.class_names, cast=binder.cast,
                         copy_to_device=binder.copy_to_device, check_values=binder.check_values)
        self.backend = engine.backend
        self.inner = engine
        self.random_weights = engine.random_weights
        self.copy_outputs = copy_outputs
        self.warmup = warmup
        self._graphs: dict[tuple, _Captured] = {}

    def _capture(self, bound: BoundInputs) -> _Captured:
        static = {k: v.clone() for k, v in bound.tensors.items()}
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # lazy initialisation (cuBLAS handles, autotuning) must happen outside capture
                self.inner._run(BoundInputs(static, bound.dims))
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self.inner._run(BoundInputs(static, bound.dims))
        except Exception as e:
            raise EngineError(f"the {self.backend} engine cannot be captured in a CUDA graph: {e.__class__.__name__}: {e}") from None
        return _Captured(graph, static, outputs)

    def _run(self, bound: BoundInputs) -> dict[str, torch.Tensor]:
        key = tuple((k, tuple(v.shape)) for k, v in sorted(bound.tensors.items()))
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(bound)
        for name, t in bound.tensors.items():
            captured.inputs[name].copy_(t, non_blocking=True)
        captured.graph.replay()
        if bound.outputs is not None:
            for name, t in captured.outputs.items():
                bound.outputs[name].copy_(t, non_blocking=True)
            return bound.outputs
        return {k: v.clone() for k, v in captured.outputs.items()} if self.copy_outputs else dict(captured.outputs)
