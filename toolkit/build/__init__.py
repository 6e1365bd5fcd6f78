"""Build deployable engines from a verified ONNX file, with an engine cache.

:func:`build_engine` dispatches through :data:`BUILDERS` (backend -> module in :mod:`toolkit.build`). A
builder module exposes two functions:

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
from ..sidecar import read_sidecar, sidecar_path
from ..signature import Signature

# backend name -> module in toolkit.build
BUILDERS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt", "aoti": "aoti"}
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


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
) -> BuildResult:
    """Build ``onnx_path`` into ``output`` (+ ``output.json`` sidecar) for ``backend``; reuse a cached engine when possible.

    ``batch``: (min, opt, max) of the optimization profile for a symbolic batch dim. ``precision``: fp32, fp16 or
    bf16, checked against the built engine (a precision that is not delivered is an error, never a fallback).
    """
    from .. import __version__

    if backend not in BUILDERS:
        raise BuildError(f"unknown build backend {backend!r}; backends: {', '.join(BUILDERS)}")
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
    output = check_output_path(output)
    module = import_module(f".{BUILDERS[backend]}", __name__)
    options = {"trt_module": trt_module} if trt_module is not None else {}
    start = time.perf_counter()
    onnx_sha = file_sha256(onnx_path)
    key_parts = {"onnx_sha256": onnx_sha, "backend": backend, "precision": precision, "batch": list(batch),
                 "workspace_gib": workspace_gib, "toolkit_version": __version__,
                 "environment": module.environment(backend, **options)}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
    cached_engine = cache_dir() / f"{key}.engine"
    if cache and cached_engine.is_file() and sidecar_path(cached_engine).is_file():
        meta = read_sidecar(cached_engine)
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


__all__ = ["BUILDERS", "BuildError", "BuildResult", "build_engine", "cache_dir"]
