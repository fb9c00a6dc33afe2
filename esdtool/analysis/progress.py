"""A progress bar for :func:`esdtool.analyze` called from Python: ``progress=True`` draws one
with tqdm's auto mode, a widget in Jupyter and a text bar in a terminal. The library draws
nothing unless asked (the CLI draws its own rich bar)."""

from __future__ import annotations

import threading
from typing import Any


class TqdmProgress:
    """A :class:`~esdtool.analysis.result.ProgressHook` over bytes read, with tensors done, and
    for a hub id a second bar of the bytes fetched (each with its rate)."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar: Any = None
        self.fetch: Any = None
        self._lock = threading.Lock()  # fetched() is called from reader and download threads
        self.done = 0
        self.total = 0

    def fetched(self, nbytes: int) -> None:
        """Bytes received from the hub (a retried attempt's bytes count too: they came)."""
        with self._lock:
            if self.fetch is None:
                self.fetch = self._tqdm(unit="B", unit_scale=True, desc="fetch")
            self.fetch.update(nbytes)

    def start(self, total_tensors: int, total_bytes: int) -> None:
        self.total = total_tensors
        self.bar = self._tqdm(total=total_bytes, unit="B", unit_scale=True, desc="analyze")

    def advance(self, name: str, nbytes: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.done}/{self.total} tensors", refresh=False)
            self.bar.update(nbytes)

    def note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)

    def close(self) -> None:
        for bar in (self.bar, self.fetch):
            if bar is not None:
                bar.close()
