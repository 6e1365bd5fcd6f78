"""``rtdetr-deploy``: a thin command line over the Python API (each verb calls one public function).

Errors the user can cause print one line and exit with code 2; ``--verbose`` shows the traceback. ``app.py`` holds
the typer app; ``stages.py`` (export, inspect, build, quantize), ``tasks.py`` (run, bench, eval, demo), ``checks.py``
(compare, validate) and ``serving.py`` (serve, export-triton, serve-bench) register their verbs on it; ``main.py``
is the entry point.

May import: every stage package and the top-level helpers (lazily, inside each verb, so `--help` stays fast).
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]
