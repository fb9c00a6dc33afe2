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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esdtool.errors import CheckpointError, PickleRefusedError, ShardMissingError, SourceError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class ResolvedSource:
    """What SOURCE turned out to be.

    source:   the argument as given.
    kind:     "file", "directory" or "hub".
    files:    safetensors files to read, in order.
    config:   the parsed config.json beside them, or None.
    revision: the hub commit hash for hub ids, else None.
    """

    source: str
    kind: str
    files: tuple[Path, ...]
    config: dict[str, Any] | None
    revision: str | None


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


def resolve_source(
    source: str | os.PathLike[str],
    revision: str | None = None,
    token: str | None = None,
    *,
    also: tuple[str, ...] = (),
) -> ResolvedSource:
    """Find the safetensors files behind ``source``; see the module docstring. ``also``: more
    file patterns to fetch with a hub id (e.g. :data:`TOKENIZER_PATTERNS`)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise SourceError(f"{text}: --revision applies to hub ids, not local paths")
        if path.is_dir():
            try:
                files = _files_in_dir(path)
            except PermissionError as exc:
                raise SourceError(f"{text}: cannot list the directory ({exc.strerror})") from exc
            return ResolvedSource(text, "directory", files, _config(path), None)
        if path.is_file():
            _refuse_pickle(path)
            return ResolvedSource(text, "file", (path,), _config(path.parent), None)
        raise SourceError(f"{text}: not a regular file or directory")
    if _HUB_ID.fullmatch(text) and "/" in text and not text.startswith((".", "/")):
        snapshot, commit = _download(text, revision, token, also)
        return ResolvedSource(text, "hub", _files_in_dir(snapshot), _config(snapshot), commit)
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


def _files_in_dir(directory: Path) -> tuple[Path, ...]:
    index = directory / INDEX_NAME
    if index.is_file():
        return _shards_from_index(index)
    if (directory / SINGLE_NAME).is_file():
        return (directory / SINGLE_NAME,)
    found = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if found:
        return tuple(found)
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefusedError(
            f"{directory}: holds only pickled checkpoints ({', '.join(pickles[:3])}); "
            "esdtool never unpickles",
            hint="convert them to safetensors, or point esdtool at a safetensors copy",
        )
    raise SourceError(f"{directory}: no .safetensors files in this directory")


def _shards_from_index(index: Path) -> tuple[Path, ...]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index}: not a readable JSON index ({exc})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no weight_map")
    shards: list[Path] = []
    for shard in dict.fromkeys(weight_map.values()):
        # Shard names come from an untrusted file: a bare file name, never a path.
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index}: shard name {shard!r} is not a plain file name")
        path = index.parent / shard
        if not path.is_file():
            raise ShardMissingError(
                f"{index}: names shard {shard!r}, which is missing from {index.parent}",
                hint="the download is incomplete; fetch the missing shard again",
            )
        shards.append(path)
    return tuple(shards)


def _config(directory: Path) -> dict[str, Any] | None:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


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
        snapshot = fetch(["config.json", INDEX_NAME])
        index = snapshot / INDEX_NAME
        if index.is_file():
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: has no weight_map")
            shards = sorted({s for s in weight_map.values() if isinstance(s, str)})
            snapshot = fetch([INDEX_NAME, "config.json", *shards, *also])
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
