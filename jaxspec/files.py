"""Atomic, durable file writes (a temporary file in the same directory, fsync, ``os.replace``, fsync the directory),
and a quick listing of a directory tree's files."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | Iterable[bytes]) -> None:
    """Replace ``path`` with ``data`` (bytes or chunks of bytes): readers see the old file or the whole new one, and
    the new one survives a crash once this returns. A failed write leaves no temporary file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines([data] if isinstance(data, bytes | bytearray) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_files(root: str | Path) -> list[tuple[str, int, int]]:
    """Every file under ``root`` as (path relative to it in POSIX form, size, mtime in ns), in ``Path`` order (by
    path components). ``os.scandir``, one ``stat`` per file and no path arithmetic: a warm ``generate.py`` lists a
    checkpoint's ~830 entries on every start (``os.walk`` with ``relpath``: 17.6 ms, this: 5.2)."""
    out: list[tuple[str, int, int]] = []

    def walk(d: str, rel: str) -> None:
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    walk(e.path, rel + e.name + "/")
                elif not e.is_dir():  # a file, or a link to one (``os.walk`` skips links to directories too)
                    s = e.stat()
                    out.append((rel + e.name, s.st_size, s.st_mtime_ns))

    walk(os.fspath(root), "")
    return sorted(out, key=lambda f: f[0].split("/"))
