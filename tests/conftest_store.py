"""Pytest fixtures for tests that need a study database on both backends (SQLite and PostgreSQL).

Registered for the whole suite by `pytest_plugins = ["conftest_store"]` in tests/conftest.py; a module
may also import the fixtures directly. One PostgreSQL cluster serves the whole test process either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, create_engine, select, text

import pg

BACKENDS = ("sqlite", "postgresql")
# per-row values that differ between any two ingests: ids, links by id, times
IGNORED = {"id", "started_at", "finished_at", "seconds", "recorded_at"}
TABLES = ("volumes", "runs", "bscans", "lesions")


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


def _plain(row: Any) -> dict[str, Any]:
    """A row without ids, links by id and times; JSON text and memoryviews as values."""
    out = {}
    for name, value in row._mapping.items():
        if name in IGNORED or name.endswith("_pk"):
            continue
        if isinstance(value, memoryview):
            value = bytes(value)
        elif isinstance(value, str) and value.startswith(("[", "{")):
            value = json.loads(value)
        out[name] = value
    return out


def stored_rows(url: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Per volume (source sha256, series uid): its row, its runs, every B-scan and every lesion."""
    engine = create_engine(url)
    meta = MetaData()
    try:
        meta.reflect(engine, only=TABLES)
        with engine.connect() as conn:
            rows = {t: conn.execute(select(meta.tables[t])).all() for t in TABLES}
    finally:
        engine.dispose()
    volume_of = {v.id: (v.source_sha256, v.series_uid) for v in rows["volumes"]}
    run_volume = {r.id: volume_of[r.volume_pk] for r in rows["runs"]}
    bscan_of = {b.id: (run_volume[b.run_pk], b.bscan_index) for b in rows["bscans"]}
    out: dict[tuple[str, str], dict[str, Any]] = {
        key: {"volume": _plain(v), "runs": [], "bscans": {}, "lesions": {}}
        for v in rows["volumes"] for key in [volume_of[v.id]]}
    for r in rows["runs"]:
        out[run_volume[r.id]]["runs"].append(_plain(r))
    for b in rows["bscans"]:
        key, index = bscan_of[b.id]
        assert index not in out[key]["bscans"], f"B-scan {index} of {key} stored twice"
        out[key]["bscans"][index] = _plain(b)
    for lesion in rows["lesions"]:
        key, index = bscan_of[lesion.bscan_pk]
        out[key]["lesions"][(index, lesion.lesion_index)] = _plain(lesion)
    return out
