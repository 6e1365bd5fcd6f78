"""Sidecar metadata (``model.engine.json``, ``model.pt2.json``): the facts needed to run or refuse an engine.

Compiled engines cannot carry our metadata inside, so it lives beside them, written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..errors import EngineError


def sidecar_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def write_sidecar(engine_path: str | Path, data: dict[str, Any]) -> Path:
    path = sidecar_path(engine_path)
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise EngineError(f"{engine_path}: its sidecar {path.name} is missing; rebuild the engine with "
                          "'rtdetr-deploy build' (the sidecar records the I/O signature, GPU and library it was built for)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
