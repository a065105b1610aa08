"""Alembic environment: runs the revisions on the connection that `hrf_batch.store.engine` hands over."""

from __future__ import annotations

from alembic import context

from hrf_batch.store.engine import make_engine, resolve_url
from hrf_batch.store.schema import VERSION_TABLE, Base


def _run(connection) -> None:  # noqa: ANN001 - an SQLAlchemy Connection
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things in place
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # the alembic command line, with `-x url=...` naming the database
    engine = make_engine(resolve_url(context.get_x_argument(as_dictionary=True).get("url")))
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()
