"""The console entry point: every verb module registered on the app, one line and exit 2 for a ToolkitError,
signals turned into a clean exit."""

from __future__ import annotations

from importlib import import_module
from typing import Optional

import typer
from rich.markup import escape

from .app import _state, app, err_console

# each module registers its verbs on the app; this order is the order of `rtdetr-deploy --help`
for _verbs in ("stages", "tasks", "checks", "serving"):
    import_module(f".{_verbs}", __package__)


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point: ToolkitError -> one line on stderr, exit 2."""
    from ..atomic import install_signal_handlers, restore_signal_handlers

    previous = install_signal_handlers()  # SIGTERM/SIGHUP/SIGINT: unfinished files removed, one line, exit 128+n
    try:
        return _main_body(argv)
    finally:
        restore_signal_handlers(previous)


def _main_body(argv: Optional[list[str]]) -> int:
    from ..atomic import Interrupted
    from ..errors import ToolkitError

    try:
        code = app(args=argv, standalone_mode=False)  # typer.Exit(n) comes back as the return value here
    except ToolkitError as e:
        if _state["verbose"]:
            raise
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except Interrupted as e:  # the handler already printed its line
        return int(e.code)
    except KeyboardInterrupt:
        err_console.print("rtdetr-deploy: stopped by SIGINT", highlight=False)
        return 130
    except (typer.Exit, SystemExit) as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except typer.Abort:
        return 1
    except Exception as e:  # usage errors: typer bundles its own click, so match both
        if type(e).__name__ in ("UsageError", "BadParameter", "NoSuchOption", "MissingParameter", "BadOptionUsage",
                                "BadArgumentUsage") or hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            return 2
        raise
    return int(code or 0)
