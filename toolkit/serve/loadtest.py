"""Load test of a served model: requests per second and p50/p99 latency at several concurrencies.

Each client thread sends batch-1 requests through the toolkit's remote engine (so every response is checked
for shape and content) for a bounded count and time. Triton's own statistics before and after each level
give the dynamic batcher's effect: ``inference_count`` (images answered) over ``execution_count`` (model
calls) is the mean batch the batcher formed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError


@dataclass
class LoadLevel:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    inferences: int  # Triton's inference_count delta
    executions: int  # Triton's execution_count delta

    @property
    def mean_batch(self) -> float:
        return self.inferences / self.executions if self.executions else 0.0

    def row(self) -> list[str]:
        return [str(self.concurrency), str(self.requests), str(self.errors), f"{self.rps:.1f}", f"{self.p50_ms:.1f}",
                f"{self.p99_ms:.1f}", str(self.inferences), str(self.executions), f"{self.mean_batch:.2f}"]


HEADER = ["concurrency", "requests", "errors", "req/s", "p50 ms", "p99 ms", "inferences", "executions", "mean batch"]


def _counts(engine: Any, at_least: int | None = None, timeout_s: float = 5.0) -> tuple[int, int]:
    """Triton's (inference_count, execution_count); ``at_least``: wait (bounded) until the server has counted that many
    inferences, since its statistics are updated just after the responses go out."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.statistics()
        counts = int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
        if at_least is None or counts[0] >= at_least or time.monotonic() > deadline:
            return counts
        time.sleep(0.02)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def load_test(url: str, concurrency: Sequence[int] = (1, 8, 32), requests_per_level: int = 64, max_seconds: float = 60.0,
              say: Callable[[str], None] | None = None) -> list[LoadLevel]:
    """Bounded load at each concurrency: ``requests_per_level`` requests (or ``max_seconds``, whichever first)."""
    from ..runtime.engine import load
    from ..runtime.preprocessing import engine_preprocess
    from ..signature import INPUT_IMAGES, INPUT_SIZES

    if not concurrency or min(concurrency) < 1 or requests_per_level < 1:
        raise InputError("concurrency levels and the request count must be positive")
    engine = load(url)
    h, w = engine_preprocess(engine).size
    gen = torch.Generator().manual_seed(0)
    feeds = {INPUT_IMAGES: torch.rand(1, 3, h, w, generator=gen), INPUT_SIZES: torch.tensor([[w, h]])}
    counted = _counts(engine)[0]
    engine.infer(feeds)  # warm-up, and a checked answer before anything is timed
    counted += 1  # what the server has counted before each level (its statistics settle just after each response)
    levels = []
    for c in concurrency:
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        left = [requests_per_level]
        deadline = time.monotonic() + max_seconds

        def client() -> None:
            while time.monotonic() < deadline:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                t0 = time.perf_counter()
                try:
                    engine.infer(feeds)
                    ok = True
                except Exception:
                    ok = False
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    (latencies.append(dt) if ok else errors.__setitem__(0, errors[0] + 1))

        before = _counts(engine, at_least=counted)
        start = time.perf_counter()
        threads = [threading.Thread(target=client, daemon=True) for _ in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max_seconds + 30)
        seconds = time.perf_counter() - start
        after = _counts(engine, at_least=before[0] + len(latencies))
        counted = after[0]
        level = LoadLevel(c, len(latencies), errors[0], seconds, len(latencies) / seconds if seconds else 0.0,
                          _percentile(latencies, 0.5), _percentile(latencies, 0.99), after[0] - before[0], after[1] - before[1])
        levels.append(level)
        if say is not None:
            say(f"concurrency {c}: {level.rps:.1f} req/s, p50 {level.p50_ms:.1f} ms, p99 {level.p99_ms:.1f} ms, "
                f"{level.errors} errors, mean batch {level.mean_batch:.2f}")
    engine.close()
    return levels


def to_dict(levels: Sequence[LoadLevel]) -> list[dict[str, Any]]:
    return [asdict(level) | {"mean_batch": level.mean_batch} for level in levels]
