"""Timing and environment facts for ``rtdetr-deploy bench``: CUDA events or wall-clock per call, percentiles,
and what a benchmark figure must name (GPU, driver, CUDA, library versions, date)."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_calls(call: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds per call: CUDA events on the current stream (GPU) or wall-clock (CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        call()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def environment(device: torch.device) -> dict[str, Any]:
    import platform

    from .. import __version__

    env: dict[str, Any] = {"toolkit": __version__, "torch": torch.__version__, "python": platform.python_version(),
                           "device": str(device), "date": time.strftime("%Y-%m-%d")}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(device))
        env["cuda"] = torch.version.cuda
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env
