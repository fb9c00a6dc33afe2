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


def hush(quiet: bool) -> None:
    """--quiet / --json: errors only. Python warnings (PEFT's, transformers', torch's) and the
    log lines of transformers and datasets are silenced; esdtool's own errors still print."""
    if not quiet:
        return
    import logging
    import warnings

    warnings.simplefilter("ignore")
    for name in ("transformers", "datasets", "peft", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
