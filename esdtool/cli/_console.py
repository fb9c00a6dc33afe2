"""Terminal output helpers: one stdout console, one stderr console, untrusted text made safe.

Tensor names and metadata come from checkpoints written by strangers: they are printed with
markup off and control characters escaped, so they can neither style nor move the terminal.
"""

from __future__ import annotations

from rich.console import Console

from esdtool.untrusted import printable as safe

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

__all__ = ["err", "out", "print_error", "safe"]


def print_error(message: str, hint: str | None = None) -> None:
    """One line on stderr: what happened, then (if any) what to do about it."""
    message, hint = " ".join(str(message).split()), hint and " ".join(hint.split())
    line = f"Error: {safe(message)}" + (f" (hint: {safe(hint)})" if hint else "")
    err.print(line, markup=False, style="bold red", soft_wrap=True)
