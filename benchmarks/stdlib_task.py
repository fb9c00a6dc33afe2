"""A held-out fine-tuning task from the standard library: given a function's signature, write
the first line of its docstring. Prompt/completion JSONL, for ``esdtool finetune`` and
``esdtool ablate``.

The records come from the stdlib files that ``stdlib_corpus`` puts in the task parts, never in
the pretraining text of ``pretrain_stdlib.py``; the split is by file (a module's functions are
all in train, or all in eval, or all in test). A record whose docstring line occurs verbatim in
the pretraining text is dropped; at most 40 records per file, then a seeded draw of 1000 train,
200 eval and 200 test records (see ``stdlib_corpus.task_records``). A record::

    {"prompt": "# calendar.py\\ndef leapdays(y1, y2):\\n    \\"\\"\\"",
     "completion": "Return number of leap years in range [y1, y2)."}

The model sees the file's path, the class for a method, and the signature as written; the loss
is on the completion (and the end-of-text token TRL appends).

    python benchmarks/stdlib_task.py OUTDIR     # writes OUTDIR/{train,eval,test}.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stdlib_corpus

FILES = {"task-train": "train.jsonl", "task-eval": "eval.jsonl", "task-test": "test.jsonl"}


def write_task(outdir: Path) -> dict[str, Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    written = {}
    for part, records in stdlib_corpus.task_records().items():
        path = outdir / FILES[part]
        with path.open("w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n")
        n_files = len({r.file for r in records})
        print(f"{path}: {len(records)} records from {n_files} stdlib files")
        written[part] = path
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/stdlib_task.py OUTDIR")
    write_task(Path(sys.argv[1]))
