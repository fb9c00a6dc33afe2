"""Resumable analysis: every finished tensor's rows are appended to a sidecar next to the
output, so a run killed after hours loses at most the tensor it was computing.

The sidecar (``.NAME.partial`` beside ``NAME``) is JSON lines: a header line with a fingerprint
of the checkpoint (:func:`fingerprint`), the settings and esdtool's version, then one line
per finished tensor holding its rows; each line is flushed and fsynced before the next tensor
starts. A torn last line (a kill mid-write) is ignored. On the next run with the same output,
the rows are reused when the fingerprint matches and discarded (with a notice) when it does not.
The sidecar is deleted once the table is written. It holds only numbers and strings: JSON, never
pickle.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from esdtool.errors import OutputError
from esdtool.io.table import MatrixRow
from esdtool.spectral import ALPHA_METHODS
from esdtool.spectral.farms import FarmsMetrics, FarmsWindows
from esdtool.spectral.marchenko_pastur import SpikeCount
from esdtool.spectral.metrics import SpectrumMetrics
from esdtool.spectral.powerlaw import PowerLawFit
from esdtool.version import __version__

FORMAT = "esdtool-partial/3"  # /2: rows as records (nested fits); /3: the quantization field


def sidecar_path(output: Path, rank: int = 0, world_size: int = 1) -> Path:
    """Where the rows of a run writing ``output`` are kept (one file per rank under torchrun)."""
    suffix = f".rank{rank}of{world_size}" if world_size > 1 else ""
    return output.with_name(f".{output.name}{suffix}.partial")


# Data samples hashed per file: a re-save with new weights changes nearly every byte, so 16
# samples of 64 KiB spread over the data see it; reading 1 MiB a file costs nothing next to
# the analysis.
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def fingerprint(files: list[Path], settings: dict[str, Any], extra: dict[str, Any]) -> str:
    """A digest that changes whenever the rows kept from an earlier run could be stale.

    Each file contributes its resolved absolute path (another model at the same ``-o`` never
    matches), its size, mtime_ns, inode and device (a re-save, even in place), the SHA-256 of
    its header (names, dtypes, shapes, offsets) and of 16 samples of its data (a re-save
    within one timestamp tick). esdtool's version, the settings and the job layout complete
    it: a new esdtool never reuses rows an older one computed.
    """
    digest = hashlib.sha256()
    for path in files:
        resolved = Path(path).resolve()
        stat = resolved.stat()
        with open(resolved, "rb") as f:
            head = f.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            header = f.read(min(length, 100_000_000))
            data_start, data_size = 8 + len(header), max(0, stat.st_size - 8 - len(header))
            step = max(data_size // _SAMPLES, 1)
            for offset in range(0, data_size, step)[:_SAMPLES]:
                f.seek(data_start + offset)
                digest.update(f.read(_SAMPLE_BYTES))
        facts = (str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
        digest.update("\0".join(map(str, facts)).encode("utf-8", "surrogateescape"))
        digest.update(hashlib.sha256(header).digest())
    meta = [settings, extra, {"esdtool": __version__}]
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _encode(row: MatrixRow) -> dict[str, Any]:
    """A row as JSON-ready data: its fields (the metrics' records nested), eigenvalues as
    base64 little-endian float32."""
    data = asdict(row)
    if row.eigenvalues is not None:
        raw = row.eigenvalues.astype("<f4").tobytes()
        data["eigenvalues"] = base64.b64encode(raw).decode("ascii")
    return data


def _decode(data: dict[str, Any]) -> MatrixRow:
    """The inverse of :func:`_encode` (raises KeyError/TypeError/ValueError on foreign data)."""
    data = dict(data)
    if data.get("eigenvalues") is not None:
        raw = base64.b64decode(data["eigenvalues"], validate=True)
        data["eigenvalues"] = np.frombuffer(raw, dtype="<f4").copy()
    if data.get("metrics") is not None:
        data["metrics"] = _metrics(data["metrics"])
    farms = data.get("farms")
    if farms is not None:
        placed = farms["windows"]
        data["farms"] = FarmsMetrics(
            _metrics(farms["metrics"]),
            FarmsWindows(
                int(placed["n"]),
                int(placed["c"]),
                tuple(placed["row_starts"]),
                tuple(placed["col_starts"]),
            ),
        )
    return MatrixRow(**data)


def _metrics(metrics: dict[str, Any]) -> SpectrumMetrics:
    fits = {m: PowerLawFit(**metrics[m]) for m in ALPHA_METHODS}
    return SpectrumMetrics(**{**metrics, **fits, "spikes": SpikeCount(**metrics["spikes"])})


class Sidecar:
    """The append-only file of finished rows of one run (see the module docstring)."""

    def __init__(self, path: Path, digest: str) -> None:
        self.path = path
        self.digest = digest
        self.kept: dict[str, list[MatrixRow]] = {}
        self.discarded = False  # a sidecar was there but for another checkpoint or settings
        self.appended = 0  # tensors recorded by this run
        self._file: Any = None

    @classmethod
    def open(cls, path: Path, digest: str, resume: bool = True) -> Sidecar:
        """Read back what a previous run finished (when ``resume`` and it matches), then start
        appending. The file is rewritten with only the valid lines, so a torn tail is gone."""
        side = cls(path, digest)
        if path.exists() and resume:
            side.kept, side.discarded = _read(path, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # two runs never share a temp
        side._file = open(tmp, "w", encoding="utf-8")  # noqa: SIM115
        try:
            side._write_line({"format": FORMAT, "fingerprint": digest})
            for rows in side.kept.values():
                side._write_line({"rows": [_encode(r) for r in rows]})
            os.replace(tmp, path)
        except BaseException:
            side.close()
            tmp.unlink(missing_ok=True)
            raise
        return side

    @classmethod
    def none(cls) -> Sidecar:
        """A sidecar that keeps nothing and writes nothing (a run with no output file)."""
        side = cls(Path(os.devnull), "")
        side._write_line = lambda record: None  # type: ignore[method-assign]
        side.remove = side.close  # type: ignore[method-assign]
        return side

    @property
    def kept_rows(self) -> int:
        return sum(len(rows) for rows in self.kept.values())

    def append(self, rows: list[MatrixRow]) -> None:
        """Record one finished tensor's rows durably (flush + fsync)."""
        self.appended += 1
        self._write_line({"rows": [_encode(r) for r in rows]})

    def _write_line(self, record: dict[str, Any]) -> None:
        """Append one line durably; a full disk or any other OS failure is an
        :class:`OutputError` naming the sidecar."""
        try:
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise OutputError(
                f"{self.path}: cannot write the resume file ({exc.strerror or exc})",
                hint="free some space on that disk and run the same command again; the rows "
                "finished so far are kept",
            ) from exc

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    def remove(self) -> None:
        """The table is written: the sidecar has served its purpose."""
        self.close()
        self.path.unlink(missing_ok=True)


def _read(path: Path, digest: str) -> tuple[dict[str, list[MatrixRow]], bool]:
    """(rows by tensor name, whether the file was discarded as not matching)."""
    kept: dict[str, list[MatrixRow]] = {}
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError):
        return {}, True
    try:
        head = json.loads(lines[0])
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        return {}, True
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        return {}, True
    if head.get("fingerprint") != digest:
        return {}, True
    for line in lines[1:]:
        try:
            record = json.loads(line)
            rows = [_decode(r) for r in record["rows"]]
            name = rows[0].name
        except (ValueError, KeyError, IndexError, TypeError, RecursionError, binascii.Error):
            break  # a torn last line: everything before it is good
        kept[name] = rows
    return kept, False
