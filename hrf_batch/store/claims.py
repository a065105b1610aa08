"""Who is processing a volume right now: locks that die with their process.

Two ingests on one database split a study instead of computing it twice: before computing a volume,
an ingest takes a lock named after the volume's rerun key and marks the run 'running'. A lock that
another live process holds means "being done elsewhere: skip". The lock is what tells a live claim
from a stale one, so it must vanish with its owner, however the owner ends (SIGKILL included):

* PostgreSQL: a session advisory lock (``pg_try_advisory_lock``) on one connection the store keeps
  open; the server drops it when that session ends.
* SQLite file: a one-byte POSIX record lock at an offset given by the key, in ``<database>-claims``
  beside the database; the kernel drops it when the process ends. SQLite in WAL mode (which the store
  uses) only works with every process on one host, so a kernel lock sees every claimant. POSIX locks
  belong to the process, so the store's own registry keeps two stores of one process apart.
* SQLite in memory: nothing else can see the database; a set in this store is enough.

A 'running' run whose lock nobody holds was left by a process that died: the next claim takes it over.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

from hrf_batch.store.errors import StoreError

try:
    import fcntl
except ImportError:  # Windows has no POSIX record locks
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
_OFFSET_BITS = 62  # byte offsets of the record locks stay far below the largest off_t


def lock_key(*parts: str) -> int:
    """A signed 64-bit key (PostgreSQL's bigint) for ``parts``; the first part names what is locked."""
    digest = hashlib.sha256("\0".join(("hrf-batch", *parts)).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class ClaimLocks(Protocol):
    """Non-blocking, process-lifetime locks on 64-bit keys."""

    def try_lock(self, key: int) -> bool:
        """Take the lock for ``key``; False when another process (or another store) holds it."""
        ...

    def unlock(self, key: int) -> None:
        """Give back a lock this object holds."""
        ...

    def close(self) -> None:
        """Give back every lock this object holds."""
        ...


def claim_locks(engine: Engine, url: URL) -> ClaimLocks:
    """The kind of lock that fits the database behind ``url``."""
    if url.get_backend_name() == "postgresql":
        return AdvisoryLocks(engine)
    if url.database in (None, "", ":memory:"):
        return LocalLocks()
    if fcntl is None:
        log.warning("no POSIX record locks on this system: concurrent ingests on %s may compute a volume twice "
                    "(each result is still stored once)", url.database)
        return LocalLocks()
    return FileLocks(Path(f"{url.database}-claims"))


class LocalLocks:
    """Locks of one private (in-memory) database: a set is enough."""

    def __init__(self) -> None:
        self._held: set[int] = set()

    def try_lock(self, key: int) -> bool:
        if key in self._held:
            return False
        self._held.add(key)
        return True

    def unlock(self, key: int) -> None:
        self._held.discard(key)

    def close(self) -> None:
        self._held.clear()


class AdvisoryLocks:
    """PostgreSQL session advisory locks on a connection kept open (outside any transaction) for them."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: Connection | None = None
        self._held: set[int] = set()

    def _session(self) -> Connection:
        if self._connection is None:
            self._connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._connection

    def try_lock(self, key: int) -> bool:
        if key in self._held:
            return False
        taken = bool(self._session().execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        if taken:
            self._held.add(key)
        return taken

    def unlock(self, key: int) -> None:
        if key in self._held:
            self._held.discard(key)
            self._session().execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})

    def close(self) -> None:
        connection, self._connection = self._connection, None
        self._held.clear()
        if connection is None:
            return
        try:
            connection.execute(text("SELECT pg_advisory_unlock_all()"))
        finally:
            # dropped, not pooled: ending the session is what releases a lock for certain
            connection.invalidate()
            connection.close()


@dataclass
class _LockFile:
    name: str
    fd: int
    users: int = 0
    held: set[int] = field(default_factory=set)


_FILES: dict[str, _LockFile] = {}
_FILES_MUTEX = threading.Lock()


class FileLocks:
    """One-byte POSIX record locks in a file beside the SQLite database, shared by every store of this process.

    POSIX record locks are per process, and closing any descriptor of the file drops all of them, so
    this process opens the file once (refcounted) and remembers which keys it holds."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: _LockFile | None = None
        self._mine: set[int] = set()

    def _open(self) -> _LockFile:
        if self._file is not None:
            return self._file
        name = os.path.realpath(self._path)
        lock_file = _FILES.get(name)
        if lock_file is None:
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as exc:
                raise StoreError(
                    f"cannot open {self._path}, the file that marks volumes being processed: {exc.strerror}",
                    "the folder of the SQLite database must be writable for an ingest",
                ) from exc
            lock_file = _FILES[name] = _LockFile(name, fd)
        lock_file.users += 1
        self._file = lock_file
        return lock_file

    def try_lock(self, key: int) -> bool:
        offset = key & ((1 << _OFFSET_BITS) - 1)
        with _FILES_MUTEX:
            lock_file = self._open()
            if offset in lock_file.held:
                return False
            try:
                fcntl.lockf(lock_file.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    return False
                raise StoreError(
                    f"cannot lock {self._path}, the file that marks volumes being processed: {exc.strerror}",
                    "keep the SQLite database on a local disk",
                ) from exc
            lock_file.held.add(offset)
            self._mine.add(offset)
            return True

    def unlock(self, key: int) -> None:
        offset = key & ((1 << _OFFSET_BITS) - 1)
        with _FILES_MUTEX:
            if offset in self._mine and self._file is not None:
                self._release(self._file, offset)

    def _release(self, lock_file: _LockFile, offset: int) -> None:
        self._mine.discard(offset)
        lock_file.held.discard(offset)
        fcntl.lockf(lock_file.fd, fcntl.LOCK_UN, 1, offset)

    def close(self) -> None:
        with _FILES_MUTEX:
            lock_file, self._file = self._file, None
            if lock_file is None:
                return
            for offset in list(self._mine):
                self._release(lock_file, offset)
            lock_file.users -= 1
            if lock_file.users == 0:
                _FILES.pop(lock_file.name, None)
                os.close(lock_file.fd)
