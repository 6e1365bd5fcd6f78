"""Artifacts (ONNX files, engines, reports) are written to a temporary file and renamed: never half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError


def check_output_path(path: str | Path) -> Path:
    """A clear error for an output path that is a directory, or whose directory is missing or unwritable."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"output {p} is a directory; give a file name such as {p / 'model.onnx'}")
    if not p.parent.is_dir():
        raise InputError(f"output directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise InputError(f"output directory {p.parent} is not writable")
    return p


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error delete it."""
    target = check_output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise InputError(f"output directory {target.parent} is not writable ({e.strerror})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())
