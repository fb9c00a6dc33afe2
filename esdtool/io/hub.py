"""Files of a Hugging Face hub repo at one commit, over huggingface_hub's own HTTP machinery.

Byte ranges (``Range: bytes=a-b`` on ``/{repo}/resolve/{commit}/{file}``) go through
``huggingface_hub``'s session, headers (``HF_TOKEN``, user agent) and error mapping, so
``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` mean what they mean to every other hub
client; whole shards go through ``hf_hub_download`` into the HF cache. What the hub's answers
mean and the retries (:mod:`esdtool.io.hub_calls`) are shared by both: a short body is retried
and the whole range read again.

Network data is untrusted: a whole-file read (config.json, the index) is refused past
:data:`MAX_SMALL_FILE` before anything is allocated, and every byte-range read of a file must
come from the version of it whose header was read (:class:`FileVersion`: the size from
Content-Range, and the ETag when the server sends one).
"""

from __future__ import annotations

import contextlib
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
    SourceError,
)
from esdtool.io import hub_calls
from esdtool.io.hub_calls import (
    Cancelled,
    Retry,
    call_hub,
    hub_errors,
    redirect_errors,
    transport_errors,
    with_retries,
)

MAX_SMALL_FILE = 64 * 2**20  # config.json and the shard index are read whole into memory
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

OnFetch = Callable[[int], None]
T = TypeVar("T")


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
        return with_retries(get, self.where(filename))

    def copy_range(
        self,
        filename: str,
        end: int,
        version: FileVersion,
        write: Callable[[bytes, int], None],
        stop: threading.Event | None = None,
    ) -> None:
        """Bytes ``[0, end)`` of ``version`` of ``filename``, handed to ``write(chunk,
        offset)`` in order as they arrive, by one streamed request; a dropped connection or a
        short body asks for the rest only, from the same version (every answer is checked as
        :meth:`read`'s are, so two versions never meet in one copy). The retries of
        :meth:`read` count per stall: an answer that brought bytes starts them afresh (a copy
        of gigabytes over a flaky link may drop many times and still finish). ``stop`` set
        ends the copy at its next chunk with :class:`Cancelled`."""
        done = 0

        def attempt() -> None:
            nonlocal done
            start = done
            try:
                with self._answer(filename, done, end, version, False) as (response, _, _):
                    for chunk in response.iter_raw():
                        if stop is not None and stop.is_set():
                            raise Cancelled(filename)
                        if done + len(chunk) > end:
                            raise Retry(f"body longer than the {end - start} bytes asked for")
                        write(chunk, done)
                        done += len(chunk)
                        if self.on_fetch is not None:
                            self.on_fetch(len(chunk))
                if done != end:
                    raise Retry(f"body cut short at {done - start} of {end - start} bytes")
            except Retry:
                if done == start:
                    raise

        while done < end:
            before = done
            with_retries(attempt, self.where(filename), stop)
            if done < end and done > before:  # dropped after some bytes: a pause, then on
                pause = hub_calls.BACKOFF_S
                if stop.wait(pause) if stop is not None else time.sleep(pause):
                    raise Cancelled(filename)

    def read_all(self, filename: str) -> bytes:
        """A small file (config.json, the shard index) into memory, never onto the disk; one
        announced larger than :data:`MAX_SMALL_FILE` is refused before anything is read."""
        get = lambda: self._get(filename, 0, None, None, False)  # noqa: E731
        return bytes(with_retries(get, self.where(filename))[0])

    def _get(
        self,
        filename: str,
        start: int,
        end: int | None,
        version: FileVersion | None,
        tail_ok: bool,
    ) -> tuple[bytearray, FileVersion]:
        with self._answer(filename, start, end, version, tail_ok) as (response, got, want):
            return self._body(response, want), got

    @contextlib.contextmanager
    def _answer(
        self,
        filename: str,
        start: int,
        end: int | None,
        version: FileVersion | None,
        tail_ok: bool,
    ) -> Iterator[tuple[Any, FileVersion, int]]:
        """One GET of bytes ``[start, end)`` (the whole file for ``end`` None), its status
        and Content-Range checked: (the streamed response, the file's version, the body's
        length). Failures worth another try are :class:`Retry`."""
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
                    raise Retry(f"HTTP {status}")
                if status == 416 and end is not None:  # the range lies past the file's end
                    raise _changed(self.where(filename), version, f"no bytes {start}-{end - 1}")
                if status >= 400:
                    response.read()
                    with hub_errors(self.repo_id, self.commit, filename):
                        hf_raise_for_status(response)
                got, want = _file_size(response, start, end, self.where(filename), tail_ok,
                                       version)  # fmt: skip
                yield response, got, want
        except redirect_errors() as exc:  # a server that redirects to itself: no retry
            raise SourceError(
                f"{self.where(filename)}: the server redirects the request in a loop ({exc})",
                hint="check HF_ENDPOINT (a mirror or proxy that redirects to itself)",
            ) from exc
        except transport_errors() as exc:  # connect, read, dropped mid-body, timeouts
            raise Retry(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc

    def _body(self, response: Any, want: int) -> bytearray:
        """The body into one preallocated buffer (no copy per chunk kept), exactly ``want``
        bytes long or a retry."""
        buffer = bytearray(want)
        view, got = memoryview(buffer), 0
        for chunk in response.iter_raw():
            if got + len(chunk) > want:
                raise Retry(f"body longer than the {want} bytes asked for")
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
            if self.on_fetch is not None:
                self.on_fetch(len(chunk))
        if got != want:
            raise Retry(f"body cut short at {got} of {want} bytes")
        return buffer

    def download(self, filename: str, stop: threading.Event | None = None) -> Path:
        """``filename`` into the HF cache by ``hf_hub_download`` (a second run, or
        transformers, reuses it), retried like :meth:`read`; its path in the snapshot. Once
        ``stop`` is set the download ends (at its next chunk, or between tries) with
        :class:`Cancelled`."""
        from huggingface_hub import hf_hub_download

        # tqdm_class (huggingface_hub >= 1.1) hears each chunk, and can stop the download;
        # without it the whole file is counted once it is there, and a download under way
        # runs to its end.
        counted = "tqdm_class" in inspect.signature(hf_hub_download).parameters
        extra = {"tqdm_class": self._counter(stop)} if counted else {}

        def fetch() -> Path:
            if stop is not None and stop.is_set():
                raise Cancelled(filename)
            return Path(hf_hub_download(self.repo_id, filename, revision=self.commit,
                                        token=self.token, **extra))  # fmt: skip

        where = self.where(filename)
        path = call_hub(fetch, self.repo_id, self.commit, where, filename, stop=stop)
        if not counted and self.on_fetch is not None:
            self.on_fetch(path.stat().st_size)
        return path

    def _counter(self, stop: threading.Event | None) -> Any:
        """A tqdm stand-in for hf_hub_download that passes each chunk's size on, and raises
        :class:`Cancelled` (out of hf_hub_download, which drops its partial file) once
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
                    raise Cancelled("download stopped")
                if on_fetch is not None and n and n > 0:
                    on_fetch(int(n))

            def close(self) -> None:
                return None

            def set_postfix_str(self, *args: object, **kwargs: object) -> None:
                return None

        return _Counter


def serves_ranges() -> bool:
    """Whether this huggingface_hub can stream byte ranges: its session is an httpx-style
    client (huggingface_hub >= 1.0). Older ones (requests) read hub ids the local way."""
    try:
        from huggingface_hub.utils import get_session
    except ImportError:
        return False
    return callable(getattr(get_session(), "stream", None)) and bool(transport_errors())


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
            raise Retry(f"HTTP {response.status_code} for a whole file")
        length = response.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise Retry("no Content-Length")
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
        raise Retry(f"bad Content-Range {response.headers.get('Content-Range')!r}")
    first, last, size = int(match[1]), int(match[2]), int(match[3])
    got = FileVersion.of(response, size)
    if version is not None and not version.same_as(got):  # before the range: a shorter file
        raise _changed(where, version, f"now {got.size} bytes, ETag {got.etag}")
    tail = tail_ok and last == size - 1 < end - 1
    if first != start or not (last == end - 1 or tail) or size <= last:
        raise Retry(f"Content-Range {first}-{last}/{size} for bytes {start}-{end - 1}")
    return got, last - first + 1
