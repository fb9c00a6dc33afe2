"""Atomic writes: a crash, a kill or a failure at any point leaves the old file or the new one,
never half of one; two writers racing leave one complete file."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from esdtool.errors import OutputError, listed


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, fsync the result, then rename it over ``path``.

    The temporary file sits beside ``path`` (same file system, so the rename is atomic) and is
    named per process, so concurrent writers never share one. ``path`` is checked with
    :func:`check_output_file` again here: nothing but a regular file is ever renamed over.
    """
    path = check_output_file(path)
    if path.is_symlink():  # write through the link: its target gets the new content
        path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        with contextlib.suppress(OSError):  # nothing left to clean, or nowhere to clean it
            tmp.unlink()


def atomic_dir(
    path: Path, build: Callable[[Path], object], ours: Iterable[str], marker: str | None = None
) -> None:
    """Build a directory with ``build(tmp_dir)`` in a temporary sibling, then swap it in whole:
    a failure or a kill at any point leaves the old directory or the new one, never a mix.

    An existing ``path`` is replaced only when it holds nothing but files named in ``ours`` (the
    files this kind of directory holds) and, unless it is empty, the ``marker`` file that says
    esdtool wrote it: a mistaken ``-o`` never deletes a user's files, even a lone report.html.
    On Linux the swap is one atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames
    (a kill between them leaves the old directory under a dot-name beside ``path``).
    """
    path = check_output_dir(path)
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_dir():
            raise OutputError(f"{path}: exists and is not a directory; give a directory name")
        try:
            foreign = sorted(p.name for p in path.iterdir() if p.name not in set(ours))
        except OSError as exc:
            raise OutputError(f"{path}: cannot list ({exc.strerror or exc})") from exc
        unmarked = marker is not None and not (path / marker).is_file()
        if unmarked and not foreign and any(path.iterdir()):  # ours by name, but not by origin
            foreign = sorted(p.name for p in path.iterdir())
        if foreign:
            shown = listed(foreign, 3)
            raise OutputError(
                f"{path}: holds files esdtool did not write ({shown}); it is not replaced",
                hint="choose another output directory, or remove those files",
            )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        for child in tmp.iterdir():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        if not path.exists():
            os.rename(tmp, path)
        elif not _exchange(tmp, path):
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange it holds the old directory


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result != 0:
        errno = ctypes.get_errno()
        if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot
            return False
        raise OSError(errno, os.strerror(errno), str(b))
    return True


def check_output_file(output: str | os.PathLike[str], inputs: Iterable[Path] = ()) -> Path:
    """The file ``output`` names, checked before any work: not a directory (``''``, ``/``,
    ``name/``), not a device, FIFO or socket (renaming over one would replace it: ``-o
    /dev/null`` as root), and none of ``inputs`` (``report m.parquet -o m.parquet``). A symlink
    to a regular file is written through (its target gets the new content)."""
    text = os.fspath(output)
    path = Path(text)
    if text == "" or text.endswith(("/", os.sep)) or path.name in ("", ".", ".."):
        raise OutputError(f"{text!r}: names a directory; give a file name")
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name")
    if target.exists() and not target.is_file():
        raise OutputError(
            f"{path}: is not a regular file (a device, FIFO or socket); esdtool writes only "
            "regular files",
            hint="give a file name",
        )
    for source in inputs:
        if Path(os.path.realpath(source)) == target:
            raise OutputError(f"{path}: is also an input; it is never overwritten")
    return path


def check_output_dir(output: str | os.PathLike[str], inputs: Iterable[Path] = ()) -> Path:
    """The directory ``output`` names, checked before any work: a name (not ``''``, ``.``,
    ``/``), not an existing file, and neither one of ``inputs`` nor a directory holding one."""
    text = os.fspath(output)
    path = Path(text)
    target = Path(os.path.realpath(path))
    if text == "" or path.name in ("", ".", "..") or target == target.parent:
        raise OutputError(f"{text!r}: give a directory name for the output")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{path}: exists and is not a directory; give a directory name")
    for source in inputs:
        real = Path(os.path.realpath(source))
        if real == target or target in real.parents:
            raise OutputError(
                f"{path}: holds the input {source}; an output directory is never an input's",
                hint="choose another output directory",
            )
    return path
