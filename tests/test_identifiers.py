"""Patients kept apart and identifiers kept in: one patient-id rule for every volume and both backends,
file names that are not UTF-8, safe report file names, a record for everything odd in a study folder,
foreign databases refused, and no name or birth date in what ingest, scan, info and report print or log.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import sqlite3
import unicodedata
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text

from hrf_batch import __version__
from hrf_batch.cli import EXIT_PARTIAL, main
from hrf_batch.errors import VolumeError
from hrf_batch.io import discover as discover_module
from hrf_batch.io.discover import discover, display_text
from hrf_batch.io.volume import PATIENT_ID_MAX, Volume, normalise_patient_id
from hrf_batch.io.writers.dicom import write_dicom_oct
from hrf_batch.io.writers.e2e import write_e2e
from hrf_batch.io.writers.heyex_xml import write_heyex_xml
from hrf_batch.io.writers.vol import write_vol
from hrf_batch.report import export_cohort, render_patient_report
from hrf_batch.report.pdf import report_stem
from hrf_batch.report.sources import SourceReader
from hrf_batch.results import BScanResult, RunInfo, VolumeResult
from hrf_batch.store import StoreError, open_store, upgrade

from conftest import make_test_volume

SHA = "ab" * 32
RUN = RunInfo(model_id="TEST-ONLY-identifiers", segmenter="none (test)", segmenter_checkpoint_sha256=None,
              parameters={"test": True}, code_version=__version__, device="cpu", seconds={"score": 0.1})
NAME_PARTS = ("Zyxwort", "Quillane")
BIRTH = date(1931, 7, 29)
BIRTH_FORMS = ("1931-07-29", "19310729", "29.07.1931", "07/29/1931", "29/07/1931", "1931.07.29")


def ingest_args(db: str | Path, model: Path) -> list[str]:
    return ["--db", str(db), "--model", str(model), "--device", "cpu", "--segmenter", "region", "--max-iterations", "1",
            "--quiet"]


def volume(patient_id: str, *, series: str = "S1", eye: str = "OD", seed: int = 0, **meta: object) -> Volume:
    """A 2-B-scan 64 x 64 test volume with this patient id (and any other metadata given)."""
    base = make_test_volume(n=2, height=64, width=64, eye=eye, seed=seed)
    return dataclasses.replace(base, meta=dataclasses.replace(base.meta, patient_id=patient_id, series_uid=series, **meta))


def empty_result(vol: Volume, sha: str) -> VolumeResult:
    """A result without HRF for ``vol`` as if read from a file with this sha256 (for store-level tests)."""
    meta = dataclasses.replace(vol.meta, source_sha256=sha, source_path=f"/gone/{sha[:8]}.vol")
    bscans = tuple(BScanResult(index=i, scores=(0.1,), relevance_peaks=(), mask=np.zeros(vol.bscan_shape, bool),
                               lesions=()) for i in range(vol.n_bscans))
    return VolumeResult(meta=meta, bscan_shape=vol.bscan_shape, bscans=bscans, run=RUN)


def patient_ids(url: str) -> set[str]:
    with open_store(url) as store:
        return {p.patient_id for p in store.list_patients()}


# 1 — one patient-id rule ------------------------------------------------------------------------------


def test_patient_id_rule_strips_cleans_caps_and_names_the_unnamed() -> None:
    assert normalise_patient_id("  P012 \x00\x00", SHA) == "P012"
    assert normalise_patient_id("", SHA) == normalise_patient_id(" \x00\t", SHA) == "unknown-abababababab"
    nul, soh = normalise_patient_id("P0\x0012", SHA), normalise_patient_id("P0\x0112", SHA)
    assert nul.startswith("P0_12-") and soh.startswith("P0_12-") and nul != soh  # never merged by the cleaning
    assert normalise_patient_id("P\u202e21", SHA).startswith("P_21-")  # a bidi override would hide characters
    long_a, long_b = (normalise_patient_id("L" * 199 + end, SHA) for end in "ab")
    assert len(long_a) == len(long_b) == PATIENT_ID_MAX and long_a != long_b and long_a.startswith("L" * 50)
    assert normalise_patient_id(unicodedata.normalize("NFD", "ÄÖ"), SHA) == unicodedata.normalize("NFC", "ÄÖ")
    for stored in (long_a, nul, "P012", "unknown-abababababab", "ÄÖ", "a/b"):  # applying it again changes nothing
        assert normalise_patient_id(stored, "") == stored
    with pytest.raises(VolumeError, match="sha256"):
        normalise_patient_id("", "")


def test_ids_from_files_are_the_same_in_scan_info_and_both_databases(
    tmp_path: Path, tiny_model: Path, pg_cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A 200-character id and one with a NUL once stopped a PostgreSQL ingest; files without an id were
    stored as patient ''. Now each gets the same clean id in `scan`, `info` and on both backends."""
    study = tmp_path / "study"
    for i, (pid, folder) in enumerate((("L" * 200, "long"), ("P0\x0012", "nul"), ("", "no_id"))):
        write_dicom_oct(volume(pid, series=f"1.2.3.{i}", seed=i), study / folder)
    write_vol(volume("", series="V1", seed=5), study / "valid.vol")
    write_vol(volume(" P012 ", series="V2", seed=6), study / "P012.vol")
    runner = CliRunner()
    scanned = json.loads(runner.invoke(main, ["scan", "--json", str(study)]).stdout)
    shown = {v["patient_id"] for v in scanned["visits"]}
    assert len(shown) == 5 and "P012" in shown and "" not in shown
    assert all(len(p) <= PATIENT_ID_MAX and p.isprintable() and p == p.strip() for p in shown)
    unnamed = {p for p in shown if p.startswith("unknown-")}
    assert len(unnamed) == 2  # one pseudonym per file, never one shared patient
    sha_valid = hashlib.sha256((study / "valid.vol").read_bytes()).hexdigest()
    assert f"unknown-{sha_valid[:12]}" in unnamed
    assert "valid.vol: the file names no patient" in caplog.text
    info = json.loads(runner.invoke(main, ["info", "--json", str(study / "valid.vol")]).stdout)
    assert info["patient_id"] == f"unknown-{sha_valid[:12]}"
    sqlite_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    for url in (sqlite_url, pg_cluster.create_database()):
        result = runner.invoke(main, ["ingest", str(study), *ingest_args(url, tiny_model)])
        assert result.exit_code == 0, result.output
        assert "5 processed" in result.stdout
        assert patient_ids(url) == shown
    with open_store(sqlite_url) as store:
        for path in export_cohort(store, tmp_path / "csv"):
            assert b"\x00" not in path.read_bytes()


def test_the_store_applies_the_same_rule_to_what_a_library_caller_hands_over(store_url: str) -> None:
    with open_store(store_url) as store:
        for k, pid in enumerate(("x" * 200, "N\x00UL", "", "  P7  ")):
            store.save_volume_result(empty_result(volume(pid), sha=f"{k:x}" * 64))
        assert {p.patient_id for p in store.list_patients()} == {
            normalise_patient_id("x" * 200, ""), normalise_patient_id("N\x00UL", ""), "unknown-222222222222", "P7",
        }


# 2 — file and folder names that are not UTF-8 ----------------------------------------------------------


def test_latin1_file_and_folder_names_are_stored_shown_and_skipped_on_rerun(
    tmp_path: Path, tiny_model: Path, store_url: str
) -> None:
    study = tmp_path / "study"
    folder = study / os.fsdecode(b"Kl\xe9e")
    good = write_vol(volume("P012"), folder / os.fsdecode(b"P\xe9rez_OD.vol"))
    (folder / os.fsdecode(b"notes\xff.txt")).write_text("not OCT")
    shown_path = display_text(good)
    assert shown_path.endswith("Kl\\xe9e/P\\xe9rez_OD.vol") and shown_path.encode("utf-8")
    runner = CliRunner()
    first = runner.invoke(main, ["ingest", str(study), *ingest_args(store_url, tiny_model)])
    assert first.exit_code == 0, first.output
    assert "1 processed" in first.stdout and "files not OCT (skipped): 1" in first.stdout
    again = runner.invoke(main, ["ingest", str(study), *ingest_args(store_url, tiny_model)])
    assert again.exit_code == 0 and "0 processed, 1 already done" in again.stdout, again.output
    with open_store(store_url) as store:
        (stored,) = store.volume_results("P012", masks=False)
        errors = store.ingest_errors()
        assert stored.source_path == shown_path
        assert {e.path for e in errors} == {display_text(folder / os.fsdecode(b"notes\xff.txt"))}
        assert SourceReader().pixels(stored).problem is None  # the report still finds the real file
        csv = export_cohort(store, tmp_path / "csv", include_identifiers=True)
    assert shown_path in (tmp_path / "csv" / "hrf_volumes.csv").read_text(encoding="utf-8")
    assert all(p.read_bytes().decode("utf-8") for p in csv)
    scanned = json.loads(runner.invoke(main, ["scan", "--json", str(study)]).stdout)
    assert scanned["visits"][0]["volumes"][0]["source_path"] == shown_path
    info = runner.invoke(main, ["info", str(good)])
    assert info.exit_code == 0 and shown_path in info.stdout


# 3 — report file names -------------------------------------------------------------------------------


def test_report_file_names_are_safe_never_empty_and_never_shared(tmp_path: Path) -> None:
    ids = ["", "..", "a/b", "a\\b", "ÄÖ", "a:b", "a;b", ".hidden", "P012"]
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with open_store(url) as store:
        for k, pid in enumerate(ids):
            store.save_volume_result(empty_result(volume(pid), sha=f"{k:x}" * 64))
        stored = [p.patient_id for p in store.list_patients()]
        assert len(stored) == len(ids) and "" not in stored
        out = tmp_path / "reports"
        written = [render_patient_report(store, pid, out) for pid in stored]
    assert len({p.name for p in written}) == len(ids)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # all inside, nothing else
    for path in written:
        stem = path.name.removesuffix("_hrf_report.pdf")
        assert path.parent == out and stem and not stem.startswith(".") and stem.isprintable()
        assert "/" not in stem and "\\" not in stem and ".." not in stem
    names = {p.name for p in written}
    assert {"P012_hrf_report.pdf", "ÄÖ_hrf_report.pdf", "unknown-000000000000_hrf_report.pdf"} <= names
    assert report_stem("a:b") != report_stem("a;b") and report_stem("a/b") != report_stem("a\\b")
    assert report_stem("a/b") != "a_b" and report_stem("a_b") == "a_b"
    for odd in ("", "\x00", "é" * 300, "/" * 10):
        stem = report_stem(odd)
        assert stem and len(stem.encode("utf-8")) < 200 and "/" not in stem and stem.isprintable()


# 4 — a record for everything odd in a study folder -----------------------------------------------------


def odd_study(root: Path) -> dict[str, Path]:
    """A good volume next to a folder nobody may read, a link loop, a FIFO and two broken links."""
    write_vol(volume("P012"), root / "visit" / "good.vol")
    (root / "locked").mkdir()
    write_vol(volume("P099", series="S9"), root / "locked" / "hidden_from_us.vol")
    loop = root / "visit" / "back_to_top"
    loop.symlink_to(root, target_is_directory=True)
    fifo = root / "visit" / "pipe.vol"
    os.mkfifo(fifo)
    broken = root / "visit" / "moved.vol"
    broken.symlink_to(root / "nowhere.vol")
    broken_dir = root / "unmounted"
    broken_dir.symlink_to(root / "missing_drive", target_is_directory=True)
    return {"locked": root / "locked", "loop": loop, "fifo": fifo, "broken": broken, "broken_dir": broken_dir}


@pytest.fixture
def no_read_access(monkeypatch: pytest.MonkeyPatch):
    """Make os.scandir refuse one folder as it does for a user without read permission (tests run as root)."""
    locked: set[str] = set()
    real = os.scandir

    def scandir(path: str | os.PathLike[str] = ".") -> object:
        if os.fspath(path) in locked:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return locked


@pytest.fixture
def never_open(monkeypatch: pytest.MonkeyPatch):
    """Fail the test, instead of hanging it, if discovery opens a path in the returned set."""
    forbidden: set[Path] = set()
    real = discover_module.read_head

    def read_head(path: Path, *args: object) -> bytes:
        if Path(path) in forbidden:
            raise AssertionError(f"discovery opened {path}")  # opening a FIFO would block forever
        return real(path, *args)

    monkeypatch.setattr(discover_module, "read_head", read_head)
    return forbidden


def test_unreadable_folders_link_loops_fifos_and_broken_links_each_get_one_record(
    tmp_path: Path, tiny_model: Path, no_read_access: set[str], never_open: set[Path]
) -> None:
    study = tmp_path / "study"
    odd = odd_study(study)
    no_read_access.add(str(odd["locked"]))
    never_open.add(odd["fifo"])
    disc = discover(study)
    assert [s.path for s in disc.sources] == [study / "visit" / "good.vol"]  # once, although the loop leads back
    by_path = {i.path: i for i in disc.issues}
    assert len(disc.issues) == len(by_path) == 5
    expect = {"locked": ("error", "folder cannot be read (PermissionError"), "loop": ("skipped", "already searched"),
              "fifo": ("skipped", "FIFO"), "broken": ("error", "points to nothing"),
              "broken_dir": ("error", "points to nothing")}
    for key, (kind, words) in expect.items():
        issue = by_path[odd[key]]
        assert issue.kind == kind and words in issue.reason, issue
    scan = CliRunner().invoke(main, ["scan", str(study)])
    assert scan.exit_code == 0, scan.output
    for key in expect:
        assert sum(str(odd[key]) + ":" in line for line in scan.stdout.splitlines()) == 1, (key, scan.stdout)
    db = tmp_path / "db.sqlite"
    result = CliRunner().invoke(main, ["ingest", str(study), *ingest_args(db, tiny_model)])
    assert result.exit_code == EXIT_PARTIAL, result.output  # a folder that could not be read is not "all done"
    with sqlite3.connect(db) as con:
        recorded = dict(con.execute("select path, kind from ingest_errors").fetchall())
    assert recorded == {str(odd[key]): kind for key, (kind, _words) in expect.items()}


def test_a_study_folder_that_cannot_be_read_is_one_clear_error(tmp_path: Path, no_read_access: set[str]) -> None:
    (tmp_path / "study").mkdir()
    no_read_access.add(str(tmp_path / "study"))
    result = CliRunner().invoke(main, ["scan", str(tmp_path / "study")])
    assert result.exit_code == 1 and "cannot be read (PermissionError" in result.output


# 5 — a database of another program is refused ---------------------------------------------------------


def test_foreign_sqlite_database_is_refused_and_left_as_it_was(tmp_path: Path, tiny_model: Path) -> None:
    foreign = tmp_path / "customers.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("create table customers (id integer primary key, name text)")
        con.execute("insert into customers (name) values ('someone')")
    con.close()
    before = foreign.read_bytes()
    (tmp_path / "study").mkdir()
    write_vol(volume("P012"), tmp_path / "study" / "a.vol")
    runner = CliRunner()
    for args in (["ingest", str(tmp_path / "study"), *ingest_args(foreign, tiny_model)],
                 ["db", "upgrade", "--db", str(foreign)], ["export", "--out", str(tmp_path / "csv"), "--db", str(foreign)],
                 ["report", "--patient", "P012", "--db", str(foreign), "--out", str(tmp_path / "pdf")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        assert "is not an hrf-batch study database" in result.output and "customers" in result.output
    assert foreign.read_bytes() == before
    assert not (tmp_path / "csv").exists() and not (tmp_path / "pdf").exists()
    empty = tmp_path / "empty.sqlite"
    empty.touch()  # an empty file is an empty database: it becomes a study
    result = runner.invoke(main, ["ingest", str(tmp_path / "study"), *ingest_args(empty, tiny_model)])
    assert result.exit_code == 0, result.output


def test_foreign_postgresql_database_is_refused_and_left_as_it_was(pg_cluster) -> None:
    url = pg_cluster.create_database()
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE invoices (id integer PRIMARY KEY)"))
        with pytest.raises(StoreError, match="not an hrf-batch study database: it holds tables or views \\(invoices\\)"):
            open_store(url)
        with pytest.raises(StoreError, match="not an hrf-batch study database"):
            upgrade(url)
        with engine.connect() as conn:
            assert inspect(conn).get_table_names() == ["invoices"]
    finally:
        engine.dispose()


# 6 — no name or birth date in what ingest, scan, info and report print or log ---------------------------


def identifying_study(root: Path) -> list[Path]:
    """One volume per format of a patient with a distinctive name and birth date, plus a DICOM whose
    birth date cannot be parsed and a .vol whose birth date is impossible (both once logged the value)."""
    name = " ".join(NAME_PARTS)
    person = {"patient_name": name, "birth_date": BIRTH}
    files = [write_vol(volume("ZQ-7781", series="V1", **person), root / "v1" / "scan.vol")]
    (root / "v2").mkdir()
    files.append(write_e2e([volume("ZQ-7781", series="E1", eye=eye, seed=i, **person) for i, eye in enumerate(("OD", "OS"))],
                           root / "v2" / "scan.e2e"))
    files.append(write_heyex_xml(volume("ZQ-7781", series="X1", **person), root / "v3", stem="scan"))
    dicom = volume("ZQ-7781", series="1.2.826.0.1.3680043.8.498.77", patient_name="^".join(reversed(NAME_PARTS)),
                   birth_date=BIRTH)
    files.append(write_dicom_oct(dicom, root / "v4")[0])
    bad_date = write_dicom_oct(dataclasses.replace(dicom, meta=dataclasses.replace(
        dicom.meta, series_uid="1.2.826.0.1.3680043.8.498.78")), root / "v5")[0]
    import pydicom

    ds = pydicom.dcmread(bad_date)
    ds.PatientBirthDate = BIRTH.isoformat()  # not DICOM's YYYYMMDD: unreadable for the reader
    ds.save_as(bad_date)
    files.append(bad_date)
    files.append(write_vol(volume("ZQ-7781", series="V6", patient_name=name, birth_date=date(1850, 1, 1)),
                           root / "v6" / "old.vol"))
    return files


def test_no_name_or_birth_date_in_console_output_logs_or_warnings_by_default(
    tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = tmp_path / "study"
    files = identifying_study(study)
    runner = CliRunner()
    revealed = runner.invoke(main, ["info", "--show-identifiers", str(files[3])]).stdout
    assert NAME_PARTS[0] in revealed and BIRTH.isoformat() in revealed  # the study does hold them
    caplog.clear()
    caplog.set_level(logging.INFO)
    db = tmp_path / "db.sqlite"
    outputs: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        commands = [["scan", str(study)], ["scan", "--json", str(study)],
                    *(["info", str(f)] for f in files), *(["info", "--json", str(f)] for f in files)]
        for args in commands:
            result = runner.invoke(main, args)
            assert result.exit_code == 0, (args, result.output)
            outputs.append(result.output)
        logged_before = len(caplog.text)
        result = runner.invoke(main, ["ingest", str(study), *ingest_args(db, tiny_model)])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
        ingest_text = result.output + caplog.text[logged_before:]
        with open_store(str(db)) as store:
            stored_ids = {p.patient_id for p in store.list_patients()}
        for pid in stored_ids:
            result = runner.invoke(main, ["report", "--patient", pid, "--db", str(db), "--out", str(tmp_path / "pdf")])
            assert result.exit_code == 0, result.output
            outputs.append(result.output)
        result = runner.invoke(main, ["export", "--out", str(tmp_path / "csv"), "--db", str(db)])
        outputs.append(result.output)
    assert stored_ids == {"ZQ-7781"}
    assert "birth date" in caplog.text  # the two damaged birth dates were noticed, and said so …
    haystack = "\n".join([*outputs, caplog.text, *(str(w.message) for w in caught)])
    haystack += "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "csv").iterdir())
    for secret in (*NAME_PARTS, *BIRTH_FORMS, "1850-01-01", "18500101"):  # … without their values
        assert secret not in haystack, secret
    assert "ZQ-7781" not in ingest_text  # ingest never needs to name a patient
