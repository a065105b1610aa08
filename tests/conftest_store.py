"""Pytest fixtures for tests that need a study database on both backends (SQLite and PostgreSQL).

Registered for the whole suite by `pytest_plugins = ["conftest_store"]` in tests/conftest.py; a module
may also import the fixtures directly. One PostgreSQL cluster serves the whole test process either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

import pg

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.PgCluster]:
    """The throwaway PostgreSQL 15 cluster; fails (never skips) when the server is not installed."""
    problem = ""
    try:
        cluster = pg.session_cluster()
    except pg.PostgresUnavailable as exc:
        problem = str(exc)
    if problem:
        pytest.fail(problem, pytrace=False)
    yield cluster
    pg.stop_session_cluster()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty database on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.sqlite'}"
    return request.getfixturevalue("pg_cluster").create_database()


def row_counts(url: str, tables: tuple[str, ...]) -> dict[str, int]:
    """Rows in each of ``tables`` of the database at ``url``."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in tables}
    finally:
        engine.dispose()
