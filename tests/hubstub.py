"""A local stand-in for the Hugging Face Hub, for tests that must never touch the internet.

A threaded ``http.server`` on 127.0.0.1 (an ephemeral port) serves a folder of repos
(``ROOT/org/name/<files>``, one fake commit per repo) through the endpoints huggingface_hub
calls, answering the way huggingface.co does:

- ``GET /api/models/{repo}[/revision/{rev}]``: the model info (``sha``, ``siblings``);
- ``GET /api/models/{repo}/tree/{rev}``: the file listing snapshot_download reads;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (the sha256; for
  a ``.safetensors`` file also ``X-Linked-Etag`` and ``X-Linked-Size``, as the hub sends for LFS
  files), ``Content-Length``, ``Accept-Ranges``; ``Range: bytes=a-b`` gives 206 with
  ``Content-Range``;
- refusals with the hub's ``X-Error-Code``: 401 (private repo, no or a wrong token), 403
  ``GatedRepo``, 404 ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``.

Bytes of response bodies are counted per file (``served``); ``rate`` throttles every body to
that many bytes per second, all connections together (one shared link); ``faults`` injects
failures into matching GETs: a connection dropped after N body bytes, a 500, a body truncated
(an honest but short Content-Length), a refusal (401, 403 GatedRepo, 404 EntryNotFound).
``ignore_ranges`` answers every GET with 200 and the whole file (a server without range
support); ``announce`` makes a file's answer claim another Content-Length (the real body is
sent, then the connection closed); ``loops`` makes a file's every answer a redirect to itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def commit_of(repo_id: str) -> str:
    """The fake 40-hex commit of a repo (the same every run)."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


@dataclass
class Fault:
    """One injected failure of a GET whose path contains ``match`` and whose range starts at or
    after ``min_start`` (``min_start=1``: never a header's first bytes).

    kind:  "drop" (close the connection after ``after`` body bytes), "500", "truncate"
           (announce and send only ``after`` bytes of the body), or a refusal as the hub
           answers it: "401" (a token it refuses), "403" (GatedRepo), "404" (EntryNotFound).
           "call": run ``then`` once ``after`` body bytes are sent, and send the rest.
    times: how many requests it hits.
    whole: only GETs of a whole file or of the rest of one (no Range, hf_hub_download's; or
           a Range running to the file's last byte, esdtool's copy into the cache), never the
           range reads of a header or a tensor.
    """

    kind: str
    match: str = ".safetensors"
    after: int = 0
    times: int = 1
    min_start: int = 0
    whole: bool = False
    then: Callable[[], None] | None = None  # also run after a "drop", before the connection ends


class HubStub:
    """The server; use as a context manager (see the module docstring)."""

    def __init__(self, root: Path, rate: float | None = None) -> None:
        self.root = Path(root)
        self.rate = rate  # bytes per second, all bodies together; None: unlimited
        self.faults: list[Fault] = []
        self.served: Counter[str] = Counter()  # file name -> body bytes sent
        self.requests: list[tuple[str, str, str | None, int]] = []  # method, path, range, status
        self.request_times: list[float] = []  # when each of ``requests`` was answered
        self.private: dict[str, str] = {}  # repo id -> the token it needs
        self.gated: set[str] = set()
        self.ignore_ranges = False  # answer a Range request with 200 and the whole file
        self.whole_as_200 = False  # answer a Range asking for all of a file with 200
        self.announce: dict[str, int] = {}  # file name -> the Content-Length its answer claims
        self.loops: set[str] = set()  # file names whose every answer redirects to themselves
        self._lock = threading.Lock()
        self._link = threading.Lock()  # the throttled link: one chunk at a time
        self._next = 0.0
        stub = self

        class Handler(_Handler):
            hub = stub

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: Path) -> Path:
        """Copy the files of folder ``files`` in as repo ``repo_id``; the repo's folder."""
        import shutil

        target = self.root / repo_id
        target.mkdir(parents=True, exist_ok=True)
        for f in Path(files).iterdir():
            if f.is_file():
                shutil.copy(f, target / f.name)
        return target

    def replace(self, repo_id: str, name: str, data: bytes) -> None:
        """Put other bytes at the same URL (the same commit): a misbehaving mirror or proxy."""
        path = self.root / repo_id / name
        path.write_bytes(data)
        _SHA.pop(str(path), None)

    def served_bytes(self, suffix: str = ".safetensors") -> int:
        with self._lock:
            return sum(n for name, n in self.served.items() if name.endswith(suffix))

    def take_fault(self, path: str, start: int, ranged: bool) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.whole and ranged:
                    continue
                if fault.times > 0 and fault.match in path and start >= fault.min_start:
                    fault.times -= 1
                    return fault
        return None

    def throttle(self, nbytes: int) -> None:
        """Wait until the shared link has room for ``nbytes`` more. A sleep that overslept is
        made up by the next chunks (up to 50 ms of credit, a link's buffer), so a busy CPU
        does not slow the link down."""
        if not self.rate:
            return
        with self._link:
            now = time.monotonic()
            self._next = max(self._next, now - 0.05) + nbytes / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)

    def count(self, name: str, nbytes: int) -> None:
        with self._lock:
            self.served[name] += nbytes


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up mid-answer (as one does on a 200 to a range request) is no
        error of the stub's; anything else is printed as usual."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    hub: HubStub
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

    def log_message(self, *args: object) -> None:  # quiet
        return None

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # -- routing ---------------------------------------------------------------------------

    def _serve(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/(revision|tree)/([^/]+))?/?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if api:
            repo_id, kind, rev = api[1], api[2] or "revision", api[3] or "main"
            if self._refused(repo_id, rev):
                return
            if kind == "tree":
                return self._json(self._tree(repo_id), body)
            return self._json(self._info(repo_id), body)
        if resolve:
            repo_id, rev, name = resolve[1], resolve[2], resolve[3]
            if self._refused(repo_id, rev):
                return
            return self._file(repo_id, name, body)
        if path == "/_stub/served":  # the counts, for a stub run in its own process
            return self._json(dict(self.hub.served), body)
        self._error(404, "RepoNotFound", "no such route")

    def _refused(self, repo_id: str, rev: str) -> bool:
        """Answer a refusal as the hub does; True when one was sent."""
        hub = self.hub
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if not (hub.root / repo_id).is_dir():
            self._error(401 if not token else 404, "RepoNotFound", "Repository not found")
            return True
        if repo_id in hub.private and token != hub.private[repo_id]:
            if token:
                self._error(401, None, "Invalid credentials in Authorization header")
            else:
                self._error(401, "RepoNotFound", "Repository not found")
            return True
        if repo_id in hub.gated:
            self._error(403, "GatedRepo", "Access to this model is restricted")
            return True
        if rev not in ("main", commit_of(repo_id)):
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return True
        return False

    # -- answers ---------------------------------------------------------------------------

    def _info(self, repo_id: str) -> dict:
        files = sorted(p.name for p in (self.hub.root / repo_id).iterdir() if p.is_file())
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit_of(repo_id),
            "private": repo_id in self.hub.private,
            "gated": False,
            "siblings": [{"rfilename": f} for f in files],
        }

    def _tree(self, repo_id: str) -> list[dict]:
        entries = []
        for p in sorted((self.hub.root / repo_id).iterdir()):
            if p.is_file():
                sha = _sha256(p)
                lfs = {"oid": sha, "size": p.stat().st_size, "pointerSize": 134}
                entries.append({"type": "file", "oid": sha[:40], "size": p.stat().st_size,
                                "path": p.name, "lfs": lfs})  # fmt: skip
        return entries

    def _json(self, data: object, body: bool) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if body:
            self.wfile.write(raw)
        self._log(200)

    def _file(self, repo_id: str, name: str, body: bool) -> None:
        path = self.hub.root / repo_id / name
        if "/" in name or not path.is_file():
            return self._error(404, "EntryNotFound", "Entry not found")
        if name in self.hub.loops:  # a misconfigured mirror: a redirect to the same URL
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._log(302)
            return
        size = path.stat().st_size
        start, end, status = 0, size, 200
        wanted = None if self.hub.ignore_ranges else self.headers.get("Range")
        if wanted and self.hub.whole_as_200 and wanted.strip() == f"bytes=0-{size - 1}":
            wanted = None  # a proxy that answers a request for the whole file with all of it
        if wanted:
            match = _RANGE.fullmatch(wanted.strip())
            if match is None or int(match[1]) >= size:
                return self._error(416, None, "Range Not Satisfiable")
            start = int(match[1])
            end = min(size, int(match[2]) + 1) if match[2] else size
            status = 206
        rest = not wanted or end == size  # the whole file, or all of it from start on
        fault = self.hub.take_fault(path.name, start, not rest) if body else None
        if fault is not None and fault.kind == "500":
            return self._error(500, None, "Internal Error (injected)")
        refusals = {"401": None, "403": "GatedRepo", "404": "EntryNotFound"}
        if fault is not None and fault.kind in refusals:
            return self._error(int(fault.kind), refusals[fault.kind], "Refused (injected)")
        length = end - start
        if fault is not None and fault.kind == "truncate":
            length = min(length, fault.after)
        self.send_response(status)
        self.send_header("X-Repo-Commit", commit_of(repo_id))
        self.send_header("ETag", f'"{_sha256(path)}"')
        if name.endswith(".safetensors"):
            self.send_header("X-Linked-Etag", f'"{_sha256(path)}"')
            self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        announced = self.hub.announce.get(name)
        self.send_header("Content-Length", str(length if announced is None else announced))
        if announced is not None:
            self.close_connection = True
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        self._log(status)
        if not body:
            return
        limit = fault.after if fault is not None and fault.kind == "drop" else length
        call = fault.after if fault is not None and fault.kind == "call" else None
        step = 4096 if self.hub.rate else 1 << 16  # a throttled link trickles, as a real one
        with open(path, "rb") as f:
            f.seek(start)
            sent = 0
            while sent < min(length, limit):
                if sent == call and fault is not None and fault.then is not None:
                    fault.then()
                upto = min(length, limit) if call is None or sent >= call else call
                chunk = f.read(min(step, upto - sent))
                self.hub.throttle(len(chunk))
                try:
                    self.wfile.write(chunk)
                except OSError:  # the client went away
                    break
                self.hub.count(path.name, len(chunk))
                sent += len(chunk)
        if fault is not None and fault.kind == "drop":
            if fault.then is not None:
                fault.then()
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # mid-body: the client sees a broken stream

    def _error(self, status: int, code: str | None, message: str) -> None:
        raw = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)
        self._log(status)

    def _log(self, status: int) -> None:
        with self.hub._lock:
            self.hub.requests.append((self.command, self.path, self.headers.get("Range"), status))
            self.hub.request_times.append(time.monotonic())


_SHA: dict[str, tuple[tuple[int, int], str]] = {}


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    if _SHA.get(str(path), (None,))[0] != key:
        _SHA[str(path)] = (key, hashlib.sha256(path.read_bytes()).hexdigest())
    return _SHA[str(path)][1]


def main() -> None:
    """``python tests/hubstub.py ROOT [--rate BYTES_PER_S]``: serve ROOT in this process (a
    benchmark runs the hub apart from the client, as the real one is); prints the endpoint,
    serves until stdin closes."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--rate", type=float, default=None)
    args = parser.parse_args()
    with HubStub(args.root, rate=args.rate) as stub:
        print(stub.endpoint, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
