"""Training data for ``finetune``: load a file or a hub dataset, recognise its format, and turn
it into the two shapes TRL's SFTTrainer knows (``text``; ``prompt`` + ``completion``).

Formats, recognised from the columns (first match wins):

- ``messages``: chat turns ``[{"role", "content"}, ...]``; the last turn, the assistant's, is
  the completion and everything before it the prompt (the tokenizer's chat template applies);
- ``prompt/completion``: two strings;
- ``instruction/input/output``: the Alpaca-style records of the LLM-Adapters math and commonsense
  sets, put into the Alpaca template they were trained with; the output is the completion;
- ``text``: plain text, loss on every token.

With a prompt, the loss is on the completion only (TRL's completion_only_loss).
"""

from __future__ import annotations

import codecs
import logging
import os
from pathlib import Path
from typing import Any

from esdtool.errors import DataFormatError

FORMATS = ("messages", "prompt/completion", "instruction/input/output", "text")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# The Alpaca template, as LLM-Adapters' finetune.py writes it (with and without an input).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def load_records(data: str | os.PathLike[str], split: str = "train") -> Any:
    """A ``datasets.Dataset`` from a local .jsonl/.json/.parquet/.csv file or a hub dataset id
    (``org/name`` takes ``split``; ``org/name:validation`` names the split)."""
    import datasets

    text = os.fspath(data)
    path = Path(text).expanduser()
    try:
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataFormatError(
                    f"{text}: unknown data file type {path.suffix!r}",
                    hint="use .jsonl, .json, .parquet or .csv, or a hub dataset id",
                )
            if builder in ("json", "csv"):
                _require_utf8(path, text)
                with open(path, "rb") as f:  # datasets says "StopIteration" or "no data"
                    if not f.read(1 << 16).strip():
                        raise DataFormatError(f"{text}: no records (the file is empty)")
            # A local file parses in moments: no progress bars or log lines to clutter the
            # terminal (a failure is reported once, by the error).
            was_enabled = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()
            log = logging.getLogger("datasets")
            level = log.level
            log.setLevel(logging.ERROR)
            # CSV: every cell as text (no "5" -> 5.0, no empty -> NaN -> "None").
            try:
                if builder == "csv":
                    import pandas as pd

                    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
                    return datasets.Dataset.from_pandas(frame, preserve_index=False)
                return datasets.load_dataset(builder, data_files=str(path), split="train")
            finally:
                log.setLevel(level)
                if was_enabled:
                    datasets.enable_progress_bars()
        if path.exists():
            raise DataFormatError(f"{text}: not a regular file")
        if text.startswith((".", "/", "~")) or path.suffix.lower() in _BUILDERS:
            raise DataFormatError(f"{text}: no such file")
        name, _, chosen = text.partition(":")  # "org/name:validation" picks a split
        return datasets.load_dataset(name, split=chosen or split)
    except DataFormatError:
        raise
    except Exception as exc:  # datasets raises many types (DatasetNotFoundError, ArrowInvalid...)
        raise DataFormatError(
            f"{text}: cannot read the data ({type(exc).__name__}: {exc})"
        ) from exc


def _require_utf8(path: Path, where: str) -> None:
    """A text data file must be UTF-8 throughout: say where it is not, rather than let a
    reader fail later (or decode it lazily, record by record, in the middle of training)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1  # the line the next chunk starts on
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = decoder.getstate()[0]  # the incomplete character the last chunk ended in
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                data = pending + chunk
                at = line + chunk[: max(0, exc.start - len(pending))].count(b"\n")
                raise DataFormatError(
                    f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {at})",
                    hint="save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)",
                ) from exc
            if not chunk:
                return
            line += chunk.count(b"\n")


def detect_format(columns: list[str], where: str) -> str:
    """The format a data set's columns fit (see the module docstring)."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt/completion"
    if {"instruction", "output"} <= cols:
        return "instruction/input/output"
    if "text" in cols:
        return "text"
    shown = ", ".join(sorted(cols)[:8]) or "none"
    raise DataFormatError(
        f"{where}: columns ({shown}) fit no known format",
        hint="expected one of: " + "; ".join(FORMATS),
    )


def alpaca_prompt(instruction: str, input_text: str | None) -> str:
    """The Alpaca prompt of one instruction record (LLM-Adapters' template)."""
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def _require_text(dataset: Any, columns: list[str], where: str) -> None:
    """Each of ``columns`` must hold a string in every record: a number or a missing value
    would otherwise train on "5.0" or "None"."""
    for column in columns:
        for index, value in enumerate(dataset[column]):
            if not isinstance(value, str):
                raise DataFormatError(
                    f"{where}: record {index}: {column} is {type(value).__name__}, not text"
                )


def _describe(value: object) -> str:
    return "missing" if value is None else type(value).__name__


def _require_turns(dataset: Any, where: str) -> None:
    """Every ``messages`` record must be a non-empty list of {"role": text, "content": text}
    turns, the last one the assistant's; the first record that is not is named."""
    for index, turns in enumerate(dataset["messages"]):
        at = f"{where}: record {index}"
        if not isinstance(turns, list):
            raise DataFormatError(f"{at}: messages is {_describe(turns)}, not a list of turns")
        for number, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataFormatError(
                    f"{at}: turn {number} is {_describe(turn)}, not a {{role, content}} object"
                )
            for key in ("role", "content"):
                if not isinstance(turn.get(key), str):
                    raise DataFormatError(
                        f"{at}: turn {number}: {key} is {_describe(turn.get(key))}, not text"
                    )
        if not turns or turns[-1]["role"] != "assistant":
            raise DataFormatError(
                f"{at}: every messages record must end with an assistant turn",
                hint='make the last turn of each record {"role": "assistant", "content": ...}',
            )


def to_training_records(dataset: Any, fmt: str, where: str) -> Any:
    """``dataset`` rewritten to TRL's shapes: ``text`` or ``prompt`` + ``completion``."""
    text_columns = {
        "text": ["text"],
        "prompt/completion": ["prompt", "completion"],
        "instruction/input/output": ["instruction", "output"],
    }
    _require_text(dataset, text_columns.get(fmt, []), where)
    if fmt == "text":
        return dataset.select_columns(["text"])
    if fmt == "prompt/completion":
        return dataset.select_columns(["prompt", "completion"])
    if fmt == "instruction/input/output":
        has_input = "input" in dataset.column_names

        def alpaca(record: dict[str, Any]) -> dict[str, str]:
            prompt = alpaca_prompt(record["instruction"], record["input"] if has_input else None)
            return {"prompt": prompt, "completion": record["output"]}

        return dataset.map(alpaca, remove_columns=dataset.column_names)

    _require_turns(dataset, where)  # before map: an error inside it is no longer ours

    def split_turns(record: dict[str, Any]) -> dict[str, Any]:
        turns = record["messages"]
        return {"prompt": turns[:-1], "completion": turns[-1:]}

    return dataset.map(split_turns, remove_columns=dataset.column_names)


def load_training_data(data: str | os.PathLike[str], split: str = "train") -> tuple[Any, str]:
    """Load ``data``, recognise its format, return (records for TRL, format name)."""
    where = os.fspath(data)
    dataset = load_records(data, split)
    if len(dataset) == 0:
        raise DataFormatError(f"{where}: no records")
    fmt = detect_format(dataset.column_names, where)
    records = to_training_records(dataset, fmt, where)
    trained = {"text": "text", "prompt/completion": "completion",
               "instruction/input/output": "completion"}.get(fmt)  # fmt: skip
    if trained is not None and not any(str(v).strip() for v in records[trained]):
        raise DataFormatError(
            f"{where}: every record's {trained} is empty: there is nothing to train on"
        )
    return records, fmt
