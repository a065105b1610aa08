"""The bytes of a file, or a :class:`~hrf_batch.errors.ReadError` that names it: the one way readers open files."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from hrf_batch.errors import ReadError
from hrf_batch.io.hashing import sha256_of_files


def read_bytes(path: Path, size: int = -1) -> bytes:
    """The first ``size`` bytes of ``path`` (all of them when negative)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError as exc:
        raise ReadError.unreadable(path, exc) from exc


def read_bytes_at(path: Path, offset: int, size: int) -> bytes:
    """``size`` bytes of ``path`` from ``offset`` (fewer at the end of the file), for header fields
    that lie past the first block."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)
    except OSError as exc:
        raise ReadError.unreadable(path, exc) from exc


def file_size(path: Path) -> int:
    """Size of ``path`` in bytes, so readers can check what a header declares before reading it."""
    try:
        return path.stat().st_size
    except OSError as exc:
        raise ReadError.unreadable(path, exc) from exc


def source_sha256(paths: Iterable[Path]) -> str:
    """:func:`~hrf_batch.io.hashing.sha256_of_files`, with a ReadError naming the file that cannot be read
    (a file of the source can vanish or be unreadable after it was found)."""
    paths = [Path(p) for p in paths]
    try:
        return sha256_of_files(paths)
    except OSError as exc:
        where = exc.filename if exc.filename else paths[0]
        raise ReadError.unreadable(where, exc) from exc
