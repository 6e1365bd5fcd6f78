"""TensorRT (8.6, 10, 11) and TensorRT-RTX engines behind the Engine protocol, thin.

The signature is read from the engine itself (``get_tensor_dtype``/``get_tensor_shape``/profile), never from
the tensors that arrive: TensorRT reads raw bytes at a bound address as the dtype *it* declares, which is
how an int64 ``orig_target_sizes`` bound to TensorRT 8's int32 input turned every y coordinate into 0
(lyuwenyu/RT-DETR#364). All checks and lossless conversions happen in the shared :class:`~toolkit.runtime.binding.Binder`
before any pointer reaches TensorRT; this module only binds, runs, and turns every False/None that
TensorRT returns into an :class:`~toolkit.errors.EngineError` carrying the logged TensorRT errors.

Streams: the engine is enqueued on the caller's current torch stream, so outputs are valid in that
stream's order, like a torch op. Inputs the binder converted were allocated on that stream, so torch's
caching allocator does not reuse them before TensorRT has read them.

Threads: one execution context per thread (a context holds shapes and addresses, it is not thread-safe).

The module is imported lazily: ``tensorrt``, else ``tensorrt_rtx``, else ``tensorrt_rtx_bindings`` (same
API). ``trt_module=`` injects another module, e.g. :func:`toolkit.testing.make_fake_tensorrt` (CPU tensors).
"""

from __future__ import annotations

import importlib
import logging
import threading
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import torch

from ... import dtypes
from ...errors import EngineError, MissingDependencyError
from ...signature import Signature, TensorSpec
from ..base import BaseEngine
from ..binding import BoundInputs
from ..sidecar import read_sidecar

INSTALL_HINT = "pip install 'rtdetr-deploy[tensorrt]'"
MODULE_NAMES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")
FAKE_LIBRARY = "fake-tensorrt"
_log = logging.getLogger("toolkit.tensorrt")


def import_tensorrt(trt_module: Any = None, names: tuple[str, ...] = MODULE_NAMES) -> Any:
    """The TensorRT module: ``trt_module`` if given, else the first of ``names`` that imports."""
    if trt_module is not None:
        return trt_module
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError(f"TensorRT is not installed (tried to import {', '.join(names)}): {INSTALL_HINT} "
                                 "(TensorRT-RTX: pip install tensorrt-rtx); without TensorRT, build with --backend aoti")


def is_fake(trt: Any) -> bool:
    """True for the test double (:mod:`toolkit.testing.fake_tensorrt`)."""
    return bool(getattr(trt, "FAKE", False))


def library_name(trt: Any) -> str:
    if is_fake(trt):
        return FAKE_LIBRARY
    name = getattr(trt, "__name__", "tensorrt")
    return "tensorrt_rtx" if name.startswith("tensorrt_rtx") else name


def library_version(trt: Any) -> str:
    return str(getattr(trt, "__version__", "unknown"))


def running_gpu(trt: Any, device: torch.device | None = None) -> tuple[str | None, str | None]:
    """(GPU name, compute capability "9.0") this library runs on: the double's fake GPU, else torch.cuda, else Nones."""
    if is_fake(trt):
        return str(trt.fake_gpu_name), str(trt.fake_compute_capability)
    if torch.cuda.is_available():
        index = device.index if device is not None and device.type == "cuda" and device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return torch.cuda.get_device_name(index), f"{major}.{minor}"
    return None, None


def make_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that records every message (last 500), forwarding warnings/errors to ``logging``."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.records: deque[tuple[int, str]] = deque(maxlen=500)
            self.count = 0
            self._lock = threading.Lock()

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)
            with self._lock:
                self.records.append((level, str(msg)))
                self.count += 1
            if level <= 1:
                _log.error("[TRT] %s", msg)
            elif level == 2:
                _log.warning("[TRT] %s", msg)
            else:
                _log.debug("[TRT] %s", msg)

        def mark(self) -> int:
            return self.count

        def errors(self, since: int = 0, max_severity: int = 1) -> list[str]:
            """Messages at ERROR (or ``max_severity``) and worse logged since ``mark()`` returned ``since``."""
            with self._lock:
                recent = list(self.records)[-(self.count - since):] if self.count > since else []
            return [m for s, m in recent if s <= max_severity]

    return CapturingLogger()


def format_log(lines: list[str]) -> str:
    return (" TensorRT said: " + " | ".join(lines)) if lines else " (TensorRT logged no error)"


class TensorRTEngine(BaseEngine):
    """A deserialized TensorRT engine; its signature comes from the engine, preprocessing/classes from the sidecar."""

    backend = "tensorrt"

    def __init__(self, path: str | Path, device: torch.device | None = None, *, trt_module: Any = None, **options: Any) -> None:
        path = Path(path)
        if not path.is_file():
            raise EngineError(f"{path}: no such engine file")
        data = path.read_bytes()
        if not data:
            raise EngineError(f"{path} is empty (0 bytes), probably from an interrupted build or copy; rebuild it with "
                              "'rtdetr-deploy build model.onnx -o model.engine'")
        meta = read_sidecar(path)  # the file is checked against its sidecar before any library parses it
        try:
            trt = import_tensorrt(trt_module)
        except MissingDependencyError as e:
            raise MissingDependencyError(f"{path} is a TensorRT engine, and {e}; or run the ONNX it was built from "
                                         "(rtdetr-deploy run model.onnx), or build a .pt2 with 'rtdetr-deploy build "
                                         "model.onnx --backend aoti -o model.pt2'") from None
        self._trt = trt
        self._fake = is_fake(trt)
        device = self._pick_device(device)
        self._check_sidecar(path, meta, device)
        self._logger = make_logger(trt)
        mark = self._logger.mark()
        self._runtime = trt.Runtime(self._logger)
        if self._fake:
            engine = self._runtime.deserialize_cuda_engine(data)
        else:
            with torch.cuda.device(device):
                engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(
                f"{path}: TensorRT {library_version(trt)} could not deserialize this engine. Likely causes: the file is not a "
                f"TensorRT engine; it was built by another TensorRT version (sidecar: {meta.get('library')} "
                f"{meta.get('library_version')}); or for another GPU (sidecar: compute capability {meta.get('compute_capability')}, "
                f"this GPU: {running_gpu(trt, device)[1]}). Rebuild it on this machine with 'rtdetr-deploy build'."
                + format_log(self._logger.errors(mark)))
        self._engine = engine
        signature = self._signature_from_engine(path, engine, meta)
        super().__init__(signature, device, class_names=meta.get("class_names"), **options)
        self.random_weights = meta.get("random_weights")
        self.path = path
        self.metadata = meta
        self._contexts: list[Any] = []
        self._contexts_lock = threading.Lock()

    # -- loading ---------------------------------------------------------------------------------------
    def _pick_device(self, device: torch.device | None) -> torch.device:
        if self._fake:
            if device is not None and device.type != "cpu":
                raise EngineError(f"the TensorRT test double runs on host memory; load with device='cpu', not {device}")
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise EngineError("TensorRT engines run on a CUDA GPU and torch.cuda.is_available() is False here; run the "
                              "ONNX file with ONNX Runtime instead (toolkit.load('model.onnx'))")
        if device is None:
            return torch.device("cuda", torch.cuda.current_device())
        if device.type != "cuda":
            raise EngineError(f"TensorRT engines run on a CUDA device, got device={device}; use device='cuda'")
        return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())

    def _check_sidecar(self, path: Path, meta: dict[str, Any], device: torch.device) -> None:
        trt = self._trt
        lib, ver = library_name(trt), library_version(trt)
        built_lib, built_ver = meta.get("library"), meta.get("library_version")
        if built_lib and (built_lib == FAKE_LIBRARY) != self._fake:
            raise EngineError(f"{path} was built with {built_lib} {built_ver}, this is {lib} {ver}; rebuild it with this library")
        if built_ver and built_ver != ver:
            raise EngineError(f"{path} was built with {built_lib} {built_ver}, this is {lib} {ver}: TensorRT engines only run "
                              "on the version that built them; rebuild with 'rtdetr-deploy build' here")
        gpu, cc = running_gpu(trt, device)
        built_cc = meta.get("compute_capability")
        if built_cc and cc and str(built_cc) != cc:
            raise EngineError(f"{path} was built for compute capability {built_cc} ({meta.get('gpu_name')}), this GPU "
                              f"({gpu}) is {cc}: TensorRT engines only run on the GPU architecture that built them; "
                              "rebuild with 'rtdetr-deploy build' on this machine")

    def _signature_from_engine(self, path: Path, engine: Any, meta: dict[str, Any]) -> Signature:
        trt = self._trt
        side = Signature.from_dict(meta["signature"]) if isinstance(meta.get("signature"), dict) else None
        side_specs = {t.name: t for t in side.inputs + side.outputs} if side else {}
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        bounds: dict[str, tuple[int, int | None]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            if mode == trt.TensorIOMode.NONE:
                continue
            try:
                dtype = dtypes.from_trt(engine.get_tensor_dtype(name)).name
            except ValueError as e:
                raise EngineError(f"{path}: tensor {name}: {e}; the toolkit binds float32, float16, bfloat16, int64, int32, "
                                  "int8, uint8 and bool tensors") from None
            known = side_specs.get(name)
            shape: list[int | str] = []
            for axis, d in enumerate(engine.get_tensor_shape(name)):
                if int(d) >= 0:
                    shape.append(int(d))
                    continue
                sym = known.shape[axis] if known is not None and axis < len(known.shape) and isinstance(known.shape[axis], str) else None
                shape.append(sym or ("N" if axis == 0 else f"{name}_dim{axis}"))
            if known is not None and known.dtype != dtype:
                warnings.warn(f"{path}: the engine declares {name} as {dtype} but its sidecar says {known.dtype}; trusting the "
                              "engine (the sidecar may come from another build)", stacklevel=3)
            spec = TensorSpec(name, dtype, tuple(shape))
            if mode == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                if any(isinstance(d, str) for d in shape):
                    profile = engine.get_tensor_profile_shape(name, 0)
                    if not profile or len(profile) != 3:
                        raise EngineError(f"{path}: input {name} has dynamic dims but no optimization profile 0"
                                          + format_log(self._logger.errors()))
                    lo_shape, _, hi_shape = (list(p) for p in profile)
                    for axis, d in enumerate(shape):
                        if isinstance(d, str):
                            lo, hi = int(lo_shape[axis]), int(hi_shape[axis])
                            if d in bounds:
                                old_lo, old_hi = bounds[d]
                                lo, hi = max(lo, old_lo), min(hi, old_hi if old_hi is not None else hi)
                            bounds[d] = (lo, hi)
            else:
                outputs.append(spec)
        return Signature(tuple(inputs), tuple(outputs), bounds, side.preprocess if side else None)

    # -- running ---------------------------------------------------------------------------------------
    def _context(self) -> Any:
        ctx = getattr(self._local, "context", None)
        if ctx is None:
            mark = self._logger.mark()
            ctx = self._engine.create_execution_context()
            if ctx is None:
                raise EngineError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)"
                                  + format_log(self._logger.errors(mark)))
            self._local.context = ctx
            with self._contexts_lock:
                self._contexts.append(ctx)
        return ctx

    def _run(self, bound: BoundInputs) -> dict[str, torch.Tensor]:
        if self._engine is None:
            raise EngineError(f"{self.path}: the engine was closed")
        ctx = self._context()
        mark = self._logger.mark()
        keep = []
        for spec in self.signature.inputs:
            t = bound.tensors[spec.name]
            if not ctx.set_input_shape(spec.name, tuple(t.shape)):
                raise EngineError(f"TensorRT refused shape {list(t.shape)} for input {spec.name} (engine: {spec.describe()}, "
                                  f"bounds {self.signature.dim_bounds})" + format_log(self._logger.errors(mark)))
            if t.numel() == 0:  # TensorRT rejects a NULL address even for an empty tensor [CB]: bind a placeholder
                t = torch.empty(1, dtype=t.dtype, device=t.device)
                keep.append(t)
            if not ctx.set_tensor_address(spec.name, t.data_ptr()):
                raise EngineError(f"TensorRT refused the address of input {spec.name}" + format_log(self._logger.errors(mark)))
        outputs = bound.outputs
        if outputs is None:
            outputs = {}
            for spec in self.signature.outputs:
                shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
                if any(d < 0 for d in shape):
                    raise EngineError(f"output {spec.name} has a data-dependent shape {list(shape)} that the toolkit cannot "
                                      "allocate before running; export with a fixed top-K")
                outputs[spec.name] = torch.empty(shape, dtype=dtypes.get(spec.dtype).torch, device=self.device)
        for spec in self.signature.outputs:
            t = outputs[spec.name]
            if t.numel() == 0:
                t = torch.empty(1, dtype=t.dtype, device=t.device)
                keep.append(t)
            if not ctx.set_tensor_address(spec.name, t.data_ptr()):
                raise EngineError(f"TensorRT refused the address of output {spec.name}" + format_log(self._logger.errors(mark)))
        stream = 0 if self._fake else torch.cuda.current_stream(self.device).cuda_stream
        if not ctx.execute_async_v3(stream):
            raise EngineError(f"TensorRT execute_async_v3 failed for {self.path} with inputs "
                              + ", ".join(f"{n} {list(t.shape)}" for n, t in bound.tensors.items())
                              + format_log(self._logger.errors(mark)))
        return dict(outputs)

    def close(self) -> None:
        with self._contexts_lock:
            self._contexts.clear()
        self._local = threading.local()
        self._engine = None
        self._runtime = None


def load(source: Any, device: torch.device | None = None, trt_module: Any = None, **options: Any) -> TensorRTEngine:
    """Load a serialized engine (``.engine``/``.plan`` with its ``.json`` sidecar); ``trt_module`` injects a TensorRT module."""
    return TensorRTEngine(source, device, trt_module=trt_module, **options)
