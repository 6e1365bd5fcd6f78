"""Running Triton's own ``tritonserver`` (the binary inside the ``nvidia-pytriton`` wheel) on a model repository.

The server is a child process: it is given its own backend directory (the python backend and the stub
built for this Python), ``PATH`` with this interpreter first (the stub starts the ``python3`` it finds
there), and ``PYTHONPATH`` with the toolkit, so ``model.py`` imports the same toolkit as the caller. It dies
with its parent (``PR_SET_PDEATHSIG``), and it is stopped with SIGTERM, on which Triton stops accepting new
requests, answers the ones in flight and unloads the models before it exits.

It runs in its own process group, which its python-backend stubs inherit: a server that crashed or was killed
(SIGKILL, the OOM killer) leaves its stubs orphaned and holding their memory and GPU contexts, so ``stop`` ends
whatever is left of the group once the server itself is gone. (A terminal's Ctrl-C reaches the toolkit alone,
which stops the server with SIGTERM, the draining stop.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import EngineError, InputError, MissingDependencyError

READY_TIMEOUT_S = 120.0


@dataclass
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def pytriton_dist() -> tuple[Path, Path]:
    """(tritonserver distribution directory, its shared libraries) from the installed ``nvidia-pytriton``."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("serving needs Triton's server binary from nvidia-pytriton: pip install 'rtdetr-deploy[serve]'")
    root = Path(list(spec.submodule_search_locations)[0])
    dist = root / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise MissingDependencyError(f"{dist}: nvidia-pytriton has no tritonserver binary here; reinstall it")
    return dist, root.parent / "nvidia_pytriton.libs"


def backend_directory(work: Path) -> Path:
    """A backend directory with the python backend and the stub for this interpreter's version."""
    dist, _ = pytriton_dist()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise MissingDependencyError(f"nvidia-pytriton has no python-backend stub for Python {version}")
    target = work / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for f in (dist / "backends" / "python").iterdir():
        if f.is_file() and not (target / f.name).exists():
            os.symlink(f, target / f.name)
    if not (target / stub.name).exists():
        os.symlink(stub, target / stub.name)
    return work / "backends"


def check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"{what} port {port} on {host} is in use ({e.strerror}); pick another with --{what}-port") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stub_environment(work: Path, python_path: Sequence[str]) -> Path:
    """A minimal virtual environment whose ``python3`` sees exactly ``python_path`` (in order).

    Triton's python stub ignores PYTHONPATH: it takes its ``sys.path`` from the ``python3`` on PATH. Pointing
    PATH at this environment gives the stub the serving process's own packages (the toolkit, torch) whatever
    environment the server was started from.
    """
    env = work / "stub-python"
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = env / "lib" / version / "site-packages"
    (env / "bin").mkdir(parents=True, exist_ok=True)
    site.mkdir(parents=True, exist_ok=True)
    base = Path(getattr(sys, "_base_executable", sys.executable))
    for name in ("python3", "python", version):
        if not (env / "bin" / name).exists():
            os.symlink(base, env / "bin" / name)
    (env / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\nversion = {sys.version.split()[0]}\n")
    (site / "_rtdetr_deploy_serve.pth").write_text("\n".join(dict.fromkeys(str(Path(p).resolve()) for p in python_path)) + "\n")
    return env


def server_env(work: Path, python_path: Sequence[str] | None = None) -> dict[str, str]:
    """The environment the stub needs: a ``python3`` that sees the toolkit and this process's packages."""
    import toolkit

    _, libs = pytriton_dist()
    env = dict(os.environ)
    paths = [str(Path(toolkit.__file__).resolve().parent.parent),
             *[p for p in (sys.path if python_path is None else python_path) if p and Path(p).is_dir()]]
    stub = stub_environment(work, paths)
    env["PATH"] = f"{stub / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    libdir = Path(sys.base_prefix) / "lib"  # a pyenv-built Python: its own libpython, not the system's
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), str(libdir), env.get("LD_LIBRARY_PATH", "")) if p)
    env.pop("PYTHONHOME", None)
    env.setdefault("OMP_NUM_THREADS", "1")  # see toolkit.serve.serve: CPU instances are single-threaded unless asked
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class TritonProcess:
    """A running ``tritonserver``; ``stop()`` is graceful (SIGTERM: in-flight requests are answered)."""

    process: subprocess.Popen
    host: str
    ports: Ports
    log_path: Path
    model: str
    work: Any = None  # TemporaryDirectory kept alive as long as the server
    exit_timeout_s: int = 30
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.ports.grpc}/{self.model}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.ports.http}/{self.model}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def errors(self, limit: int = 12) -> str:
        """Triton's error lines (``E1203 ...``) and the failed models' status, else the log's tail."""
        import re

        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        keep = [ln.strip() for ln in lines if re.match(r"^E\d{4} ", ln) or re.search(r"(Error|Exception|UNAVAILABLE)", ln)]
        keep = [re.sub(r"\s*\|\s*", " | ", k).strip(" |") for k in keep]
        return "\n".join(dict.fromkeys(keep[-limit:])) or self.log_tail()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, progress: Callable[[str], None] | None = None) -> None:
        """Poll Triton's readiness endpoint (bounded); a server that exits or never gets ready is an EngineError."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        url = f"http://{self.host}:{self.ports.http}/v2/models/{self.model}/ready"
        next_note = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise EngineError(f"tritonserver exited with code {self.process.returncode} while loading {self.model}:\n{self.errors()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise EngineError(f"tritonserver did not get {self.model} ready in {timeout_s:g} s:\n{self.errors()}")
            if progress is not None and time.monotonic() >= next_note:
                progress(f"waiting for {self.model} to load ({timeout_s - (deadline - time.monotonic()):.0f} s)")
                next_note += 10
            time.sleep(0.2)

    def stop(self, timeout_s: float | None = None) -> int:
        """SIGTERM, then wait (Triton drains in-flight requests); SIGKILL only past the timeout."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s if timeout_s is not None else self.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._end_group()
        if self.work is not None and not self._stopped:
            self.work.cleanup()
        self._stopped = True
        return self.process.returncode

    def _end_group(self) -> None:
        """SIGKILL what is left of the server's process group (stubs orphaned by a server that died first)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "TritonProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_tritonserver(repository: Path, model: str, *, host: str = "127.0.0.1", ports: Ports | None = None,
                       work: Any = None, exit_timeout_s: int = 30, log_verbose: int = 0,
                       python_path: Sequence[str] | None = None, stub_timeout_s: float = 300) -> TritonProcess:
    """Start ``tritonserver`` on ``repository`` (its metrics endpoint on); returns at once, see ``wait_ready``.

    ``python_path``: the stub's ``sys.path`` (default: this process's). ``stub_timeout_s``: how long a python
    stub may take to start and import the toolkit, torch and the engine's library (Triton's default, 30 s, is
    short on a busy machine).
    """
    ports = ports or Ports()
    for what, port in (("http", ports.http), ("grpc", ports.grpc), ("metrics", ports.metrics)):
        check_port_free(host, port, what)
    dist, _ = pytriton_dist()
    work = work or tempfile.TemporaryDirectory(prefix="rtdetr-serve-")
    base = Path(work.name)
    log_path = base / "tritonserver.log"
    cmd = [str(dist / "bin" / "tritonserver"), f"--model-repository={repository}",
           f"--backend-directory={backend_directory(base)}", f"--cache-directory={dist / 'caches'}",
           f"--http-address={host}", f"--http-port={ports.http}", f"--grpc-address={host}", f"--grpc-port={ports.grpc}",
           "--allow-metrics=true", f"--metrics-address={host}", f"--metrics-port={ports.metrics}",
           "--allow-gpu-metrics=false", f"--backend-config=python,stub-timeout-seconds={int(stub_timeout_s)}", "--model-control-mode=none", "--strict-readiness=true",
           f"--exit-timeout-secs={exit_timeout_s}", f"--log-verbose={log_verbose}", "--log-info=true"]
    log = open(log_path, "wb")
    try:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=server_env(base, python_path),
                                   preexec_fn=_die_with_parent, start_new_session=True)
    finally:
        log.close()
    return TritonProcess(process, host, ports, log_path, model, work, exit_timeout_s)
