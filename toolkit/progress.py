"""Progress lines for long steps (export, compile, verify): one line when a step starts, one when it ends with
its elapsed time, and a "still ..." line every ``heartbeat_s`` while it runs.

Plain lines on stderr, so they show in logs and CI too, where a spinner or a bar (which need a terminal)
shows nothing: a step that runs for minutes is never silent.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import IO, Iterator


class Steps:
    """``with Steps("export").step("tracing"):`` prints ``export: tracing ...`` then ``export: tracing done (3.1 s)``."""

    def __init__(self, name: str, enabled: bool = True, stream: IO[str] | None = None, heartbeat_s: float = 30.0) -> None:
        self.name = name
        self.enabled = enabled
        self.stream = stream
        self.heartbeat_s = heartbeat_s
        self.start = time.perf_counter()

    def say(self, line: str) -> None:
        if not self.enabled:
            return
        stream = self.stream or sys.stderr
        with contextlib.suppress(Exception):  # progress must never break the work
            stream.write(f"{self.name}: {line}\n")
            stream.flush()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                self.say(f"still {what} ({time.perf_counter() - start:.0f} s)")

        self.say(f"{what} ...")
        ticker = threading.Thread(target=beat, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join(timeout=1)
        self.say(f"{what} done ({time.perf_counter() - start:.1f} s)")
