"""The typer app every verb registers on, its consoles, and the small parsers the verbs share."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export, build, run and compare RT-DETR detectors.")


def _width(stream) -> Optional[int]:
    """Rich draws 80 columns where the output is not a terminal, which cuts a bench table's config names to
    "aoti-…" in a log file. Off a terminal (and unless COLUMNS says otherwise) the tables get 200 columns."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return None if tty or os.environ.get("COLUMNS") else 200


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))
_state = {"verbose": False}


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")) -> None:
    _state["verbose"] = verbose


def _size(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise InputError(f"--size takes H,W or one positive number, got {value!r}")
    return parts[0], parts[1]


def _print_signature(signature) -> None:
    table = Table(title="I/O signature")
    for col in ("", "name", "dtype", "shape"):
        table.add_column(col)
    for row in signature.rows():
        table.add_row(*row)
    console.print(table)
