"""Opening a hub id: :func:`wants_hub` (from :mod:`esdtool.io.hub_prefetch`) decides whether
it is read as it arrives (a hub id, online, with a huggingface_hub that streams byte ranges),
:func:`open_hub` resolves the commit, reads config.json and the shard index (or takes them from
the CLI's prefetch), and opens the shards as a
:class:`~esdtool.io.remote.DownloadingCheckpoint` (the default) or a
:class:`~esdtool.io.remote.StreamedCheckpoint` (``--stream``). Anything else, and a hub id with
nothing to gain from overlapping, goes the local way (:func:`~esdtool.io.source.resolve_source`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from esdtool.errors import OptionError, PickleRefusedError, ShardMissingError, SourceError
from esdtool.io import hub_prefetch
from esdtool.io.checkpoint import Checkpoint
from esdtool.io.hub import HubRepo, OnFetch, RangesNotServed
from esdtool.io.hub_calls import resolve_commit
from esdtool.io.hub_prefetch import hub_offline, wants_hub  # noqa: F401 (the analysis asks here)
from esdtool.io.remote import DownloadingCheckpoint, StreamedCheckpoint
from esdtool.io.source import (
    ADAPTER_WEIGHTS,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    ResolvedSource,
    read_index,
)


def open_hub(
    repo_id: str,
    revision: str | None,
    token: str | None,
    *,
    stream: bool,
    on_fetch: OnFetch | None = None,
) -> tuple[ResolvedSource, Checkpoint] | None:
    """The source and an open checkpoint for a hub id, or None when the overlapped download
    has nothing to gain (an adapter; a repo of neither a shard index nor a model.safetensors;
    every shard already in the cache) or cannot be had (the endpoint serves no byte ranges,
    so no header can be read ahead): the caller then takes the plain
    :func:`~esdtool.io.source.resolve_source` road."""
    if stream:
        return _open_streamed(repo_id, revision, token, on_fetch)
    prefetch = hub_prefetch.take(repo_id, revision, token)
    try:
        plan = (
            prefetch.result()
            if prefetch is not None
            else hub_prefetch.plan_hub(repo_id, revision, token, on_fetch)
        )
        if plan is None:
            return None
        try:
            ckpt = DownloadingCheckpoint(plan.repo, plan.shards, plan.index, plan.headers,
                                         plan.downloads)  # fmt: skip
        except BaseException:  # a header refused: the prefetch's downloads stop too
            plan.downloads.close()
            raise
    except RangesNotServed:  # a mirror without range support: download first, then analyse
        return None
    files = tuple(plan.snapshot / s for s in plan.shards)
    config = _json_object(plan.snapshot / "config.json")
    return ResolvedSource(repo_id, "hub", files, config, plan.repo.commit, plan.index), ckpt


def _open_streamed(
    repo_id: str, revision: str | None, token: str | None, on_fetch: OnFetch | None
) -> tuple[ResolvedSource, Checkpoint]:
    """--stream: the commit and file list from the hub API, config.json and the index into
    memory, the shard headers by range requests; nothing touches the disk."""
    commit, names = resolve_commit(repo_id, revision, token)
    repo = HubRepo(repo_id, commit, token, on_fetch)
    config = _json_object_bytes(repo.read_all("config.json")) if "config.json" in names else None
    index = None
    if INDEX_NAME in names:
        index = read_index(Path(repo.where(INDEX_NAME)), repo.read_all(INDEX_NAME))
        shards = tuple(dict.fromkeys(index.weight_map.values()))
        for shard in shards:
            if shard not in names:
                raise ShardMissingError(
                    f"{repo.where(INDEX_NAME)}: names shard {shard!r}, which is not in the repo "
                    f"at {commit}"
                )
    elif SINGLE_NAME in names:
        shards = (SINGLE_NAME,)
    elif ADAPTER_WEIGHTS in names:  # the order resolve_source reads a folder in
        raise OptionError(
            f"{repo_id}: a PEFT adapter repo; --stream reads models",
            hint="drop --stream (an adapter is small enough to download)",
        )
    else:
        shards = tuple(sorted(n for n in names if n.endswith(".safetensors") and "/" not in n))
    if not shards:
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise PickleRefusedError(
                f"{repo_id}: holds only pickled checkpoints ({', '.join(pickles[:3])}); "
                "esdtool never unpickles",
                hint="use a repo with safetensors weights",
            )
        raise SourceError(f"{repo_id}: no .safetensors files in the repo at {commit}")
    ckpt = StreamedCheckpoint(repo, shards, index)
    files = tuple(Path(s) for s in shards)
    return ResolvedSource(repo_id, "hub", files, config, commit, index), ckpt


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        return _json_object_bytes(path.read_bytes())
    except OSError:
        return None


def _json_object_bytes(data: bytes) -> dict[str, Any] | None:
    """Parsed JSON object, or None (config.json only feeds model_type and architectures, and
    the quantization scheme, which is checked on its own)."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON, or an
        # integer of more digits than Python converts
        return None
    return value if isinstance(value, dict) else None
