"""Which road a hub id takes, and opening it: :func:`wants_hub` decides (a hub id, online, with
a huggingface_hub that streams byte ranges), :func:`open_hub` resolves the commit, reads
config.json and the shard index, and opens the shards as a
:class:`~esdtool.io.remote.DownloadingCheckpoint` (the default) or a
:class:`~esdtool.io.remote.StreamedCheckpoint` (``--stream``). Anything else, and a hub id with
nothing to gain from overlapping, goes the local way (:func:`~esdtool.io.source.resolve_source`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from esdtool.errors import OptionError, PickleRefusedError, ShardMissingError, SourceError
from esdtool.io.checkpoint import Checkpoint
from esdtool.io.hub import HubRepo, OnFetch, RangesNotServed, serves_ranges
from esdtool.io.hub_calls import call_hub, resolve_commit
from esdtool.io.remote import DownloadingCheckpoint, StreamedCheckpoint
from esdtool.io.source import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    ResolvedSource,
    is_hub_id,
    read_index,
)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids reaching the hub."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return constants.is_offline_mode() or flag


def wants_hub(source: object, stream: bool) -> bool:
    """Whether ``source`` is read from the hub as it arrives (a hub id that is not a local
    path, with the hub reachable); ``stream`` on anything else is refused with the reason."""
    text = os.fspath(source) if isinstance(source, str | os.PathLike) else None
    hub = text is not None and is_hub_id(text) and not Path(text).expanduser().exists()
    if stream and not hub:
        what = text or type(source).__name__
        raise OptionError(f"{what}: --stream reads hub ids (org/name) only")
    if stream and hub_offline():
        raise SourceError(
            f"{text}: --stream reads from the hub, but HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE, or drop --stream to read the model from the local HF cache",
        )
    if hub and not serves_ranges():  # huggingface_hub < 1.0: the download-then-analyse road
        if stream:
            import huggingface_hub

            raise OptionError(
                f"{text}: --stream needs huggingface_hub >= 1.0 (this is "
                f"{huggingface_hub.__version__})",
                hint="pip install -U huggingface_hub, or drop --stream",
            )
        return False
    return hub and not hub_offline()


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
    snapshot, commit = _index_snapshot(repo_id, revision, token)
    index_path = snapshot / INDEX_NAME
    index = read_index(index_path) if index_path.is_file() else None
    if index is not None:
        shards = tuple(dict.fromkeys(index.weight_map.values()))
    elif (snapshot / ADAPTER_CONFIG).is_file() and not (snapshot / "config.json").is_file():
        return None  # a PEFT adapter: small, read the local way
    elif (snapshot / SINGLE_NAME).is_file():
        return None  # in the cache already
    elif SINGLE_NAME in resolve_commit(repo_id, commit, token)[1]:
        shards = (SINGLE_NAME,)  # one file: its tensors are analysed as they land too
    else:
        return None
    if all((snapshot / s).is_file() for s in shards):
        return None
    try:
        ckpt = DownloadingCheckpoint(HubRepo(repo_id, commit, token, on_fetch), shards, index)
    except RangesNotServed:  # a mirror without range support: download first, then analyse
        return None
    files = tuple(snapshot / s for s in shards)
    return ResolvedSource(repo_id, "hub", files, _json_object(snapshot / "config.json"), commit,
                          index), ckpt  # fmt: skip


def _index_snapshot(repo_id: str, revision: str | None, token: str | None) -> tuple[Path, str]:
    """config.json and the shard index into the HF cache (as huggingface_hub keeps them): the
    snapshot folder and its commit."""
    import huggingface_hub
    from huggingface_hub.utils import tqdm

    class Quiet(tqdm):  # two small files: the analysis draws its own progress
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    def fetch() -> Path:
        patterns = ["config.json", INDEX_NAME, "adapter_config.json"]
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=patterns, tqdm_class=Quiet
        ))  # fmt: skip

    snapshot = call_hub(fetch, repo_id, revision, f"{repo_id}/{INDEX_NAME}", INDEX_NAME)
    return snapshot, snapshot.name


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
