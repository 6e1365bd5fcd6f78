"""The model a built file was made from, where the file records it: the torch model ``bench`` builds peers from and
``validate`` judges the file against.

An exported ``.onnx`` records ``source``/``source_config`` and the weights' sha256 in its metadata; a model-compiled
package (``.pt2``, ``.ep``, each bucket of a ``.buckets`` manifest) records the same in its sidecar's ``model_source``;
a TensorRT ``.engine`` names the ONNX file it was built from (and its sha256), which is used where it still lies
beside the engine. The model is rebuilt and used only when its weights are the recorded ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, ToolkitError


@dataclass
class RecordedModel:
    """``model``: the rebuilt model, or None (``why`` says why); ``origin``: where it came from, in words;
    ``meta``: the file's metadata or sidecar (``precision``, ``inner_backend``...)."""

    model: Any
    origin: str = ""
    why: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def recorded_model(source: Any, native: str) -> RecordedModel:
    """The model the built file ``source`` (whose backend is ``native``, :func:`toolkit.runtime.engine.detect_backend`)
    records; a file whose record is missing or stale gives ``model=None`` and the reason, never an error."""
    if native == "triton":
        return RecordedModel(None, why=f"{source} is a served model, which records no source model here")
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if native == "onnxruntime":
        return _onnx_source(path)
    from ..runtime.sidecar import read_sidecar

    if native == "buckets":
        from ..runtime.buckets import read_manifest

        meta = read_manifest(path)
    else:
        meta = read_sidecar(path)
    if native == "tensorrt":  # the ONNX file it was built from, where it still lies beside the engine
        found = _engine_source(path, meta)
    else:
        found = _rebuild(meta.get("model_source"), str(path))
    found.meta = meta
    return found


def _rebuild(record: dict[str, Any] | None, what: str) -> RecordedModel:
    """(model or None, where it came from, why not) from a package's ``model_source`` record."""
    from ..models.loading import load_model
    from ..models.weights import weights_sha256

    record = record or {}
    source, config = record.get("source"), record.get("source_config")
    if not source and not config:
        return RecordedModel(None, "", f"{what} records no source model (it was compiled from an in-memory module, or by an older toolkit)")
    origin = source or f"config {config}"
    try:
        deploy = load_model(source, config=config) if source else load_model(None, config=config)
    except (ToolkitError, OSError) as e:
        return RecordedModel(None, origin, f"{what} was built from {origin}, which cannot be loaded here ({str(e).splitlines()[0]})")
    if record.get("weights_sha256") and record["weights_sha256"] != weights_sha256(deploy):
        return RecordedModel(None, origin, f"{what} was built from {origin}, but the weights there are not the ones it was built from")
    return RecordedModel(deploy.eval(), origin)


def _onnx_source(path: Path) -> RecordedModel:
    import onnx

    from .build import model_for_onnx
    from ..integrity import check_onnx

    check_onnx(path)
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    origin = meta.get("source") or (f"config {meta['source_config']}" if meta.get("source_config") else "")
    try:
        return RecordedModel(model_for_onnx(path).eval(), origin, "", meta)
    except ToolkitError as e:
        return RecordedModel(None, origin, str(e).split("; give the model instead")[0], meta)


def _engine_source(path: Path, meta: dict[str, Any]) -> RecordedModel:
    from ..integrity import file_sha256

    onnx_file = meta.get("onnx_file")
    beside = path.parent / str(onnx_file) if onnx_file else None
    if beside is None or not beside.is_file():
        return RecordedModel(None, "", f"{path} names no ONNX file beside it ({onnx_file or 'none recorded'}) to rebuild its model from")
    if meta.get("onnx_sha256") and file_sha256(beside) != meta["onnx_sha256"]:
        return RecordedModel(None, str(beside), f"{beside} changed since {path.name} was built from it")
    return _onnx_source(beside)


