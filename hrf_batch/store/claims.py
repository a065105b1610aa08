"""Keys for PostgreSQL advisory locks, so concurrent writers of one database queue for the same thing."""

from __future__ import annotations

import hashlib


def lock_key(*parts: str) -> int:
    """A signed 64-bit key (PostgreSQL's bigint) for ``parts``; the first part names what is locked."""
    digest = hashlib.sha256("\0".join(("hrf-batch", *parts)).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
