"""A shard written into the HF cache by esdtool's own range reads, where and as
``hf_hub_download`` leaves it, so that its tensors are analysed while the rest of it arrives.

``hf_hub_download`` hands over a file once all of it is there (and over Xet it writes it in no
fixed order), so with it a tensor waits for its whole shard: the last shard's tensors are all
computed after the download ends. Here the bytes come through
:meth:`~esdtool.io.hub.HubRepo.copy_range`, in order, each answer from the version of the file
its header was read from (size and the hub's sha256 ETag), a dropped connection resumed where it
stopped. They are written to ``blobs/<etag>.<random>.incomplete``; :class:`Landing` says how far
the file is written, and a tensor whose bytes have landed is read from there at once. At the end
the file's sha256 must equal the ETag (the hub's content hash of an LFS file), and
huggingface_hub's own lock and link helpers put it in place (``blobs/<sha256>``, and
``snapshots/<commit>/<file>`` pointing at it, or the file itself where symlinks are not
supported), so a later run, or transformers, finds it there.

Where that cannot be promised (an ETag that is no sha256: a mirror without the hub's headers;
a huggingface_hub without those helpers), :func:`cache_target` gives None and the shard is
downloaded by ``hf_hub_download``, then analysed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esdtool.errors import CheckpointError
from esdtool.io.hub import FileVersion, HubRepo, RangesNotServed
from esdtool.io.hub_calls import cache_error

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RawHeader:
    """A shard's first 8 bytes, its version, and the header bytes they announce (None where
    the length is not one to fetch: the checkpoint reader says why)."""

    prefix: bytes
    version: FileVersion
    raw: bytes | None


def read_raw_header(repo: HubRepo, shard: str, limit: int) -> RawHeader:
    """Two range reads: the length prefix, then (up to ``limit`` bytes) the header JSON.
    Nothing is parsed here (:class:`~esdtool.io.remote.HubCheckpoint` checks it all)."""
    prefix, version = repo.read(shard, 0, 8, tail_ok=True)
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    raw = None
    if n == 0:
        raw = b""
    elif 0 < n <= limit and 8 + n <= version.size:
        raw = bytes(repo.read(shard, 8, 8 + n, version=version)[0])
    return RawHeader(bytes(prefix), version, raw)


@dataclass(frozen=True)
class CacheTarget:
    """Where one shard goes in the HF cache, and huggingface_hub's helpers that put it there."""

    blob: Path
    pointer: Path
    lock: Path
    etag: str
    link: Callable[..., None]
    file_lock: Callable[..., Any]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """huggingface_hub's lock on the blob: another process downloading the same file
        (hf_hub_download or esdtool) waits, then finds it there."""
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        with self.file_lock(self.lock):
            yield


def cache_target(repo: HubRepo, shard: str, version: FileVersion) -> CacheTarget | None:
    """Where ``shard`` of ``version`` goes in the HF cache, or None when esdtool cannot write it
    exactly as hf_hub_download would (see the module docstring)."""
    etag = version.etag
    if not version.linked or etag is None or _SHA256.fullmatch(etag) is None:
        return None
    if Path(shard).name != shard or shard in ("", ".", ".."):  # the index reader refuses these
        return None
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import _create_symlink, repo_folder_name
        from huggingface_hub.utils import WeakFileLock
    except ImportError:
        return None
    cache = Path(constants.HF_HUB_CACHE)
    folder = repo_folder_name(repo_id=repo.repo_id, repo_type="model")
    storage = cache / folder
    if os.name == "nt" and len(str(storage.resolve() / "snapshots" / repo.commit / shard)) > 250:
        return None  # past MAX_PATH: hf_hub_download knows Windows' extended paths
    return CacheTarget(
        blob=storage / "blobs" / etag,
        pointer=storage / "snapshots" / repo.commit / shard,
        lock=cache / ".locks" / folder / f"{etag}.lock",
        etag=etag,
        link=_create_symlink,
        file_lock=WeakFileLock,
    )


class Landing:
    """How far one shard has landed in its incomplete file. Readers wait for their bytes;
    once the shard is complete (or failed) :meth:`read` answers None and the caller reads the
    finished file (or meets the error) through the shard's future. ``waited`` is the time
    readers spent waiting for bytes (the progress line's "which rate bounds the run")."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._file = threading.Lock()  # held while reading, and while the file is moved
        self._path: Path | None = None
        self._landed = 0
        self._over = False
        self.waited = 0.0

    @property
    def landed_bytes(self) -> int:
        return self._landed

    @property
    def path(self) -> Path | None:
        """The incomplete file being written, while it is."""
        return self._path

    def begin(self, path: Path) -> None:
        with self._cond:
            self._path = path

    def landed(self, end: int) -> None:
        with self._cond:
            self._landed = end
            self._cond.notify_all()

    def finish(self, move: Callable[[], None] | None = None) -> None:
        """No more reads from the incomplete file: ``move`` (the file into place) runs once
        no reader is inside it."""
        with self._file:
            with self._cond:
                self._over = True
                self._path = None
                self._cond.notify_all()
            if move is not None:
                move()

    def read(self, begin: int, end: int) -> bytearray | None:
        """Bytes ``[begin, end)`` of the shard once they have landed; None once it is over."""
        t0 = time.perf_counter()
        with self._cond:
            while not self._over and self._landed < end:
                self._cond.wait()
            self.waited += time.perf_counter() - t0
        with self._file:
            path = self._path
            if path is None:
                return None
            buffer = bytearray(end - begin)
            with open(path, "rb") as f:
                f.seek(begin)
                got = f.readinto(buffer)
        if got != end - begin:  # the writer said these bytes were there
            raise CheckpointError(f"{path}: {got} of {end - begin} bytes where the copy wrote them")
        return buffer


def download_shard(
    repo: HubRepo,
    shard: str,
    version: FileVersion,
    target: CacheTarget,
    landing: Landing,
    stop: threading.Event | None = None,
) -> Path:
    """``shard`` into the HF cache at ``target`` by ranged reads, ``landing`` kept up to date;
    its path in the snapshot. A local error writing the cache is a HubCacheError."""
    where = repo.where(shard)
    try:
        try:
            target.blob.parent.mkdir(parents=True, exist_ok=True)
            target.pointer.parent.mkdir(parents=True, exist_ok=True)
            with target.locked():
                if not target.pointer.exists():
                    new = not target.blob.exists()  # another process may have written it
                    if new:
                        _write_blob(repo, shard, version, target, landing, stop)
                    target.link(str(target.blob), str(target.pointer), new_blob=new)
        except OSError as exc:
            if exc.errno is None or isinstance(exc, ConnectionError | TimeoutError):
                raise  # not the disk's: the shard's tensors get error rows saying what
            raise cache_error(where, exc) from exc
    finally:
        landing.finish()
    return target.pointer


def _write_blob(
    repo: HubRepo,
    shard: str,
    version: FileVersion,
    target: CacheTarget,
    landing: Landing,
    stop: threading.Event | None,
) -> None:
    """The bytes into ``blobs/<etag>.<random>.incomplete`` (a name of its own, as
    hf_hub_download's: two writers never share one), checked against the ETag, then moved to
    ``blobs/<etag>``; a failed copy leaves nothing behind."""
    tmp = target.blob.with_name(f"{target.etag}.{uuid.uuid4().hex[:8]}.incomplete")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            landing.begin(tmp)

            def write(chunk: bytes, offset: int) -> None:
                f.write(chunk)
                f.flush()  # readers open the file by name: the bytes must be in it
                digest.update(chunk)
                landing.landed(offset + len(chunk))

            repo.copy_range(shard, version.size, version, write, stop)
        if digest.hexdigest() != target.etag:
            raise CheckpointError(
                f"{repo.where(shard)}: the downloaded bytes hash to sha256 "
                f"{digest.hexdigest()}, not the {target.etag} the hub gave as their ETag",
                hint="the server (or a proxy) serves damaged bytes; run again",
            )
        landing.finish(lambda: os.replace(tmp, target.blob))
    finally:  # readers are let go first: none is inside the file when it goes
        landing.finish(lambda: tmp.unlink(missing_ok=True))


_JOIN_S = 5.0  # how long closing waits for the download thread to stop


class ShardQueue:
    """Shards downloaded into the HF cache one at a time (the first asked for lands soonest)
    on a background thread, in the order they are asked for: :meth:`fetch` gives a shard's
    future (its path in the snapshot) and its :class:`Landing`. Torch-free, so the CLI starts
    it before the heavy imports (:mod:`esdtool.io.hub_prefetch`)."""

    def __init__(self, repo: HubRepo, versions: dict[str, FileVersion]) -> None:
        self.repo = repo
        self.versions = versions
        self._shards: dict[str, tuple[Future[Path], Landing]] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.stop = threading.Event()  # set on closing: the download under way stops too

    def fetch(self, shard: str) -> tuple[Future[Path], Landing]:
        """``shard``'s future and landing; a shard not asked for yet joins the queue's end."""
        with self._lock:
            if shard not in self._shards:
                future: Future[Path] = Future()
                landing = Landing()
                self._shards[shard] = future, landing
                if self.stop.is_set():  # closed: nothing starts
                    landing.finish()
                    future.cancel()
                    return future, landing
                self._queue.put(shard)
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._download_all, name="esdtool-download", daemon=True
                    )
                    self._thread.start()
            return self._shards[shard]

    def flowing(self) -> bool:
        """Whether bytes of a shard have landed (or a download has ended) since the start."""
        with self._lock:
            return any(f.done() or landing.landed_bytes > 0 for f, landing in self._shards.values())

    def waited(self) -> float:
        """Seconds readers have waited for bytes to land, all shards together."""
        with self._lock:
            return sum(landing.waited for _, landing in self._shards.values())

    def _download_all(self) -> None:
        while (shard := self._queue.get()) is not None:
            future, landing = self._shards[shard]
            if self.stop.is_set():  # the analysis is over (or stopped): fetch no more
                landing.finish()
                future.cancel()
                continue
            try:
                future.set_result(self._download(shard, landing))
            except BaseException as exc:  # handed to every tensor of the shard
                future.set_exception(exc)
            finally:
                landing.finish()

    def _download(self, shard: str, landing: Landing) -> Path:
        version = self.versions[shard]
        target = cache_target(self.repo, shard, version)
        if target is not None:
            try:
                return download_shard(self.repo, shard, version, target, landing, self.stop)
            except RangesNotServed:  # a proxy that answers the copy whole: hf_hub_download
                pass
        landing.finish()  # nothing lands early: readers wait for the whole file
        return self.repo.download(shard, self.stop)

    def close(self) -> None:
        """The download under way stops at its next chunk (a reader waiting on it gets an
        error at once), no other starts, and the thread is joined (for :data:`_JOIN_S` at
        most: a read blocked on a silent server ends with the hub's download timeout)."""
        with self._lock:
            if self.stop.is_set():
                return
            self.stop.set()
            thread = self._thread
        self._queue.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_JOIN_S)
            if thread.is_alive():  # a read blocked on a silent server: no partial file stays
                with self._lock:
                    paths = [landing.path for _, landing in self._shards.values()]
                for path in paths:
                    if path is not None:
                        path.unlink(missing_ok=True)
