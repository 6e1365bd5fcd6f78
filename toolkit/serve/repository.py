"""``export-triton``: a Triton model repository (``NAME/config.pbtxt`` + ``NAME/1/<model file>``) for any model.

Three kinds, one generator (:mod:`toolkit.serve.config`):
  * ``onnxruntime``: ``1/model.onnx`` for Triton's ONNX Runtime backend (a checkpoint is exported first);
  * ``tensorrt``: ``1/model.plan`` (a built ``.engine`` with its sidecar, which supplies the signature);
  * ``python``: ``1/model.py`` (:mod:`toolkit.serve.triton_model`) plus the artifact, loaded with
    ``toolkit.load`` inside Triton's python stub: the kind ``rtdetr-deploy serve`` runs.

A model directory is built beside its target and renamed into place, so a server watching the repository
never sees half a model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from ..runtime.engine import detect_backend, load
from ..runtime.sidecar import read_sidecar
from ..signature import Signature, from_onnx
from .config import PLATFORMS, TritonConfig, check, render

MODEL_FILE = Path(__file__).with_name("triton_model.py")


@dataclass
class Repository:
    """A written model repository."""

    root: Path
    name: str
    kind: str
    signature: Signature
    config_text: str

    @property
    def model_dir(self) -> Path:
        return self.root / self.name


def model_name(source: Any) -> str:
    """A Triton model name from the source (file stem or directory name), restricted to safe characters."""
    p = Path(str(source).rstrip("/"))
    stem = p.stem if p.suffix in (".onnx", ".engine", ".plan", ".pt2", ".ep") else p.name
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem).strip("_")
    return name or "model"


def _describe(source: Any, backend: str | None, device: str | None) -> tuple[Signature, list[str], str]:
    """(signature, class names, backend) of what ``toolkit.load`` would serve; loads it once to be sure it runs."""
    engine = load(source, backend=backend, device=device)
    try:
        return engine.signature, list(engine.class_names), engine.backend
    finally:
        engine.close()


def _copy_artifact(source: Any, version_dir: Path) -> str:
    """Copy a file (with its sidecar) or a checkpoint directory into ``1/``; the name to load it by."""
    p = Path(str(source))
    if p.is_dir():
        shutil.copytree(p, version_dir / p.name)
        return p.name
    if p.is_file():
        shutil.copy2(p, version_dir / p.name)
        if Path(str(p) + ".json").is_file():
            shutil.copy2(str(p) + ".json", version_dir / (p.name + ".json"))
        return p.name
    raise InputError(f"{source}: export-triton --backend python copies the model into the repository; give a file or directory "
                     "(a config name has no weights to ship)")


def _install(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_triton(model: Any, output: str | Path, *, backend: str = "python", name: str | None = None,
                  max_batch: int = 32, max_queue_delay_us: int = 1000, instances: int = 1,
                  devices: Sequence[int] | None = None, engine_backend: str | None = None, device: str | None = None,
                  ship_model: bool = True, parameters: dict[str, str] | None = None) -> Repository:
    """Write ``output/NAME/`` for Triton: config.pbtxt from the model's Signature and the model in ``1/``.

    ``backend``: the Triton backend (``onnxruntime``, ``tensorrt``, ``python``). For ``python``,
    ``engine_backend``/``device`` pick how ``toolkit.load`` runs it inside the server and ``ship_model=False``
    points the repository at the model where it is instead of copying it (what ``serve`` does).
    """
    if backend not in PLATFORMS:
        raise InputError(f"unknown --backend {backend!r}; choose {', '.join(PLATFORMS)}")
    if Path(str(model)).suffix.lower() in (".onnx", ".engine", ".plan", ".pt2", ".ep") and not Path(str(model)).is_file():
        raise InputError(f"{model}: no such file")
    root = Path(output)
    if root.exists() and not root.is_dir():
        raise InputError(f"output {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    name = name or model_name(model)
    params = dict(parameters or {})
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        version = tmp / "1"
        version.mkdir()
        native = detect_backend(model)
        if backend == "onnxruntime":
            if native == "onnxruntime":
                shutil.copy2(model, version / "model.onnx")
            else:
                from ..export.onnx import export_onnx

                export_onnx(model, version / "model.onnx")
            signature = from_onnx(version / "model.onnx")
            names = _onnx_class_names(version / "model.onnx")
        elif backend == "tensorrt":
            if native != "tensorrt":
                raise InputError(f"{model}: --backend tensorrt takes a built engine (rtdetr-deploy build m.onnx -o m.engine)")
            meta = read_sidecar(model)
            signature = Signature.from_dict(meta["signature"])
            names = list(meta.get("class_names", []))
            shutil.copy2(model, version / "model.plan")
        else:
            signature, names, used = _describe(model, engine_backend, device)
            if ship_model:
                params.update(source=_copy_artifact(model, version), source_in_version="1")
            else:
                params["source"] = str(Path(model).resolve()) if Path(str(model)).exists() else str(model)
            params.update(backend=used, device="cuda" if devices else (device or "cpu"))
            shutil.copy2(MODEL_FILE, version / "model.py")
        text = render(TritonConfig(name, backend, signature, max_batch, max_queue_delay_us, instances, devices, names, params))
        check(text, signature)  # parsed back with Triton's protobuf definitions: what a server will read
        (tmp / "config.pbtxt").write_text(text)
        _install(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Repository(root, name, backend, signature, text)


def _onnx_class_names(path: Path) -> list[str]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(meta["class_names"]) if "class_names" in meta else []


def parse_devices(text: str | None) -> list[int] | None:
    """``"0,1"`` -> ``[0, 1]``; None or empty -> None (CPU instances)."""
    if not text:
        return None
    try:
        devices = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise InputError(f"--devices takes GPU indices such as 0,1, got {text!r}") from None
    if not devices or min(devices) < 0 or len(set(devices)) != len(devices):
        raise InputError(f"--devices takes distinct GPU indices such as 0,1, got {text!r}")
    return devices
