"""Turning SOURCE (a file, a directory or a Hugging Face hub id) into safetensors files.

Hub ids go through ``huggingface_hub.snapshot_download``, which honours ``HF_HOME``,
``HF_HUB_OFFLINE``, ``HF_TOKEN`` and revisions, and fetches only what analysis needs:
``config.json``, the shard index, and the safetensors shards. Pickled checkpoints
(``.bin``, ``.pt``, ...) are refused by name and never opened.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esdtool.errors import CheckpointError, PickleRefusedError, ShardMissingError, SourceError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header's JSON
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class ShardIndex:
    """A sharded checkpoint's model.safetensors.index.json, checked: its path, and its
    weight_map (tensor name -> shard file name, every value a plain file name)."""

    path: Path
    weight_map: Mapping[str, str]


@dataclass(frozen=True)
class ResolvedSource:
    """What SOURCE turned out to be.

    source:   the argument as given.
    kind:     "file", "directory" or "hub".
    files:    safetensors files to read, in order.
    config:   the parsed config.json beside them, or None.
    revision: the hub commit hash for hub ids, else None.
    index:    the shard index the files came from (sharded checkpoints), else None; pass it
              to :func:`esdtool.io.checkpoint.open_checkpoint` to check it against the shards.
    adapter_config: the parsed adapter_config.json of a PEFT adapter (a directory or hub repo
              holding adapter_model.safetensors and no model weights, or that file itself),
              unchecked beyond being a JSON object; None for a model.
    """

    source: str
    kind: str
    files: tuple[Path, ...]
    config: dict[str, Any] | None
    revision: str | None
    index: ShardIndex | None = None
    adapter_config: dict[str, Any] | None = None


# What training needs beside the weights (tokenizer, chat template, generation defaults).
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template*",
    "vocab*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
)


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the shape of a hub id, ``org/name`` (never a path: no leading dot
    or slash, no ``..``)."""
    return (
        bool(_HUB_ID.fullmatch(text))
        and "/" in text
        and ".." not in text.split("/")
        and not text.startswith((".", "/"))
    )


def resolve_source(
    source: str | os.PathLike[str],
    revision: str | None = None,
    token: str | None = None,
    *,
    also: tuple[str, ...] = (),
    hub_only: bool = False,
) -> ResolvedSource:
    """Find the safetensors files behind ``source``; see the module docstring. ``also``: more
    file patterns to fetch with a hub id (e.g. :data:`TOKENIZER_PATTERNS`). ``hub_only``: a hub
    id from a table's metadata, resolved through the hub cache only, never as a local path."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if hub_only and not is_hub_id(text):
        raise SourceError(f"{text}: not a hub id (org/name)")
    if path.exists() and not hub_only:
        if revision is not None:
            raise SourceError(f"{text}: --revision applies to hub ids, not local paths")
        if path.is_dir():
            try:
                files, index = _files_in_dir(path)
            except PermissionError as exc:
                raise SourceError(f"{text}: cannot list the directory ({exc.strerror})") from exc
            return ResolvedSource(text, "directory", files, _config(path), None, index,
                                  _adapter_config(files, index))  # fmt: skip
        if path.is_file():
            _refuse_pickle(path)
            return ResolvedSource(text, "file", (path,), _config(path.parent), None,
                                  adapter_config=_adapter_config((path,), None))  # fmt: skip
        raise SourceError(f"{text}: not a regular file or directory")
    if is_hub_id(text):
        snapshot, commit = _download(text, revision, token, also)
        files, index = _files_in_dir(snapshot)
        return ResolvedSource(text, "hub", files, _config(snapshot), commit, index,
                              _adapter_config(files, index))  # fmt: skip
    raise SourceError(
        f"{text}: no such file or directory",
        hint="pass a .safetensors file, a model directory, or a hub id such as org/name",
    )


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(
            f"{path}: pickled checkpoints are never loaded (they can run arbitrary code)",
            hint="convert it to safetensors first, or use the model's safetensors files",
        )


def _files_in_dir(directory: Path) -> tuple[tuple[Path, ...], ShardIndex | None]:
    """The safetensors files of ``directory``, and the shard index they came from, if any."""
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        index = read_index(index_path)
        return _shards_from_index(index), index
    if (directory / SINGLE_NAME).is_file():
        return (directory / SINGLE_NAME,), None
    if (directory / ADAPTER_WEIGHTS).is_file():  # a PEFT adapter (its config is checked later)
        return (directory / ADAPTER_WEIGHTS,), None
    found = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if found:
        return tuple(found), None
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefusedError(
            f"{directory}: holds only pickled checkpoints ({', '.join(pickles[:3])}); "
            "esdtool never unpickles",
            hint="convert them to safetensors, or point esdtool at a safetensors copy",
        )
    raise SourceError(f"{directory}: no .safetensors files in this directory")


def read_index(path: Path, content: bytes | None = None) -> ShardIndex:
    """Read and check a shard index: JSON, an object with a non-empty weight_map whose every
    value is a plain file name (names come from an untrusted file: never a path). ``content``:
    the index's bytes already in memory (a streamed hub repo); ``path`` then only names it."""
    try:
        text = path.read_text(encoding="utf-8") if content is None else content.decode("utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError too
        raise CheckpointError(f"{path}: not a readable JSON index ({exc})") from exc
    except RecursionError as exc:  # "[[[[..." nested too deeply for the parser
        raise CheckpointError(f"{path}: not a readable JSON index (nested too deeply)") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: has no weight_map")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"{path}: weight_map gives tensor {_short(tensor)} the shard {_short(shard)}, "
                "not a file name"
            )
        glob = any(c in shard for c in "*?[]")  # a hub download pattern must name one file
        if Path(shard).name != shard or shard in ("", ".", "..") or glob:
            raise CheckpointError(
                f"{path}: shard name {_short(shard)} (of tensor {_short(tensor)}) "
                "is not a plain file name"
            )
    return ShardIndex(path, weight_map)


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (an untrusted value may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shards_from_index(index: ShardIndex) -> tuple[Path, ...]:
    shards: list[Path] = []
    for shard in dict.fromkeys(index.weight_map.values()):
        path = index.path.parent / shard
        if not path.is_file():
            raise ShardMissingError(
                f"{index.path}: names shard {shard!r}, which is missing from {index.path.parent}",
                hint="the download is incomplete; fetch the missing shard again",
            )
        shards.append(path)
    return tuple(shards)


def _config(directory: Path) -> dict[str, Any] | None:
    """The parsed config.json of ``directory``; None when absent or unreadable (analysis only
    records its model_type and architectures, so a broken one is no reason to stop)."""
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON,
        return None  # or an integer of more digits than Python converts
    return data if isinstance(data, dict) else None


def _adapter_config(files: tuple[Path, ...], index: ShardIndex | None) -> dict[str, Any] | None:
    """The adapter_config.json beside a lone adapter_model.safetensors, parsed; None for a
    model. An adapter whose config cannot be read is an error: without it r and lora_alpha,
    hence every number of the table, are unknown."""
    if index is not None or len(files) != 1 or files[0].name != ADAPTER_WEIGHTS:
        return None
    path = files[0].parent / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"{files[0]}: a PEFT adapter's weights without its {ADAPTER_CONFIG} beside them: "
            "its r and lora_alpha, hence every number, are unknown",
            hint=f"put the adapter's {ADAPTER_CONFIG} next to it (PEFT's save_pretrained writes "
            "both)",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError,
        # and integers of more digits than Python converts
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from exc
    except RecursionError as exc:
        raise CheckpointError(f"{path}: not a readable JSON file (nested too deeply)") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _download(
    repo_id: str, revision: str | None, token: str | None, also: tuple[str, ...] = ()
) -> tuple[Path, str | None]:
    """Fetch the index and config first, then only the shards the index names."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(patterns: list[str]) -> Path:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token)
        )

    try:
        snapshot = fetch(["config.json", INDEX_NAME, ADAPTER_CONFIG])
        index_path = snapshot / INDEX_NAME
        if index_path.is_file():
            shards = sorted(set(read_index(index_path).weight_map.values()))
            snapshot = fetch([INDEX_NAME, "config.json", *shards, *also])
        elif (snapshot / ADAPTER_CONFIG).is_file() and not (snapshot / "config.json").is_file():
            snapshot = fetch([ADAPTER_CONFIG, ADAPTER_WEIGHTS, *also])
        else:
            snapshot = fetch(["config.json", "*.safetensors", *also])
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise SourceError(
            f"{repo_id}: not in the local Hugging Face cache ({where})"
            + (" and HF_HUB_OFFLINE is set" if offline else " and the hub cannot be reached"),
            hint=f"download it first (hf download {repo_id}) or unset HF_HUB_OFFLINE",
        ) from exc
    except GatedRepoError as exc:
        raise SourceError(
            f"{repo_id}: gated repository; access not granted",
            hint="accept its terms on the hub and log in (hf auth login) or set HF_TOKEN",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise SourceError(
            f"{repo_id}: no such repository on the hub (or it is private)",
            hint="check the id; for a private repo log in or set HF_TOKEN",
        ) from exc
    except RevisionNotFoundError as exc:
        raise SourceError(f"{repo_id}: revision {revision!r} not found") from exc
    except HfHubHTTPError as exc:
        raise SourceError(f"{repo_id}: hub request failed ({exc})") from exc
    except (OSError, ValueError) as exc:
        raise SourceError(f"{repo_id}: cannot fetch from the hub ({exc})") from exc
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else revision
    return snapshot, commit
