"""Text from checkpoints is untrusted: names and metadata are written by strangers."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """``text`` with control characters shown as \\xNN escapes, so it can neither move a
    terminal's cursor nor hide inside a web page. (HTML escaping is the template's job.)"""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
