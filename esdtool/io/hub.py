"""Files of a Hugging Face hub repo at one commit, over huggingface_hub's own HTTP machinery.

Byte ranges (``Range: bytes=a-b`` on ``/{repo}/resolve/{commit}/{file}``) go through
``huggingface_hub``'s session, headers (``HF_TOKEN``, user agent) and error mapping, so
``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` mean what they mean to every other hub
client; whole shards go through ``hf_hub_download`` into the HF cache. A dropped connection, a
5xx or a short body is retried with exponential backoff and the whole range read again; when
the retries run out the error is a :class:`~esdtool.errors.TransferError`. A 401/403/404 is a
:class:`~esdtool.errors.HubRefusedError` saying which (gated repo, wrong id, missing token).

Network data is untrusted: a whole-file read (config.json, the index) is refused past
:data:`MAX_SMALL_FILE` before anything is allocated, and every byte-range read of a file must
come from the version of it whose header was read (:class:`FileVersion`: the size from
Content-Range, and the ETag when the server sends one).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from esdtool.errors import (
    CheckpointError,
    HubCacheError,
    HubRefusedError,
    SourceError,
    TransferError,
)

RETRIES = 5  # tries after the first, per request
BACKOFF_S = 0.5  # the first wait; it doubles with each retry (0.5 s ... 8 s, 15.5 s in all)
MAX_SMALL_FILE = 64 * 2**20  # config.json and the shard index are read whole into memory
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

OnFetch = Callable[[int], None]
T = TypeVar("T")


class _Retry(Exception):
    """A failure worth another try: a dropped connection, a 5xx or 429, a short body."""


class _Cancelled(Exception):
    """A download stopped because the analysis is over (Ctrl-C, a fatal error)."""


class RangesNotServed(SourceError):
    """The server answered a byte-range request with the whole file (HTTP 200)."""


@dataclass(frozen=True)
class FileVersion:
    """Which version of a file a range read came from: its size (from Content-Range) and its
    ETag, normalised as huggingface_hub names cache blobs by it: the hub's X-Linked-Etag
    (sent on the redirect of an LFS file) when some answer of the redirect chain carried one
    (``linked``), else the final answer's ETag; None when the server sends neither."""

    size: int
    etag: str | None = None
    linked: bool = False

    @classmethod
    def of(cls, response: Any, size: int) -> FileVersion:
        chain = [*getattr(response, "history", ()), response]
        linked = next((r.headers["X-Linked-Etag"] for r in chain
                       if "X-Linked-Etag" in r.headers), None)  # fmt: skip
        etag = linked or response.headers.get("ETag")
        # huggingface_hub's own normalisation (file_download._normalize_etag)
        normal = etag.lstrip("W/").strip('"') if etag is not None else None
        return cls(size, normal or None, linked is not None)

    def same_as(self, other: FileVersion) -> bool:
        """The same size, and the same ETag where both answers carry one of the same kind (two
        X-Linked-Etag content hashes, or two plain ETags of one server: a CDN's own ETag says
        nothing about the hub's hash, so a linked and a plain one are never compared)."""
        comparable = (
            self.etag is not None and other.etag is not None and self.linked == other.linked
        )
        return self.size == other.size and (not comparable or self.etag == other.etag)


@dataclass(frozen=True)
class HubRepo:
    """One hub repo at one resolved commit; ``on_fetch`` hears every byte received."""

    repo_id: str
    commit: str
    token: str | None = None
    on_fetch: OnFetch | None = field(default=None, compare=False)

    def where(self, filename: str) -> str:
        """How messages name a file of the repo."""
        return f"{self.repo_id}/{filename}"

    def url(self, filename: str) -> str:
        from huggingface_hub import constants, hf_hub_url

        return hf_hub_url(self.repo_id, filename, revision=self.commit, endpoint=constants.ENDPOINT)

    def read(
        self,
        filename: str,
        start: int,
        end: int,
        *,
        version: FileVersion | None = None,
        tail_ok: bool = False,
    ) -> tuple[bytearray, FileVersion]:
        """Bytes ``[start, end)`` of ``filename`` and the version they came from, with
        retries; see the module docstring. With ``version`` (that of the header's reads) the
        answer must come from that same version of the file, else a :class:`CheckpointError`
        says the file changed. ``tail_ok``: a file shorter than ``end`` gives its tail (only
        the 8-byte length prefix, whose read learns the size, may end short)."""
        if end <= start:
            raise ValueError(f"empty range {start}..{end}")
        get = lambda: self._get(filename, start, end, version, tail_ok)  # noqa: E731
        return _with_retries(get, self.where(filename))

    def read_all(self, filename: str) -> bytes:
        """A small file (config.json, the shard index) into memory, never onto the disk; one
        announced larger than :data:`MAX_SMALL_FILE` is refused before anything is read."""
        get = lambda: self._get(filename, 0, None, None, False)  # noqa: E731
        return bytes(_with_retries(get, self.where(filename))[0])

    def _get(
        self,
        filename: str,
        start: int,
        end: int | None,
        version: FileVersion | None,
        tail_ok: bool,
    ) -> tuple[bytearray, FileVersion]:
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = build_hf_headers(token=self.token)
        headers["Accept-Encoding"] = "identity"  # byte offsets are of the stored file
        if end is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        try:
            timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
            with get_session().stream(
                "GET", self.url(filename), headers=headers, timeout=timeout
            ) as response:
                status = response.status_code
                if status >= 500 or status in (408, 429):
                    raise _Retry(f"HTTP {status}")
                if status == 416 and end is not None:  # the range lies past the file's end
                    raise _changed(self.where(filename), version, f"no bytes {start}-{end - 1}")
                if status >= 400:
                    response.read()
                    with hub_errors(self.repo_id, self.commit, filename):
                        hf_raise_for_status(response)
                got, want = _file_size(response, start, end, self.where(filename), tail_ok,
                                       version)  # fmt: skip
                return self._body(response, want), got
        except transport_errors() as exc:  # connect, read, dropped mid-body, timeouts
            raise _Retry(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc

    def _body(self, response: Any, want: int) -> bytearray:
        """The body into one preallocated buffer (no copy per chunk kept), exactly ``want``
        bytes long or a retry."""
        buffer = bytearray(want)
        view, got = memoryview(buffer), 0
        for chunk in response.iter_raw():
            if got + len(chunk) > want:
                raise _Retry(f"body longer than the {want} bytes asked for")
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
            if self.on_fetch is not None:
                self.on_fetch(len(chunk))
        if got != want:
            raise _Retry(f"body cut short at {got} of {want} bytes")
        return buffer

    def download(self, filename: str, stop: threading.Event | None = None) -> Path:
        """``filename`` into the HF cache by ``hf_hub_download`` (a second run, or
        transformers, reuses it), retried like :meth:`read`; its path in the snapshot. Once
        ``stop`` is set the download ends (at its next chunk, or between tries) with
        :class:`_Cancelled`."""
        from huggingface_hub import hf_hub_download

        # tqdm_class (huggingface_hub >= 1.1) hears each chunk, and can stop the download;
        # without it the whole file is counted once it is there, and a download under way
        # runs to its end.
        counted = "tqdm_class" in inspect.signature(hf_hub_download).parameters
        extra = {"tqdm_class": self._counter(stop)} if counted else {}

        def fetch() -> Path:
            if stop is not None and stop.is_set():
                raise _Cancelled(filename)
            return Path(hf_hub_download(self.repo_id, filename, revision=self.commit,
                                        token=self.token, **extra))  # fmt: skip

        where = self.where(filename)
        path = call_hub(fetch, self.repo_id, self.commit, where, filename, stop=stop)
        if not counted and self.on_fetch is not None:
            self.on_fetch(path.stat().st_size)
        return path

    def _counter(self, stop: threading.Event | None) -> Any:
        """A tqdm stand-in for hf_hub_download that passes each chunk's size on, and raises
        :class:`_Cancelled` (out of hf_hub_download, which drops its partial file) once
        ``stop`` is set."""
        on_fetch = self.on_fetch

        class _Counter:
            def __init__(self, *args: object, **kwargs: object) -> None:
                pass

            def __enter__(self) -> _Counter:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def update(self, n: float | None = 1) -> None:
                if stop is not None and stop.is_set():
                    raise _Cancelled("download stopped")
                if on_fetch is not None and n and n > 0:
                    on_fetch(int(n))

            def close(self) -> None:
                return None

            def set_postfix_str(self, *args: object, **kwargs: object) -> None:
                return None

        return _Counter


@functools.cache
def transport_errors() -> tuple[type[BaseException], ...]:
    """The connection-level errors of the HTTP client huggingface_hub uses: httpx2's
    (huggingface_hub 2.x) or httpx's (1.x)."""
    found = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(module).TransportError)
    return tuple(found)


def serves_ranges() -> bool:
    """Whether this huggingface_hub can stream byte ranges: its session is an httpx-style
    client (huggingface_hub >= 1.0). Older ones (requests) read hub ids the local way."""
    try:
        from huggingface_hub.utils import get_session
    except ImportError:
        return False
    return callable(getattr(get_session(), "stream", None)) and bool(transport_errors())


def call_hub(
    fetch: Callable[[], T],
    repo_id: str,
    revision: str | None,
    where: str,
    filename: str | None,
    *,
    stop: threading.Event | None = None,
) -> T:
    """``fetch()``, a huggingface_hub download into the HF cache, with :func:`hub_errors`'
    messages and the retries of :meth:`HubRepo.read` for what the network did (a 5xx, a lost
    connection, huggingface_hub's own size and metadata checks). An error of the local disk
    (an OSError with an errno: a full disk, no permission, a file where a folder belongs) is
    no network failure: it is a :class:`HubCacheError` naming the cache, at once."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    def once() -> T:
        try:
            with hub_errors(repo_id, revision, filename):
                return fetch()
        except SourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, HfHubHTTPError) and _retryable_status(cause):
                raise _Retry(str(cause).splitlines()[0]) from cause
            raise
        except transport_errors() as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            # huggingface_hub's consistency check ("file should be of size ...") and its
            # LocalEntryNotFoundError / FileMetadataError carry no errno; nor does a lost
            # connection it did not wrap (ConnectionError, TimeoutError) belong to the disk.
            if exc.errno is None or isinstance(exc, ConnectionError | TimeoutError):
                raise _Retry(f"{type(exc).__name__}: {exc}") from exc
            path = f": {exc.filename}" if exc.filename else ""
            raise HubCacheError(
                f"{where}: cannot write it into the HF cache at {constants.HF_HUB_CACHE} "
                f"({exc.strerror or type(exc).__name__}{path})",
                hint="free space or fix the permissions there, set HF_HOME to another folder, "
                "or use --stream (which stores no shard)",
            ) from exc

    return _with_retries(once, where, stop)


def _retryable_status(exc: Any) -> bool:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status is not None and (status >= 500 or status in (408, 429))


def _changed(where: str, version: FileVersion | None, detail: str) -> CheckpointError:
    if version is None:  # the prefix read: the file is empty
        return CheckpointError(f"{where}: the server has {detail} of it; the file is empty")
    return CheckpointError(
        f"{where}: the file changed since its header was read (then {version.size} bytes, "
        f"ETag {version.etag}; {detail})",
        hint="the server (or a proxy or mirror) serves another version of the file at the "
        "same commit; run again once it serves one version",
    )


def _file_size(
    response: Any,
    start: int,
    end: int | None,
    where: str,
    tail_ok: bool = False,
    version: FileVersion | None = None,
) -> tuple[FileVersion, int]:
    """(the file's version, the body's length). A 206 must come from ``version`` of the file
    (when given), and cover exactly the range asked for, or with ``tail_ok`` the file's tail
    when the file ends first (a server that ignores Range would send the whole file for every
    tensor). A whole file must announce a length of at most :data:`MAX_SMALL_FILE`."""
    if end is None:
        if response.status_code != 200:
            raise _Retry(f"HTTP {response.status_code} for a whole file")
        length = response.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise _Retry("no Content-Length")
        if int(length) > MAX_SMALL_FILE:
            raise SourceError(
                f"{where}: the server announces {int(length)} bytes; esdtool reads at most "
                f"{MAX_SMALL_FILE // 2**20} MB of it"
            )
        return FileVersion.of(response, int(length)), int(length)
    if response.status_code != 206:
        raise RangesNotServed(
            f"{where}: the server answered a byte-range request with HTTP "
            f"{response.status_code}, not 206 Partial Content",
            hint="--stream needs an endpoint that serves byte ranges; drop --stream to "
            "download the shards whole",
        )
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None or match[3] == "*":
        raise _Retry(f"bad Content-Range {response.headers.get('Content-Range')!r}")
    first, last, size = int(match[1]), int(match[2]), int(match[3])
    got = FileVersion.of(response, size)
    if version is not None and not version.same_as(got):  # before the range: a shorter file
        raise _changed(where, version, f"now {got.size} bytes, ETag {got.etag}")
    tail = tail_ok and last == size - 1 < end - 1
    if first != start or not (last == end - 1 or tail) or size <= last:
        raise _Retry(f"Content-Range {first}-{last}/{size} for bytes {start}-{end - 1}")
    return got, last - first + 1


def _with_retries(
    attempt: Callable[[], Any], where: str, stop: threading.Event | None = None
) -> Any:
    """``attempt()``, tried again after :data:`BACKOFF_S`, twice that, ... :data:`RETRIES`
    times on a :class:`_Retry`; then a :class:`TransferError`. ``stop`` set during a wait
    ends it with :class:`_Cancelled`."""
    for n in range(RETRIES + 1):
        try:
            return attempt()
        except _Retry as exc:
            last = exc
            if n < RETRIES:
                if stop is None:
                    time.sleep(BACKOFF_S * 2**n)
                elif stop.wait(BACKOFF_S * 2**n):
                    raise _Cancelled(where) from exc
    raise TransferError(
        f"{where}: transfer failed {RETRIES + 1} times, the last with {last}",
        hint="check the connection (or HF_ENDPOINT) and run the same command again",
    ) from last


def resolve_commit(repo_id: str, revision: str | None, token: str | None) -> tuple[str, list[str]]:
    """(the commit ``revision`` names now, the repo's file names) from the hub's
    ``/api/models/{repo}/revision/{revision}``."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, token=token)
    if not isinstance(info.sha, str) or not re.fullmatch(r"[0-9a-f]{40}", info.sha):
        raise SourceError(f"{repo_id}: the hub gave no commit hash for revision {revision!r}")
    return info.sha, [s.rfilename for s in info.siblings or []]


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, filename: str | None = None) -> Iterator[None]:
    """huggingface_hub's errors for a refused request as one :class:`HubRefusedError` line
    each (during an analysis it stops the run: every later request would be refused too)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except OfflineModeIsEnabled as exc:
        raise HubRefusedError(
            f"{repo_id}: the hub cannot be reached: HF_HUB_OFFLINE is set"
        ) from exc
    except GatedRepoError as exc:
        raise HubRefusedError(
            f"{repo_id}: gated repository; access not granted (HTTP 403)",
            hint="accept its terms on the hub and log in (hf auth login) or set HF_TOKEN",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise HubRefusedError(
            f"{repo_id}: no such repository on the hub, or it is private and no valid token "
            f"was sent (HTTP {_status(exc)})",
            hint="check the id; for a private repo log in (hf auth login) or set HF_TOKEN",
        ) from exc
    except RevisionNotFoundError as exc:
        raise HubRefusedError(f"{repo_id}: revision {revision!r} not found (HTTP 404)") from exc
    except RemoteEntryNotFoundError as exc:
        raise HubRefusedError(
            f"{repo_id}: {filename!r} not found at {revision} (HTTP 404)"
        ) from exc
    except HfHubHTTPError as exc:
        status = _status(exc)
        if status == 401:
            raise HubRefusedError(
                f"{repo_id}: the hub refused the token (HTTP 401)",
                hint="log in again (hf auth login) or set a valid HF_TOKEN",
            ) from exc
        if status == 403:
            raise HubRefusedError(
                f"{repo_id}: access denied (HTTP 403)",
                hint="the token lacks read access to this repo; use one that has it",
            ) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubRefusedError(f"{repo_id}: hub request failed ({first})") from exc


def _status(exc: Any) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)
