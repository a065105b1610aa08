"""Database URLs, engines and the schema revision check every open goes through.

Supported: SQLite (a file path or ``sqlite:///path``; the default is ``hrf_batch.sqlite`` in the current
folder) and PostgreSQL (``postgresql://…``, driven by psycopg 3). A new, empty database is created at the
newest schema revision; a database made by an older hrf-batch is never changed behind the user's back —
opening it raises :class:`SchemaOutdatedError` until ``hrf-batch db upgrade`` runs :func:`upgrade`. A
database that already holds other tables and no hrf-batch revision (another program's data, a mistyped
``--db``) is refused before anything is written, by opening and by upgrading alike. On PostgreSQL
"empty" means the schema the connection writes to (its search path), so other schemas may hold anything.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from hrf_batch.store.errors import SchemaOutdatedError, StoreError
from hrf_batch.store.schema import VERSION_TABLE

DEFAULT_SQLITE_FILE = "hrf_batch.sqlite"
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
    cursor.execute("PRAGMA busy_timeout = 30000")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN")


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
        return migrate(engine, resolved, revision)
    finally:
        engine.dispose()


def migrate(engine: Engine, url: URL, revision: str = "head") -> str:
    """:func:`upgrade` on an existing engine (keeps in-memory SQLite databases alive)."""
    try:
        with engine.begin() as connection:
            command.upgrade(_alembic_config(connection), revision)
            return current_revision(connection) or ""
    except CommandError as exc:
        raise StoreError(f"cannot upgrade {display_url(url)} to {revision!r}: {exc}", "check the revision name") from exc
    except SQLAlchemyError as exc:
        raise StoreError(
            f"upgrading {display_url(url)} failed; nothing was changed",
            "check that the database is reachable and writable, then run `hrf-batch db upgrade` again",
        ) from exc


def check_schema(engine: Engine, url: URL) -> None:
    """Create a new database at head, accept one at head, refuse anything else with what to do."""
    head = head_revision()
    current, foreign = _inspect(engine, url)
    if current == head:
        return
    if current is None and not foreign:
        migrate(engine, url)
        return
    if current is None:
        raise _foreign_database(url, foreign)
    _raise_for_revision(url, current, head)


def _inspect(engine: Engine, url: URL) -> tuple[str | None, list[str]]:
    """The hrf-batch revision (None when there is none) and every other table and view, read only."""
    try:
        with engine.connect() as connection:
            current = current_revision(connection)
            found = inspect(connection)
            names = set(found.get_table_names()) | set(found.get_view_names())
    except SQLAlchemyError as exc:
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
