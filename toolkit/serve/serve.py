"""``toolkit.serve``: any model ``toolkit.load`` takes, behind a real Triton Inference Server.

The model is written as a python-backend model repository (:mod:`toolkit.serve.repository`) and run by
``tritonserver`` itself, so what is served is exactly what ``export-triton --backend python`` ships and what
Triton publishes (metadata, datatypes, ``-1`` batch dims, statistics, metrics) is Triton's own. Before it is
announced, the served model answers one request through the toolkit's remote engine: a deployment that
would answer with empty or misshapen outputs never reports itself as listening.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError
from .repository import Repository, export_triton, model_name
from .server import READY_TIMEOUT_S, Ports, TritonProcess, check_port_free, start_tritonserver


@dataclass
class Server:
    """A served model: its URLs, the ``tritonserver`` process, and a graceful ``stop()``."""

    process: TritonProcess
    repository: Repository

    @property
    def grpc_url(self) -> str:
        return self.process.grpc_url

    @property
    def http_url(self) -> str:
        return self.process.http_url

    @property
    def metrics_url(self) -> str:
        return self.process.metrics_url

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int:
        """SIGTERM to tritonserver: in-flight requests are answered, then the model unloads and it exits."""
        return self.process.stop()

    def wait(self) -> int:
        return self.process.process.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _instance_devices(device: str | None, devices: Sequence[int] | None) -> tuple[str, list[int] | None]:
    """(device the repository records, GPUs with one instance group each)."""
    if devices:
        if device is not None and torch.device(device).type != "cuda":
            raise InputError(f"--devices lists GPUs, but --device is {device}")
        return "cuda", list(devices)
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        return "cuda", [index or 0]
    return device or "cpu", None


def _self_check(server: Server) -> None:
    """One request through the toolkit's remote engine; its response checks catch empty or misshapen outputs."""
    from ..runtime.engine import load
    from ..runtime.preprocessing import engine_preprocess
    from ..signature import INPUT_IMAGES, INPUT_SIZES

    engine = load(server.grpc_url, timeout_s=10)
    try:
        h, w = engine_preprocess(engine).size
        a, b = (engine.signature.preprocess.value_range if engine.signature.preprocess else (0.0, 1.0))
        feeds = {INPUT_IMAGES: torch.full((1, 3, h, w), (a + b) / 2), INPUT_SIZES: torch.tensor([[w, h]])}
        engine.infer(feeds)
    finally:
        engine.close()


def serve(model: Any, *, backend: str | None = None, device: str | None = None, name: str | None = None,
          max_batch: int = 32, max_queue_delay_us: int = 1000, host: str = "127.0.0.1", http_port: int = 8000,
          grpc_port: int = 8001, metrics_port: int = 8002, instances: int = 1, devices: Sequence[int] | None = None,
          block: bool = True, ready_timeout_s: float = READY_TIMEOUT_S, exit_timeout_s: int = 30,
          threads: int | None = None, python_path: Sequence[str] | None = None,
          say: Callable[[str], None] = print) -> Server:
    """Serve ``model`` (a file, checkpoint or config name ``toolkit.load`` takes) on Triton; dynamic batching on.

    ``devices``: GPU indices, one instance group (of ``instances`` instances) per GPU; without them the
    model runs on ``device`` (CPU by default). ``block=True`` (the CLI) serves until SIGINT/SIGTERM, then
    stops gracefully; ``block=False`` returns the running :class:`Server` (stop it, or use ``with``).
    ``threads``: torch threads per CPU instance (default 1: Triton scales CPU serving with ``instances``;
    several multi-threaded instances on the same cores spin against each other: measured on a loaded 2-core
    machine, batch-1 latency was 0.68 s with one thread and 12.6 s with two).
    ``python_path``: the ``sys.path`` Triton's python stub gets (default: this process's).
    """
    import tempfile

    if isinstance(model, torch.nn.Module):
        raise InputError("serve takes a file, checkpoint directory or config name: the server loads the model in its own process")
    record_device, gpus = _instance_devices(device, devices)
    name = name or model_name(model)
    for what, port in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port)):
        check_port_free(host, port, what)  # before the model is loaded: a busy port is refused at once
    work = tempfile.TemporaryDirectory(prefix="rtdetr-serve-")
    try:
        say(f"loading {model} to write its Triton model repository")
        repo = export_triton(model, Path(work.name) / "models", backend="python", name=name, max_batch=max_batch,
                             max_queue_delay_us=max_queue_delay_us, instances=instances, devices=gpus,
                             engine_backend=backend, device=record_device, ship_model=False,
                             parameters={"torch_threads": str(threads or (0 if gpus else 1))})
        ports = Ports(http_port, grpc_port, metrics_port)
        process = start_tritonserver(repo.root, name, host=host, ports=ports, work=work, exit_timeout_s=exit_timeout_s,
                                     python_path=python_path)
    except BaseException:
        work.cleanup()
        raise
    server = Server(process, repo)
    try:
        say(f"tritonserver (pid {process.pid}) is loading {name}")
        process.wait_ready(ready_timeout_s, progress=say)
        _self_check(server)
    except BaseException:
        server.stop()
        raise
    groups = f"{len(gpus)} GPU instance group(s) on {','.join(map(str, gpus))}" if gpus else f"{instances} CPU instance(s)"
    say(f"serving {name} ({repo.signature.input('images').describe() if 'images' in repo.signature.input_names else ''}; "
        f"max batch {repo.config_text.split('max_batch_size: ')[1].split()[0]}, {groups})")
    say(f"  gRPC    {server.grpc_url}")
    say(f"  HTTP    {server.http_url}")
    say(f"  health  http://{host}:{http_port}/v2/health/ready")
    say(f"  metrics {server.metrics_url}")
    if not block:
        return server
    say("Ctrl-C or SIGTERM stops it after answering the requests in flight")
    _serve_until_signal(server, say)
    return server


def _serve_until_signal(server: Server, say: Callable[[str], None]) -> None:
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.is_set() and server.process.process.poll() is None:
            stop.wait(0.5)
        if server.process.process.poll() is not None and not stop.is_set():
            from ..errors import EngineError

            raise EngineError(f"tritonserver exited on its own with code {server.process.process.returncode}:\n{server.process.errors()}")
        say("stopping: answering the requests in flight, then unloading")
        code = server.stop()
        say(f"tritonserver stopped (exit code {code})")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
