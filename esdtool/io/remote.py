"""Hub checkpoints analysed while they arrive: downloaded alongside the analysis (the default
for a hub id), or streamed tensor by tensor with nothing stored (``--stream``).

Both read every shard's header first, with two byte-range requests each (the 8-byte length,
then the JSON), and check it exactly as a local header is checked (:func:`check_header`): a
header from the network is as untrusted as a file. Then:

- :class:`DownloadingCheckpoint` fetches whole shards into the HF cache on a background
  thread, in the order the analysis will read them (:meth:`will_read`), by ranged reads of its
  own (:mod:`esdtool.io.hub_cache`): a tensor is computed as soon as its bytes have landed, in
  the shard still arriving, and its row is held until the whole shard has checked out (size,
  sha256 against the hub's ETag, header). Where the cache cannot be written exactly as
  ``hf_hub_download`` writes it, ``hf_hub_download`` fetches the shard and its tensors wait for
  it. The finished shard's size and header are checked again on disk and must equal the ones
  planned from. A small tensor (under :data:`SMALL_READ` bytes: a ``weight_shape``) read while
  the analysis is planned, before any shard is queued, is read by a range request instead of
  waiting for its shard.
- :class:`StreamedCheckpoint` reads each tensor with one range request into memory (the reader
  thread of :func:`esdtool.io.checkpoint.prefetched` keeps one tensor ahead: that is the
  read-ahead bound) and writes nothing to disk.

Every range read of tensor data must come from the version of the shard its header was read
from (:class:`~esdtool.io.hub.FileVersion`: the size and ETag of the header's answers), else the
tensor's row is an error saying the file changed.

Both look like :class:`~esdtool.io.checkpoint.Checkpoint` (``keys``, ``metadata``, ``info``,
``get_tensor``, ``files``), so the analysis code is the same; ``identity`` (repo, commit and a
digest of the headers) stands in for the file facts in the resume fingerprint.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from esdtool.errors import (
    CheckpointError,
)
from esdtool.io.checkpoint import (
    MAX_HEADER_BYTES,
    Checkpoint,
    TensorInfo,
    check_header,
    header_length,
    tensor_from_bytes,
)
from esdtool.io.hub import (
    FileVersion,
    HubRepo,
)
from esdtool.io.hub_cache import Landing, RawHeader, ShardQueue, read_raw_header
from esdtool.io.source import (
    ResolvedSource,
    ShardIndex,
)

_HEADER_WORKERS = 8  # shard headers fetched at once
SMALL_READ = 64 * 2**10  # the default road reads a tensor this small by range, not waiting


class HubCheckpoint(Checkpoint):
    """The headers of a hub checkpoint's shards, checked; see the module docstring."""

    def __init__(
        self,
        repo: HubRepo,
        shards: Iterable[str],
        index: ShardIndex | None,
        headers: Mapping[str, RawHeader] | None = None,
    ) -> None:
        self.repo = repo
        shards = tuple(shards)
        self.files = tuple(Path(s) for s in shards)
        self._tensors: dict[str, TensorInfo] = {}
        self._metadata: dict[str, str] = {}
        self._data_start: dict[str, int] = {}
        self._shard_metadata: dict[str, dict[str, str]] = {}
        self._versions: dict[str, FileVersion] = {}
        with ThreadPoolExecutor(_HEADER_WORKERS, thread_name_prefix="esdtool-header") as pool:
            ahead = dict(headers or {})
            read = lambda shard: self._header(shard, ahead.get(shard))  # noqa: E731
            headers = list(pool.map(read, shards))
        for shard, (_, metadata, start, version, _) in zip(shards, headers, strict=True):
            self._data_start[shard] = start
            self._versions[shard] = version
            self._shard_metadata[shard] = metadata
        self._merge(((repo.where(shard), tensors, metadata) for shard, (tensors, metadata, *_)
                     in zip(shards, headers, strict=True)), index)  # fmt: skip
        facts = [(shard, v.size, raw) for shard, (*_, v, raw) in zip(shards, headers, strict=True)]
        self.identity = hub_identity(repo.repo_id, repo.commit, facts)

    def _header(
        self, shard: str, read: RawHeader | None = None
    ) -> tuple[dict[str, TensorInfo], dict[str, str], int, FileVersion, bytes]:
        """(tensors, metadata, where the data starts, the file's version, the raw header),
        from the bytes ``read`` ahead (the CLI's prefetch) or read now."""
        where = self.repo.where(shard)
        read = read or read_raw_header(self.repo, shard, MAX_HEADER_BYTES)
        version = read.version
        n = header_length(read.prefix, version.size, where)
        raw = read.raw if read.raw is not None and len(read.raw) == n else None
        if raw is None:
            raw = bytes(self.repo.read(shard, 8, 8 + n, version=version)[0]) if n else b""
        tensors, metadata = check_header(raw, version.size, Path(shard), where)
        return tensors, metadata, 8 + n, version, raw

    def _read_range(self, name: str) -> torch.Tensor:
        """One tensor by one range request, into memory. Bytes of another version of the
        shard than the header's (another size or ETag: a mirror or proxy serving a file
        replaced at the same URL) are a CheckpointError, the tensor's error row: every row
        computed stays one of the version planned from, and a finished run leaves no sidecar,
        so a rerun reads the new version afresh rather than mixing the two in one table."""
        info = self._tensors[name]
        shard = info.shard.name
        if info.nbytes == 0:
            return tensor_from_bytes(bytearray(), info, self.repo.where(shard))
        start, version = self._data_start[shard], self._versions[shard]
        data, _ = self.repo.read(shard, start + info.begin, start + info.end, version=version)
        return tensor_from_bytes(data, info, self.repo.where(shard))


class StreamedCheckpoint(HubCheckpoint):
    """--stream: each tensor one range request, into memory only."""

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._read_range(name)


class DownloadingCheckpoint(HubCheckpoint):
    """The default road for a hub id: shards downloaded into the HF cache on a background
    thread (:class:`~esdtool.io.hub_cache.ShardQueue`) while the tensors already there are
    analysed. ``downloads``: a queue started before the analysis (the CLI's prefetch)."""

    def __init__(
        self,
        repo: HubRepo,
        shards: Iterable[str],
        index: ShardIndex | None,
        headers: Mapping[str, RawHeader] | None = None,
        downloads: ShardQueue | None = None,
    ) -> None:
        super().__init__(repo, shards, index, headers)
        self._downloads = downloads or ShardQueue(repo, dict(self._versions))
        self._checked: dict[str, Future[Checkpoint]] = {}
        self._landings: dict[str, Landing] = {}
        self._early: dict[str, Future[Checkpoint]] = {}  # tensors read before their shard ended
        self._lock = threading.Lock()
        self._waited = 0.0  # for whole shards (hf_hub_download's road)

    def will_read(self, names: Iterable[str]) -> None:
        for shard in dict.fromkeys(self._tensors[n].shard.name for n in names):
            self._shard(shard)

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor, as soon as its bytes have landed in the shard being downloaded (or
        once its shard is in the cache, read from there like a local file). A small one of a
        shard not queued for download (by :meth:`will_read`) is read by a range request
        instead: compressed-tensors' ``weight_shape``, read for every weight while the
        analysis is planned, would otherwise queue and wait for every shard before the first
        tensor is analysed. Tensors of a queued shard wait for it (read twice, their bytes
        would be fetched twice)."""
        info = self._tensors[name]
        shard = info.shard.name
        with self._lock:
            queued = shard in self._checked
        if info.nbytes < SMALL_READ and not queued:
            return self._read_range(name)
        checked = self._shard(shard)
        if not checked.done() and info.nbytes:
            start = self._data_start[shard]
            data = self._landings[shard].read(start + info.begin, start + info.end)
            if data is not None:
                with self._lock:
                    self._early[name] = checked
                return tensor_from_bytes(data, info, self.repo.where(shard))
        if not checked.done():  # the whole shard awaited (hf_hub_download's road): counted too
            t0 = time.perf_counter()
            checked.exception()
            with self._lock:
                self._waited += time.perf_counter() - t0
        return checked.result().get_tensor(name)

    def unverified(self, names: Iterable[str]) -> list[Future[object]]:
        with self._lock:
            return [self._early[n] for n in names if n in self._early]

    @property
    def waited(self) -> float:
        """Seconds the analysis has waited for bytes to land (or for a whole shard)."""
        with self._lock:
            waited = self._waited
        return waited + self._downloads.waited()

    def _shard(self, shard: str) -> Future[Checkpoint]:
        """The future of ``shard``'s local checkpoint, checked against the header planned
        from; a shard not asked for yet joins the end of the download queue."""
        with self._lock:
            if shard not in self._checked:
                downloaded, landing = self._downloads.fetch(shard)
                checked: Future[Checkpoint] = Future()
                self._checked[shard], self._landings[shard] = checked, landing

                def check(done: Future[Path]) -> None:
                    try:
                        checked.set_result(self._check(shard, done.result()))
                    except BaseException as exc:  # handed to every tensor of the shard
                        checked.set_exception(exc)

                downloaded.add_done_callback(check)
            return self._checked[shard]

    def _check(self, shard: str, path: Path) -> Checkpoint:
        """``shard`` in the cache, opened (its header checked by read_header and safetensors)
        and compared with the size and header the analysis was planned from."""
        version = self._versions[shard]
        size, planned_size = path.stat().st_size, version.size
        if size != planned_size:
            raise CheckpointError(
                f"{path}: the downloaded shard differs from the one fetched from "
                f"{self.repo.where(shard)} at {self.repo.commit}: {size} bytes, not the "
                f"{planned_size} its header was read from",
                hint="the file changed on the server, or the cached file is damaged; delete it "
                "and run again",
            )
        blob = path.resolve()  # the HF cache names a blob by the ETag it downloaded
        if version.linked and blob.parent.name == "blobs" and blob.name != version.etag:
            raise CheckpointError(
                f"{path}: the downloaded shard differs from the one fetched from "
                f"{self.repo.where(shard)} at {self.repo.commit}: ETag {blob.name}, not the "
                f"{version.etag} its header was read from",
                hint="the file changed on the server; run again once it serves one version",
            )
        local = Checkpoint([path])
        planned = [n for n, i in self._tensors.items() if i.shard.name == shard]
        same = _facts(local, local.keys()) == _facts(self, planned)
        if not same or local.metadata() != self._shard_metadata[shard]:
            raise CheckpointError(
                f"{path}: the downloaded shard's header differs from the one fetched from "
                f"{self.repo.where(shard)} at {self.repo.commit}",
                hint="the cached file is damaged or stale; delete it and run again",
            )
        return local

    def close(self) -> None:
        """The download under way stops at its next chunk; see ShardQueue.close."""
        self._downloads.close()


def hub_identity(
    repo_id: str, commit: str, headers: list[tuple[str, int, bytes]]
) -> dict[str, str]:
    """What the resume fingerprint keeps of a hub checkpoint: repo, commit, and a digest of
    every shard's (name, size, raw header). The same whichever road read it (streamed,
    downloaded alongside, or from the cache), so a rerun resumes on any of them."""
    digest = hashlib.sha256(f"{repo_id}\0{commit}".encode())
    for shard, size, raw in headers:
        digest.update(f"\0{shard}\0{size}\0".encode() + raw)
    return {"repo": repo_id, "commit": commit, "headers": digest.hexdigest()}


def cached_identity(resolved: ResolvedSource) -> dict[str, str] | None:
    """:func:`hub_identity` of a hub id read from the HF cache (None for other sources)."""
    if resolved.kind != "hub" or resolved.revision is None:
        return None
    headers = []
    for path in resolved.files:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            raw = f.read(min(n, MAX_HEADER_BYTES))
        headers.append((path.name, path.stat().st_size, raw))
    return hub_identity(resolved.source, resolved.revision, headers)


def _facts(ckpt: Checkpoint, names: Iterable[str]) -> dict[str, tuple[object, ...]]:
    """What two headers of one shard must agree on: each tensor's dtype, shape and offsets."""
    return {n: (i.dtype, i.shape, i.begin, i.end) for n in names for i in [ckpt.info(n)]}
