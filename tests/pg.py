"""A throwaway PostgreSQL 15 cluster for tests: initdb in a temp folder, 127.0.0.1, trust auth.

`initdb` refuses to run as root, so as root the server runs as the `postgres` user. Missing binaries
are an error, not a reason to skip: CI installs Debian's `postgresql` package and must test both backends.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path(os.environ.get("HRF_BATCH_PG_BIN", "/usr/lib/postgresql/15/bin"))
_FAST = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=40"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing or the cluster did not start."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """Start with :meth:`start`, get URLs from :meth:`create_database`, always :meth:`stop`."""

    def __init__(self, bin_dir: Path = PG_BIN) -> None:
        self.bin_dir = bin_dir
        self.root: Path | None = None
        self.port = 0
        self._databases = 0

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return [*prefix, *args]

    def _run(self, *args: str) -> None:
        done = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            log_file = self.root / "server.log" if self.root else None
            log = log_file.read_text(errors="replace") if log_file and log_file.exists() else ""
            raise PostgresUnavailable(f"{' '.join(args[:2])} failed: {done.stderr.strip()}\n{log[-2000:]}")

    def start(self) -> PgCluster:
        """initdb and start the server on a free port; raises PostgresUnavailable with what to do."""
        if not (self.bin_dir / "initdb").is_file() or not (self.bin_dir / "pg_ctl").is_file():
            raise PostgresUnavailable(
                f"PostgreSQL 15 server binaries not found in {self.bin_dir}: install Debian's `postgresql` "
                "package (apt-get install postgresql), or point HRF_BATCH_PG_BIN at the folder with initdb and pg_ctl"
            )
        self.root = Path(tempfile.mkdtemp(prefix="hrf-batch-pg-"))
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        data = self.root / "data"
        self._run(str(self.bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
        for _attempt in range(3):  # another process may take the port between probe and start
            self.port = _free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} {_FAST}"
            try:
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                          str(self.root / "server.log"), "-w", "-t", "30", "start")
                return self
            except PostgresUnavailable:
                continue
        raise PostgresUnavailable(f"the test PostgreSQL server did not start; see {self.root / 'server.log'}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database in the cluster, for one test; returns its URL."""
        import psycopg

        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server immediately and delete its files."""
        if self.root is None:
            return
        if (self.root / "data" / "postmaster.pid").exists():
            stop = self._cmd(str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
            subprocess.run(stop, capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


_SHARED: PgCluster | None = None


def session_cluster() -> PgCluster:
    """One cluster per test process, shared by every fixture that asks; stop it with :func:`stop_session_cluster`."""
    global _SHARED
    if _SHARED is None:
        cluster = PgCluster()
        try:
            cluster.start()
        except PostgresUnavailable:
            cluster.stop()
            raise
        _SHARED = cluster
    return _SHARED


def stop_session_cluster() -> None:
    """Stop the shared cluster if one runs (safe to call twice)."""
    global _SHARED
    if _SHARED is not None:
        _SHARED.stop()
        _SHARED = None
