"""One bad file never stops a study: `hrf-batch ingest` over a corpus of malformed files mixed with good
volumes, as a user would run it (a subprocess), with its peak memory measured.

The corpus is built here: damaged copies of the real fixtures in ../shared/fixtures, the hostile files of
tests/test_hostile_input.py (made by the project's writers, then patched; the big ones are sparse), a few
non-OCT files, and good volumes of every format written by hrf_batch/io/writers.
"""

from __future__ import annotations

import math
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import RLELossless

from hrf_batch.io.writers.dicom import write_dicom_oct
from hrf_batch.io.writers.e2e import write_e2e
from hrf_batch.io.writers.heyex_xml import write_heyex_xml
from hrf_batch.io.writers.vol import write_vol

from conftest import PROJECT_ROOT, make_test_volume, save_tiny_model
from test_hostile_input import (
    DOB,
    N_BSCANS,
    SCALE_X,
    VISIT,
    H,
    W,
    _compressed_claim,
    _dicom,
    _e2e_missing_one_bscan,
    _nan_first_bscan_vol,
    _set,
    _sparse_vol,
    _tiff_declaring,
    _vol_with,
    _xml,
    _xml_with_overflowing_hour,
    _xml_without_localizer,
)

RSS_LIMIT_KB = 2 * 1024 * 1024  # 2 GiB
TIME = Path("/usr/bin/time")


def _truncated(source: Path, target: Path, fraction: float) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def _build_corpus(root: Path, fixtures: Path) -> tuple[list[Path], list[Path]]:
    """Write the corpus under ``root``; return (good files, bad files)."""
    bad: list[Path] = []
    real = root / "real"
    real.mkdir(parents=True)
    for name in ("spectralis-raw-data/invalid.vol", "rse-panimg/corrupt.fds", "rse-panimg/e2e_minimized.E2E"):
        bad.append(Path(shutil.copy(fixtures / name, real / Path(name).name)))  # known broken fixtures
    bad += [
        _truncated(fixtures / "eyepy/test_volume.vol", real / "truncated_volume.vol", 0.6),
        _truncated(fixtures / "spectralis-raw-data/valid.vol", real / "header_only.vol", 0.002),
        _truncated(fixtures / "rse-panimg/fds_minimized.fds", real / "truncated.fds", 0.5),
        _truncated(fixtures / "rse-panimg/e2e_minimized.E2E", real / "truncated.e2e", 0.3),
    ]
    hostile = root / "hostile"
    hostile.mkdir()
    bad += [
        _vol_with(hostile, "date_overflow.vol", VISIT, "<d", 1e300),
        _vol_with(hostile, "nan_spacing.vol", SCALE_X, "<d", math.nan),
        _vol_with(hostile, "more_bscans_than_file.vol", N_BSCANS, "<i", 300),
        _e2e_missing_one_bscan(hostile),
    ]
    bad += [_nan_first_bscan_vol(hostile, "nan_pixels.vol"), _sparse_vol(hostile, "sparse_over_budget.vol", 2048, 1024, 1024)]
    xml_hour = _xml_with_overflowing_hour(hostile / "xml_hour")
    xml_missing = _xml_without_localizer(hostile / "xml_missing_tiff")
    xml_bomb = _xml(hostile / "xml_bomb")
    _tiff_declaring(xml_bomb.parent / "x_B2.tif", 12000, 12000)
    bad += [
        xml_hour, xml_missing, xml_bomb,
        _dicom(hostile / "dicom_rle_claim", _compressed_claim(RLELossless, 100000, 65535, 65535)),
        _dicom(hostile / "dicom_slope_nan", _set(RescaleSlope="NaN")),
    ]
    other = root / "not_oct"
    other.mkdir()
    (other / "notes.txt").write_text("visit notes\n")
    (other / "table.csv").write_text("patient,eye\nP012,OD\n")

    good_dir = root / "good"
    good_dir.mkdir()
    good = [
        shutil.copy(fixtures / "eyepy/test_volume.vol", good_dir / "test_volume.vol"),
        shutil.copy(fixtures / "rse-panimg/fds_minimized.fds", good_dir / "fds_minimized.fds"),
        write_vol(make_test_volume(3, H, W, seed=1), good_dir / "good.vol"),
        write_heyex_xml(make_test_volume(3, H, W, seed=2, fmt="heyex-xml"), good_dir / "xml", stem="g"),
        write_dicom_oct(make_test_volume(2, H, W, seed=3, eye="OS", fmt="dicom-oct"), good_dir / "dicom")[0],
        write_e2e([make_test_volume(3, H, W, seed=4, fmt="heyex-e2e")], good_dir / "good.e2e"),
        _vol_with(good_dir, "impossible_birth_date.vol", DOB, "<d", 1e300),  # the date is dropped, the scan kept
    ]
    return [Path(p) for p in good], bad


def _peak_rss_kb(stderr: str) -> tuple[int, str]:
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if found:
        return int(found.group(1)), "/usr/bin/time -v"
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "getrusage(RUSAGE_CHILDREN), an upper bound"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # the writer's own warning about the NaN slope
def test_ingest_of_a_malformed_corpus_stores_every_good_volume_and_records_every_bad_file(
        tmp_path: Path, fixtures_dir: Path) -> None:
    good, bad = _build_corpus(tmp_path / "corpus", fixtures_dir)
    model = save_tiny_model(tmp_path / "tiny")
    db = tmp_path / "corpus.sqlite"
    cmd = [sys.executable, "-m", "hrf_batch", "ingest", str(tmp_path / "corpus"), "--db", str(db), "--model", str(model),
           "--device", "cpu", "--segmenter", "region", "--max-iterations", "2", "--quiet"]
    if TIME.is_file():
        cmd = [str(TIME), "-v", *cmd]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    seconds = time.perf_counter() - started
    peak_kb, how = _peak_rss_kb(done.stderr)
    print(f"\ncorpus ingest: {len(good)} good and {len(bad)} bad files, exit {done.returncode}, {seconds:.1f} s, "
          f"peak RSS {peak_kb / 1024:.0f} MiB ({how})\n{done.stdout}")
    assert done.returncode == 3, f"{done.stdout}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stdout and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert peak_kb < RSS_LIMIT_KB

    with sqlite3.connect(db) as con:
        stored = {p for (p,) in con.execute(
            "SELECT v.source_path FROM volumes v JOIN runs r ON r.volume_pk = v.id WHERE r.status = 'done'")}
        failed_runs = con.execute("SELECT v.source_path, r.error FROM volumes v JOIN runs r ON r.volume_pk = v.id "
                                  "WHERE r.status != 'done'").fetchall()
        errors = con.execute("SELECT path, reason FROM ingest_errors WHERE kind = 'error'").fetchall()
        skipped = {Path(p).name for (p,) in con.execute("SELECT path FROM ingest_errors WHERE kind = 'skipped'")}
    assert failed_runs == []
    assert {str(p) for p in good} <= stored, sorted({str(p) for p in good} - stored)
    for path in bad:
        rows = [reason for p, reason in errors if p == str(path)]
        assert len(rows) == 1 or (not rows and str(path) in stored), (path.name, rows)
        assert all("\n" not in r and "Traceback" not in r for r in rows), rows
    assert {p for p, _ in errors} <= {str(p) for p in bad}, "an error was recorded for a file that is not bad"
    assert {"notes.txt", "table.csv"} <= skipped
    stored_bad = sorted(p.name for p in bad if str(p) in stored)
    assert f"{len(stored)} processed, 0 already done (skipped), {len(errors)} failed" in done.stdout, done.stdout
    print(f"bad files stored as volumes (read legitimately): {stored_bad or 'none'}")
