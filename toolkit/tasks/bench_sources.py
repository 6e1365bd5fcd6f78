"""What ``bench`` measures when MODEL is a built artifact: the file as given, and the model its peers are built from.

A built file (``.onnx``, ``.pt2``, ``.ep``, ``.buckets``, ``.engine``) is timed as given, on the backend that runs it
(:func:`toolkit.runtime.engine.detect_backend`). Where the file records the model it came from (an export's
``source``/``source_config`` metadata, a package's ``model_source`` sidecar record, an engine's ONNX file beside it),
that model is rebuilt, its weights checked against the file's record, and the other requested backends are
built from it as peers; where it does not, only the file's own rows are measured and a note says why.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..builders.sources import recorded_model
from ..errors import InputError

# detect_backend's name -> the row backend bench reports (a .buckets manifest of AOTI packages is bench's aoti-static)
ROW_BACKEND = {"onnxruntime": "onnxruntime", "aoti": "aoti", "tensorrt": "tensorrt", "torch-tensorrt": "torch-tensorrt",
               "buckets": "aoti-static"}


@dataclass
class BenchSource:
    """``model``: the torch model peers are built from (None: the file records none, ``why`` says so);
    ``path``/``backend``/``precision``: the file timed as given and its row (None for a model);
    ``batch``: the batch sizes the file runs (lo, hi or None)."""

    model: Any
    path: Path | None = None
    backend: str | None = None
    loader: str | None = None
    precision: str = "fp32"
    batch: tuple[int, int | None] = (1, None)
    size: tuple[int, int] | None = None
    origin: str = ""
    why: str = ""
    notes: list[str] = field(default_factory=list)

    def owns(self, backend: str, precision: str) -> bool:
        return self.path is not None and backend == self.backend and precision == self.precision

    def outside(self, batch: int) -> str | None:
        """Why the given file cannot run ``batch`` images in one call, or None."""
        lo, hi = self.batch
        if self.path is not None and (batch < lo or (hi is not None and batch > hi)):
            return f"{self.path.name} runs batch {lo}..{hi if hi is not None else 'any'} (built for that range)"
        return None


def bench_source(model: Any, config: str | None, device: Any) -> BenchSource:
    """The model bench builds every backend from, or the built file it times as given (see the module docstring)."""
    from ..models.loading import load_model
    from ..runtime.engine import detect_backend, load
    from ..runtime.preprocessing import engine_preprocess

    native = detect_backend(model) if isinstance(model, (str, Path)) else "torch"
    if native == "triton":
        raise InputError(f"{model} is a served model: time it with rtdetr-deploy bench {model} (the CLI runs the load test: "
                         "requests/s, p50/p99 at concurrency 1,8,32), or toolkit.serve.loadtest.load_test")
    if native == "torch":
        return BenchSource(load_model(model, config=config, seed=0).eval())  # a config name: the same random weights every run
    path = Path(model)
    if native == "tensorrt" and path.exists() and importlib.util.find_spec("tensorrt") is None:
        raise InputError(f"{path} is a TensorRT engine, and TensorRT is not installed here: bench it where TensorRT runs "
                         "(pip install 'rtdetr-deploy[tensorrt]'), or bench the .onnx it was built from")
    found = recorded_model(path, native)
    deploy, origin, why, meta = found.model, found.origin, found.why, found.meta
    engine = load(path, backend=native, device=device, check_values=False)
    try:
        lo, hi = engine.signature.bounds("N")
        size = tuple(engine_preprocess(engine).size)
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    inner = meta.get("inner_backend", "aoti")
    backend = ROW_BACKEND[native] if native != "buckets" or inner == "aoti" else f"{inner}-static"
    src = BenchSource(deploy, path, backend, native, str(meta.get("precision") or "fp32"), (max(1, lo), hi), size, origin, why)
    src.notes.append(f"{path}: the {backend} {src.precision} rows time {path.name} as given" + (
        f"; the other backends are rebuilt from {origin} (weights match the file's record)" if deploy is not None else ""))
    return src


def recorded_device(model: Any) -> str | None:
    """The device a package was compiled for (its sidecar or manifest says), so ``bench m.pt2`` runs it there by default."""
    from ..runtime.engine import detect_backend

    if not isinstance(model, (str, Path)) or detect_backend(model) not in ("aoti", "buckets", "torch-tensorrt") or not Path(model).is_file():
        return None
    try:
        import json

        from ..runtime.sidecar import sidecar_path

        meta = json.loads((Path(model) if detect_backend(model) == "buckets" else sidecar_path(model)).read_text())
    except (OSError, ValueError):
        return None  # loading it says what is wrong
    device = meta.get("device") if isinstance(meta, dict) else None
    return str(device) if device in ("cpu", "cuda") else None


def plan_backends(src: BenchSource, backends: Sequence[str] | None, default: Sequence[str]) -> tuple[list[str], list[str]]:
    """The backends to run for ``src`` and notes about any left out; ``backends`` None: ``default`` (a built file:
    its own backend first, then the default peers where its model is known). A list that leaves out the file's own
    backend cannot time the file: an :class:`InputError` with the fix, in CLI words."""
    if src.path is None:
        return list(backends if backends is not None else default), []
    own = src.backend
    assert own is not None
    if backends is None:
        chosen = [own] + ([b for b in default if b != own] if src.model is not None else [])
    else:
        chosen = list(backends)
        if own not in chosen:
            hint = f" (add the others to time them as peers built from {src.origin})" if src.model is not None else ""
            raise InputError(f"{src.path} is a {src.loader} file, which --backends {','.join(chosen)} cannot run: "
                             f"use --backends {own}{hint}")
    peers = [b for b in chosen if b != own]
    if src.model is None and peers:
        return [own], [f"no peers ({', '.join(peers)}): {src.why}; bench the checkpoint or config it was built from to time them"]
    if src.model is None:
        return [own], [f"{src.why}: only the file's own rows are measured"]
    return [own] + peers, []
