"""Sidecar metadata (``model.engine.json``, ``model.pt2.json``): the facts needed to run or refuse an engine.

Compiled engines cannot carry our metadata inside, so it lives beside them, written atomically. The
sidecar also records the artifact's size and sha256 (``integrity``), taken from the file on disk when the
sidecar is written; reading the sidecar checks the file against it, so a corrupted or swapped artifact
is refused, naming the file, before any library parses it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import integrity
from ..atomic import write_text
from ..errors import EngineError


def sidecar_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def write_sidecar(engine_path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` beside ``engine_path`` with the artifact's current size and sha256 (``integrity``)."""
    path = sidecar_path(engine_path)
    data = {k: v for k, v in data.items() if k != "integrity"}
    if Path(engine_path).is_file():
        data["integrity"] = integrity.record(engine_path)
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(engine_path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The sidecar of ``engine_path`` as a dict with a ``signature``; with ``verify``, the artifact must be
    the file the sidecar was written for (size, sha256)."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise EngineError(f"{engine_path}: its sidecar {path.name} is missing; rebuild the engine with "
                          "'rtdetr-deploy build' (the sidecar records the I/O signature, GPU and library it was built for)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path}: a sidecar is a JSON object, this one is a JSON {type(data).__name__}; rebuild the engine")
    if not isinstance(data.get("signature"), dict):
        raise EngineError(f"{path}: the sidecar has no 'signature' object (the engine's inputs and outputs); rebuild the engine")
    if verify and Path(engine_path).is_file():
        integrity.check_record(engine_path, data.get("integrity"), f"its sidecar {path.name}")
    return data
