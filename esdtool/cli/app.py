"""Wiring: the `esdtool` Typer app, its global options, and the error boundary `main()`."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Annotated

import typer

from esdtool.cli import ablate as ablate_cmd
from esdtool.cli import allocate as allocate_cmd
from esdtool.cli import analyze as analyze_cmd
from esdtool.cli import compare as compare_cmd
from esdtool.cli import finetune as finetune_cmd
from esdtool.cli import report as report_cmd
from esdtool.cli._console import print_error
from esdtool.errors import EsdtoolError
from esdtool.version import __version__

app = typer.Typer(
    name="esdtool",
    help="Read the eigenvalue spectra of a model's weights and turn them into LoRA ranks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
for _name, _module in (
    ("analyze", analyze_cmd),
    ("allocate", allocate_cmd),
    ("report", report_cmd),
    ("compare", compare_cmd),
    ("finetune", finetune_cmd),
    ("ablate", ablate_cmd),
):
    app.command(_name, help=_module.HELP, epilog=_module.EXAMPLES, no_args_is_help=True)(
        getattr(_module, _name)
    )

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"esdtool {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show full tracebacks on errors (also ESDTOOL_DEBUG=1)."),
    ] = False,
) -> None:
    """Read the eigenvalue spectra of a model's weights and turn them into LoRA ranks."""
    _state["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning library errors into one-line messages."""
    debug_env = os.environ.get("ESDTOOL_DEBUG", "") not in ("", "0")
    _state["debug"] = False
    # SIGTERM (a scheduler's stop, `timeout`) ends the run as Ctrl-C does: finished rows stay in
    # the resume sidecar and half-built plan directories are removed, instead of an abrupt exit.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        app(args=argv, prog_name="esdtool")
    except EsdtoolError as exc:
        if _state["debug"] or debug_env:
            raise
        print_error(str(exc), exc.hint)
        _json_error(argv, str(exc), exc.hint, exc.exit_code)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug: still one line, the traceback on request
        if _state["debug"] or debug_env:
            raise
        message = f"unexpected {type(exc).__name__}: {exc}"
        hint = "re-run with --debug for the traceback, and please report it"
        print_error(message, hint)
        _json_error(argv, message, hint, 1)
        sys.exit(1)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _json_error(argv: list[str] | None, message: str, hint: str | None, code: int) -> None:
    """With --json, the error as one JSON object on stdout too, so a script piping stdout to a
    JSON parser reads what went wrong instead of nothing."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "--json" in args:
        print(json.dumps({"error": " ".join(message.split()), "hint": hint, "exit_code": code}))


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
