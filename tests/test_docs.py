"""The docs cannot rot: code blocks in README.md and docs/ that are meant to run are run.

A block runs when the line before its fence is an HTML comment starting with ``doctest``; a
bash, python or sql block that is not meant to run says why in a ``not run`` comment instead
(a test fails on an unmarked one). The marked blocks of one document run in order, in one fresh
folder that holds what a reader's folder would:

- ``my-model/``: a tiny local Llama (safetensors, config, tokenizer);
- ``HuggingFaceTB/SmolLM2-135M`` in the local hub cache (``HF_HOME``, ``HF_HUB_OFFLINE=1``), the
  same tiny model, so hub ids resolve without a network;
- ``train.jsonl``: prompt / completion records;
- ``metrics.parquet`` and ``demo-out/metrics.parquet``: the MiniLM table ``make demo`` writes.

python blocks run in a fresh interpreter, bash blocks with ``bash -euo pipefail`` and the
``esdtool`` command on PATH; what a bash block exports is seen by the blocks after it, as in
one terminal. A block importing polars or duckdb is skipped where they are
missing. ``make demo`` itself is run by :func:`test_make_demo_matches_the_readme`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ARITHMETIC, make_hf_cache, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- doctest[^>]*-->\n```(\w+)\n(.*?)\n```", re.S)
HUB_ID = "HuggingFaceTB/SmolLM2-135M"


def marked_blocks(path: Path) -> list[tuple[int, str, str]]:
    text = path.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in BLOCK.finditer(text)
    ]


DOCUMENTS = [p for p in DOCS if marked_blocks(p)]


def test_the_docs_mark_their_runnable_blocks():
    names = {p.name for p in DOCUMENTS}
    assert {"README.md", "finetune.md", "metrics.md", "tutorial.md"} <= names


def test_every_code_block_runs_or_says_why_not():
    """docs/cli.md is generated from --help and is exempt; output blocks carry no language."""
    unmarked = []
    for doc in DOCS:
        if doc.name == "cli.md":
            continue
        lines = doc.read_text().splitlines()
        fences = [i for i, line in enumerate(lines) if line.startswith("```")]
        for opening in fences[::2]:
            lang = lines[opening][3:].strip()
            before = lines[opening - 1] if opening else ""
            if lang and not re.match(r"<!-- (doctest|not run)", before):
                unmarked.append(f"{doc.relative_to(ROOT)}:{opening + 1} ({lang})")
    assert not unmarked, "blocks neither run nor marked 'not run: why':\n" + "\n".join(unmarked)


@pytest.fixture(scope="module")
def doc_fixtures(minilm_metrics, tiny_causal_lm, tmp_path_factory) -> Path:
    """What a reader's folder holds (see the module docstring), built once and copied per doc."""
    base = tmp_path_factory.mktemp("doc-fixtures")
    folder = base / "folder"
    shutil.copytree(tiny_causal_lm, folder / "my-model")
    (folder / "demo-out").mkdir()
    shutil.copy(minilm_metrics, folder / "metrics.parquet")
    shutil.copy(minilm_metrics, folder / "demo-out" / "metrics.parquet")
    write_jsonl(folder / "train.jsonl", ARITHMETIC)
    make_hf_cache(base / "hf", HUB_ID, tiny_causal_lm)
    return base


@pytest.mark.parametrize("doc", DOCUMENTS, ids=[p.relative_to(ROOT).as_posix() for p in DOCUMENTS])
def test_doc_runs_as_written(doc, doc_fixtures, tmp_path):
    pytest.importorskip("trl", reason="the tutorial fine-tunes: pip install 'esdtool[finetune]'")
    folder = tmp_path / "folder"
    shutil.copytree(doc_fixtures / "folder", folder)
    env = {
        **{k: v for k, v in os.environ.items() if k != "MODEL"},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HOME": str(doc_fixtures / "hf"),
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "120",
    }
    shell_env = tmp_path / "shell.env"  # what `export` left behind, as in a reader's terminal
    for line, lang, code in marked_blocks(doc):
        where = f"{doc.relative_to(ROOT)}:{line}"
        missing = [m for m in ("polars", "duckdb") if re.search(rf"^import {m}\b", code, re.M)]
        if any(_absent(m) for m in missing):
            continue  # an optional reader this machine lacks (CI installs both)
        if lang == "python":
            command = [sys.executable, "-c", code]
        elif lang == "bash":
            command = ["bash", "-euo", "pipefail", "-c", f'{code}\nenv -0 > "{shell_env}"']
        else:
            pytest.fail(f"{where}: cannot run a {lang} block")
        proc = subprocess.run(
            command, cwd=folder, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{where}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        if lang == "bash":
            pairs = shell_env.read_text().split("\0")
            env = dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def test_make_demo_matches_the_readme(tmp_path):
    """The README's first command, on the installed checkout: its recipe runs, and the figures
    the README shows from it (rows, analysed, skipped, modules adapted, trainable parameters)
    are the ones it prints now."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    installed = ROOT / ".venv" / ".installed"
    if shutil.which("make") is None or not installed.exists():
        pytest.skip("make demo needs make and the .venv that make install creates")
    if Path(sys.executable).resolve() != venv_python.resolve():
        pytest.skip("make demo runs in .venv; these tests run in another interpreter")
    if installed.stat().st_mtime < (ROOT / "pyproject.toml").stat().st_mtime:
        pytest.skip(".venv is older than pyproject.toml: make would reinstall")
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        ["make", "-C", str(ROOT), "demo", f"DEMO_OUT={out}"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("metrics.parquet", "lora-plan/adapter_config.json",
                 "lora-plan/allocation.csv", "lora-plan/report.html"):  # fmt: skip
        assert (out / name).is_file(), name

    readme = (ROOT / "README.md").read_text()
    shown = readme[readme.index("$ make demo") :]
    for label in ("rows", "analysed", "skipped", "modules adapted", "trainable params"):
        expected = re.search(rf"│ {label}\s*│ ([^│]*?)\s*│", shown).group(1)
        actual = re.search(rf"│ {label}\s*│ ([^│]*?)\s*│", proc.stdout)
        assert actual, f"make demo no longer prints {label!r}"
        assert actual.group(1) == expected, f"README: {label} {expected}; now {actual.group(1)}"


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None
