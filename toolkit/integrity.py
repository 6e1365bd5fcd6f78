"""Artifacts carry their own integrity: every file the toolkit writes records its size and sha256.

Why: a bit-flipped ``.pt2`` or ``.onnx`` loads without complaint and moves boxes by hundreds of pixels
(or segfaults inside AOTInductor). A recorded hash turns that into one clear error naming the file.

* Compiled artifacts (``.engine``, ``.pt2``, ``.ep``) record ``{"integrity": {"size", "sha256"}}`` in their
  sidecar (:func:`toolkit.runtime.sidecar.write_sidecar` adds it from the file on disk).
* ONNX files cannot hold their own hash, so they hold a fixed-length metadata value
  (``rtdetr-integrity-v1 sha256=<64 hex> size=<16 digits>``): the sha256 is taken over the file with those
  64 hex digits set to ``0``. Sealing patches the value in place, so the size never changes.
* Checking is fast when nothing changed: a file already verified at the same path, size, inode and mtime
  is not hashed again (the size is always compared).

A ``.pt2`` package is a zip: :func:`check_zip` also verifies every entry's CRC before AOTInductor reads it.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from .errors import IntegrityError

ONNX_KEY = "rtdetr_deploy_integrity"
_PREFIX = b"rtdetr-integrity-v1 sha256="
_HEX, _SIZE_DIGITS = 64, 16
_SIZE_TAG = b" size="
ONNX_PLACEHOLDER = (_PREFIX + b"0" * _HEX + _SIZE_TAG + b"0" * _SIZE_DIGITS).decode()
_REBUILD = "re-export or rebuild it (the file changed after the toolkit wrote it: a bad copy, a truncated download, disk corruption)"

_EDITED = f"; if you edited the graph on purpose, delete its {ONNX_KEY} metadata entry"

_verified: dict[str, tuple[int, int, int, str]] = {}
_lock = threading.Lock()


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_ino, st.st_mtime_ns


def _cached(path: Path, sha256: str) -> bool:
    with _lock:
        hit = _verified.get(str(path.resolve()))
    return hit is not None and hit == (*_stat_key(path), sha256)


def _remember(path: Path, sha256: str) -> None:
    with _lock:
        _verified[str(path.resolve())] = (*_stat_key(path), sha256)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def record(path: str | Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file, for its sidecar."""
    p = Path(path)
    sha = file_sha256(p)
    _remember(p, sha)
    return {"size": p.stat().st_size, "sha256": sha}


def check_record(path: str | Path, rec: Any, what: str = "its sidecar") -> None:
    """Refuse ``path`` unless it has the size and sha256 recorded in ``rec``."""
    p = Path(path)
    if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("size"), int):
        raise IntegrityError(f"{p}: {what} records no size and sha256 of the file (written by hand or by an older "
                             "toolkit), so nothing says this file is the artifact it describes; rebuild it with rtdetr-deploy build")
    size = p.stat().st_size
    if size != rec["size"]:
        raise IntegrityError(f"{p}: {size} bytes, but {what} records {rec['size']}: truncated or modified; {_REBUILD}")
    if _cached(p, rec["sha256"]):
        return
    sha = file_sha256(p)
    if sha != rec["sha256"]:
        raise IntegrityError(f"{p}: sha256 {sha[:12]}... differs from the {rec['sha256'][:12]}... recorded in {what}; {_REBUILD}")
    _remember(p, sha)


def _locate(data: bytes | bytearray) -> int:
    at = data.rfind(_PREFIX)
    if at < 0:
        return -1
    end = at + len(_PREFIX) + _HEX + len(_SIZE_TAG) + _SIZE_DIGITS
    if end > len(data) or data[at + len(_PREFIX) + _HEX: at + len(_PREFIX) + _HEX + len(_SIZE_TAG)] != _SIZE_TAG:
        return -1
    return at


def seal_onnx(path: str | Path) -> str:
    """Fill the placeholder metadata value of an ONNX file (written with :data:`ONNX_PLACEHOLDER`) in place."""
    p = Path(path)
    data = bytearray(p.read_bytes())
    at = _locate(data)
    if at < 0:
        raise IntegrityError(f"{p}: no {ONNX_KEY} placeholder to seal")
    hex_at = at + len(_PREFIX)
    size_at = hex_at + _HEX + len(_SIZE_TAG)
    data[hex_at:hex_at + _HEX] = b"0" * _HEX
    data[size_at:size_at + _SIZE_DIGITS] = str(len(data)).zfill(_SIZE_DIGITS).encode()
    sha = hashlib.sha256(data).hexdigest()
    data[hex_at:hex_at + _HEX] = sha.encode()
    with open(p, "r+b") as f:  # same length: patch in place, keep the file's mode
        f.write(data)
    _remember(p, sha)
    return sha


def check_onnx(path: str | Path) -> bool:
    """Refuse an ONNX file the toolkit sealed whose bytes changed since; True if it was sealed, False if not ours."""
    p = Path(path)
    size_now = p.stat().st_size
    with _lock:
        hit = _verified.get(str(p.resolve()))
    if hit is not None and hit[:3] == _stat_key(p):
        return True
    data = bytearray(p.read_bytes())
    at = _locate(data)
    if at < 0:
        return False
    hex_at = at + len(_PREFIX)
    size_at = hex_at + _HEX + len(_SIZE_TAG)
    recorded, size_field = data[hex_at:hex_at + _HEX].decode("ascii", "replace"), data[size_at:size_at + _SIZE_DIGITS]
    if not size_field.isdigit():
        raise IntegrityError(f"{p}: its integrity record is damaged; {_REBUILD}")
    if int(size_field) != size_now:
        raise IntegrityError(f"{p}: {size_now} bytes, but it was written with {int(size_field)}: truncated or modified; {_REBUILD}{_EDITED}")
    data[hex_at:hex_at + _HEX] = b"0" * _HEX
    sha = hashlib.sha256(data).hexdigest()
    if sha != recorded:
        raise IntegrityError(f"{p}: sha256 {sha[:12]}... differs from the {recorded[:12]}... it was written with; {_REBUILD}{_EDITED}")
    _remember(p, sha)
    return True


def check_zip(path: str | Path) -> None:
    """Every entry of a zip package (``.pt2``) reads back with its CRC: a clear error instead of a crash in the loader."""
    import zipfile

    p = Path(path)
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise IntegrityError(f"{p}: not a readable zip package ({e.__class__.__name__}: {e}); {_REBUILD}") from None
    except Exception as e:  # zlib.error and friends for a damaged deflate stream
        raise IntegrityError(f"{p}: a zip entry cannot be read ({e.__class__.__name__}: {e}); {_REBUILD}") from None
    if bad is not None:
        raise IntegrityError(f"{p}: zip entry {bad} fails its CRC check; {_REBUILD}")


def forget(path: str | Path) -> None:
    """Drop the fast-path cache entry of ``path`` (tests, or after rewriting a file in place)."""
    with _lock:
        _verified.pop(str(Path(path).resolve()), None)


__all__ = ["ONNX_KEY", "ONNX_PLACEHOLDER", "check_onnx", "check_record", "check_zip", "file_sha256", "forget", "record",
           "seal_onnx"]
