"""The bytes of a file, or a :class:`~hrf_batch.errors.ReadError` that names it: the one way readers open files."""

from __future__ import annotations

from pathlib import Path

from hrf_batch.errors import ReadError


def read_bytes(path: Path, size: int = -1) -> bytes:
    """The first ``size`` bytes of ``path`` (all of them when negative)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError as exc:
        raise ReadError.unreadable(path, exc) from exc
