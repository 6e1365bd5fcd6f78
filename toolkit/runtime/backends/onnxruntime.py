"""ONNX Runtime behind the Engine protocol, with torch tensors bound by pointer (IOBinding).

Inputs and torch-allocated outputs are bound by ``data_ptr()`` on CPU and CUDA alike: no copies.

Streams (CUDA): the session is created with ``user_compute_stream`` set to the torch stream that was
current at load time (the engine's stream) and runs with ``disable_synchronize_execution_providers``,
so ORT's kernels are queued on that stream like any torch op and the host never waits. A call made
while another torch stream is current first makes the engine's stream wait for it, and afterwards
makes it wait for the engine's stream (events, no host synchronization). Outputs are therefore valid
in the order of the caller's current stream, exactly like the result of a torch op.

Precision: TF32 is off by default (``tf32=False``) so an fp32 file computes in fp32 on the GPU as on
the CPU; pass ``tf32=True`` for speed where TF32's 10-bit mantissa is acceptable.

Threads: ``InferenceSession.run_with_iobinding`` is thread-safe and each call builds its own binding.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ...errors import EngineError, MissingDependencyError
from ...integrity import check_onnx
from ...signature import from_onnx
from ..base import BaseEngine
from ..binding import BoundInputs, allocate_outputs


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime "
                                     "(or 'rtdetr-deploy[gpu]' for onnxruntime-gpu)") from None
    return onnxruntime


def cuda_available() -> bool:
    ort = import_onnxruntime()
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _class_names(path: Path, meta: dict[str, str]) -> list[str]:
    """The ``class_names`` metadata: a JSON list of strings, or a clear error naming the file."""
    if "class_names" not in meta:
        return []
    try:
        names = json.loads(meta["class_names"])
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}: metadata class_names is not valid JSON ({e}); re-export the file") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise EngineError(f"{path}: metadata class_names must be a JSON list of strings, got {meta['class_names'][:60]!r}; "
                          "re-export the file")
    return names


class OnnxRuntimeEngine(BaseEngine):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: torch.device, *, graph_optimization: str = "all",
                 cuda_graph: bool = False, tf32: bool = False, **options: Any) -> None:
        ort = import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise EngineError(f"{path}: no such file")
        check_onnx(path)  # a file the toolkit wrote must still be the one it wrote (size, sha256)
        try:
            signature = from_onnx(path)
        except Exception as e:
            raise EngineError(f"{path}: not a readable ONNX model ({e.__class__.__name__}: {e})") from None
        sess_options = ort.SessionOptions()
        sess_options.log_severity_level = 3
        sess_options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[graph_optimization]
        self.run_options = ort.RunOptions()
        if device.type == "cuda":
            if not cuda_available():
                raise MissingDependencyError(
                    f"device {device} asked for ONNX Runtime's CUDA execution provider, which this onnxruntime lacks "
                    f"(providers: {', '.join(ort.get_available_providers())}); pip install 'rtdetr-deploy[gpu]' "
                    "(onnxruntime-gpu), or load with device='cpu'")
            device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
            self.stream = torch.cuda.current_stream(device)
            cuda_options = {"device_id": str(device.index), "user_compute_stream": str(self.stream.cuda_stream),
                            "use_tf32": "1" if tf32 else "0"}
            if cuda_graph:
                cuda_options["enable_cuda_graph"] = "1"
            providers = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        else:
            self.stream = None
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options, providers=providers)
        except Exception as e:
            raise EngineError(f"{path}: ONNX Runtime cannot load it ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        names = _class_names(path, meta)
        super().__init__(signature, device, class_names=names, **options)
        self.random_weights = meta.get("random_weights")
        self.precision = meta.get("precision")  # as exported / quantized; None for a file the toolkit did not write
        self.warnings = [w for w in (signature.batch_warning(),) if w]
        for w in self.warnings:
            warnings.warn(f"{path}: {w}", RuntimeWarning, stacklevel=3)
        self.path = path
        self.cuda_graph = cuda_graph
        self._static: tuple[dict[str, int], BoundInputs, dict[str, torch.Tensor]] | None = None

    def _graph_buffers(self, bound: BoundInputs) -> BoundInputs:
        """ORT replays its CUDA graph on the addresses of its first run: copy into fixed buffers (one shape per engine)."""
        if self._static is None:
            static_in = {k: v.clone() for k, v in bound.tensors.items()}
            self._static = (dict(bound.dims), BoundInputs(static_in, dict(bound.dims)),
                            allocate_outputs(self.signature, bound.dims, self.device))
        dims, static, outputs = self._static
        if dims != bound.dims:
            raise EngineError(f"this ONNX Runtime engine captured a CUDA graph for {dims}; got {bound.dims}: "
                              "load one engine per batch size with cuda_graph=True")
        for k, v in bound.tensors.items():
            static.tensors[k].copy_(v)
        return BoundInputs(static.tensors, static.dims, outputs)

    def _run(self, bound: BoundInputs) -> dict[str, torch.Tensor]:
        import numpy as np

        device_type = "cuda" if self.device.type == "cuda" else "cpu"
        device_id = self.device.index or 0
        caller_outputs = bound.outputs
        if self.cuda_graph:
            bound = self._graph_buffers(bound)
        symbol, fixed = self.signature.fixed_batch_outputs()
        declared_batch_differs = any(t.shape[0] != bound.dims.get(symbol) for t in fixed)  # let ORT allocate those
        outputs = bound.outputs or (None if declared_batch_differs else allocate_outputs(self.signature, bound.dims, self.device))
        caller = torch.cuda.current_stream(self.device) if self.stream is not None else None
        if caller is not None and caller != self.stream:
            self.stream.wait_stream(caller)
        binding = self.session.io_binding()
        for spec in self.signature.inputs:
            t = bound.tensors[spec.name]
            binding.bind_input(spec.name, device_type, device_id, np.dtype(spec.dtype), tuple(t.shape), t.data_ptr())
        for spec in self.signature.outputs:
            if outputs is not None:
                t = outputs[spec.name]
                binding.bind_output(spec.name, device_type, device_id, np.dtype(spec.dtype), tuple(t.shape), t.data_ptr())
            else:
                binding.bind_output(spec.name, device_type, device_id)
        try:
            self.session.run_with_iobinding(binding, self.run_options)
        except Exception as e:  # ORT raises its own RuntimeError subclasses (Fail, InvalidArgument, RuntimeException...)
            raise EngineError(self._run_error(e, bound.dims)) from None
        if outputs is None:  # data-dependent output shapes: ORT allocated them
            outputs = {s.name: torch.from_dlpack(v.to_dlpack()) if device_type == "cuda" else torch.from_numpy(v.numpy())
                       for s, v in zip(self.signature.outputs, binding.get_outputs())}
        if caller is not None and caller != self.stream:
            caller.wait_stream(self.stream)
        if self.cuda_graph:  # the graph's buffers are reused by the next call: hand out copies
            outputs = {k: caller_outputs[k].copy_(v) if caller_outputs else v.clone() for k, v in outputs.items()}
        for t in bound.tensors.values():  # keep inputs alive until the engine's stream is done with them
            if t.is_cuda:
                t.record_stream(self.stream)
        return outputs

    def _run_error(self, error: Exception, dims: dict[str, int]) -> str:
        """ONNX Runtime's failure as one line, with the likely cause."""
        first = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
        symbol, fixed = self.signature.fixed_batch_outputs()
        if fixed:
            cause = (f"outputs {', '.join(f'{t.name} {list(t.shape)}' for t in fixed)} declare a fixed batch while this call has {symbol}={dims.get(symbol)}: the "
                     "graph was exported for one batch (torch.onnx's dynamo exporter bakes it in); run at that batch or "
                     "re-export with dynamic output axes (rtdetr-deploy export)")
        elif "shape" in first.lower() or "reshape" in first.lower():
            cause = ("a shape baked into the graph does not fit these inputs (exported at another batch or image size?); "
                     "re-export with rtdetr-deploy export, or feed the shapes it was exported with")
        else:
            cause = "the graph cannot run these inputs here; check the inputs against rtdetr-deploy inspect"
        return f"{self.path}: ONNX Runtime failed to run it ({error.__class__.__name__}: {first}). Likely cause: {cause}"


def load(source: Any, device: torch.device | None = None, **options: Any) -> OnnxRuntimeEngine:
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() and cuda_available() else torch.device("cpu")
    return OnnxRuntimeEngine(source, device, **options)


