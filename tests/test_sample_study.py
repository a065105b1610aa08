"""Synthetic studies: every format written round-trips through the readers; the study folder is complete."""

from __future__ import annotations

import csv
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hrf_batch.cli import main
from hrf_batch.io.discover import FileIssue, discover, read_sources
from hrf_batch.io.ground_truth import load_ground_truth
from hrf_batch.io.readers import read_volumes
from hrf_batch.io.study import iter_study
from hrf_batch.io.volume import Volume
from hrf_batch.synthetic.study import FORMAT_CYCLE, StudySpec, synthetic_volume, write_format, write_synthetic_study

SPEC = StudySpec(patients=2, visits=2, bscans=4, width=96, height=64, seed=5)


def _pair() -> list[Volume]:
    rng = np.random.default_rng(11)
    when = datetime(2024, 5, 6, 10, 30, 15)
    return [synthetic_volume(rng, SPEC, "P007", date(2024, 5, 6), eye, 0.5, when)[0] for eye in ("OD", "OS")]


def _read_back(fmt: str, sources: list[Path]) -> list[Volume]:
    if fmt == "dicom-oct":
        return [v for s in sources for v in read_sources(discover(s).sources) if isinstance(v, Volume)]
    return read_volumes(sources[0]) if fmt == "heyex-e2e" else [read_volumes(s)[0] for s in sources]


@pytest.mark.parametrize("fmt", FORMAT_CYCLE)
def test_each_format_round_trips(tmp_path: Path, fmt: str) -> None:
    written = _pair()
    sources = write_format(fmt, written, tmp_path, "P007_2024-05-06")
    back = sorted(_read_back(fmt, sources), key=lambda v: v.meta.eye)
    assert [v.meta.eye for v in back] == ["OD", "OS"]
    for w, r in zip(written, back, strict=True):
        a, b = w.meta, r.meta
        assert r.bscans.shape == w.bscans.shape
        assert np.abs(r.bscans - w.bscans).max() <= 1.0, f"{fmt}: pixels differ by more than one grey level"
        assert (b.patient_id, b.visit_date, b.eye, b.source_format) == (a.patient_id, a.visit_date, a.eye, fmt)
        assert b.acquired_at == a.acquired_at
        for field in ("lateral_mm", "axial_mm", "between_bscans_mm"):
            assert getattr(b.spacing, field) == pytest.approx(getattr(a.spacing, field), rel=1e-3)
        loc_px = max(a.localizer_spacing_mm)
        for pa, pb in zip(a.positions, b.positions, strict=True):
            assert pb.start_mm == pytest.approx(pa.start_mm, abs=loc_px)
            assert pb.end_mm == pytest.approx(pa.end_mm, abs=loc_px)


def test_study_folder_has_every_format_and_ground_truth(tmp_path: Path) -> None:
    records = write_synthetic_study(tmp_path, SPEC)
    assert len(records) == SPEC.patients * SPEC.visits * 2
    assert {r.format for r in records} == set(FORMAT_CYCLE)
    items = list(iter_study(tmp_path))
    volumes = [i for i in items if isinstance(i, Volume)]
    errors = [i for i in items if isinstance(i, FileIssue) and i.kind == "error"]
    assert not errors and len(volumes) == len(records)
    truth = load_ground_truth(tmp_path)
    for vol in volumes:
        labels = truth[(vol.meta.patient_id, vol.meta.visit_date, vol.meta.eye)]
        assert labels.shape == vol.bscans.shape
        hrf = labels > 0
        if hrf.any():  # HRFs are bright foci in what the reader returns, whatever the format
            assert vol.bscans[hrf].mean() > vol.bscans[~hrf].mean() + 40
    with open(tmp_path / "ground_truth/manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records) * SPEC.bscans
    assert sum(int(r["hrf_count"]) for r in rows) == sum(sum(r.hrf_counts) for r in records)
    for r in rows:  # each row's area is its B-scan's HRF pixels in the mask file
        labels = np.load(tmp_path / r["mask_file"])["labels"][int(r["bscan_index"])]
        assert int(r["hrf_area_px"]) == int((labels > 0).sum())


def test_same_seed_same_study(tmp_path: Path) -> None:
    a = write_synthetic_study(tmp_path / "a", SPEC)
    b = write_synthetic_study(tmp_path / "b", SPEC)
    assert [r.hrf_counts for r in a] == [r.hrf_counts for r in b]
    la, lb = load_ground_truth(tmp_path / "a"), load_ground_truth(tmp_path / "b")
    assert all(np.array_equal(la[k], lb[k]) for k in la)


def test_synth_command(tmp_path: Path) -> None:
    out = tmp_path / "study"
    result = CliRunner().invoke(main, ["synth", str(out), "--patients", "1", "--visits", "1", "--bscans", "2", "--width", "64", "--height", "48"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 volumes" in result.output
    info = CliRunner().invoke(main, ["info", str(next(out.rglob("*.vol")))])
    assert info.exit_code == 0 and "2 B-scans x 48 x 64 px" in info.output
