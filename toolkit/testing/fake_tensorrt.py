"""A faithful TensorRT test double: the subset of the ``tensorrt`` Python API the toolkit calls, on CPU.

``make_fake_tensorrt(version)`` returns a module-like object for TensorRT ``"8.6"``, ``"10"`` or ``"11"``.
Pass it wherever the toolkit accepts ``trt_module=`` (``toolkit.load``, ``toolkit.builders.build.build_engine``), or
use it directly in your own CPU tests of code written against TensorRT.

What it copies from TensorRT (reference keys are those of ``TENSORRT.md``, whose list gives the URLs):

* The engine is "built" from an ONNX graph by the same calls as the real library (Builder, network flags,
  OnnxParser, BuilderConfig, optimization profiles, timing cache, progress monitor) and "runs" that graph in
  ONNX Runtime on CPU. The serialized plan holds the ONNX bytes, the I/O types TensorRT would declare, the
  profile, a version tag and a fake compute capability; a plan from another version or GPU deserializes to
  ``None`` with the logged error, like a real plan [I-V8] [I-V10] [I-CC].
* **Raw memory, typed by the engine.** ``execute_async_v3`` reads each input from its bound address as
  ``shape x itemsize`` bytes of the dtype the *engine* declares (``get_tensor_dtype``) and writes outputs
  the same way, never looking at the caller's tensor: the ``tensorrt`` API only ever sees an ``int``
  address [H11] [I-RT]. Bind CPU memory (``tensor.data_ptr()`` of a CPU tensor): the double runs on the host.
* **Version "8.6"** narrows every ONNX INT64 graph input/output (and intermediate) to INT32 and DOUBLE to
  FLOAT, as onnx-tensorrt 8.6's ``convertDtype`` does [O86] [O86MI]: an int64 ``[[640, 640]]`` bound there is
  read as ``[[640, 0]]``, the zero-coordinate bug. "10"/"11" keep the ONNX dtypes and warn about INT64 I/O [O10] [O10U].
* Misuse never raises at run time: ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3`` and
  ``deserialize_cuda_engine`` return False/None and log at ERROR [H11] [CB] [W114]; a rejected shape keeps
  the previous one [CB]; a failed execution leaves outputs untouched [CB]; unknown names give FLOAT/NONE [H11] [W114].
* Enum members absent in the emulated version raise AttributeError like the real enums (11 has no
  ``BuilderFlag.FP16`` nor ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``) [W114] [M11PY].
* ``IOptimizationProfile.set_shape`` raises RuntimeError on inconsistent shapes [P11] [W114].

Not emulated: CUDA streams (any ``int`` handle is accepted and the call is synchronous), device memory,
output allocators (data-dependent output shapes), plugins, refit, INT8 calibration, weak-typing kernel choice
(an ``FP16`` flag is recorded but the double computes in the graph's types).
"""

from __future__ import annotations

import ctypes
import enum
import json
import struct
import sys
import threading
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np

_FULL_VERSIONS = {"8.6": "8.6.1", "10": "10.16.0", "11": "11.4.0"}
_MAGIC = b"FAKETRT\x00"
FAKE_GPU_NAME = "Fake GPU (rtdetr-deploy TensorRT double: ONNX Runtime on CPU)"

# DataType members (name, value, itemsize, first major version) [HB] [I1016] [W114] [PFT]
_DATATYPES = [("FLOAT", 0, 4, 8), ("HALF", 1, 2, 8), ("INT8", 2, 1, 8), ("INT32", 3, 4, 8), ("BOOL", 4, 1, 8),
              ("UINT8", 5, 1, 8), ("FP8", 6, 1, 8), ("BF16", 7, 2, 10), ("INT64", 8, 8, 10), ("INT4", 9, 0.5, 10),
              ("FP4", 10, 0.5, 10), ("E8M0", 11, None, 10)]
_ITEMSIZE = {n: s for n, _, s, _ in _DATATYPES}
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
          "UINT8": np.uint8, "INT64": np.int64}
# ONNX TensorProto element type -> TensorRT DataType name, as the parser maps graph tensors [O86] [O10]
_ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16", 11: "FLOAT", 7: "INT64", 6: "INT32", 3: "INT8", 2: "UINT8", 9: "BOOL"}
_ONNX_NUMPY = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32, 3: np.int8, 2: np.uint8, 9: np.bool_}

# BuilderFlag members per major version; 11.4 values from the wheel [W114]; 8.6/10 from their pyCore [P86] [P1016].
_BUILDER_FLAGS = {
    8: ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
        "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO",
        "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8"],
    10: ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
         "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO",
         "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8", "ERROR_ON_TIMING_CACHE_MISS",
         "BF16", "DISABLE_COMPILATION_CACHE", "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING", "INT4",
         "REFIT_INDIVIDUAL", "STRICT_NANS", "MONITOR_MEMORY", "FP4", "EDITABLE_TIMING_CACHE"],
}
_BUILDER_FLAGS_11 = {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7,
                     "SAFETY_SCOPE": 8, "DIRECT_IO": 11, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13,
                     "ERROR_ON_TIMING_CACHE_MISS": 15, "DISABLE_COMPILATION_CACHE": 17, "STRIP_PLAN": 18,
                     "REFIT_IDENTICAL": 19, "WEIGHT_STREAMING": 20, "REFIT_INDIVIDUAL": 22, "STRICT_NANS": 23,
                     "MONITOR_MEMORY": 24, "EDITABLE_TIMING_CACHE": 26, "DISTRIBUTIVE_INDEPENDENCE": 27}
# NetworkDefinitionCreationFlag per major [P86] [D1016] [W114]
_NETWORK_FLAGS = {8: {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1},
                  10: {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3},
                  11: {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}}
_MEMORY_POOLS = {8: ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM", "TACTIC_DRAM"],
                 10: ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM", "TACTIC_DRAM", "TACTIC_SHARED_MEMORY"]}
_PARSER_ERRORS = ["SUCCESS", "INTERNAL_ERROR", "MEM_ALLOC_FAILED", "MODEL_DESERIALIZE_FAILED", "INVALID_VALUE", "INVALID_GRAPH",
                  "INVALID_NODE", "UNSUPPORTED_GRAPH", "UNSUPPORTED_NODE", "UNSUPPORTED_NODE_ATTR", "UNSUPPORTED_NODE_INPUT",
                  "UNSUPPORTED_NODE_DATATYPE", "UNSUPPORTED_NODE_DYNAMIC", "UNSUPPORTED_NODE_SHAPE", "REFIT_FAILED"]


class _DataTypeBase(int):
    """``DataType.itemsize`` is a Python property (8.6+); None for E8M0 as in the 11.4 table [I86] [W114]."""

    @property
    def itemsize(self) -> float | int | None:
        return _ITEMSIZE[self.name]  # type: ignore[attr-defined]


class Severity(enum.IntEnum):
    """``ILogger.Severity`` [W114]."""

    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class TensorIOMode(enum.IntEnum):
    """NONE for a name that is not an I/O tensor [H11] [W114]."""

    NONE = 0
    INPUT = 1
    OUTPUT = 2


class TensorLocation(enum.IntEnum):
    DEVICE = 0
    HOST = 1


class ILogger:
    """Base class for Python loggers: subclass, call ``ILogger.__init__(self)``, implement ``log(severity, msg)`` [W114]."""

    Severity = Severity

    def __init__(self) -> None:
        pass

    def log(self, severity: Severity, msg: str) -> None:  # pragma: no cover - subclasses implement it
        raise NotImplementedError


for _s in Severity:
    setattr(ILogger, _s.name, _s)


class Logger(ILogger):
    """``trt.Logger(min_severity=WARNING)``: prints ``[TRT] [E] ...`` lines to stderr [W114] [I-CC2]."""

    def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity: Severity, msg: str) -> None:
        if severity <= self.min_severity:
            print(f"[TRT] [{'FEWIV'[int(severity)]}] {msg}", file=sys.stderr)


class Dims(tuple):
    """``trt.Dims`` behaves like a tuple of ints; -1 marks a dynamic dim [W114]."""

    @property
    def nbDims(self) -> int:  # noqa: N802 - TensorRT's name
        return len(self)


class IHostMemory(bytes):
    """Serialized plans and timing caches: a buffer (``bytes(mem)``, ``memoryview(mem)``) with ``nbytes`` [P11]."""

    @property
    def nbytes(self) -> int:
        return len(self)


class _Lib:
    """The emulated library: version, GPU, enums."""

    def __init__(self, version: str, compute_capability: tuple[int, int], gpu_name: str) -> None:
        if version not in _FULL_VERSIONS:
            raise ValueError(f"version must be one of {', '.join(_FULL_VERSIONS)}, got {version!r}")
        self.version = version
        self.full_version = _FULL_VERSIONS[version]
        self.major = int(version.split(".")[0])
        self.compute_capability = f"{compute_capability[0]}.{compute_capability[1]}"
        self.gpu_name = gpu_name
        self.DataType = enum.Enum("DataType", [(n, v) for n, v, _, first in _DATATYPES if self.major >= first],
                                  type=_DataTypeBase, module=__name__)
        if self.major >= 11:
            bf = list(_BUILDER_FLAGS_11.items())
        else:
            bf = [(n, i) for i, n in enumerate(_BUILDER_FLAGS[self.major])]
        self.BuilderFlag = enum.IntEnum("BuilderFlag", bf, module=__name__)
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", _NETWORK_FLAGS[self.major], module=__name__)
        self.MemoryPoolType = enum.IntEnum("MemoryPoolType", [(n, i) for i, n in enumerate(_MEMORY_POOLS[min(self.major, 10)])], module=__name__)
        self.ErrorCode = enum.IntEnum("ErrorCode", [(n, i) for i, n in enumerate(_PARSER_ERRORS[: 9 if self.major == 8 else None])], module=__name__)
        self.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2}, module=__name__)

    def trt_dtype(self, onnx_elem_type: int) -> Any:
        """onnx-tensorrt's ``convertDtype``: 8.6 narrows INT64 to INT32 (DOUBLE to FLOAT everywhere) [O86] [O10]."""
        name = _ONNX_TO_TRT.get(onnx_elem_type)
        if name is None:
            return None
        if name == "INT64" and self.major < 10:
            name = "INT32"
        return self.DataType[name]


def _log(logger: Any, severity: Severity, msg: str) -> None:
    if logger is not None:
        logger.log(severity, msg)


def _host_array(ptr: int, nbytes: int) -> np.ndarray:
    """The ``nbytes`` bytes at address ``ptr`` as a writable uint8 array (no copy): what TensorRT sees."""
    return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(ptr))


def _dims(shape: Sequence[int]) -> Dims:
    return Dims(int(d) for d in shape)


# ----------------------------------------------------------------------------------------------- run side


class ICudaEngine:
    """A deserialized plan: name-based I/O queries [P10] [H11], backed by an ONNX Runtime session on CPU."""

    def __init__(self, lib: _Lib, header: dict[str, Any], onnx_bytes: bytes, logger: Any) -> None:
        self._lib = lib
        self._header = header
        self._onnx = onnx_bytes
        self._logger = logger
        self._io = {t["name"]: t for t in header["io"]}
        self._order = [t["name"] for t in header["io"]]
        self._session_obj: Any = None
        self._lock = threading.Lock()

    @property
    def num_io_tensors(self) -> int:
        return len(self._order)

    @property
    def num_optimization_profiles(self) -> int:
        return 1 if any(t.get("profile") for t in self._header["io"]) else 0

    @property
    def name(self) -> str:
        return self._header.get("name", "")

    def get_tensor_name(self, index: int) -> str:
        if not 0 <= index < len(self._order):
            raise IndexError(f"tensor index {index} out of range [0, {len(self._order)})")
        return self._order[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        """NONE for an unknown name [H11]."""
        return TensorIOMode[self._io[name]["mode"]] if name in self._io else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> Any:
        """FLOAT for an unknown name (the C++ default) [H11] [W114]."""
        return self._lib.DataType[self._io[name]["dtype"]] if name in self._io else self._lib.DataType.FLOAT

    def get_tensor_shape(self, name: str) -> Dims:
        """-1 per dynamic dim; an unknown name gives C++ ``Dims{-1, {}}`` (empty here) [H11]."""
        return _dims(self._io[name]["shape"]) if name in self._io else Dims()

    def get_tensor_location(self, name: str) -> TensorLocation:
        return TensorLocation.DEVICE

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        """``[min, opt, max]`` of an input in a profile [P11]; empty (with a logged error) otherwise."""
        t = self._io.get(name)
        if t is None or t["mode"] != "INPUT" or profile_index != 0 or not t.get("profile"):
            _log(self._logger, Severity.ERROR, f"ICudaEngine::getProfileShape: Error Code 3: API Usage Error (Parameter check failed, "
                 f"condition: {name!r} is an input with a profile {profile_index}.)")
            return []
        return [_dims(s) for s in t["profile"]]

    def create_execution_context(self, *args: Any) -> "IExecutionContext":
        return IExecutionContext(self)

    def serialize(self) -> IHostMemory:
        return IHostMemory(_pack(self._header, self._onnx))

    def _session(self) -> Any:
        with self._lock:
            if self._session_obj is None:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.log_severity_level = 3
                self._session_obj = ort.InferenceSession(self._onnx, opts, providers=["CPUExecutionProvider"])
            return self._session_obj


class IExecutionContext:
    """One execution context: shapes and addresses are per context, as in TensorRT [H11]."""

    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        for name, t in engine._io.items():
            if t["mode"] == "INPUT" and all(d >= 0 for d in t["shape"]):
                self._shapes[name] = tuple(t["shape"])
        self.active_optimization_profile = 0

    def _error(self, api: str, text: str) -> bool:
        _log(self.engine._logger, Severity.ERROR, f"IExecutionContext::{api}: Error Code 3: API Usage Error ({text})")
        return False

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if profile_index != 0:
            return self._error("setOptimizationProfileAsync", f"Parameter check failed, condition: profileIndex >= 0 && "
                               f"profileIndex < mEngine.getNbOptimizationProfiles(). (got {profile_index})")
        return True

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        """False (and the previous shape kept) when ``name`` is not an input, the rank or a fixed dim differs, or the
        shape is outside the profile; the error text is TensorRT 11.1's [H11] [CB] [I-P8]."""
        t = self.engine._io.get(name)
        shape = tuple(int(d) for d in shape)
        if t is None or t["mode"] != "INPUT":
            return self._error("setInputShape", f"Parameter check failed, condition: engineDims.nbDims >= 0. "
                               f"Tensor {name} is not an input tensor.")
        if len(shape) != len(t["shape"]) or any(w >= 0 and w != g for w, g in zip(t["shape"], shape)):
            return self._error("setInputShape", f"Parameter check failed, condition: engineDims.d[i] == dims.d[i]. "
                               f"Static dimension mismatch while setting input shape for {name}. Set dimensions are "
                               f"[{','.join(map(str, shape))}]. Expected dimensions are [{','.join(map(str, t['shape']))}].")
        lo, _, hi = t.get("profile") or (t["shape"], None, t["shape"])
        if any(g < a or g > b for g, a, b in zip(shape, lo, hi)):
            rng = f"[{','.join(map(str, lo))}]..[{','.join(map(str, hi))}]"
            return self._error("setInputShape", f"Parameter check failed, condition: satisfyProfile. Set dimension "
                               f"[{','.join(map(str, shape))}] for tensor {name} does not satisfy any optimization profiles. "
                               f"Valid range for profile 0: {rng}.")
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        """False when ``name`` is not an I/O tensor [H11]. The address is kept as an int, nothing else [H86]."""
        if name not in self.engine._io:
            return self._error("setTensorAddress", f"Parameter check failed, condition: mEngine.bindingIndex(name) != -1. "
                               f"Given invalid tensor name: {name}")
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def _symbols(self) -> dict[str, int]:
        values: dict[str, int] = {}
        for name, t in self.engine._io.items():
            if t["mode"] == "INPUT" and name in self._shapes:
                for sym, d in zip(t["onnx_shape"], self._shapes[name]):
                    if isinstance(sym, str):
                        values[sym] = d
        return values

    def get_tensor_shape(self, name: str) -> Dims:
        """Inputs: the shape set (or the engine's, -1 where unset); outputs: resolved once inputs are set [P11]."""
        t = self.engine._io.get(name)
        if t is None:
            return Dims()
        if t["mode"] == "INPUT":
            return _dims(self._shapes.get(name, t["shape"]))
        values = self._symbols()
        return _dims(d if d >= 0 else values.get(sym, -1) if isinstance(sym, str) else -1
                     for d, sym in zip(t["shape"], t["onnx_shape"]))

    @property
    def all_input_dimensions_specified(self) -> bool:
        return all(n in self._shapes for n, t in self.engine._io.items() if t["mode"] == "INPUT")

    def infer_shapes(self) -> list[str]:
        """Names of inputs still insufficiently specified; empty on success [P11]."""
        return [n for n, t in self.engine._io.items() if t["mode"] == "INPUT" and n not in self._shapes]

    def execute_v2(self, bindings: Sequence[int]) -> bool:
        """Synchronous run with addresses in I/O tensor order [W114]."""
        for name, ptr in zip(self.engine._order, bindings):
            self._addresses[name] = int(ptr)
        return self.execute_async_v3(0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        """Run; False with a logged error when a shape or address is missing, or the graph fails; outputs are then
        left untouched [W114] [CB] [I-A] [I-O]. Inputs are read and outputs written as the engine's declared dtypes,
        straight from/to the bound addresses. ``stream_handle`` is accepted and ignored (synchronous, host memory)."""
        if not isinstance(stream_handle, int):
            raise TypeError(f"execute_async_v3(): incompatible function arguments: stream_handle must be int, got {type(stream_handle).__name__}")
        io = self.engine._io
        missing = self.infer_shapes()
        if missing:  # text unconfirmed (TENSORRT.md §1)
            return self._error("enqueueV3", f"Parameter check failed, condition: mContext.profileObliviousBindings.allInputShapesSpecified. "
                               f"Not all input shapes are specified. Following input tensors' dimensions are not specified: {', '.join(missing)}.")
        for name, t in io.items():
            if not self._addresses.get(name):
                if t["mode"] == "INPUT":
                    return self._error("enqueueV3", f"Parameter check failed, condition: mContext.profileObliviousBindings[profileObliviousIndex] "
                                       f"|| getPtrOrNull(mOutputAllocators, profileObliviousIndex). Address is not set for input tensor {name}. "
                                       "Call setInputTensorAddress or setTensorAddress before enqueue/execute.")
                return self._error("enqueueV3", f"Parameter check failed, condition: mContext.profileObliviousBindings[profileObliviousIndex] "
                                   f"|| getPtrOrNull(mOutputAllocators, profileObliviousIndex). Neither address or allocator is set for "
                                   f"output tensor {name}. Call setOutputTensorAddress, setTensorAddress or setOutputAllocator before enqueue/execute.")
        feeds = {}
        for name, t in io.items():
            if t["mode"] != "INPUT":
                continue
            if t["dtype"] not in _NUMPY:
                return self._error("enqueueV3", f"the test double cannot read {t['dtype']} input {name}")
            shape = self._shapes[name]
            dtype = np.dtype(_NUMPY[t["dtype"]])
            n = int(np.prod(shape)) if shape else 1
            raw = _host_array(self._addresses[name], n * dtype.itemsize).copy() if n else np.zeros(0, np.uint8)
            value = raw.view(dtype).reshape(shape)
            feeds[name] = value.astype(_ONNX_NUMPY.get(t["onnx_dtype"], dtype), copy=False)
        try:
            results = self.engine._session().run(None, feeds)
        except Exception as e:  # the engine failed: nothing is written
            _log(self.engine._logger, Severity.ERROR, f"IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime "
                 f"(test double: ONNX Runtime failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return False
        out_names = [o.name for o in self.engine._session().get_outputs()]
        staged = []
        for name, value in zip(out_names, results):
            t = io[name]
            want = tuple(self.get_tensor_shape(name))
            if any(d < 0 for d in want):
                return self._error("enqueueV3", f"output {name} has a data-dependent shape: the test double has no IOutputAllocator")
            if tuple(value.shape) != want:
                return self._error("enqueueV3", f"output {name}: computed shape {tuple(value.shape)} differs from the "
                                   f"inferred shape {want}")
            staged.append((name, np.ascontiguousarray(value.astype(_NUMPY[t["dtype"]], copy=False))))
        for name, value in staged:
            if value.nbytes:
                _host_array(self._addresses[name], value.nbytes)[:] = value.reshape(-1).view(np.uint8)
        return True


class Runtime:
    """``trt.Runtime(logger)``; ``deserialize_cuda_engine`` returns None and logs on a bad plan [W114] [I-V8] [I-V10] [I-CC]."""

    _lib: _Lib

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        data = bytes(memoryview(serialized_engine))
        lib = self._lib
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
            _log(self.logger, Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                 "assertion plan->header.magicTag == rt::kPLAN_MAGIC_TAG failed.Trying to load an engine created with "
                 "incompatible serialization version. Check that the engine was not created using safety runtime, same OS "
                 "was used and version compatibility parameters were set accordingly.)")
            return None
        try:
            header, onnx_bytes = _unpack(data)
        except Exception:
            _log(self.logger, Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                 "assertion failed: the plan is truncated or corrupt.)")
            return None
        if header["library_version"] != lib.full_version:
            if lib.major < 10:
                _log(self.logger, Severity.ERROR, f"6: The engine plan file is not compatible with this version of TensorRT, "
                     f"expecting library version {lib.full_version} got {header['library_version']}, please rebuild.")
                _log(self.logger, Severity.ERROR, "4: [runtime.cpp::deserializeCudaEngine::50] Error Code 4: Internal Error "
                     "(Engine deserialization failed.)")
            else:
                _log(self.logger, Severity.ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                     "assertion stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not match. Note: Current "
                     f"Version: {lib.full_version}, Serialized Engine Version: {header['library_version']})")
            return None
        if header["compute_capability"] != lib.compute_capability:
            _log(self.logger, Severity.ERROR, "The engine plan file is generated on an incompatible device, expecting compute "
                 f"{header['compute_capability']} got compute {lib.compute_capability}, please rebuild.")
            return None
        return ICudaEngine(lib, header, onnx_bytes, self.logger)


def _pack(header: dict[str, Any], onnx_bytes: bytes) -> bytes:
    h = json.dumps(header, sort_keys=True).encode()
    return _MAGIC + struct.pack("<I", len(h)) + h + onnx_bytes


def _unpack(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<I", data[len(_MAGIC): len(_MAGIC) + 4])
    start = len(_MAGIC) + 4
    return json.loads(data[start: start + n]), data[start + n:]


# --------------------------------------------------------------------------------------------- build side


class ITensor:
    def __init__(self, name: str, dtype: Any, shape: Sequence[int], onnx_dtype: int, onnx_shape: Sequence[int | str],
                 is_input: bool = False, is_output: bool = False) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = _dims(shape)
        self.is_network_input = is_input
        self.is_network_output = is_output
        self._onnx_dtype = onnx_dtype
        self._onnx_shape = list(onnx_shape)


class ILayer:
    def __init__(self, name: str, op: str, outputs: list[ITensor]) -> None:
        self.name = name
        self.type = op
        self._outputs = outputs

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]


class INetworkDefinition:
    """Filled by the OnnxParser; 8.6 networks without EXPLICIT_BATCH have an implicit batch [O86MI]; 11 is always strongly typed [NI11]."""

    def __init__(self, lib: _Lib, flags: int) -> None:
        self._lib = lib
        self._flags = int(flags)
        members = {m.name: m.value for m in lib.NetworkDefinitionCreationFlag}
        if lib.major >= 11:
            self._strongly_typed = True
        else:
            self._strongly_typed = "STRONGLY_TYPED" in members and bool(self._flags & (1 << members["STRONGLY_TYPED"]))
        self._explicit_batch = lib.major >= 10 or bool(self._flags & (1 << members["EXPLICIT_BATCH"]))
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._layers: list[ILayer] = []
        self._onnx: bytes | None = None
        self.name = ""

    def get_flag(self, flag: Any) -> bool:
        return bool(self._flags & (1 << int(flag))) or (self._lib.major >= 11 and flag.name == "STRONGLY_TYPED")

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return not self._explicit_batch

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]

    def get_layer(self, index: int) -> ILayer:
        return self._layers[index]


class ParserError:
    """``OnnxParser.get_error(i)``: ``code()``, ``desc()``, ``node()``, ``node_name()``, ``node_operator()`` ... [W114]."""

    def __init__(self, code: Any, desc: str, node: int = -1, node_name: str = "", node_operator: str = "") -> None:
        self._code, self._desc, self._node, self._node_name, self._op = code, desc, node, node_name, node_operator

    def code(self) -> Any:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._node_name

    def node_operator(self) -> str:
        return self._op

    def file(self) -> str:
        return "ModelImporter.cpp"

    def func(self) -> str:
        return "parseGraph"

    def line(self) -> int:
        return 0

    def __str__(self) -> str:
        return f"In node {self._node} with name: {self._node_name} and operator: {self._op} ({self._code.name}): {self._desc}"


class OnnxParser:
    """``trt.OnnxParser(network, logger)``; ``parse``/``parse_from_file`` return False and record ParserErrors [W114].

    Nodes outside the default ONNX domain are unsupported (no plugin registry), like a real parser without the plugin.
    """

    _lib: _Lib

    def __init__(self, network: INetworkDefinition, logger: Any) -> None:
        self.network = network
        self.logger = logger
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError | None:
        return self._errors[index] if 0 <= index < len(self._errors) else None

    def clear_errors(self) -> None:
        self._errors.clear()

    def parse_from_file(self, model: str) -> bool:
        try:
            data = Path(model).read_bytes()
        except OSError as e:
            self._errors.append(ParserError(self._lib.ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to open file: {model} ({e.strerror})"))
            return False
        return self.parse(data, str(Path(model).parent))

    def parse(self, model: bytes, path: str | None = None) -> bool:
        import onnx

        lib, net, E = self._lib, self.network, self._lib.ErrorCode
        if not net._explicit_batch:  # the 8.6 parser asserts explicit batch [O86MI]
            self._errors.append(ParserError(E.INVALID_GRAPH, "Assertion failed: !mImporterCtx.network()->hasImplicitBatchDimension() && "
                                            "\"This version of the ONNX parser only supports TensorRT INetworkDefinitions with an explicit "
                                            "batch dimension. Please ensure the network was initialized with the explicit batch flag.\""))
            return False
        try:
            proto = onnx.load_from_string(bytes(model))
            if not proto.graph.node and not proto.graph.output:
                raise ValueError("empty graph")
        except Exception:
            self._errors.append(ParserError(E.MODEL_DESERIALIZE_FAILED, "Failed to parse ONNX model from buffer"))
            return False
        for i, node in enumerate(proto.graph.node):
            if node.domain not in ("", "ai.onnx"):
                self._errors.append(ParserError(E.UNSUPPORTED_NODE, f"No importer registered for op: {node.op_type}. Attempting "
                                                "to import as plugin. ... Plugin not found, are the plugin name, version, and "
                                                "namespace correct?", i, node.name, node.op_type))
        if self._errors:
            return False
        try:
            inferred = onnx.shape_inference.infer_shapes(proto)
        except Exception:
            inferred = proto
        types_: dict[str, int] = {}
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            types_[v.name] = v.type.tensor_type.elem_type
        initializers = {t.name: t for t in proto.graph.initializer}
        if lib.major < 10 and any(t.data_type == 7 for t in initializers.values()):  # [O86]
            _log(self.logger, Severity.WARNING, "onnx2trt_utils.cpp:374: Your ONNX model has been generated with INT64 weights, while "
                 "TensorRT does not natively support INT64. Attempting to cast down to INT32.")

        def tensor(v: Any, **kw: bool) -> ITensor | None:
            tt = v.type.tensor_type
            dtype = lib.trt_dtype(tt.elem_type)
            if dtype is None:
                return None
            onnx_shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            return ITensor(v.name, dtype, [d if isinstance(d, int) else -1 for d in onnx_shape], tt.elem_type, onnx_shape, **kw)

        for v in proto.graph.input:
            if v.name in initializers:
                continue
            t = tensor(v, is_input=True)
            if t is None:
                self._errors.append(ParserError(E.UNSUPPORTED_GRAPH, f"Unsupported ONNX data type for input {v.name}: "
                                                f"{v.type.tensor_type.elem_type}"))
                return False
            if t._onnx_dtype == 7 and lib.major >= 10:  # [O10]
                _log(self.logger, Severity.WARNING, f"ModelImporter.cpp: Make sure input {v.name} has Int64 binding.")
            _log(self.logger, Severity.VERBOSE, f"Adding network input: {v.name} with dtype: {t.dtype.name.lower()}, dimensions: {tuple(t.shape)}")
            net._inputs.append(t)
        for i, node in enumerate(proto.graph.node):
            outs = [ITensor(o, lib.trt_dtype(types_.get(o, 1)) or lib.DataType.FLOAT, (), types_.get(o, 1), ()) for o in node.output]
            net._layers.append(ILayer(node.name or f"node_{i}", node.op_type, outs))
        for v in proto.graph.output:
            t = tensor(v, is_output=True)
            if t is None:
                self._errors.append(ParserError(E.UNSUPPORTED_GRAPH, f"Unsupported ONNX data type for output {v.name}"))
                return False
            if t._onnx_dtype == 7 and lib.major >= 10:  # [O10U]
                _log(self.logger, Severity.WARNING, f"ModelImporter.cpp: Make sure output {v.name} has Int64 binding.")
            net._outputs.append(t)
        net._onnx = bytes(model)
        return True


class IOptimizationProfile:
    """min/opt/max per input; ``set_shape`` raises RuntimeError (not the documented ValueError) [P11] [W114]."""

    def __init__(self) -> None:
        self._shapes: dict[str, list[tuple[int, ...]]] = {}

    def set_shape(self, input: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> None:  # noqa: A002
        a, b, c = (tuple(int(d) for d in s) for s in (min, opt, max))
        if not (len(a) == len(b) == len(c)) or any(x < 0 or not x <= y <= z for x, y, z in zip(a, b, c)):
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        self._shapes[input] = [a, b, c]

    def get_shape(self, input: str) -> list[Dims]:  # noqa: A002
        return [_dims(s) for s in self._shapes.get(input, [])]

    def __bool__(self) -> bool:
        return bool(self._shapes)


class ITimingCache:
    def __init__(self, compute_capability: str, entries: int = 0) -> None:
        self._cc = compute_capability
        self._entries = entries

    def serialize(self) -> IHostMemory:
        return IHostMemory(json.dumps({"fake_tensorrt_timing_cache": 1, "compute_capability": self._cc,
                                       "entries": self._entries}).encode())

    def combine(self, input_cache: "ITimingCache", ignore_mismatch: bool) -> bool:
        if input_cache._cc != self._cc and not ignore_mismatch:
            return False
        self._entries += input_cache._entries
        return True

    def reset(self) -> bool:
        self._entries = 0
        return True


class IProgressMonitor:
    """Python base class (10.0+): subclass, call ``__init__``, implement ``phase_start``, ``step_complete`` (False
    cancels the build) and ``phase_finish``; set ``config.progress_monitor`` [W114] [P10]."""

    def __init__(self) -> None:
        pass

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def step_complete(self, phase_name: str, step: int) -> bool:  # pragma: no cover
        raise NotImplementedError

    def phase_finish(self, phase_name: str) -> None:  # pragma: no cover
        raise NotImplementedError


class IBuilderConfig:
    """Flags, memory pools, profiles, timing cache, progress monitor; unknown attributes raise like pybind objects [W114]."""

    _lib: _Lib
    _public = {"profiling_verbosity", "builder_optimization_level", "hardware_compatibility_level", "avg_timing_iterations"}

    def __init__(self) -> None:
        object.__setattr__(self, "_flags", set())
        object.__setattr__(self, "_pools", {})
        object.__setattr__(self, "_profiles", [])
        object.__setattr__(self, "_cache", None)
        if self._lib.major >= 10:
            object.__setattr__(self, "progress_monitor", None)
        object.__setattr__(self, "profiling_verbosity", self._lib.ProfilingVerbosity.LAYER_NAMES_ONLY)
        object.__setattr__(self, "builder_optimization_level", 3)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "progress_monitor" and self._lib.major >= 10 or name in self._public:
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(f"'tensorrt.IBuilderConfig' object has no attribute {name!r}")

    def set_flag(self, flag: Any) -> None:
        self._flags.add(flag.name)

    def clear_flag(self, flag: Any) -> None:
        self._flags.discard(flag.name)

    def get_flag(self, flag: Any) -> bool:
        return flag.name in self._flags

    @property
    def flags(self) -> int:
        return sum(1 << int(self._lib.BuilderFlag[n]) for n in self._flags)

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        self._pools[pool.name] = int(pool_size)

    def get_memory_pool_limit(self, pool: Any) -> int:
        return self._pools.get(pool.name, 2**63 - 1 if pool.name == "WORKSPACE" else 0)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        """The profile's index, or -1 if it is invalid (no shape set) [W114]."""
        if not profile:
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
        """``b""`` makes a new cache [W114]; an unreadable blob gives None (text of the real error unconfirmed)."""
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache(self._lib.compute_capability)
        try:
            d = json.loads(data)
            return ITimingCache(d["compute_capability"], int(d["entries"]))
        except Exception:
            return None

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        """Another device's cache is rejected unless ``ignore_mismatch`` [W114]."""
        if cache._cc != self._lib.compute_capability and not ignore_mismatch:
            return False
        object.__setattr__(self, "_cache", cache)
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._cache


class Builder:
    """``trt.Builder(logger)``; ``build_serialized_network`` returns None (logged) on failure [P11] [NI11] [I-NP]."""

    _lib: _Lib

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        valid = sum(1 << m.value for m in self._lib.NetworkDefinitionCreationFlag)
        if int(flags) & ~valid:
            _log(self.logger, Severity.ERROR, f"IBuilder::createNetworkV2: Error Code 3: API Usage Error (invalid flags {flags})")
        return INetworkDefinition(self._lib, flags)

    def create_builder_config(self) -> IBuilderConfig:
        return self._lib.classes["IBuilderConfig"]()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def _fail(self, msg: str) -> None:
        _log(self.logger, Severity.ERROR, msg)
        return None

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        lib = self._lib
        if network._onnx is None or not network._outputs:
            return self._fail("IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error (Network must have at least one output)")
        dynamic = [t for t in network._inputs if any(d < 0 for d in t.shape)]
        if dynamic and not config._profiles:
            return self._fail("Network has dynamic or shape inputs, but no optimization profile has been defined.")
        profile = config._profiles[0] if config._profiles else None
        io = []
        for t in network._inputs:
            shapes = profile._shapes.get(t.name) if profile is not None else None
            if t in dynamic and shapes is None:
                return self._fail(f"{t.name}: dynamic input is missing dimensions in profile 0.")
            if shapes is not None:
                for i, want in enumerate(t.shape):
                    got = [s[i] if i < len(s) else None for s in shapes]
                    if len(shapes[0]) != len(t.shape) or (want >= 0 and any(g != want for g in got)):
                        return self._fail(f"IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error ({t.name}: for dimension "
                                          f"number {i} in profile 0 does not match network definition (got min={got[0]}, "
                                          f"opt={got[1]}, max={got[2]}), expected min=opt=max={want}).)")
            io.append({"name": t.name, "mode": "INPUT", "dtype": t.dtype.name, "shape": list(t.shape), "onnx_dtype": t._onnx_dtype,
                       "onnx_shape": t._onnx_shape, "profile": [list(s) for s in shapes] if shapes else None})
        for t in network._outputs:
            io.append({"name": t.name, "mode": "OUTPUT", "dtype": t.dtype.name, "shape": list(t.shape), "onnx_dtype": t._onnx_dtype,
                       "onnx_shape": t._onnx_shape})
        monitor = getattr(config, "progress_monitor", None)
        if monitor is not None:
            phases = [("Building engine", None, 3), ("Tactic selection", "Building engine", 4)]
            for name, parent, steps in phases:
                monitor.phase_start(name, parent, steps)
                for step in range(steps):
                    if monitor.step_complete(name, step) is False:
                        monitor.phase_finish(name)
                        return self._fail("IBuilder::buildSerializedNetwork: Error Code 2: Internal Error (the build was canceled "
                                          "by the progress monitor)")
                monitor.phase_finish(name)
        if config._cache is not None:
            config._cache._entries += len(network._layers)
        header = {"library_version": lib.full_version, "compute_capability": lib.compute_capability, "io": io,
                  "strongly_typed": network._strongly_typed, "builder_flags": sorted(config._flags),
                  "workspace": config._pools.get("WORKSPACE")}
        return IHostMemory(_pack(header, network._onnx))


def make_fake_tensorrt(version: str = "10", *, compute_capability: tuple[int, int] = (9, 0),
                       gpu_name: str = FAKE_GPU_NAME) -> types.ModuleType:
    """A module-like TensorRT double for ``version`` ``"8.6"``, ``"10"`` or ``"11"`` running on a fake GPU of ``compute_capability``.

    Extra attributes (not in TensorRT): ``FAKE = True``, ``fake_compute_capability`` ("9.0") and ``fake_gpu_name``,
    so code that records the GPU can ask the double instead of CUDA.
    """
    lib = _Lib(str(version), compute_capability, gpu_name)
    mod = types.ModuleType("fake_tensorrt", f"TensorRT {lib.full_version} test double (toolkit.testing.fake_tensorrt)")
    classes: dict[str, type] = {}
    for base in (Runtime, Builder, OnnxParser, IBuilderConfig):
        classes[base.__name__] = type(base.__name__, (base,), {"_lib": lib, "__module__": "fake_tensorrt"})
    lib.classes = classes  # type: ignore[attr-defined]
    mod.__dict__.update(
        __version__=lib.full_version, FAKE=True, fake_compute_capability=lib.compute_capability, fake_gpu_name=gpu_name,
        Logger=Logger, ILogger=ILogger, Severity=Severity, DataType=lib.DataType, TensorIOMode=TensorIOMode,
        TensorLocation=TensorLocation, Dims=Dims, IHostMemory=IHostMemory, ICudaEngine=ICudaEngine,
        IExecutionContext=IExecutionContext, INetworkDefinition=INetworkDefinition, ITensor=ITensor, ILayer=ILayer,
        IOptimizationProfile=IOptimizationProfile, ITimingCache=ITimingCache, ParserError=ParserError,
        BuilderFlag=lib.BuilderFlag, NetworkDefinitionCreationFlag=lib.NetworkDefinitionCreationFlag,
        MemoryPoolType=lib.MemoryPoolType, ErrorCode=lib.ErrorCode, ProfilingVerbosity=lib.ProfilingVerbosity,
        Runtime=classes["Runtime"], Builder=classes["Builder"], OnnxParser=classes["OnnxParser"],
        IBuilderConfig=classes["IBuilderConfig"],
    )
    if lib.major >= 10:
        mod.IProgressMonitor = IProgressMonitor  # Python progress monitors arrived in 10.0 [P10] [P86]
    if lib.major < 11:
        classes["Builder"].platform_has_fast_fp16 = property(lambda self: True)  # removed in 11 [M11PY]

    def nptype(trt_type: Any) -> type:
        """numpy type of a DataType; int64 from 10 on; others raise TypeError [I86] [I1016] [W114]."""
        name = trt_type.name
        if name in _NUMPY and (name != "INT64" or lib.major >= 10):
            return _NUMPY[name]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    mod.nptype = nptype
    for name, dt in lib.DataType.__members__.items():  # trt.float32 ... aliases [W114]
        alias = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}.get(name, name.lower())
        setattr(mod, alias, dt)
    return mod


__all__ = ["make_fake_tensorrt", "FAKE_GPU_NAME"]
