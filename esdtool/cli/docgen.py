"""docs/cli.md, written from the commands themselves so it cannot drift from them.

    python -m esdtool.cli.docgen > docs/cli.md      # `make docs` does this

A test regenerates it and fails when the file in the repository differs, and others fail when
any command, argument or option has no help text, or has a literal [word] that rich would read as
markup and swallow (write it as \\[word]).
"""

from __future__ import annotations

import re
from typing import Any

import typer
from rich.errors import StyleSyntaxError
from rich.style import Style
from rich.text import Text

from esdtool.cli.app import app

HEADER = """# Command-line reference

Generated from the commands' own help by `python -m esdtool.cli.docgen` (`make docs`); a
test fails when this file is stale. `esdtool COMMAND --help` prints the same in a terminal.
"""


def _plain(text: str) -> str:
    """Help text as the terminal shows it: rich markup ([bold] ... [/bold]) applied."""
    return Text.from_markup(text or "").plain.strip()


def _is_argument(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "argument"


def _flags(param: Any) -> str:
    if _is_argument(param):
        return (param.name or "").upper()
    names = list(param.opts) + list(param.secondary_opts)
    return ", ".join(f"`{n}`" for n in names)


def _default(param: Any) -> str:
    if getattr(param, "required", False):
        return "required"
    if _is_argument(param) or param.default is None:
        return ""
    if getattr(param, "is_flag", False) and not param.secondary_opts:
        return ""
    value = param.default
    return f"`{value}`" if not isinstance(value, bool) else f"`{'on' if value else 'off'}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _params_table(params: list[Any]) -> list[str]:
    rows = ["| argument / option | default | meaning |", "|---|---|---|"]
    for p in params:
        if getattr(p, "hidden", False) or p.name == "help":
            continue
        flags = _flags(p)
        help_text = _escape(_plain(getattr(p, "help", "") or ""))
        rows.append(f"| {flags} | {_default(p)} | {help_text} |")
    return rows


def cli_reference() -> str:
    """The whole docs/cli.md text."""
    group: Any = typer.main.get_command(app)
    out = [HEADER, "## esdtool", "", _plain(group.help), "", *_params_table(group.params), ""]
    for name, command in group.commands.items():
        args = " ".join(_flags(p) for p in command.params if _is_argument(p))
        out += [f"## esdtool {name}", "", "```", f"esdtool {name} [OPTIONS] {args}", "```", ""]
        out += [_plain(command.help), ""]
        out += [*_params_table(command.params), ""]
        if command.epilog:
            examples = [line.strip() for line in _plain(command.epilog).splitlines()]
            examples = [line for line in examples if line and line != "Examples"]
            out += ["Examples:", "", "```bash", *examples, "```", ""]
    return "\n".join(out).rstrip() + "\n"


def missing_help(typer_app: typer.Typer = app) -> list[str]:
    """Every command, argument or option with no help text (a test wants none)."""
    group: Any = typer.main.get_command(typer_app)
    problems = [f"esdtool {p.name}" for p in group.params if not getattr(p, "help", None)]
    for name, command in group.commands.items():
        if not command.help:
            problems.append(f"esdtool {name}")
        for p in command.params:
            if p.name != "help" and not getattr(p, "help", None):
                problems.append(f"esdtool {name} {_flags(p)}")
    return problems


def swallowed_markup(typer_app: typer.Typer = app) -> list[str]:
    """Every [word] in help text that rich takes for a style tag it cannot apply, so that the
    terminal would drop it (``pip install 'esdtool[finetune]'`` printed as ``'esdtool'``)."""
    group: Any = typer.main.get_command(typer_app)
    texts = [group.help, *(p.help for p in group.params)]
    for command in group.commands.values():
        texts += [command.help, command.epilog, *(getattr(p, "help", "") for p in command.params)]
    problems = []
    for text in filter(None, texts):
        for tag in re.findall(r"(?<!\\)\[([^\[\]]*)\]", text):
            try:
                Style.parse(tag.removeprefix("/"))
            except StyleSyntaxError:
                problems.append(f"[{tag}] in {text[:60]!r}")
    return problems


if __name__ == "__main__":
    print(cli_reference(), end="")
