"""Code blocks in README.md and docs/ that are marked to run are run, so the docs cannot rot.

A block runs when the line before its fence is an HTML comment starting with ``doctest``. The
marked blocks of one document run in order, in one fresh folder that starts with
``metrics.parquet`` (the MiniLM table): python blocks in a fresh interpreter, bash blocks with
``bash -euo pipefail``, the ``esdtool`` command on PATH, ``MODEL`` set to a tiny local causal
LM and ``HF_HUB_OFFLINE=1``. A block importing polars or duckdb is skipped where they are missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- doctest[^>]*-->\n```(\w+)\n(.*?)\n```", re.S)


def marked_blocks(path: Path) -> list[tuple[int, str, str]]:
    text = path.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in BLOCK.finditer(text)
    ]


DOCUMENTS = [p for p in DOCS if marked_blocks(p)]


def test_the_docs_mark_their_runnable_blocks():
    names = {p.name for p in DOCUMENTS}
    assert {"metrics.md", "tutorial.md"} <= names


@pytest.mark.parametrize("doc", DOCUMENTS, ids=[p.relative_to(ROOT).as_posix() for p in DOCUMENTS])
def test_doc_runs_as_written(doc, minilm_metrics, tiny_causal_lm, tmp_path):
    pytest.importorskip("trl", reason="the tutorial fine-tunes: pip install 'esdtool[finetune]'")
    shutil.copy(minilm_metrics, tmp_path / "metrics.parquet")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MODEL": str(tiny_causal_lm),
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "120",
    }
    for line, lang, code in marked_blocks(doc):
        where = f"{doc.relative_to(ROOT)}:{line}"
        missing = [m for m in ("polars", "duckdb") if re.search(rf"^import {m}\b", code, re.M)]
        if any(_absent(m) for m in missing):
            continue  # an optional reader this machine lacks (CI installs both)
        if lang == "python":
            command = [sys.executable, "-c", code]
        elif lang == "bash":
            command = ["bash", "-euo", "pipefail", "-c", code]
        else:
            pytest.fail(f"{where}: cannot run a {lang} block")
        proc = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{where}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None
