"""Text from checkpoints is untrusted: names and metadata are written by strangers, so they are
shown escaped and matched only by linear-time regexes."""

from __future__ import annotations

import re
from typing import Any

# Control characters, and the invisible format characters that reorder or hide text (bidi
# overrides and isolates, zero-width joiners and spaces, the BOM).
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffb]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` with control and invisible format characters shown as \\xNN / \\uNNNN
    escapes, so it can neither move a terminal's cursor nor reorder or hide text in a terminal
    or a web page (a right-to-left override turns "exe.txt" around). (HTML escaping is the
    template's job.)"""
    return _CONTROL.sub(_escape, str(text))


def user_regex(pattern: str, flag: str) -> Any:
    """``pattern`` (an option's regex) compiled with RE2, which matches in time linear in the
    text: names come from checkpoints written by strangers, and Python's backtracking ``re``
    takes exponential time on patterns like ``(a+)+$``. Raises ValueError naming ``flag`` for a
    pattern RE2 does not accept (back-references and look-arounds are not linear-time)."""
    import re2

    options = re2.Options()
    options.log_errors = False  # the caller reports the problem in one line
    try:
        return re2.compile(pattern, options=options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(
            f"{flag} {pattern!r} is not a regex esdtool accepts ({reason}; RE2 syntax: no "
            "back-references or look-arounds)"
        ) from None


# A spreadsheet evaluates a cell that starts with one of these (=HYPERLINK(...), +1+cmd|...).
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text, never evaluates: a string starting with =, +, -,
    @, tab or carriage return gets a leading ' (and one starting with ' another, so that
    :func:`from_spreadsheet_cell` gives back the exact text). Other values pass unchanged."""
    if isinstance(value, str) and value.startswith((*_FORMULA, "'")):
        return "'" + value
    return value


def from_spreadsheet_cell(text: str) -> str:
    """The text :func:`spreadsheet_cell` was given."""
    return text[1:] if text.startswith("'") else text


def spreadsheet_frame(frame: Any) -> Any:
    """A copy of a DataFrame whose text cells are :func:`spreadsheet_cell`'s (numbers, which
    may be negative, untouched), for writing as CSV; parquet and JSON keep exact text."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    out = frame.copy()
    for column in out.columns:
        kind = out[column].dtype
        if not (is_numeric_dtype(kind) or is_bool_dtype(kind)):  # object, str, string
            out[column] = out[column].astype(object).map(spreadsheet_cell)
    return out


def read_json_file(path: Any, limit: int = 64 << 20) -> Any:
    """The JSON value of a small file a user or a checkpoint gave: a regular file (a FIFO,
    a device or a directory would hang or never end), at most ``limit`` bytes, parsed without
    letting deep nesting escape as RecursionError. Raises ValueError saying what is wrong and
    OSError when it cannot be read; FileNotFoundError when it is absent."""
    import json
    import os
    import stat

    info = os.stat(path)  # FileNotFoundError / OSError propagate
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file")
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"larger than {limit >> 20} MB")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
