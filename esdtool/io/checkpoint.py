"""Reading safetensors checkpoints one tensor at a time, never the whole model.

A :class:`Checkpoint` looks like ``safetensors.safe_open`` stretched over every shard of a model:
``keys()``, ``metadata()``, ``info(name)`` and ``get_tensor(name)``. Headers are parsed and
checked here first (lengths, JSON, offsets against the file size), so a damaged file fails with
a message naming it and the problem before any tensor is computed. Tensor data is then read with
``safe_open``, which memory-maps the file; the map is opened per tensor and closed right after,
so resident memory stays bounded by the largest tensor, not the shard.

Nothing here executes code from a file: safetensors is a JSON header and raw bytes.
Tensor names and metadata are untrusted strings; they are never used as paths.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import safe_open

from esdtool.errors import CheckpointError
from esdtool.io.source import MAX_HEADER_BYTES

if TYPE_CHECKING:
    from esdtool.io.source import ShardIndex

T = TypeVar("T")

# Bytes per element of every safetensors dtype; None marks formats without a byte size.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
}  # fmt: skip
# Every dtype safetensors knows: the ones above and the sub-byte floats (whose sizes in bits
# safetensors itself checks when the file is opened).
# Sub-byte dtypes: bits per element (safetensors packs them, a whole number of bytes per tensor).
SUB_BYTE_BITS: dict[str, int] = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
KNOWN_DTYPES = frozenset(DTYPE_SIZES) | frozenset(SUB_BYTE_BITS)
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3"}
INT64_LIMIT = 2**63  # shapes and element counts must fit int64 (torch, numpy, parquet)


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, from the header alone (no data read)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors header: (tensors by name, ``__metadata__``).

    Raises :class:`CheckpointError` naming ``path`` for anything malformed: too short, header
    length past the end of the file, not JSON (or nested too deeply to parse), not an object,
    ``__metadata__`` values that are not strings, bad entries, unknown dtypes, sizes past int64,
    a size mismatch, overlapping or out-of-file data offsets, data bytes no tensor covers.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = header_length(f.read(8), size, path)
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return check_header(raw, size, path)


def header_length(prefix: bytes, size: int, where: object) -> int:
    """The header length the first 8 bytes of a ``size``-byte safetensors file give, checked
    against the file size and safetensors' 100 MB limit (``where`` names the file in errors)."""
    if len(prefix) < 8:
        raise CheckpointError(
            f"{where}: {size} bytes is too short to be a safetensors file",
            hint="the file is empty or truncated; download it again",
        )
    n = int.from_bytes(prefix[:8], "little")
    if n > size - 8:
        raise CheckpointError(
            f"{where}: header length {n} is larger than the file ({size} bytes); "
            "not a safetensors file, or truncated"
        )
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: header of {n} bytes exceeds the 100 MB limit")
    return n


def check_header(
    raw: bytes, size: int, shard: Path, where: object = None
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every check of :func:`read_header` on a header already in memory: ``raw`` is its JSON
    bytes, ``size`` the whole file's size, ``shard`` what each :class:`TensorInfo` records. A
    header fetched from the hub is as untrusted as a local one, so both go through here;
    ``where`` names the file in errors (default: ``shard``)."""
    path = shard if where is None else where
    n = len(raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from exc
    except RecursionError as exc:  # e.g. "[[[[..." a hundred thousand deep
        raise CheckpointError(f"{path}: header is not valid JSON (nested too deeply)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not a JSON object")
    for key, value in metadata.items():
        if not isinstance(value, str):  # safetensors itself refuses the whole file
            raise CheckpointError(
                f"{path}: __metadata__ entry {_short(key)} is a JSON {_json_kind(value)}, "
                "not a string"
            )

    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, shard, name, entry, data_size)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, end_a, name_a), (begin_b, _, name_b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: data of tensors {name_a!r} and {name_b!r} overlap")
    # The format indexes every data byte (safetensors itself refuses holes and trailing bytes).
    covered = 0
    for begin, end, _ in spans:
        if begin != covered:
            break
        covered = end
    if covered != data_size:
        raise CheckpointError(
            f"{path}: data bytes {covered}..{data_size} belong to no tensor "
            "(a damaged or non-standard file; safetensors refuses it too)"
        )
    return tensors, metadata


def _json_kind(value: object) -> str:
    kinds = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _tensor_info(path: object, shard: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: missing dtype")
    if dtype not in KNOWN_DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {_short(dtype)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: shape {_short(shape)} is not a list of sizes")
    if not _fits_int64(shape):
        raise CheckpointError(
            f"{where}: shape {_short(shape)} is too large (a size or the element count "
            "does not fit in int64)"
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where}: data_offsets {_short(offsets)} are not [begin, end]")
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(
            f"{where}: data ends at byte {end} but the file holds {data_size} bytes of data; "
            "the file is truncated"
        )
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is not None and math.prod(shape) * itemsize != end - begin:
        raise CheckpointError(
            f"{where}: {dtype} x {shape} needs {math.prod(shape) * itemsize} bytes, "
            f"data_offsets span {end - begin}"
        )
    bits = SUB_BYTE_BITS.get(dtype)  # safetensors' own reader would refuse it naming no tensor
    if bits is not None:
        total = math.prod(shape) * bits
        if total % 8:
            raise CheckpointError(
                f"{where}: {dtype} x {shape} is {total} bits, not a whole number of bytes"
            )
        if total // 8 != end - begin:
            raise CheckpointError(
                f"{where}: {dtype} x {shape} needs {total // 8} bytes, data_offsets span "
                f"{end - begin}"
            )
    return TensorInfo(name, dtype, tuple(shape), shard, begin, end)


def _fits_int64(shape: list[int]) -> bool:
    """Every size and the element count are below 2**63 (checked as the product grows, so a
    header with a million huge sizes costs no more than one)."""
    if any(d >= INT64_LIMIT for d in shape):
        return False
    if 0 in shape:
        return True
    count = 1
    for d in shape:
        count *= d
        if count >= INT64_LIMIT:
            return False
    return True


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (an untrusted list may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def natural_key(name: str) -> list[object]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class Checkpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint, read one at a time.

    Use :func:`open_checkpoint`. Headers of every shard are checked on opening, by
    :func:`read_header` and then by safetensors' own ``safe_open`` (the header only), so a file
    safetensors would refuse fails here, not tensor by tensor; a tensor name found in two shards
    is an error. With ``index`` (the shard index of a sharded checkpoint), every tensor its
    weight_map names must be in the shard it names; tensors the index omits are fine.
    """

    def __init__(self, files: Iterable[Path], index: ShardIndex | None = None) -> None:
        self.files = tuple(Path(f) for f in files)
        self._tensors: dict[str, TensorInfo] = {}
        self._metadata: dict[str, str] = {}
        self._data_start: dict[Path, int] = {}
        shards = []
        for path in self.files:
            tensors, metadata = read_header(path)
            _check_safe_open(path)
            shards.append((str(path), tensors, metadata))
            with open(path, "rb") as f:  # where the data begins: after the 8 bytes and header
                self._data_start[path] = 8 + int.from_bytes(f.read(8), "little")
        self._merge(shards, index)

    def _merge(
        self,
        shards: Iterable[tuple[str, dict[str, TensorInfo], dict[str, str]]],
        index: ShardIndex | None,
    ) -> None:
        """Every shard's (where, tensors, metadata) into one checkpoint: a tensor in two shards
        is an error, the first shard's metadata wins, and ``index`` is checked."""
        for where, tensors, metadata in shards:
            for name, info in tensors.items():
                if name in self._tensors:
                    raise CheckpointError(
                        f"{where}: tensor {name!r} is also in {self._tensors[name].shard}"
                    )
                self._tensors[name] = info
            for k, v in metadata.items():
                self._metadata.setdefault(k, v)
        if index is not None:
            self._check_index(index)
        self._order = sorted(self._tensors, key=natural_key)

    def _check_index(self, index: ShardIndex) -> None:
        """Every tensor of the index's weight_map is in the shard it names."""
        wrong = [
            (name, shard)
            for name, shard in index.weight_map.items()
            if name not in self._tensors or self._tensors[name].shard.name != shard
        ]
        if not wrong:
            return
        name, shard = wrong[0]
        found = self._tensors.get(name)
        where = f"but it is in {found.shard.name!r}" if found else "but no shard holds it"
        more = f" ({len(wrong) - 1} more tensor(s) like it)" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{index.path}: names tensor {_short(name)} in shard {shard!r}, {where}{more}",
            hint="the index does not match its shards; download the checkpoint again",
        )

    def keys(self) -> list[str]:
        """Tensor names in natural order (layer 2 before layer 10)."""
        return list(self._order)

    def metadata(self) -> dict[str, str]:
        """The shards' ``__metadata__`` merged (first shard wins on a clash)."""
        return dict(self._metadata)

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def will_read(self, names: Iterable[str]) -> None:
        """The tensors about to be read, in that order: a hub checkpoint downloads their shards
        in this order (:mod:`esdtool.io.remote`); local files need nothing."""
        return None

    def unverified(self, names: Iterable[str]) -> list[Future[object]]:
        """For tensors read before their file was complete (a hub shard still arriving): the
        futures that say whether the whole file checked out. A row computed from them counts
        only once every future has succeeded. Local files: none."""
        return []

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor into CPU memory (as stored; no upcast): its byte range, at the
        offsets the header checked on opening gave, so a read costs the same whatever the
        number of tensors in the file (``safe_open`` per tensor parsed the whole header again:
        quadratic in the tensor count). The dtype is the one ``safe_open`` gives."""
        info = self._tensors[name]
        if sys.byteorder != "little":  # safetensors' bytes are little-endian: let it swap them
            return self._safe_open(info)
        data = bytearray(info.nbytes)
        try:
            with open(info.shard, "rb") as f:
                f.seek(self._data_start[info.shard] + info.begin)
                got = f.readinto(data)
        except OSError as exc:
            raise CheckpointError(f"{info.shard}: cannot read tensor {name!r} "
                                  f"({exc.strerror or exc})") from exc  # fmt: skip
        if got != info.nbytes:  # the file shrank since its header was checked
            short = info.nbytes - got
            raise CheckpointError(
                f"{info.shard}: cannot read tensor {name!r} (the file ends {short} bytes "
                "early; was it replaced?)"
            )
        return tensor_from_bytes(data, info, str(info.shard))

    def _safe_open(self, info: TensorInfo) -> torch.Tensor:
        try:
            with safe_open(os.fspath(info.shard), framework="pt") as f:
                return f.get_tensor(info.name)
        except Exception as exc:  # safetensors raises its own SafetensorError or OSError
            raise CheckpointError(
                f"{info.shard}: cannot read tensor {info.name!r} ({exc})"
            ) from exc

    def close(self) -> None:
        """Stop what reads ahead (a hub checkpoint's download); no further tensor is needed.
        Safe to call more than once; leaving the ``with`` block calls it."""
        return None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2",
}  # fmt: skip


def tensor_from_bytes(data: bytearray, info: TensorInfo, where: str) -> torch.Tensor:
    """The tensor ``info`` describes, over ``data`` (its little-endian bytes, no copy), with
    the dtype ``safetensors.safe_open`` gives it; a dtype torch lacks is refused as safe_open
    refuses it."""
    dtype = getattr(torch, _TORCH_DTYPES.get(info.dtype, ""), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(
            f"{where}: cannot read tensor {info.name!r} (dtype {info.dtype} is not understood "
            f"by torch {torch.__version__})"
        )
    shape = list(info.shape)
    if info.dtype == "F4":  # two 4-bit values per byte, as safetensors gives them
        shape[-1] //= 2
    if not data:
        return torch.empty(shape, dtype=dtype, device="cpu")  # frombuffer's device, not the default
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)


def _check_safe_open(path: Path) -> None:
    """safetensors' own parser accepts the header (it reads the header only; no tensor data)."""
    try:
        with safe_open(os.fspath(path), framework="pt"):
            pass
    except Exception as exc:  # SafetensorError, OSError, ...
        reason = " ".join(str(exc).split())
        raise CheckpointError(f"{path}: safetensors refuses the file ({reason})") from exc


def open_checkpoint(files: Iterable[Path], index: ShardIndex | None = None) -> Checkpoint:
    """Open the shards of one checkpoint, checking every header (and ``index``) first."""
    return Checkpoint(files, index)


def prefetched(
    items: list[T], read: Callable[[T], Any], *, depth: int = 1, pin: bool = False
) -> Iterator[tuple[T, Any]]:
    """(item, read(item)) for each of ``items`` in order, read by a background thread that
    stays at most ``depth`` items ahead (memory: the current item plus ``depth`` + 1 more).

    Reading (page faults, decompression of the mmap, pinning for a fast host-to-GPU copy)
    overlaps with the current item's eigensolver, which releases the GIL. ``read`` returns a
    tensor or a dict of tensors (the parts of a quantized weight); with ``pin`` each is pinned.
    A read error is handed over in place of the result, so the caller can record it and go on.
    """
    queued: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def pinned(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v.pin_memory() for k, v in value.items()}
        return value.pin_memory()

    def offer(entry: Any) -> None:
        """Into the queue, unless the consumer has stopped (and will never take it)."""
        while not stop.is_set():
            try:
                queued.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def reader() -> None:
        for item in items:
            if stop.is_set():
                break
            try:
                value = read(item)
                entry: Any = (item, pinned(value) if pin else value)
            except Exception as exc:
                entry = (item, exc)
            offer(entry)
        offer(None)  # a blocking put here would hang for good once the consumer is gone

    thread = threading.Thread(target=reader, name="esdtool-reader", daemon=True)
    thread.start()
    try:
        while (entry := queued.get()) is not None:
            yield entry
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                queued.get_nowait()
        thread.join(timeout=5)
