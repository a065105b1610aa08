"""export --dicom-seg: DICOM Segmentations (and DICOM OCT for HEYEX sources) that pass dciodvfy, read back
with highdicom to the stored masks, reference their sources by UID and keep their UIDs on a re-export."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from hrf_batch.cli import main
from hrf_batch.errors import HrfBatchError
from hrf_batch.export.dciodvfy import validate
from hrf_batch.export.dicom import export_dicom
from hrf_batch.export.dicom_seg import SEGMENT_LABEL, SourceFrame, read_segmentation_masks
from hrf_batch.export.sources import read_stored_source
from hrf_batch.export.volumes import stored_masks, volume_folder
from hrf_batch.io.discover import discover, read_sources
from hrf_batch.io.readers.dicom_oct import read_dicom_oct
from hrf_batch.io.volume import Volume
from hrf_batch.results import BScanResult, Lesion, RunInfo, VolumeResult
from hrf_batch.store import StoredVolume, open_store
from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

RUN = RunInfo(model_id="m" * 64, segmenter="region-growing", segmenter_checkpoint_sha256=None,
              parameters={"max_iterations": 2}, code_version="test-1", device="cpu")


def fake_bscan(index: int, shape: tuple[int, int], rng: np.random.Generator, n_lesions: int) -> BScanResult:
    """A B-scan result with ``n_lesions`` random blobs, the mask their union (as the pipeline stores it)."""
    mask = np.zeros(shape, dtype=bool)
    lesions = []
    for _ in range(n_lesions):
        h, w = int(rng.integers(2, 6)), int(rng.integers(2, 7))
        r0, c0 = int(rng.integers(0, shape[0] - h)), int(rng.integers(0, shape[1] - w))
        crop = rng.random((h, w)) > 0.3
        crop[h // 2, w // 2] = True
        mask[r0:r0 + h, c0:c0 + w] |= crop
        rows, cols = np.nonzero(crop)
        lesions.append(Lesion(index, (r0 + rows.mean(), c0 + cols.mean()), (r0, c0, r0 + h, c0 + w), int(crop.sum()), crop))
    return BScanResult(index=index, scores=(0.9,), relevance_peaks=(), mask=mask, lesions=tuple(lesions))


def store_fake_results(study: Path, db: str, seed: int = 0) -> list[Volume]:
    """Every volume of ``study`` stored with random HRF masks (B-scan 0 always without), so masks exist
    without training a model; returns the volumes as read."""
    rng = np.random.default_rng(seed)
    volumes = [v for v in read_sources(discover(study).sources) if isinstance(v, Volume)]
    with open_store(db) as store:
        for vol in volumes:
            bscans = tuple(fake_bscan(i, vol.bscan_shape, rng, 0 if i == 0 else int(rng.integers(1, 4)))
                           for i in range(vol.n_bscans))
            store.save_volume_result(VolumeResult(vol.meta, vol.bscan_shape, bscans, RUN))
    return volumes


def real_vol_study(fixtures_dir: Path, tmp_path: Path) -> tuple[Volume, str]:
    """eyepy's real Spectralis .vol alone in a study, stored with fake results: its volume and the database."""
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(fixtures_dir / "eyepy" / "test_volume.vol", study / "test_volume.vol")
    db = str(tmp_path / "db.sqlite")
    (volume,) = store_fake_results(study, db)
    return volume, db


def source_frames(stored: StoredVolume, files: list[Path]) -> list[SourceFrame]:
    """Instance and frame of each B-scan: the source's for DICOM sources, the written OPT's otherwise."""
    scan = read_stored_source(stored)
    if scan.frames:
        return [SourceFrame(f.sop_instance_uid, f.frame_number) for f in scan.frames]
    (opt,) = [p for p in files if p.name.startswith("OPT_")]
    uid = str(pydicom.dcmread(opt, stop_before_pixels=True).SOPInstanceUID)
    return [SourceFrame(uid, i + 1) for i in range(stored.n_bscans)]


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One patient per source kind: .vol (P001), a multi-frame and a single-frame DICOM series (P002)."""
    root = tmp_path_factory.mktemp("export")
    study = root / "study"
    write_synthetic_study(study, StudySpec(patients=2, visits=1, bscans=4, width=64, height=48, seed=3))
    db = str(root / "db.sqlite")
    store_fake_results(study, db)
    return study, db


@pytest.fixture(scope="module")
def exported(study_db: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Path]]]:
    out = tmp_path_factory.mktemp("dicom")
    with open_store(study_db[1]) as store:
        summary = export_dicom(store, out)
    assert summary.skipped == []
    return out, summary.written


def stored_by_folder(db: str, out: Path) -> dict[str, StoredVolume]:
    with open_store(db) as store:
        volumes = [v for p in ("P001", "P002") for v in store.volume_results(p, masks=True)]
    return {str(volume_folder(out, v)): v for v in volumes}


def test_every_written_file_passes_dciodvfy(exported: tuple[Path, dict[str, list[Path]]]) -> None:
    out, written = exported
    files = [p for paths in written.values() for p in paths]
    kinds = sorted(validate(p).iod for p in files)
    # two .vol volumes: OPT + OP localizer + SEG each; two DICOM series: a SEG each
    assert kinds.count("Segmentation") == 4 and kinds.count("OphthalmicTomographyImage") == 2
    assert kinds.count("OphthalmicPhotography8BitImage") == 2
    for path in files:
        result = validate(path)
        assert result.errors == (), f"{path.name}: {result.errors}"


def test_seg_masks_read_back_equal_the_database(study_db: tuple[Path, str], exported: tuple[Path, dict[str, list[Path]]]) -> None:
    out, written = exported
    by_folder = stored_by_folder(study_db[1], out)
    assert set(by_folder) == set(written)
    for folder, files in written.items():
        stored = by_folder[folder]
        want = stored_masks(stored)
        assert want[1:].any() and not want[0].any()
        (seg_path,) = [p for p in files if p.name.startswith("SEG_")]
        got = read_segmentation_masks(seg_path, source_frames(stored, files), stored.bscan_shape)
        np.testing.assert_array_equal(got, want)
        seg = hd.seg.segread(seg_path)
        assert int(seg.NumberOfFrames) == sum(bool(m.any()) for m in want)  # a frame per B-scan with HRF
        assert seg.SegmentationType == "BINARY"
        segment = seg.SegmentSequence[0]
        assert segment.SegmentLabel == SEGMENT_LABEL
        assert (segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
                segment.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("49755003", "52988006")
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "hrf-batch region-growing" and algorithm.AlgorithmVersion == "test-1"
        assert "m" * 64 in str(algorithm.AlgorithmParameters)


def test_seg_references_the_dicom_source_instances_and_the_written_opt(
    study_db: tuple[Path, str], exported: tuple[Path, dict[str, list[Path]]]
) -> None:
    out, written = exported
    by_folder = stored_by_folder(study_db[1], out)
    formats = set()
    for folder, files in written.items():
        stored = by_folder[folder]
        formats.add(stored.source_format)
        seg = pydicom.dcmread([p for p in files if p.name.startswith("SEG_")][0])
        referenced = {str(src.ReferencedSOPInstanceUID) for group in seg.PerFrameFunctionalGroupsSequence
                      for d in group.DerivationImageSequence for src in d.SourceImageSequence}
        if stored.source_format == "dicom-oct":
            assert not any(p.name.startswith("OPT_") for p in files)  # the source itself is referenced
            source_uids = {f.sop_instance_uid for f in read_stored_source(stored).frames}
            assert referenced and referenced <= source_uids
            assert seg.StudyInstanceUID == pydicom.dcmread(read_stored_source(stored).frames[0].path).StudyInstanceUID
        else:
            opt = pydicom.dcmread([p for p in files if p.name.startswith("OPT_")][0], stop_before_pixels=True)
            assert referenced == {str(opt.SOPInstanceUID)}
            assert seg.StudyInstanceUID == opt.StudyInstanceUID and seg.FrameOfReferenceUID == opt.FrameOfReferenceUID
    assert formats == {"heyex-vol", "dicom-oct"}


def test_reexport_writes_identical_uids(study_db: tuple[Path, str], exported: tuple[Path, dict[str, list[Path]]],
                                        tmp_path: Path) -> None:
    with open_store(study_db[1]) as store:
        export_dicom(store, tmp_path / "again")

    def uids(root: Path) -> set[tuple[str, str, str, str]]:
        found = set()
        for path in root.rglob("*.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            found.add((str(path.relative_to(root)), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
        return found

    first = uids(exported[0])
    assert len(first) == 8 and uids(tmp_path / "again") == first  # 2 x (OPT, OP, SEG) + 2 SEG
    assert len({sop for *_, sop in first}) == 8


def test_opt_of_a_vol_source_reads_back_to_the_same_volume(
    study_db: tuple[Path, str], exported: tuple[Path, dict[str, list[Path]]]
) -> None:
    out, written = exported
    by_folder = stored_by_folder(study_db[1], out)
    checked = 0
    for folder, files in written.items():
        stored = by_folder[folder]
        if stored.source_format != "heyex-vol":
            continue
        source = read_stored_source(stored).volume
        (got,) = read_dicom_oct([p for p in files if not p.name.startswith("SEG_")])
        np.testing.assert_array_equal(got.bscans, np.rint(source.bscans))
        s, m = source.meta, got.meta
        for key in ("lateral_mm", "axial_mm", "between_bscans_mm"):
            assert math.isclose(getattr(m.spacing, key), getattr(s.spacing, key), rel_tol=1e-6)
        assert (m.eye, m.visit_date, m.acquired_at, m.patient_id, m.scan_pattern) == (
            s.eye, s.visit_date, s.acquired_at, s.patient_id, s.scan_pattern)
        assert m.device == s.device
        assert m.localizer_spacing_mm == pytest.approx(s.localizer_spacing_mm)
        tol = max(s.localizer_spacing_mm)
        assert len(m.positions) == source.n_bscans
        for want, have in zip(s.positions, m.positions):
            assert have.start_mm == pytest.approx(want.start_mm, abs=tol)
            assert have.end_mm == pytest.approx(want.end_mm, abs=tol)
        np.testing.assert_array_equal(got.localizer, np.rint(source.localizer))
        assert m.patient_name == "" and m.birth_date is None  # no identifiers unless asked for
        checked += 1
    assert checked == 2


def test_identifiers_only_when_asked_for(study_db: tuple[Path, str], exported: tuple[Path, dict[str, list[Path]]],
                                         tmp_path: Path) -> None:
    for path in exported[0].rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.PatientName) == "" and ds.PatientBirthDate == "" and ds.PatientID in ("P001", "P002")
    with open_store(study_db[1]) as store:
        export_dicom(store, tmp_path, patient="P002", include_identifiers=True)
    files = list(tmp_path.rglob("*.dcm"))
    assert files and {p.relative_to(tmp_path).parts[0] for p in files} == {"P002"}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.PatientName) == "Synthetic P002" and len(ds.PatientBirthDate) == 8


def test_missing_or_changed_source_is_reported_and_the_others_exported(tmp_path: Path) -> None:
    study = tmp_path / "study"
    write_synthetic_study(study, StudySpec(patients=2, visits=1, bscans=2, width=48, height=32, seed=5))
    db = str(tmp_path / "db.sqlite")
    store_fake_results(study, db)
    vol = sorted(study.rglob("*_OD.vol"))[0]
    vol.write_bytes(vol.read_bytes() + b"\0")  # changed after the analysis
    shutil.rmtree(next(study.rglob("OS_dicom")))  # gone
    with open_store(db) as store:
        summary = export_dicom(store, tmp_path / "out")
    assert len(summary.skipped) == 2
    changed, gone = sorted(summary.skipped, key=lambda s: "changed" not in s)
    assert str(vol) in changed and "changed since it was analysed" in changed and "ingest" in changed
    assert "OS_dicom" in gone and "no longer there" in gone
    assert len(summary.written) == 2  # the other .vol and the DICOM series


def test_unknown_patient_is_a_clear_error(study_db: tuple[Path, str], tmp_path: Path) -> None:
    with open_store(study_db[1]) as store, pytest.raises(HrfBatchError, match="patient 'P999' is not in"):
        export_dicom(store, tmp_path, patient="P999")


def test_cli_exports_and_requires_an_output(study_db: tuple[Path, str], tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(main, ["export", "--db", study_db[1], "--dicom-seg", str(tmp_path / "d"), "--patient", "P001"])
    assert done.exit_code == 0, done.output
    assert "2 volumes" in done.output and len(list((tmp_path / "d").rglob("SEG_*.dcm"))) == 2
    none = runner.invoke(main, ["export", "--db", study_db[1]])
    assert none.exit_code == 2 and "pass at least one output: --out, --dicom-seg" in none.output


def test_ingested_study_exports_clean_seg_over_every_source(small_study: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Through a real ingest (tiny model, region grower): whatever it found, the SEG says the same."""
    from hrf_batch.config import load_settings
    from hrf_batch.ingest import ingest_study

    db = str(tmp_path / "db.sqlite")
    settings = load_settings({"db": db, "model": str(tiny_model), "device": "cpu", "segmenter": "region",
                              "max_iterations": 2}, env={})
    assert ingest_study(small_study, settings, progress=False).processed == 4
    with open_store(db) as store:
        summary = export_dicom(store, tmp_path / "out")
        stored = {str(volume_folder(tmp_path / "out", v)): v
                  for p in ("P001", "P002") for v in store.volume_results(p, masks=True)}
    assert summary.skipped == [] and len(summary.written) == 4
    for folder, files in summary.written.items():
        for path in files:
            assert validate(path).errors == ()
        (seg_path,) = [p for p in files if p.name.startswith("SEG_")]
        volume = stored[folder]
        got = read_segmentation_masks(seg_path, source_frames(volume, files), volume.bscan_shape)
        np.testing.assert_array_equal(got, stored_masks(volume))



def test_real_heyex_vol_gives_a_clean_opt_and_seg(fixtures_dir: Path, tmp_path: Path) -> None:
    """eyepy's real Spectralis .vol: the OPT written from it passes dciodvfy and reads back to its pixels."""
    volume, db = real_vol_study(fixtures_dir, tmp_path)
    with open_store(db) as store:
        summary = export_dicom(store, tmp_path / "out")
        (stored,) = store.volume_results(volume.meta.patient_id, masks=True)
    (files,) = summary.written.values()
    assert sorted(validate(p).iod for p in files) == ["OphthalmicPhotography8BitImage", "OphthalmicTomographyImage",
                                                       "Segmentation"]
    assert all(validate(p).errors == () for p in files)
    (got,) = read_dicom_oct([p for p in files if not p.name.startswith("SEG_")])
    np.testing.assert_array_equal(got.bscans, np.rint(volume.bscans))
    assert (got.meta.eye, got.meta.visit_date, got.meta.acquired_at) == (volume.meta.eye, volume.meta.visit_date,
                                                                         volume.meta.acquired_at)
    seg_path = next(p for p in files if p.name.startswith("SEG_"))
    got_masks = read_segmentation_masks(seg_path, source_frames(stored, files), stored.bscan_shape)
    np.testing.assert_array_equal(got_masks, stored_masks(stored))


def test_single_frame_series_without_plane_positions_is_refused_with_a_reason(tmp_path: Path) -> None:
    """Such a series cannot be placed under one SEG (highdicom takes one multi-frame source): refused, others written."""
    study = tmp_path / "study"
    write_synthetic_study(study, StudySpec(patients=2, visits=1, bscans=2, width=48, height=32, seed=6))
    for path in next(study.rglob("OS_dicom")).glob("OPT_*.dcm"):
        ds = pydicom.dcmread(path)
        del ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence
        ds.save_as(path)
    db = str(tmp_path / "db.sqlite")
    store_fake_results(study, db)  # analysed as they are now
    with open_store(db) as store:
        summary = export_dicom(store, tmp_path / "out")
    (reason,) = summary.skipped
    assert "OS_dicom" in reason and "lack plane positions" in reason and "multi-frame instance" in reason
    assert len(summary.written) == 3
