"""Calling the hub: huggingface_hub's errors as esdtool's one-line errors (a refused request is
a :class:`~esdtool.errors.HubRefusedError` saying which: gated repo, wrong id, missing token),
and retries with exponential backoff for what the network does (a dropped connection, a 5xx or
429, a short body), ending in a :class:`~esdtool.errors.TransferError` when they run out."""

from __future__ import annotations

import contextlib
import functools
import importlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from esdtool.errors import HubCacheError, HubRefusedError, SourceError, TransferError

RETRIES = 5  # tries after the first, per request
BACKOFF_S = 0.5  # the first wait; it doubles with each retry (0.5 s ... 8 s, 15.5 s in all)

T = TypeVar("T")


class Retry(Exception):
    """A failure worth another try: a dropped connection, a 5xx or 429, a short body."""


class Cancelled(Exception):
    """A download stopped because the analysis is over (Ctrl-C, a fatal error)."""


@functools.cache
def redirect_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's "too many redirects" (httpx2's or httpx's): a server that sends a
    request round in a loop. Not retried: the next try would loop the same."""
    found = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(module).TooManyRedirects)
    return tuple(found)


@functools.cache
def transport_errors() -> tuple[type[BaseException], ...]:
    """The connection-level errors of the HTTP client huggingface_hub uses: httpx2's
    (huggingface_hub 2.x) or httpx's (1.x)."""
    found = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(module).TransportError)
    return tuple(found)


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
    from huggingface_hub.errors import HfHubHTTPError

    def once() -> T:
        try:
            with hub_errors(repo_id, revision, filename):
                return fetch()
        except SourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, HfHubHTTPError) and retryablehttp_status(cause):
                raise Retry(str(cause).splitlines()[0]) from cause
            raise
        except transport_errors() as exc:
            raise Retry(f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            # huggingface_hub's consistency check ("file should be of size ...") and its
            # LocalEntryNotFoundError / FileMetadataError carry no errno; nor does a lost
            # connection it did not wrap (ConnectionError, TimeoutError) belong to the disk.
            if exc.errno is None or isinstance(exc, ConnectionError | TimeoutError):
                raise Retry(f"{type(exc).__name__}: {exc}") from exc
            raise cache_error(where, exc) from exc

    return with_retries(once, where, stop)


def cache_error(where: str, exc: OSError) -> HubCacheError:
    """A local error writing the HF cache (a full disk, no permission, a file where a folder
    belongs) as one line naming the cache."""
    from huggingface_hub import constants

    path = f": {exc.filename}" if exc.filename else ""
    return HubCacheError(
        f"{where}: cannot write it into the HF cache at {constants.HF_HUB_CACHE} "
        f"({exc.strerror or type(exc).__name__}{path})",
        hint="free space or fix the permissions there, set HF_HOME to another folder, "
        "or use --stream (which stores no shard)",
    )


def retryablehttp_status(exc: Any) -> bool:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status is not None and (status >= 500 or status in (408, 429))


def with_retries(
    attempt: Callable[[], Any], where: str, stop: threading.Event | None = None
) -> Any:
    """``attempt()``, tried again after :data:`BACKOFF_S`, twice that, ... :data:`RETRIES`
    times on a :class:`Retry`; then a :class:`TransferError`. ``stop`` set during a wait
    ends it with :class:`Cancelled`."""
    for n in range(RETRIES + 1):
        try:
            return attempt()
        except Retry as exc:
            last = exc
            if n < RETRIES:
                if stop is None:
                    time.sleep(BACKOFF_S * 2**n)
                elif stop.wait(BACKOFF_S * 2**n):
                    raise Cancelled(where) from exc
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
    except redirect_errors() as exc:
        what = f"{repo_id}/{filename}" if filename else repo_id
        raise SourceError(
            f"{what}: the server redirects the request in a loop ({_first_line(exc)})",
            hint="check HF_ENDPOINT (a mirror or proxy that redirects to itself)",
        ) from exc
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
            f"was sent (HTTP {http_status(exc)})",
            hint="check the id; for a private repo log in (hf auth login) or set HF_TOKEN",
        ) from exc
    except RevisionNotFoundError as exc:
        raise HubRefusedError(f"{repo_id}: revision {revision!r} not found (HTTP 404)") from exc
    except RemoteEntryNotFoundError as exc:
        raise HubRefusedError(
            f"{repo_id}: {filename!r} not found at {revision} (HTTP 404)"
        ) from exc
    except HfHubHTTPError as exc:
        status = http_status(exc)
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
        raise HubRefusedError(f"{repo_id}: hub request failed ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def http_status(exc: Any) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)
