"""Artifacts (ONNX files, engines, reports) are written to a temporary file and renamed: never half-written.

* The temporary file sits beside the target, named ``.NAME.PID.RANDOM.tmp``: the pid says whose it is.
* It is created with the mode ``open()`` would give (``0o666`` less the umask, or the existing target's
  mode), not mkstemp's ``0600``, and that mode survives the rename.
* SIGTERM and SIGHUP during a write (where nobody else installed a handler) and SIGINT remove every
  temporary file of this process and exit with ``128 + signal`` after one line on stderr
  (:func:`install_signal_handlers`; the CLI installs them for its whole run).
* SIGKILL cannot be caught: the next write into the same folder removes the temporaries whose process is
  gone (a folder is scanned at most once a minute per process).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

_live: set[Path] = set()
_lock = threading.Lock()
_installed: dict[int, Any] = {}
_depth = 0
CAUGHT = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(SystemExit):
    """Raised by the signal handler: exit code ``128 + signum``, temporaries already removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


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


def remove_temporaries() -> int:
    """Delete every temporary file this process is writing; returns how many."""
    with _lock:
        paths = list(_live)
        _live.clear()
    n = 0
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)
            n += 1
    return n


def _on_signal(signum: int, frame: Any) -> None:
    n = remove_temporaries()
    name = signal.Signals(signum).name
    note = f"; removed {n} unfinished file{'s' if n != 1 else ''}" if n else ""
    with contextlib.suppress(Exception):
        sys.stderr.write(f"rtdetr-deploy: stopped by {name}{note}\n")
        sys.stderr.flush()
    raise Interrupted(signum)


def install_signal_handlers(signals: tuple[int, ...] = (*CAUGHT, signal.SIGINT)) -> dict[int, Any]:
    """Turn the given signals into a clean exit (temporaries removed, one line, ``128 + n``); returns the
    previous handlers. Only from the main thread (elsewhere Python cannot set handlers: nothing happens)."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for s in signals:
        previous[s] = signal.signal(s, _on_signal)
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    """Put back what :func:`install_signal_handlers` returned."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s, handler in previous.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _enter_write() -> None:
    """During a write, catch SIGTERM/SIGHUP where the program left them at their default (which kills
    without cleanup); SIGINT's default (KeyboardInterrupt) already unwinds through the cleanup."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        _depth += 1
        if _depth > 1:
            return
    for s in CAUGHT:
        if signal.getsignal(s) == signal.SIG_DFL:
            _installed[s] = signal.signal(s, _on_signal)


def _leave_write() -> None:
    global _depth
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        _depth -= 1
        if _depth > 0:
            return
    for s, old in list(_installed.items()):
        if signal.getsignal(s) is _on_signal:
            signal.signal(s, old)
        del _installed[s]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_scanned: dict[str, float] = {}
RESCAN_S = 60.0  # a folder is scanned at most once a minute: writing 10,000 images must not scan it 10,000 times


def remove_stale(target: Path, force: bool = False) -> list[Path]:
    """Remove the temporaries beside ``target`` left by processes that no longer exist (SIGKILL, power loss).

    Only names this module makes (``.NAME.PID.RANDOM.tmp``) whose process is gone are removed."""
    key = str(target.parent.resolve())
    now = time.monotonic()
    with _lock:
        if not force and now - _scanned.get(key, -RESCAN_S) < RESCAN_S:
            return []
        _scanned[key] = now
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            m = _TEMP_NAME.match(entry.name)
            if m is None or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _create_temp(target: Path) -> tuple[Path, int]:
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask applies, as for open()
        except FileExistsError:
            continue
        except OSError as e:
            raise InputError(f"output directory {target.parent} is not writable ({e.strerror})") from None
        os.close(fd)
        mode = os.stat(tmp).st_mode & 0o7777
        with contextlib.suppress(OSError):
            mode = os.stat(target).st_mode & 0o7777  # overwriting keeps the file's mode, as open() does
        return tmp, mode
    raise InputError(f"cannot create a temporary file beside {target}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error or signal delete it."""
    target = check_output_path(path)
    remove_stale(target)
    tmp, mode = _create_temp(target)
    with _lock:
        _live.add(tmp)
    _enter_write()
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer that replaced the file (or mkstemp-like libraries) must not leave 0600
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        with _lock:
            _live.discard(tmp)
        _leave_write()


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())
