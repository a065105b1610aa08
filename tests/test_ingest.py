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

from hrf_batch.cli import EXIT_PARTIAL, main
from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

from conftest import readme_queries

TABLES = ("patients", "visits", "volumes", "runs", "bscans", "lesions", "ingest_errors")


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
    with sqlite3.connect(tmp_path / "db.sqlite") as con:  # the README's per-visit query agrees with the lesion rows
        (per_visit,) = [q for q in readme_queries() if "FROM hrf_burden_visit" in q]
        rows = con.execute(per_visit).fetchall()
        lesions = dict(((p, str(d), e), n) for p, d, e, n in con.execute(
            "select p.patient_id, vi.visit_date, v.eye, count(l.id) from volumes v join visits vi on v.visit_pk=vi.id "
            "join patients p on vi.patient_pk=p.id join runs r on r.volume_pk=v.id join bscans b on b.run_pk=r.id "
            "left join lesions l on l.bscan_pk=b.id where r.status='done' group by p.patient_id, vi.visit_date, v.eye"))
    assert len(rows) == 2 and {(p, str(d), e): n for p, d, e, n, *_ in rows} == lesions


def test_retuned_segmenter_makes_a_new_run_and_the_same_parameters_skip(tmp_path: Path, tiny_model: Path) -> None:
    from hrf_batch.config import load_settings
    from hrf_batch.ingest import ingest_study
    from hrf_batch.segment import RegionGrowingSegmenter, RegionParams

    study = tmp_path / "s"
    write_synthetic_study(study, StudySpec(patients=1, visits=1, bscans=2, width=96, height=64, seed=9))
    settings = load_settings({"db": str(tmp_path / "db.sqlite"), "model": str(tiny_model), "device": "cpu",
                              "max_iterations": 1}, env={})
    first = ingest_study(study, settings, progress=False, segmenter=RegionGrowingSegmenter())
    assert (first.processed, first.already_done) == (2, 0)
    retuned = ingest_study(study, settings, progress=False, segmenter=RegionGrowingSegmenter(RegionParams(min_contrast=20.0)))
    assert (retuned.processed, retuned.already_done) == (2, 0)  # a new run per volume, the old ones kept
    same = ingest_study(study, settings, progress=False, segmenter=RegionGrowingSegmenter(RegionParams(min_contrast=20.0)))
    assert (same.processed, same.already_done) == (0, 2)
    with sqlite3.connect(tmp_path / "db.sqlite") as con:
        contrasts = sorted(c for (c,) in con.execute(
            "select json_extract(parameters, '$.segmenter_params.min_contrast') from runs"))
    assert contrasts == [20.0, 20.0, 30.0, 30.0]


def test_missing_model_is_one_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["ingest", str(tmp_path), "--db", str(tmp_path / "x.sqlite"), "--model", str(tmp_path / "none")])
    assert result.exit_code == 1 and "model folder not found" in result.output


@pytest.mark.slow
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


def test_a_volume_that_fails_anywhere_is_recorded_and_the_study_goes_on(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the pipeline (not one of our errors) and a store refusal each cost one volume, not the study."""
    from hrf_batch import ingest as ingest_mod
    from hrf_batch.store import Store, StoreError

    study = tmp_path / "s"
    write_synthetic_study(study, StudySpec(patients=2, visits=1, bscans=2, width=96, height=64, seed=9))
    real_run, real_save = ingest_mod.run_volume, Store.save_volume_result
    seen: list[str] = []

    def flaky_run(volume, *args, **kwargs):  # noqa: ANN001, ANN202 - same signature as run_volume
        seen.append(volume.meta.source_path)
        if len(seen) == 1:
            raise KeyError("a bug")
        return real_run(volume, *args, **kwargs)

    def flaky_save(self, result, **kwargs):  # noqa: ANN001, ANN202 - same signature as save_volume_result
        if len(seen) == 2:
            raise StoreError("the database refused these rows", "a hint")
        return real_save(self, result, **kwargs)

    monkeypatch.setattr(ingest_mod, "run_volume", flaky_run)
    monkeypatch.setattr(Store, "save_volume_result", flaky_save)
    db = tmp_path / "db.sqlite"
    result = CliRunner().invoke(main, ["ingest", str(study), *_args(db, tiny_model)])
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert "volumes: 2 processed, 0 already done (skipped), 2 failed" in result.output
    with sqlite3.connect(db) as con:
        runs = con.execute("select status, coalesce(error, '') from runs order by id").fetchall()
    assert [s for s, _ in runs].count("done") == 2 and [s for s, _ in runs].count("failed") == 2
    errors = sorted(e for s, e in runs if s == "failed")
    assert errors[0].startswith("pipeline failed: KeyError") and errors[1].startswith("storing the results failed: StoreError")
    assert "Traceback" in caplog.text  # the bug keeps its traceback in the log
    again = CliRunner().invoke(main, ["ingest", str(study), *_args(db, tiny_model)])  # a rerun retries only the failures
    assert "2 processed, 2 already done" in again.output


def test_a_volume_whose_metadata_cannot_be_stored_is_recorded_as_a_file_error(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hrf_batch.store import Store, StoreError

    def refuse(self, *args, **kwargs):  # noqa: ANN001, ANN202 - stands in for the store's writers
        raise StoreError("value out of range for the volume row", "a hint")

    study = tmp_path / "s"
    write_synthetic_study(study, StudySpec(patients=1, visits=1, bscans=2, width=96, height=64, seed=9))
    monkeypatch.setattr(Store, "save_volume_result", refuse)
    monkeypatch.setattr(Store, "record_failed_run", refuse)
    db = tmp_path / "db.sqlite"
    result = CliRunner().invoke(main, ["ingest", str(study), *_args(db, tiny_model)])
    assert result.exit_code == EXIT_PARTIAL, result.output
    with sqlite3.connect(db) as con:
        errors = con.execute("select kind, reason from ingest_errors where kind = 'error'").fetchall()
        assert con.execute("select count(*) from runs").fetchone()[0] == 0
    assert len(errors) == 2 and all("storing the results failed: StoreError" in r for _, r in errors)
