"""Several processes on one study database: SQLite's lock wait, volume claims, the migration guard, and
`hrf-batch ingest` runs at once on SQLite and PostgreSQL.

The ingest test starts real CLI processes behind a start barrier (all open the new database at the same
moment) and a meeting point at the first volume each computes (all compute at the same time, so the two
on one study must each skip the volume the other holds); everything else is the unchanged ingest.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from test_store import SHAPE, make_meta, make_result, make_run

from hrf_batch.store import Claim, StoreError, open_store
from hrf_batch.store import engine as store_engine
from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

from conftest import PROJECT_ROOT, SMALL_STUDY_SPEC_ARGS, SMALL_STUDY_VOLUMES

TESTS = Path(__file__).resolve().parent
N_VOLUMES = SMALL_STUDY_VOLUMES
SUMMARY = re.compile(r"volumes: (\d+) processed, (\d+) already done \(skipped\), (\d+) failed, "
                     r"(\d+) being processed by another ingest \(skipped\)")

# The CLI behind a start barrier and a meeting point (all n ingests) at the first volume it computes.
_INGEST = r"""
import sys, time
from pathlib import Path

sync, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
import hrf_batch.ingest as ingest
from hrf_batch.cli import main

real_run_volume = ingest.run_volume
first = [True]

def run_volume(*args, **kwargs):
    if first[0]:
        first[0] = False
        (sync / f"computing-{name}").touch()
        deadline = time.monotonic() + 30
        while len(list(sync.glob("computing-*"))) < n and time.monotonic() < deadline:
            time.sleep(0.02)
    return real_run_volume(*args, **kwargs)

ingest.run_volume = run_volume
(sync / f"ready-{name}").touch()
while not (sync / "go").exists():
    time.sleep(0.01)
main(sys.argv[4:], prog_name="hrf-batch")
"""

# Holds a claim on the test volume until killed.
_HOLD_CLAIM = r"""
import sys
sys.path.insert(0, sys.argv[2])
from test_store import SHAPE, make_meta, make_run
from hrf_batch.store import open_store

store = open_store(sys.argv[1])
print(store.claim_volume(make_meta(), make_run(), n_bscans=3, bscan_shape=SHAPE).value, flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def serial_results(tmp_path_factory: pytest.TempPathFactory, small_study: Path, tiny_model: Path) -> dict[tuple, Any]:
    """The per-B-scan results of one ingest alone into a fresh database (the reference)."""
    from hrf_batch.config import load_settings
    from hrf_batch.ingest import ingest_study

    url = f"sqlite:///{tmp_path_factory.mktemp('serial') / 'serial.sqlite'}"
    flags = {"db": url, "model": str(tiny_model), "device": "cpu", "segmenter": "region", "max_iterations": 2}
    summary = ingest_study(small_study, load_settings(flags, env={}), progress=False)
    assert (summary.processed, summary.failed) == (N_VOLUMES, 0)
    return _results(url)


def _results(url: str) -> dict[tuple, Any]:
    """Every done run's B-scans and lesions, keyed by file, series and index, without ids or times."""
    def plain(value: Any) -> Any:
        if isinstance(value, str) and value[:1] in "[{":
            return json.loads(value)
        return bytes(value) if isinstance(value, memoryview) else value

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            bscans = conn.execute(text(
                "SELECT v.source_path, v.series_uid, b.bscan_index, b.scores, b.score, b.final_score, b.hrf_count, "
                "b.hrf_area_px, b.hrf_area_mm2, b.relevance_peaks, b.mask_png, b.relevance_png, b.relevance_max, "
                "l.lesion_index, l.centroid_row, l.centroid_col, l.bbox_row0, l.bbox_col0, l.bbox_row1, l.bbox_col1, "
                "l.area_px, l.area_mm2, l.mask_png, l.centroid_x_mm, l.centroid_y_mm "
                "FROM volumes v JOIN runs r ON r.volume_pk = v.id JOIN bscans b ON b.run_pk = r.id "
                "LEFT JOIN lesions l ON l.bscan_pk = b.id WHERE r.status = 'done'")).all()
    finally:
        engine.dispose()
    return {tuple(plain(v) for v in row[:3]) + (row[13],): tuple(plain(v) for v in row[3:]) for row in bscans}


def _table_counts(url: str) -> tuple[int, set[str], int, int, int]:
    """(runs, their statuses, volumes, patients, visits)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            runs = conn.execute(text("SELECT status FROM runs")).scalars().all()
            volumes, patients, visits = (conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
                                         for t in ("volumes", "patients", "visits"))
    finally:
        engine.dispose()
    return len(runs), set(runs), volumes, patients, visits


def _ingests_at_once(sync: Path, studies: list[Path], url: str, model: Path) -> list[tuple[int, int, int, int]]:
    """Start one ingest per study together on ``url``; return each one's (processed, already done, failed,
    being processed elsewhere) from its summary."""
    sync.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    procs = []
    for name, study in enumerate(studies):
        args = ["ingest", str(study), "--db", url, "--model", str(model), "--device", "cpu", "--segmenter", "region",
                "--max-iterations", "2", "--quiet"]
        procs.append(subprocess.Popen([sys.executable, "-c", _INGEST, str(sync), str(name), str(len(studies)), *args],
                                      cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while len(list(sync.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        (sync / "go").touch()
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    counts = []
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, f"exit {p.returncode}\n{out}\n{err[-3000:]}"
        assert "Traceback" not in out + err and "locked" not in out + err, err[-3000:]
        found = SUMMARY.search(out)
        assert found, out
        counts.append(tuple(int(g) for g in found.groups()))
    assert len(list(sync.glob("computing-*"))) == len(procs), "every ingest must have computed at the same time"
    return counts


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_ingests_at_once_split_a_study_and_add_another_as_one_alone_would(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest, small_study: Path, tiny_model: Path,
        serial_results: dict[tuple, Any]) -> None:
    """Two ingests of one study and a third of another study (same patient ids and visit dates, so all
    three write the same patients) on one new database at once."""
    other = tmp_path / "other"
    write_synthetic_study(other, StudySpec(**SMALL_STUDY_SPEC_ARGS, seed=5))
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}" if backend == "sqlite" else request.getfixturevalue(
        "pg_cluster").create_database()
    started = time.perf_counter()
    *same, third = _ingests_at_once(tmp_path / "sync", [small_study, small_study, other], url, tiny_model)
    print(f"\n{backend}: three ingests at once {time.perf_counter() - started:.1f} s; (processed, already done, "
          f"failed, being processed elsewhere) of the two on one study: {same}, of the other study's: {third}")
    for processed, done, failed, elsewhere in same:
        assert processed >= 1 and failed == 0 and processed + done + elsewhere == N_VOLUMES
    assert sum(c[0] for c in same) == N_VOLUMES  # every volume computed exactly once in total
    assert sum(c[3] for c in same) >= 1  # one of them met a volume the other was computing, and skipped it
    assert third == (N_VOLUMES, 0, 0, 0)
    assert _table_counts(url) == (2 * N_VOLUMES, {"done"}, 2 * N_VOLUMES, 2, 2)
    stored = _results(url)
    assert {k: v for k, v in stored.items() if k[0].startswith(str(small_study))} == serial_results
    assert len(stored) > len(serial_results)


# --- the pieces ------------------------------------------------------------------------------------


def test_a_claim_held_by_a_live_process_is_skipped_and_taken_over_once_it_is_killed(store_url: str) -> None:
    meta, run = make_meta(), make_run()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_CLAIM, store_url, str(TESTS)], cwd=PROJECT_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "claimed", holder.stderr.read() if holder.stderr else ""
        with open_store(store_url) as store:
            assert store.claim_volume(meta, run, n_bscans=3, bscan_shape=SHAPE) is Claim.ELSEWHERE
            assert store.unfinished_volumes("P012")[0].run.status == "running"
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
            # PostgreSQL frees a killed client's advisory lock once its server process notices the closed
            # socket, which under load can take a moment: the next ingest takes the claim over then
            deadline = time.monotonic() + 15
            claim = store.claim_volume(meta, run, n_bscans=3, bscan_shape=SHAPE)
            while claim is Claim.ELSEWHERE and time.monotonic() < deadline:
                time.sleep(0.2)
                claim = store.claim_volume(meta, run, n_bscans=3, bscan_shape=SHAPE)
            assert claim is Claim.CLAIMED  # a dead claim
            store.save_volume_result(make_result(meta, run=run))
            store.release_volume(meta, run)
            assert store.claim_volume(meta, run, n_bscans=3, bscan_shape=SHAPE) is Claim.DONE
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert _table_counts(store_url)[:3] == (1, {"done"}, 1)


def test_claims_between_two_stores_of_one_process_and_a_claim_released_without_result(store_url: str) -> None:
    meta, run = make_meta(), make_run()
    with open_store(store_url) as first, open_store(store_url) as second:
        assert first.claim_volume(meta, run, n_bscans=3, bscan_shape=SHAPE) is Claim.CLAIMED
        assert second.claim_volume(meta, run, n_bscans=3, bscan_shape=SHAPE) is Claim.ELSEWHERE
        other = make_meta(sha="b")
        assert second.claim_volume(other, run, n_bscans=3, bscan_shape=SHAPE) is Claim.CLAIMED
        first.release_volume(meta, run)  # nothing saved: the 'running' run goes, the claim is free
        assert _table_counts(store_url)[:2] == (1, {"running"})
        assert second.claim_volume(meta, run, n_bscans=3, bscan_shape=SHAPE) is Claim.CLAIMED
        second.record_failed_run(meta, run, "out of memory", n_bscans=3, bscan_shape=SHAPE)
        second.release_volume(meta, run)
    # closing released the other claim: its 'running' run is gone, the failed one stays for the next try
    assert _table_counts(store_url)[:2] == (1, {"failed"})
    with open_store(store_url) as store:
        assert store.claim_volume(meta, run, n_bscans=3, bscan_shape=SHAPE) is Claim.CLAIMED
        assert _table_counts(store_url)[:2] == (1, {"running"})


def test_a_duplicate_key_clash_is_tried_again_and_finds_the_row(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that loses a race on a unique key is not an abort: run again, it finds the run done."""
    from sqlalchemy.exc import IntegrityError

    from hrf_batch.store import write

    result = make_result()
    with open_store(store_url) as other:
        first = other.save_volume_result(result)
    real_persist = write.persist
    calls = []

    def clashing_persist(session, prepared, *args):  # noqa: ANN001, ANN202 - same signature as persist
        calls.append(1)
        if len(calls) == 1:  # what PostgreSQL raises when a concurrent writer committed the same key first
            raise IntegrityError("INSERT INTO runs ...", {}, Exception("duplicate key value violates uq_runs_inputs"))
        return real_persist(session, prepared, *args)

    monkeypatch.setattr(write, "persist", clashing_persist)
    with open_store(store_url) as store:
        record = store.save_volume_result(result)
    assert len(calls) == 2 and record.status == "done" and record.run_id == first.run_id
    assert _table_counts(store_url)[:3] == (1, {"done"}, 1)


def test_first_runs_at_once_create_the_schema_once(store_url: str, tmp_path: Path) -> None:
    """Four processes open one new, empty database at the same moment: one migrates, the others wait and use it."""
    script = ("import sys, time, pathlib\nfrom hrf_batch.store import open_store\n"
              "sync = pathlib.Path(sys.argv[2])\n(sync / sys.argv[3]).touch()\n"
              "while not (sync / 'go').exists(): time.sleep(0.005)\nopen_store(sys.argv[1]).close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, store_url, str(tmp_path), f"ready-{i}"], cwd=PROJECT_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    (tmp_path / "go").touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    with open_store(store_url) as store:
        assert store.view_rows("hrf_burden_patient") == []


def test_sqlite_runs_in_wal_mode_and_a_writer_waits_for_the_write_lock(tmp_path: Path) -> None:
    db = tmp_path / "wait.sqlite"
    open_store(str(db)).close()
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    # the other writer commits a row: a transaction that had begun reading before would now fail at once
    holder.execute("INSERT INTO ingest_errors (path, reason, kind, recorded_at) VALUES ('y.vol', 'other', 'error', '2024-01-01')")
    release = threading.Timer(1.5, holder.commit)
    with open_store(str(db)) as store:
        started = time.monotonic()
        release.start()
        store.record_ingest_error(tmp_path / "x.vol", "unreadable", "error", "b1")
        waited = time.monotonic() - started
        assert sorted(e.reason for e in store.ingest_errors()) == ["other", "unreadable"]
    release.join()
    holder.close()
    assert waited >= 1.0


def test_a_lock_that_outlasts_the_wait_is_named_as_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "locked.sqlite"
    open_store(str(db)).close()
    monkeypatch.setattr(store_engine, "SQLITE_BUSY_TIMEOUT_S", 0.3)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with open_store(str(db)) as store, pytest.raises(StoreError) as info:
            store.record_ingest_error(tmp_path / "x.vol", "unreadable")
    finally:
        holder.rollback()
        holder.close()
    message = str(info.value)
    assert "stayed locked by another connection" in message and "database is locked" in message, message
    assert "another program is writing to the database" in message and "reachable" not in message, message
