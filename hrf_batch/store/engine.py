"""Database URLs, engines and the schema revision check every open goes through.

Supported: SQLite (a file path or ``sqlite:///path``; the default is ``hrf_batch.sqlite`` in the current
folder) and PostgreSQL (``postgresql://…``, driven by psycopg 3). A new, empty database is created at the
newest schema revision; a database made by an older hrf-batch is never changed behind the user's back —
opening it raises :class:`SchemaOutdatedError` until ``hrf-batch db upgrade`` runs :func:`upgrade`. A
database that already holds other tables and no hrf-batch revision (another program's data, a mistyped
``--db``) is refused before anything is written, by opening and by upgrading alike. On PostgreSQL
"empty" means the schema the connection writes to (its search path), so other schemas may hold anything.

Several processes may use one database at once. SQLite files run in WAL mode (readers never block the
writer) with a busy wait, and every write transaction starts with ``BEGIN IMMEDIATE`` (see :func:`writer`)
so a writer queues for the write lock instead of failing when a read transaction turns into a write. A
schema migration holds the write lock (SQLite) or an advisory lock (PostgreSQL), so two first runs on a
new database create it once.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from hrf_batch.store.claims import lock_key
from hrf_batch.store.errors import SchemaOutdatedError, StoreError
from hrf_batch.store.schema import VERSION_TABLE

log = logging.getLogger(__name__)

DEFAULT_SQLITE_FILE = "hrf_batch.sqlite"
#: How long a SQLite connection waits for another one's write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0
_WRITE = "hrf_batch_write"  # execution option: this connection's transactions will write
_MIGRATION_LOCK = lock_key("schema migration")
MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
_URL_HINT = "use a file path, sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE"


def resolve_url(url: str | None) -> URL:
    """The SQLAlchemy URL for what the user typed: None → ./hrf_batch.sqlite, a path → SQLite file."""
    if url is None or not url.strip():
        return make_url(f"sqlite:///{Path.cwd() / DEFAULT_SQLITE_FILE}")
    if "://" not in url:
        return make_url(f"sqlite:///{Path(url).expanduser().resolve()}")
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"cannot parse database URL {url!r}", _URL_HINT) from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    raise StoreError(
        f"unsupported database {parsed.drivername!r}", "hrf-batch stores results in SQLite or PostgreSQL; " + _URL_HINT
    )


def make_engine(url: URL) -> Engine:
    """An engine with foreign keys and real transactions (also for DDL) on SQLite."""
    if url.get_backend_name() == "sqlite" and sqlite3.sqlite_version_info < (3, 28):
        raise StoreError(
            f"SQLite {sqlite3.sqlite_version} is too old for the burden views (window functions need 3.28)",
            "use a Python built with a newer SQLite, or a PostgreSQL database",
        )
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(url.database).parent
        if not folder.is_dir():
            raise StoreError(
                f"folder {folder} for the SQLite database does not exist", "create it or choose another database path"
            )
    engine = create_engine(url, pool_pre_ping=url.get_backend_name() == "postgresql")
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection, _record) -> None:  # noqa: ANN001 - DBAPI objects are untyped
    # Let SQLAlchemy, not the sqlite3 module, decide where transactions start, so that DDL and the
    # first SELECT of a save are inside the transaction too.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # A deferred transaction that starts reading and then writes cannot wait for the write lock
    # (SQLite answers "database is locked" at once to avoid a deadlock); IMMEDIATE queues for it first.
    connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get(_WRITE) else "BEGIN")


def writer(engine: Engine) -> Engine:
    """The engine for transactions that write: on SQLite they take the write lock when they begin."""
    return engine.execution_options(**{_WRITE: True})


def use_wal(engine: Engine, url: URL) -> None:
    """Put a SQLite file in WAL mode (kept in the file), so readers and one writer never block each other.

    Only called once the file is known to be an hrf-batch database: another program's file stays as it
    was. A file that cannot be switched (read only) keeps its mode and is still read."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    raw = engine.raw_connection()
    try:
        mode = raw.cursor().execute("PRAGMA journal_mode = WAL").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if is_locked(exc):
            raise locked_error(f"switching {display_url(url)} to WAL mode", "nothing was changed") from exc
        log.info("%s stays in its journal mode (%s); concurrent commands will wait for each other longer",
                 display_url(url), exc)
        return
    finally:
        raw.close()
    if str(mode).lower() != "wal":
        log.info("%s is in journal mode %s, not WAL; concurrent commands will wait for each other longer",
                 display_url(url), mode)


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` (an SQLAlchemy error or the sqlite3 error under it) is SQLite's "database is locked"."""
    orig = getattr(exc, "orig", exc)
    if not isinstance(orig, sqlite3.Error):
        return False
    name = str(getattr(orig, "sqlite_errorname", ""))
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in str(orig)


def locked_error(action: str, outcome: str) -> StoreError:
    """The message for a SQLite lock that outlasted the busy wait: what held it and what to do."""
    return StoreError(
        f"{action} failed: the SQLite database stayed locked by another connection for {SQLITE_BUSY_TIMEOUT_S:.0f} s "
        f"(database is locked); {outcome}",
        "another program is writing to the database or keeps a transaction open on it; let it finish or stop it, "
        "then run the command again",
    )


def display_url(url: URL) -> str:
    """The URL without its password, for messages."""
    return url.render_as_string(hide_password=True)


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest schema revision this hrf-batch knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise StoreError(f"no schema migrations found in {MIGRATIONS_DIR}", "reinstall hrf-batch; the package is incomplete")
    return head


def current_revision(connection: Connection) -> str | None:
    """The schema revision stored in the database, None for a database without hrf-batch tables."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def upgrade(url: str | None, revision: str = "head") -> str:
    """Migrate the database to ``revision`` (default: newest) in one transaction; returns the new revision.

    A database of another program (tables, no hrf-batch revision) is refused, not given our tables."""
    resolved = resolve_url(url)
    engine = make_engine(resolved)
    try:
        current, foreign = _inspect(engine, resolved)
        if current is None and foreign:
            raise _foreign_database(resolved, foreign)
        use_wal(engine, resolved)
        return migrate(engine, resolved, revision)
    finally:
        engine.dispose()


def migrate(engine: Engine, url: URL, revision: str = "head") -> str:
    """:func:`upgrade` on an existing engine (keeps in-memory SQLite databases alive)."""
    try:
        with writer(engine).begin() as connection:
            if connection.dialect.name == "postgresql":
                # two first runs on an empty database: the second waits here, then finds it at head
                connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            command.upgrade(_alembic_config(connection), revision)
            return current_revision(connection) or ""
    except CommandError as exc:
        raise StoreError(f"cannot upgrade {display_url(url)} to {revision!r}: {exc}", "check the revision name") from exc
    except SQLAlchemyError as exc:
        if is_locked(exc):
            raise locked_error(f"upgrading {display_url(url)}", "nothing was changed") from exc
        raise StoreError(
            f"upgrading {display_url(url)} failed; nothing was changed",
            "check that the database is reachable and writable, then run `hrf-batch db upgrade` again",
        ) from exc


def check_schema(engine: Engine, url: URL) -> None:
    """Create a new database at head, accept one at head, refuse anything else with what to do."""
    head = head_revision()
    current, foreign = _inspect(engine, url)
    if current is None and foreign:
        raise _foreign_database(url, foreign)
    if current not in (None, head):
        _raise_for_revision(url, current, head)
    use_wal(engine, url)
    if current is None:  # new and empty; a second process doing the same waits in migrate, then does nothing
        migrate(engine, url)


def _inspect(engine: Engine, url: URL) -> tuple[str | None, list[str]]:
    """The hrf-batch revision (None when there is none) and every other table and view, read only."""
    try:
        with engine.connect() as connection:
            # names first, revision second: a first run committing its migration in between is then
            # seen at its revision, never as tables without one (a foreign database)
            found = inspect(connection)
            names = set(found.get_table_names()) | set(found.get_view_names())
            current = current_revision(connection)
    except SQLAlchemyError as exc:
        if is_locked(exc):
            raise locked_error(f"opening {display_url(url)}", "nothing was read or written") from exc
        raise StoreError(
            f"cannot open database {display_url(url)}",
            "check the URL, that the server is running and that you may connect, and that a file is a SQLite database",
        ) from exc
    return current, sorted(names - {VERSION_TABLE})


def _foreign_database(url: URL, names: list[str]) -> StoreError:
    shown = ", ".join(names[:5]) + (f" … ({len(names)} in all)" if len(names) > 5 else "")
    return StoreError(
        f"{display_url(url)} is not an hrf-batch study database: it holds tables or views ({shown}) but no hrf-batch "
        "schema revision; nothing was written to it",
        "pass a new or empty database (a new SQLite file, or an empty PostgreSQL database or schema), or one that "
        "hrf-batch created",
    )


def _raise_for_revision(url: URL, current: str, head: str) -> None:
    where = display_url(url)
    try:
        known = ScriptDirectory.from_config(_alembic_config()).get_revision(current)
    except CommandError as exc:
        raise StoreError(
            f"{where} is at schema revision {current!r}, which this hrf-batch does not know",
            "it was written by a newer hrf-batch; upgrade hrf-batch to use it",
        ) from exc
    if known is None:
        raise StoreError(f"{where} is at unknown schema revision {current!r}", "upgrade hrf-batch to use it")
    raise SchemaOutdatedError(
        f"{where} is at schema revision {current}, this hrf-batch needs {head}",
        f"back it up, then run `hrf-batch db upgrade` on it ({where})",
        current=current,
        head=head,
    )
