"""The Python standard library as a corpus every machine has: its ``.py`` files, split by file
into a pretraining part and three held-out parts for a downstream task, and that task's records.

The files are those under the running interpreter's ``sysconfig.get_paths()["stdlib"]``, sorted
by relative path, without the test suites, IDLE, the turtle demos, ``site-packages`` and files
over 200 kB (generated tables such as ``pydoc_data/topics.py``). Each file goes to one part by a
hash of ``"{seed}:{relative path}"`` (so the split of a file never depends on which other files a
Python version ships):

- ``task-test`` (10% of files), ``task-eval`` (10%), ``task-train`` (25%): functions and methods
  with a docstring become prompt/completion records (:func:`task_records`);
- ``pretrain`` (the other 55%): the text the model is pretrained on (:func:`pretrain_documents`).

No file of a task part is ever seen in pretraining. Used by ``pretrain_stdlib.py`` and
``stdlib_task.py``; the numbers a Python version gives are printed by both.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = frozenset(
    {"site-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__"}
)
MAX_FILE_BYTES = 200_000
# cumulative shares of the files, in this order; the rest is "pretrain"
PARTS = (("task-test", 0.10), ("task-eval", 0.20), ("task-train", 0.45))
SPLIT_SEED = 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths (POSIX) of the stdlib's .py files that the corpus uses, sorted."""
    root = root or stdlib_root()
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        found.append(rel.as_posix())
    return sorted(found)


def part_of(rel: str, seed: int = SPLIT_SEED) -> str:
    """The part a file belongs to: a uniform number from the hash of seed and path."""
    digest = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    for name, upper in PARTS:
        if u < upper:
            return name
    return "pretrain"


def split_files(seed: int = SPLIT_SEED, root: Path | None = None) -> dict[str, list[str]]:
    parts: dict[str, list[str]] = {"pretrain": [], **{name: [] for name, _ in PARTS}}
    for rel in stdlib_files(root):
        parts[part_of(rel, seed)].append(rel)
    return parts


def read_source(rel: str, root: Path | None = None) -> str | None:
    try:
        return ((root or stdlib_root()) / rel).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def pretrain_documents(seed: int = SPLIT_SEED, root: Path | None = None) -> Iterator[str]:
    """The pretraining part's files, sorted, each as ``# <relative path>`` then its source."""
    for rel in split_files(seed, root)["pretrain"]:
        text = read_source(rel, root)
        if text is not None and text.strip():
            yield f"# {rel}\n{text}"


@dataclass(frozen=True)
class TaskRecord:
    """One function of a held-out file: its signature as the prompt, its docstring's first line
    as the completion."""

    file: str  # relative path in the stdlib
    qualname: str  # "func" or "Class.method"
    prompt: str  # "# <file>\n[class C:\n    ]def ...:\n<indent>\"\"\""
    completion: str  # the docstring's first line, stripped


Function = ast.FunctionDef | ast.AsyncFunctionDef


def _signature(lines: list[str], node: Function) -> str | None:
    """The def line(s) as written (decorators left out), dedented; None for one-liners."""
    start, doc_line = node.lineno - 1, node.body[0].lineno - 1
    if doc_line <= start:
        return None
    sig = textwrap.dedent("\n".join(lines[start:doc_line])).rstrip()
    if not sig.rstrip().endswith(":") or "#" in sig:  # a comment between def and docstring
        return None
    return sig


def _functions(tree: ast.Module) -> Iterator[tuple[str | None, Function]]:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield None, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield node.name, item


def file_records(rel: str, root: Path | None = None) -> list[TaskRecord]:
    """Every module-level function and method of a module-level class in ``rel`` whose docstring's
    first line has 10 to 100 characters and whose signature has at most 300."""
    source = read_source(rel, root)
    if source is None:
        return []
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    records = []
    for cls, node in _functions(tree):
        doc = ast.get_docstring(node, clean=True)
        if not doc or not doc.strip():
            continue
        first = doc.strip().splitlines()[0].strip()
        sig = _signature(lines, node)
        if sig is None or not 10 <= len(first) <= 100 or len(sig) > 300:
            continue
        if cls is None:
            prompt = f'# {rel}\n{sig}\n    """'
        else:
            prompt = f'# {rel}\nclass {cls}:\n{textwrap.indent(sig, "    ")}\n        """'
        name = node.name if cls is None else f"{cls}.{node.name}"
        records.append(TaskRecord(rel, name, prompt, first))
    return records


TASK_SIZES = {"task-train": 1000, "task-eval": 200, "task-test": 200}
PER_FILE_CAP = 40


def task_records(seed: int = SPLIT_SEED, root: Path | None = None) -> dict[str, list[TaskRecord]]:
    """The task's records per part: every part's files' records, less those whose completion
    occurs verbatim anywhere in the pretraining text (a docstring copied between modules, such as
    ``_pyio`` and ``io``), at most ``PER_FILE_CAP`` per file (a seeded draw, so that tkinter's
    hundreds of methods do not make a part one file), then a seeded draw of ``TASK_SIZES[part]``
    records (all of them when fewer), in file order."""
    import random

    parts = split_files(seed, root)
    corpus = "\n".join(pretrain_documents(seed, root))
    out = {}
    for part, size in TASK_SIZES.items():
        rng = random.Random(f"{seed}:{part}")
        kept: list[TaskRecord] = []
        for rel in parts[part]:
            records = [r for r in file_records(rel, root) if r.completion not in corpus]
            if len(records) > PER_FILE_CAP:
                records = rng.sample(records, PER_FILE_CAP)
            kept.extend(records)
        if len(kept) > size:
            chosen = set(rng.sample(range(len(kept)), size))
            kept = [r for i, r in enumerate(kept) if i in chosen]
        out[part] = kept
    return out
