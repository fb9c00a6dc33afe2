"""Which road a hub id takes (:func:`wants_hub`), and the network part of opening it on the
default road, torch-free, so that the CLI can
start it before the heavy imports: the commit, config.json and the shard index into the HF cache,
every shard's header bytes by range, then the shards the selection reads, downloading in index
order (:class:`~esdtool.io.hub_cache.ShardQueue`). :func:`plan_hub` does it in the caller's
thread; :func:`start` does it on a thread of its own, and :func:`take` hands the result to the
analysis (:func:`esdtool.io.hub_source.open_hub`), which joins it. Importing torch and the
spectral code takes seconds; the link is busy meanwhile.

Nothing here is checked beyond what huggingface_hub checks: the headers are parsed and checked
by :class:`~esdtool.io.remote.HubCheckpoint`, every downloaded shard against them, as without a
prefetch.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esdtool.errors import OptionError, SourceError
from esdtool.io.hub import HubRepo, OnFetch, serves_ranges
from esdtool.io.hub_cache import RawHeader, ShardQueue, read_raw_header
from esdtool.io.hub_calls import call_hub, resolve_commit
from esdtool.io.source import (
    ADAPTER_CONFIG,
    INDEX_NAME,
    MAX_HEADER_BYTES,
    SINGLE_NAME,
    ShardIndex,
    is_hub_id,
    read_index,
)

HEADER_WORKERS = 8  # shard headers fetched at once
FLOWING_S = 3.0  # how long start() waits for the first shard's bytes before it returns


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


@dataclass
class HubPlan:
    """A hub id opened on the network: where its small files are, its shards and their
    header bytes, and the download queue (started or not)."""

    snapshot: Path
    repo: HubRepo
    shards: tuple[str, ...]
    index: ShardIndex | None
    headers: dict[str, RawHeader]
    downloads: ShardQueue


def plan_hub(
    repo_id: str,
    revision: str | None,
    token: str | None,
    on_fetch: OnFetch | None = None,
    selects: Callable[[str], bool] | None = None,
) -> HubPlan | None:
    """The default road's plan for a hub id, or None when it has nothing to gain (an adapter;
    a repo of neither a shard index nor a model.safetensors; every shard already in the
    cache). With ``selects`` (tensor name -> analysed?) the shards holding a selected tensor
    start downloading at once, in index order (a single file always does)."""
    snapshot, commit = index_snapshot(repo_id, revision, token)
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
    repo = HubRepo(repo_id, commit, token, on_fetch)
    read = lambda shard: read_raw_header(repo, shard, MAX_HEADER_BYTES)  # noqa: E731
    with ThreadPoolExecutor(HEADER_WORKERS, thread_name_prefix="esdtool-header") as pool:
        headers = dict(zip(shards, pool.map(read, shards), strict=True))
    downloads = ShardQueue(repo, {s: h.version for s, h in headers.items()})
    if selects is not None:
        wanted = {s for n, s in index.weight_map.items() if selects(n)} if index else set(shards)
        for shard in shards:
            if shard in wanted:
                downloads.fetch(shard)
    return HubPlan(snapshot, repo, shards, index, headers, downloads)


def index_snapshot(repo_id: str, revision: str | None, token: str | None) -> tuple[Path, str]:
    """config.json and the shard index into the HF cache (as huggingface_hub keeps them): the
    snapshot folder and its commit."""
    import huggingface_hub
    from huggingface_hub.utils import tqdm

    class Quiet(tqdm):  # two small files: the analysis draws its own progress
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    def fetch() -> Path:
        patterns = ["config.json", INDEX_NAME, ADAPTER_CONFIG]
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=patterns, tqdm_class=Quiet
        ))  # fmt: skip

    snapshot = call_hub(fetch, repo_id, revision, f"{repo_id}/{INDEX_NAME}", INDEX_NAME)
    return snapshot, snapshot.name


class Prefetch:
    """:func:`plan_hub` on a thread of its own; :meth:`result` joins it (its error, if any,
    is raised there, in the analysis, as it would have been without a prefetch)."""

    def __init__(self, key: tuple[str, str | None, str | None], **kwargs: Any) -> None:
        self.key = key
        self._plan: HubPlan | None = None
        self._error: BaseException | None = None
        self._dropped = False
        self._thread = threading.Thread(
            target=self._run, args=(key, kwargs), name="esdtool-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, key: tuple[str, str | None, str | None], kwargs: dict[str, Any]) -> None:
        try:
            plan = plan_hub(*key, **kwargs)
        except BaseException as exc:  # raised again where the analysis joins it
            self._error = exc
            return
        with _lock:
            self._plan, dropped = plan, self._dropped
        if dropped and plan is not None:  # discarded while it planned: nothing may start
            plan.downloads.close()

    def drop(self, timeout: float) -> None:
        """No analysis will take this: stop its downloads (now, or once its plan is made,
        if that takes longer than ``timeout`` seconds)."""
        with _lock:
            self._dropped = True
        self._thread.join(timeout)
        with _lock:
            plan = self._plan
        if plan is not None:
            plan.downloads.close()

    def flowing(self, timeout: float) -> None:
        """Wait (``timeout`` seconds at most) until the first shard's bytes are arriving, or
        the prefetch ended: importing torch holds the interpreter for seconds (loading its
        libraries), so the requests are made first and the bytes then flow during it."""
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        plan = self._plan
        if plan is None or not plan.shards:
            return
        while time.monotonic() < deadline and not plan.downloads.flowing():
            time.sleep(0.01)

    def result(self) -> HubPlan | None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._plan


_started: dict[tuple[str, str | None, str | None], Prefetch] = {}
_lock = threading.Lock()


def start(
    repo_id: str,
    revision: str | None,
    token: str | None = None,
    *,
    on_fetch: OnFetch | None = None,
    selects: Callable[[str], bool] | None = None,
) -> None:
    """Start opening ``repo_id`` on a thread, and return once the first shard's bytes are
    arriving (:data:`FLOWING_S` at most); the analysis of the same id, revision and token in
    this process takes it over (:func:`take`)."""
    key = (repo_id, revision, token)
    with _lock:
        if key not in _started:
            _started[key] = Prefetch(key, on_fetch=on_fetch, selects=selects)
        prefetch = _started[key]
    prefetch.flowing(FLOWING_S)


def take(repo_id: str, revision: str | None, token: str | None) -> Prefetch | None:
    """The prefetch started for this id, revision and token, once (None if there is none)."""
    with _lock:
        return _started.pop((repo_id, revision, token), None)


def discard(timeout: float = 2.0) -> None:
    """Stop every prefetch not taken (the command ended before its analysis): the downloads
    it started stop and leave no partial file, waiting ``timeout`` seconds at most for one
    still planning (it stops itself once its plan is made)."""
    with _lock:
        pending = list(_started.values())
        _started.clear()
    for prefetch in pending:
        prefetch.drop(timeout)
