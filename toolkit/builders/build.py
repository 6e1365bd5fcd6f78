"""Build deployable engines from a verified ONNX file, with an engine cache.

:func:`build_engine` dispatches through :data:`BUILDERS` (backend -> module in :mod:`toolkit.builders.build`) for
builders that compile the ONNX graph (TensorRT, TensorRT-RTX), and through :data:`MODEL_BUILDERS` for those
that compile the torch model (AOTInductor, Torch-TensorRT: :func:`build_from_model`; from an ONNX file, the
model it was exported from, :func:`model_for_onnx`; they keep their own build cache). An ONNX builder module
exposes two functions:

* ``build(onnx_path, output, *, backend, precision, batch, workspace_gib, timing_cache, progress, **options) -> BuildResult``
  writes ``output`` and its sidecar atomically;
* ``environment(backend, **options) -> dict`` names the library (and version) and GPU a build depends on,
  so the engine cache never hands out an engine built for another library or GPU.

Cache: key = sha256 of the ONNX bytes + build options + library name/version + GPU name/compute capability +
toolkit version; directory ``~/.cache/rtdetr-deploy/engines`` (``RTDETR_DEPLOY_CACHE`` overrides it). A hit
copies the cached engine and sidecar to ``output`` (atomically) and returns ``cached=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, check_output_path
from ..errors import EngineError, InputError
from ..integrity import check_onnx, file_sha256  # file_sha256: also used by the builders through this module
from ..runtime.sidecar import read_sidecar, sidecar_path
from ..signature import Signature

# backend name -> module in toolkit.builders.build
BUILDERS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt"}
# backends that compile the torch model rather than the ONNX graph: backend -> (module, function(model, output, **options) -> Path)
MODEL_BUILDERS = {"aoti": ("aoti", "build_aoti"), "torch-tensorrt": ("torch_tensorrt", "build_torch_tensorrt")}
PRECISIONS = ("fp32", "fp16", "bf16")
CACHE_ENV = "RTDETR_DEPLOY_CACHE"


class BuildError(EngineError):
    """The engine could not be built (parser errors, bad profile, precision not delivered...)."""


@dataclass
class BuildResult:
    path: Path
    sidecar: Path
    signature: Signature
    backend: str
    precision: str
    cached: bool = False
    seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        src = "from the engine cache" if self.cached else f"in {self.seconds:.1f} s"
        return f"{self.path}: {self.backend} {self.precision} engine {src}"


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rtdetr-deploy" / "engines"


def build_from_model(model: Any, output: str | Path, *, backend: str = "aoti", device: str | None = None,
                     **options: Any) -> BuildResult:
    """Build for a backend that compiles the torch model (:data:`MODEL_BUILDERS`) from anything
    :func:`toolkit.models.loading.load_model` accepts; ``options`` go to the backend's builder (precision, batch,
    progress, cache, config...). ``device``: default the GPU if present."""
    if backend not in MODEL_BUILDERS:
        raise BuildError(f"backend {backend!r} builds from an ONNX file (toolkit.builders.build.build_engine); "
                         f"builds from a model: {', '.join(MODEL_BUILDERS)}")
    import torch

    module_name, function = MODEL_BUILDERS[backend]
    builder = getattr(import_module(f".{module_name}", __package__), function)
    start = time.perf_counter()
    path = builder(model, output, device=device or ("cuda" if torch.cuda.is_available() else "cpu"), **options)
    meta = read_sidecar(path)
    return BuildResult(path, sidecar_path(path), Signature.from_dict(meta["signature"]), backend, meta["precision"],
                       seconds=time.perf_counter() - start, metadata=meta)


def model_for_onnx(onnx_path: str | Path) -> Any:
    """The torch model an exported ONNX file came from, for builders that compile the model (AOTInductor).

    The export records the source (checkpoint path or config name) and a sha256 of the weights; the model is
    loaded from there and used only if its weights are still the ones exported, else a clear error.
    """
    import onnx

    from ..errors import ToolkitError
    from ..models.loading import load_model
    from ..models.weights import weights_sha256

    try:
        meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    except Exception as e:
        raise BuildError(f"{onnx_path}: not a readable ONNX file ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    hint = "give the model instead: rtdetr-deploy build --backend BACKEND --model CHECKPOINT -o OUTPUT"
    source = meta.get("source")
    if not source and meta.get("source_config"):  # exported from --config NAME: its seeded weights are rebuilt
        source = f"--config {meta['source_config']}"
        load = lambda: load_model(None, config=meta["source_config"])  # noqa: E731
    else:
        load = lambda: load_model(source, config=meta.get("source_config"))  # noqa: E731
    if not source:
        raise BuildError(f"{onnx_path} does not name the model it was exported from (exported from an in-memory module, "
                         f"or by another tool); {hint}")
    try:
        deploy = load()
    except (ToolkitError, OSError) as e:
        raise BuildError(f"{onnx_path} was exported from {source}, which cannot be loaded here ({e}); {hint}") from None
    size = tuple(json.loads(meta.get("input_size", "null")) or deploy.preprocess.size)
    if size != tuple(deploy.preprocess.size):
        from ..export.onnx import _resize_model

        deploy = _resize_model(deploy, size)  # type: ignore[arg-type]
    if meta.get("weights_sha256") != weights_sha256(deploy):
        why = ("the config's generated weights are not those of the toolkit version that exported it" if not Path(str(source)).exists()
               else "the checkpoint changed since the export")
        raise BuildError(f"{onnx_path} was exported from {source}, but the weights there are not the exported ones ({why}); {hint}")
    deploy.source_metadata = {k: meta[k] for k in ("source", "source_config") if meta.get(k)}  # what packages built from it record
    return deploy


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def build_engine(
    onnx_path: str | Path,
    output: str | Path,
    *,
    backend: str = "tensorrt",
    precision: str = "fp32",
    batch: tuple[int, int, int] = (1, 1, 8),
    workspace_gib: float | None = None,
    timing_cache: str | Path | None = None,
    trt_module: Any = None,
    progress: bool = True,
    cache: bool = True,
    device: str | None = None,
    **model_options: Any,
) -> BuildResult:
    """Build ``onnx_path`` into ``output`` (+ ``output.json`` sidecar) for ``backend``; reuse a cached engine when possible.

    ``batch``: (min, opt, max) of the optimization profile for a symbolic batch dim. ``precision``: fp32, fp16 or
    bf16, checked against the built engine (a precision that is not delivered is an error, never a fallback).
    Backends in :data:`MODEL_BUILDERS` compile the model the ONNX was exported from (:func:`model_for_onnx`),
    on ``device`` (default: the GPU if present); ``model_options`` go to their builder (``fold``, ``inductor_configs``).
    TensorRT builds take the graph as exported (``export_onnx(fold=...)`` decides the fold there).
    """
    from .. import __version__

    if backend not in BUILDERS and backend not in MODEL_BUILDERS:
        raise BuildError(f"unknown build backend {backend!r}; backends: {', '.join([*BUILDERS, *MODEL_BUILDERS])}")
    if precision not in PRECISIONS:
        raise BuildError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    batch = tuple(int(b) for b in batch)  # type: ignore[assignment]
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise BuildError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch}")
    if workspace_gib is not None and workspace_gib <= 0:
        raise BuildError(f"workspace_gib must be positive, got {workspace_gib}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: no such ONNX file")
    check_onnx(onnx_path)  # an exported file that changed since is refused before anything is built from it
    output = check_output_path(output)
    if backend in MODEL_BUILDERS:
        if workspace_gib is not None or timing_cache is not None:
            raise BuildError(f"workspace and timing cache are TensorRT build options; the {backend} backend takes neither")
        return build_from_model(model_for_onnx(onnx_path), output, backend=backend, precision=precision, batch=batch,
                                device=device, progress=progress, cache=cache, **model_options)
    if model_options:
        raise BuildError(f"{', '.join(model_options)}: options of the builders that compile the torch model "
                         f"({', '.join(MODEL_BUILDERS)}); a {backend} engine builds the ONNX graph as exported")
    module = import_module(f".{BUILDERS[backend]}", __package__)
    options = {"trt_module": trt_module} if trt_module is not None else {}
    start = time.perf_counter()
    onnx_sha = file_sha256(onnx_path)
    key_parts = {"onnx_sha256": onnx_sha, "backend": backend, "precision": precision, "batch": list(batch),
                 "workspace_gib": workspace_gib, "toolkit_version": __version__,
                 "environment": module.environment(backend, **options)}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
    cached_engine = cache_dir() / f"{key}.engine"
    meta = None
    if cache and cached_engine.is_file() and sidecar_path(cached_engine).is_file():
        try:
            meta = read_sidecar(cached_engine)  # a damaged cache entry is a miss, rebuilt below
        except EngineError:
            meta = None
    if meta is not None:
        _copy(cached_engine, output)
        _copy(sidecar_path(cached_engine), sidecar_path(output))
        return BuildResult(output, sidecar_path(output), Signature.from_dict(meta["signature"]), backend, meta.get("precision", precision),
                           cached=True, seconds=time.perf_counter() - start, metadata=meta)
    result = module.build(onnx_path, output, backend=backend, precision=precision, batch=batch, workspace_gib=workspace_gib,
                          timing_cache=timing_cache, progress=progress, onnx_sha256=onnx_sha, **options)
    result.seconds = time.perf_counter() - start
    if cache:
        try:
            cached_engine.parent.mkdir(parents=True, exist_ok=True)
            _copy(output, cached_engine)
            _copy(sidecar_path(output), sidecar_path(cached_engine))
        except (OSError, InputError) as e:
            warnings.warn(f"could not store the engine in the cache {cache_dir()}: {e}", stacklevel=2)
    return result


__all__ = ["BUILDERS", "MODEL_BUILDERS", "BuildError", "BuildResult", "build_engine", "build_from_model", "cache_dir", "model_for_onnx"]
