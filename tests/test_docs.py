"""Code blocks in README.md and docs/ that are marked to run are run, so the docs cannot rot.

A block runs when the line before its fence is an HTML comment starting with ``doctest``. Python
blocks run in a fresh interpreter in a folder that holds ``metrics.parquet`` (the MiniLM table);
a block whose imports are missing here (polars, duckdb) is skipped with the reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- doctest[^>]*-->\n```(\w+)\n(.*?)\n```", re.S)


def marked_blocks() -> list[tuple[str, int, str, str]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append((path.relative_to(ROOT).as_posix(), line, m.group(1), m.group(2)))
    return found


BLOCKS = marked_blocks()


def test_some_blocks_are_marked():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize(
    ("doc", "line", "lang", "code"), BLOCKS, ids=[f"{d}:{n}" for d, n, _, _ in BLOCKS]
)
def test_doc_block_runs(doc, line, lang, code, minilm_metrics, tmp_path):
    assert lang == "python", f"{doc}:{line}: only python blocks are run so far"
    for module in ("polars", "duckdb"):
        if re.search(rf"^import {module}\b", code, re.M):
            pytest.importorskip(module, reason=f"{doc}:{line} needs {module}")
    shutil.copy(minilm_metrics, tmp_path / "metrics.parquet")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{doc}:{line}\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip(), f"{doc}:{line} printed nothing"
