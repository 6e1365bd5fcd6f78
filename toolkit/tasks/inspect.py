"""Inspect an artifact: its I/O signature (names, dtypes, symbolic shapes), metadata and warnings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, SignatureError
from ..integrity import check_onnx, check_zip
from ..signature import Signature, from_onnx

INT64_WARNING = ("input {name} is declared int64. TensorRT 8 casts int64 inputs to int32: a torch int64 tensor "
                 "bound there by pointer reads [[640,640]] as [[640,0]], which makes every y coordinate zero. "
                 "Run engines through toolkit.load() (it converts or refuses), or export with --sizes-dtype int32.")


@dataclass
class InspectReport:
    path: Path
    kind: str
    signature: Signature
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "signature": self.signature.to_dict(),
                "metadata": self.metadata, "warnings": self.warnings}


def _warnings(signature: Signature, int64_note: bool = True) -> list[str]:
    notes = [INT64_WARNING.format(name=t.name) for t in signature.inputs if t.dtype == "int64" and int64_note]
    batch = signature.batch_warning()
    return notes + ([batch] if batch else [])


def inspect_file(path: str | Path) -> InspectReport:
    """Read ``path`` (.onnx, or an engine/.pt2 with its sidecar) without running it."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise InputError(f"{p} is empty (0 bytes), probably from an interrupted write or copy")
    if p.suffix.lower() == ".onnx":
        import onnx

        check_onnx(p)
        try:
            model = onnx.load(str(p), load_external_data=False)
        except Exception as e:
            raise InputError(f"{p}: not a readable ONNX file ({e.__class__.__name__})") from None
        if not model.graph.node or not model.graph.output:
            raise InputError(f"{p}: not an ONNX model (no graph nodes or outputs)")
        meta: dict[str, Any] = {}
        for prop in model.metadata_props:
            try:
                meta[prop.key] = json.loads(prop.value) if prop.key in ("class_names", "input_size", "preprocess") else prop.value
            except json.JSONDecodeError:
                meta[prop.key] = prop.value
        meta["opset"] = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        meta["producer"] = f"{model.producer_name} {model.producer_version}".strip()
        try:
            sig = from_onnx(model)
        except SignatureError as e:
            raise InputError(f"{p}: {e}") from None
        return InspectReport(p, "onnx", sig, meta, _warnings(sig))
    from ..runtime.sidecar import read_sidecar

    meta = read_sidecar(p)  # refuses a file that is not the one its sidecar was written for
    if p.suffix.lower() == ".pt2":
        check_zip(p)
    try:
        sig = Signature.from_dict(meta["signature"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{p}: its sidecar's signature is not valid ({e.__class__.__name__}: {e}); rebuild it") from None
    kind = meta.get("backend", p.suffix.lstrip("."))
    warnings = []
    tensorrt = kind in ("tensorrt", "tensorrt-rtx") or p.suffix.lower() in (".engine", ".plan")
    for t in sig.inputs if tensorrt else ():  # raw-pointer binding of narrowed int inputs is a TensorRT matter
        if t.dtype == "int64":
            warnings.append(f"input {t.name} is int64 in this engine (TensorRT 10/11 keep int64): bind int64 tensors; "
                            "toolkit.load() checks this for you")
        if t.name == "orig_target_sizes" and t.dtype == "int32":
            warnings.append("input orig_target_sizes is int32 in this engine: a torch int64 tensor bound by raw pointer "
                            "reads [[640,640]] as [[640,0]] (every y coordinate 0); toolkit.load() converts it safely")
    if sig.batch_warning():
        warnings.append(sig.batch_warning())
    return InspectReport(p, kind, sig, {k: v for k, v in meta.items() if k != "signature"}, warnings)
