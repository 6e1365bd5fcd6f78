"""Build a TensorRT (8.6, 10, 11) or TensorRT-RTX engine from an ONNX file, portably across versions.

* Network flags through ``getattr``: ``EXPLICIT_BATCH`` where it exists (8.6 needs it, 10 ignores it, 11 removed
  it); ``STRONGLY_TYPED`` on 10 when a reduced precision is requested (types come from the ONNX graph), and
  always on 11 and TensorRT-RTX (which are strongly typed anyway). TensorRT 8.6 has no strong typing: fp16
  there is ``BuilderFlag.FP16`` (weak typing; TensorRT picks fp16 or fp32 kernels per layer).
* Every parser error is reported (node, name, op, message).
* One optimization profile for the inputs with a symbolic batch dim: (min, opt, max) = ``batch``.
* The engine is written atomically, then its sidecar: library, GPU, precision found in the network, the
  profile, the ONNX sha256, the build options and the I/O signature as the builder typed it (TensorRT 8
  narrows int64 ``orig_target_sizes`` to int32: the root of the zero-coordinate bug).
"""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path
from typing import Any

from .. import dtypes
from ..atomic import atomic_path, write_bytes
from ..errors import MissingDependencyError
from ..runtime.backends.tensorrt import (
    format_log,
    import_tensorrt,
    library_name,
    library_version,
    make_logger,
    running_gpu,
)
from ..runtime.sidecar import write_sidecar
from ..signature import INPUT_SIZES, Signature, TensorSpec, from_onnx
from .build import BuildError, BuildResult

_MODULES = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}


def _import(backend: str, trt_module: Any) -> Any:
    try:
        return import_tensorrt(trt_module, _MODULES[backend])
    except MissingDependencyError:
        if backend == "tensorrt-rtx":
            raise MissingDependencyError("TensorRT-RTX is not installed (tried tensorrt_rtx, tensorrt_rtx_bindings): "
                                         "pip install tensorrt-rtx") from None
        raise


def environment(backend: str, trt_module: Any = None) -> dict[str, Any]:
    """What a build depends on besides the ONNX and options: library name/version, GPU name/compute capability."""
    trt = _import(backend, trt_module)
    gpu, cc = running_gpu(trt)
    return {"library": library_name(trt), "library_version": library_version(trt), "gpu_name": gpu, "compute_capability": cc}


def make_progress_monitor(trt: Any) -> Any:
    """An ``IProgressMonitor`` (TensorRT 10+) drawing one tqdm bar per build phase; thread-safe, never cancels."""
    from tqdm.auto import tqdm

    class TqdmProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, Any] = {}
            self._lock = threading.Lock()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self._lock:
                    depth = len(self._bars)
                    self._bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=depth, leave=parent_phase is None)
            except Exception:  # a progress bar must never break a build
                pass

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                with self._lock:
                    bar = self._bars.get(phase_name)
                    if bar is not None:
                        bar.update(step + 1 - bar.n)
            except Exception:
                pass
            return True

        def phase_finish(self, phase_name: str) -> None:
            try:
                with self._lock:
                    bar = self._bars.pop(phase_name, None)
                    if bar is not None:
                        bar.close()
            except Exception:
                pass

        def close(self) -> None:
            with self._lock:
                for bar in self._bars.values():
                    bar.close()
                self._bars.clear()

    return TqdmProgressMonitor()


def _major(trt: Any) -> int:
    try:
        return int(library_version(trt).split(".")[0])
    except ValueError:
        return 0


def _sizes_note(onnx_sig: Signature, built: Signature, lib: str, ver: str) -> str:
    names = onnx_sig.input_names
    if INPUT_SIZES not in names or INPUT_SIZES not in built.input_names:
        return f"this model has no {INPUT_SIZES} input"
    src, got = onnx_sig.input(INPUT_SIZES).dtype, built.input(INPUT_SIZES).dtype
    if src == "int64" and got == "int32":
        return (f"{INPUT_SIZES} is int64 in the ONNX and {lib} {ver} typed it int32 (TensorRT 8 casts int64 I/O to int32): "
                "bind int32; the bytes of an int64 [[640,640]] read as int32 are [[640,0]], which makes every y coordinate 0. "
                "toolkit.load() converts int64 tensors safely.")
    if got == "int64":
        return (f"{INPUT_SIZES} is int64, kept as in the ONNX ({lib} {ver}; TensorRT 10/11 and TensorRT-RTX keep int64, "
                "TensorRT 8 would have narrowed it to int32): bind int64 tensors.")
    return f"{INPUT_SIZES} is {got} (the ONNX declares {src}): bind {got} tensors."


def _network_precision(network: Any) -> str:
    """fp16/bf16 if any non-I/O layer output of the network is HALF/BF16, else fp32."""
    seen = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            if t is None or getattr(t, "is_network_output", False) or getattr(t, "is_network_input", False):
                continue
            seen.add(getattr(t.dtype, "name", str(t.dtype)))
    return "fp16" if "HALF" in seen else "bf16" if "BF16" in seen else "fp32"


def _layer_precisions(network: Any) -> dict[str, int]:
    """How many layers of the network compute in each type (their first output's dtype; INT8 for a Q/DQ graph's
    quantize layers and the layers TensorRT fuses with them), recorded in the sidecar as ``layer_precisions``."""
    counts: dict[str, int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        t = layer.get_output(0) if layer.num_outputs else None
        if t is not None:
            name = getattr(t.dtype, "name", str(t.dtype))
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def build(
    onnx_path: Path,
    output: Path,
    *,
    backend: str = "tensorrt",
    precision: str = "fp32",
    batch: tuple[int, int, int] = (1, 1, 8),
    workspace_gib: float | None = None,
    timing_cache: str | Path | None = None,
    progress: bool = True,
    trt_module: Any = None,
    onnx_sha256: str | None = None,
) -> BuildResult:
    """Build ``onnx_path`` into ``output`` and write its sidecar; see :func:`toolkit.builders.build.build_engine`."""
    from .. import __version__
    from .build import file_sha256

    trt = _import(backend, trt_module)
    rtx = backend == "tensorrt-rtx"
    lib, ver = library_name(trt), library_version(trt)
    major = _major(trt)
    notes: list[str] = []
    try:
        onnx_sig = from_onnx(onnx_path)
    except Exception as e:
        raise BuildError(f"{onnx_path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    class_names = _onnx_class_names(onnx_path)

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise BuildError(f"{lib} {ver} could not create a builder (no usable GPU?)" + format_log(logger.errors()))
    nflags = trt.NetworkDefinitionCreationFlag
    flags = 0
    if hasattr(nflags, "EXPLICIT_BATCH"):  # 8.6: required by the ONNX parser; 10: ignored; 11/RTX: absent
        flags |= 1 << int(nflags.EXPLICIT_BATCH)
    strongly_typed = hasattr(nflags, "STRONGLY_TYPED") and (rtx or major >= 11 or precision != "fp32")
    if strongly_typed:
        flags |= 1 << int(nflags.STRONGLY_TYPED)
    network = builder.create_network(flags)
    if network is None:
        raise BuildError(f"{lib} {ver} could not create a network with flags {flags}" + format_log(logger.errors()))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        lines = [_parser_error(e) for e in errors if e is not None]
        raise BuildError(f"{lib} {ver} cannot parse {onnx_path} ({len(lines)} error(s)):\n  " + "\n  ".join(lines)
                         + "\nFix: re-export with 'rtdetr-deploy export' (opset 17), or check the op support of this TensorRT version."
                         + format_log(logger.errors()))

    config = builder.create_builder_config()
    if config is None:
        raise BuildError(f"{lib} {ver} could not create a builder config" + format_log(logger.errors()))
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision != "fp32" and not strongly_typed:  # TensorRT 8.6 (weak typing): the flag only allows the kernels
        flag = getattr(trt.BuilderFlag, "FP16" if precision == "fp16" else "BF16", None)
        if flag is None:
            raise BuildError(f"{lib} {ver} has no BuilderFlag.{precision.upper()} and no strong typing: it cannot build a "
                             f"{precision} engine; use --precision fp32 or TensorRT 10+")
        config.set_flag(flag)
        notes.append(f"weak typing: BuilderFlag.{precision.upper()} lets TensorRT {ver} pick {precision} or fp32 kernels per layer")

    # optimization profile for the symbolic batch dim
    inputs, profile_dict = [], {}
    profile = builder.create_optimization_profile()
    fixed_batches = set()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = [int(d) for d in t.shape]
        onnx_spec = _spec_or_none(onnx_sig, t.name)
        dynamic = [a for a, d in enumerate(shape) if d < 0]
        if any(a != 0 for a in dynamic):
            raise BuildError(f"input {t.name} {shape}: dims {[a for a in dynamic if a != 0]} are dynamic; only the batch dim "
                             "(dim 0) may be; export with a fixed input size (rtdetr-deploy export --size H,W)")
        if dynamic:
            lo, opt, hi = ([b] + shape[1:] for b in batch)
            try:
                profile.set_shape(t.name, lo, opt, hi)
            except (RuntimeError, ValueError) as e:
                raise BuildError(f"input {t.name}: TensorRT rejected the profile min={lo} opt={opt} max={hi}: {e}") from None
            profile_dict[t.name] = {"min": lo, "opt": opt, "max": hi}
        elif shape:
            fixed_batches.add(shape[0])
        inputs.append((t, shape, onnx_spec))
    for b in fixed_batches:
        if not profile_dict and not batch[0] <= b <= batch[2]:
            raise BuildError(f"the ONNX fixes the batch at {b} (a static export) but batch={batch} asks for {batch[0]}..{batch[2]}; "
                             f"pass batch=({b}, {b}, {b}) (--batch {b},{b},{b}) or re-export with a dynamic batch")
    if profile_dict and config.add_optimization_profile(profile) < 0:
        raise BuildError(f"TensorRT rejected the optimization profile {profile_dict}" + format_log(logger.errors()))

    cache_obj = None
    if timing_cache is not None:
        cache_obj = _load_timing_cache(config, Path(timing_cache), notes)
    monitor = None
    if progress and hasattr(trt, "IProgressMonitor"):
        monitor = make_progress_monitor(trt)
        config.progress_monitor = monitor
    mark = logger.mark()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if monitor is not None:
            monitor.close()
    if serialized is None:
        raise BuildError(f"{lib} {ver} failed to build {onnx_path} (build_serialized_network returned None)"
                         + format_log(logger.errors(mark)))

    found = _network_precision(network)
    if precision != "fp32" and strongly_typed and found != precision:
        why = "TensorRT-RTX" if rtx else f"TensorRT {ver}"
        raise BuildError(f"--precision {precision} was requested but the built engine is {found}: {why} is strongly typed here, "
                         f"so tensor types come from the ONNX graph and {onnx_path.name} is {found}. Nothing was written. Convert "
                         f"the ONNX to {precision} first (python -m modelopt.onnx.autocast --onnx_path {onnx_path.name} "
                         f"--output_path model_{precision}.onnx --low_precision_type {precision}), or build with --precision fp32")
    built_precision = precision if (precision != "fp32" and not strongly_typed) else found
    if found != "fp32" and precision == "fp32":
        notes.append(f"the ONNX graph itself is {found}: the engine computes in {found}")

    # the I/O signature as the builder typed it
    bounds = {}
    in_specs = []
    for t, shape, onnx_spec in inputs:
        spec = _typed_spec(t, shape, onnx_spec)
        in_specs.append(spec)
        for a, d in enumerate(spec.shape):
            if isinstance(d, str):
                bounds[d] = (batch[0], batch[2])
    out_specs = []
    for i in range(network.num_outputs):
        t = network.get_output(i)
        out_specs.append(_typed_spec(t, [int(d) for d in t.shape], _spec_or_none(onnx_sig, t.name)))
    signature = Signature(tuple(in_specs), tuple(out_specs), bounds, onnx_sig.preprocess)
    for spec in signature.inputs + signature.outputs:
        src = _spec_or_none(onnx_sig, spec.name)
        if src is not None and src.dtype != spec.dtype:
            notes.append(f"{spec.name}: the ONNX declares {src.dtype}, {lib} {ver} typed it {spec.dtype}")

    with atomic_path(output) as tmp:
        with open(tmp, "wb") as f:
            f.write(memoryview(serialized))
    if cache_obj is not None and timing_cache is not None:
        saved = config.get_timing_cache()
        if saved is not None:
            write_bytes(timing_cache, bytes(memoryview(saved.serialize())))
    gpu, cc = running_gpu(trt)
    meta = {
        "toolkit_version": __version__,
        "backend": backend,
        "library": lib,
        "library_version": ver,
        "gpu_name": gpu,
        "compute_capability": cc,
        "precision": built_precision,
        "requested_precision": precision,
        "layer_precisions": _layer_precisions(network),
        "strongly_typed": bool(strongly_typed or rtx or major >= 11),
        "profile": profile_dict,
        "onnx_file": onnx_path.name,
        "onnx_sha256": onnx_sha256 or file_sha256(onnx_path),
        "build_options": {"precision": precision, "batch": list(batch), "workspace_gib": workspace_gib,
                          "timing_cache": str(timing_cache) if timing_cache is not None else None},
        "signature": signature.to_dict(),
        "class_names": class_names,
        "random_weights": _onnx_metadata(onnx_path).get("random_weights"),  # the export's label of generated weights
        "orig_target_sizes_note": _sizes_note(onnx_sig, signature, lib, ver),
        "notes": notes,
    }
    side = write_sidecar(output, meta)
    return BuildResult(output, side, signature, backend, built_precision, metadata=meta, warnings=notes)


def _spec_or_none(sig: Signature, name: str) -> TensorSpec | None:
    try:
        return sig.input(name) if name in sig.input_names else sig.output(name)
    except KeyError:
        return None


def _typed_spec(t: Any, shape: list[int], onnx_spec: TensorSpec | None) -> TensorSpec:
    try:
        dtype = dtypes.from_trt(t.dtype).name
    except ValueError as e:
        raise BuildError(f"tensor {t.name}: {e}") from None
    dims: list[int | str] = []
    for a, d in enumerate(shape):
        if d >= 0:
            dims.append(d)
        elif onnx_spec is not None and a < len(onnx_spec.shape) and isinstance(onnx_spec.shape[a], str):
            dims.append(onnx_spec.shape[a])
        else:
            dims.append("N" if a == 0 else f"{t.name}_dim{a}")
    return TensorSpec(t.name, dtype, tuple(dims))


def _parser_error(e: Any) -> str:
    def call(name: str, default: Any = "") -> Any:
        f = getattr(e, name, None)
        try:
            return f() if callable(f) else default
        except Exception:
            return default

    code = call("code")
    op, node, node_name = call("node_operator"), call("node", -1), call("node_name")
    where = f"node {node}" + (f" '{node_name}'" if node_name else "") + (f" ({op})" if op else "") if node != -1 else "model"
    return f"{where}: {call('desc')} [{getattr(code, 'name', code)}]"


def _load_timing_cache(config: Any, path: Path, notes: list[str]) -> Any:
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None and data:
        notes.append(f"timing cache {path} is unreadable; starting a new one")
        warnings.warn(notes[-1], stacklevel=3)
        cache = config.create_timing_cache(b"")
    if cache is not None and not config.set_timing_cache(cache, False):
        notes.append(f"timing cache {path} comes from another GPU or TensorRT version; starting a new one")
        warnings.warn(notes[-1], stacklevel=3)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return {}
    return {p.key: p.value for p in model.metadata_props}


def _onnx_class_names(path: Path) -> list[str]:
    meta = _onnx_metadata(path)
    try:
        return list(json.loads(meta.get("class_names", "[]")))
    except json.JSONDecodeError:
        return []
