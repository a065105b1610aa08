"""`hrf-batch ingest`: real fixtures plus a synthetic study, reruns, and a SIGKILL mid-run."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import save_tiny_model
from hrf_batch.cli import EXIT_PARTIAL, main
from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

TABLES = ("patients", "visits", "volumes", "runs", "bscans", "lesions", "ingest_errors")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised tiny CCT saved through the real model-file writer."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as con:
        return {t: con.execute(f"select count(*) from {t}").fetchone()[0] for t in TABLES}


def _args(db: Path, model: Path, *extra: str) -> list[str]:
    return ["--db", str(db), "--model", str(model), "--device", "cpu", "--segmenter", "region",
            "--max-iterations", "2", "--quiet", *extra]


def test_ingest_fixtures_and_synthetic_study(tmp_path: Path, fixtures_dir: Path, tiny_model: Path) -> None:
    study = tmp_path / "study"
    shutil.copytree(fixtures_dir, study / "fixtures")
    write_synthetic_study(study / "synthetic", StudySpec(patients=1, visits=2, bscans=2, width=96, height=64, seed=4))
    db = tmp_path / "hrf.sqlite"
    runner = CliRunner()
    result = runner.invoke(main, ["ingest", str(study), *_args(db, tiny_model)])
    assert result.exit_code == EXIT_PARTIAL, result.output  # the broken fixtures make it partial
    assert "volumes: 10 processed, 0 already done (skipped), 3 failed" in result.output
    with sqlite3.connect(db) as con:
        sources = {Path(r[0]).name for r in con.execute("select source_path from volumes")}
        errors = {Path(r[0]).name: r[1] for r in con.execute("select path, reason from ingest_errors where kind='error'")}
        bscans_per_volume = con.execute("select v.n_bscans, count(b.id) from volumes v join runs r on r.volume_pk=v.id "
                                        "join bscans b on b.run_pk=r.id group by v.id").fetchall()
    assert {"Willis_B_716_0.vol", "Willis_B_716_2.vol", "valid.vol", "test_volume.vol", "test_dummy.xml", "fds_minimized.fds"} <= sources
    assert set(errors) == {"invalid.vol", "corrupt.fds", "e2e_minimized.E2E"}
    assert "empty" in errors["invalid.vol"]
    assert len(bscans_per_volume) == 10 and all(n == m for n, m in bscans_per_volume)
    before = _counts(db)
    again = runner.invoke(main, ["ingest", str(study), *_args(db, tiny_model)])
    assert "0 processed, 10 already done" in again.output
    assert _counts(db) == before


def test_clean_study_exits_zero(tmp_path: Path, tiny_model: Path) -> None:
    study = tmp_path / "s"
    write_synthetic_study(study, StudySpec(patients=1, visits=1, bscans=2, width=96, height=64, seed=9))
    result = CliRunner().invoke(main, ["ingest", str(study), *_args(tmp_path / "db.sqlite", tiny_model)])
    assert result.exit_code == 0, result.output
    assert "2 processed" in result.output
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    queries = [q.strip() for block in readme.split("```sql")[1:] for q in block.split("```")[0].split(";") if q.strip()]
    assert len(queries) >= 2
    with sqlite3.connect(tmp_path / "db.sqlite") as con:  # the README's example queries run as written
        for query in queries:
            con.execute(query).fetchall()


def test_missing_model_is_one_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["ingest", str(tmp_path), "--db", str(tmp_path / "x.sqlite"), "--model", str(tmp_path / "none")])
    assert result.exit_code == 1 and "model folder not found" in result.output


def test_sigkill_mid_ingest_then_rerun(tmp_path: Path, tiny_model: Path) -> None:
    study = tmp_path / "study"
    write_synthetic_study(study, StudySpec(patients=2, visits=2, bscans=3, width=384, height=256, seed=8))
    db = tmp_path / "kill.sqlite"
    cmd = [sys.executable, "-m", "hrf_batch", "ingest", str(study), *_args(db, tiny_model, "--max-iterations", "4")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                done = _counts(db)["runs"]
            except sqlite3.OperationalError:
                done = 0
            if done >= 1:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed; make the study bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = _counts(db)
    assert 1 <= partial["runs"] < 8
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = _counts(db)
    assert final["runs"] == final["volumes"] == 8
    assert final["bscans"] == 8 * 3
    with sqlite3.connect(db) as con:
        dupes = con.execute("select volume_pk, count(*) from runs group by volume_pk having count(*) > 1").fetchall()
        status = {r[0] for r in con.execute("select status from runs")}
    assert not dupes and status == {"done"}
