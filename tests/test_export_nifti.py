"""export --nifti: image and HRF label volumes whose masks and mm spacing round-trip, with a provenance sidecar."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from hrf_batch.cli import main
from hrf_batch.export.nifti import IMAGE_NAME, LABEL_NAME, SIDECAR_NAME, export_nifti, from_nifti_axes
from hrf_batch.export.sources import read_stored_source
from hrf_batch.export.volumes import stored_masks, volume_folder
from hrf_batch.io.readers import read_volumes
from hrf_batch.store import StoredVolume, open_store
from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

from test_export_dicom import RUN, real_vol_study, store_fake_results


def check_round_trip(folder: Path, stored: StoredVolume, source_bscans: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Image, label and affine of one exported volume against the database and the source file."""
    image, label = nib.load(folder / IMAGE_NAME), nib.load(folder / LABEL_NAME)
    assert label.get_data_dtype() == np.uint8 and image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(from_nifti_axes(np.asarray(label.dataobj)).astype(bool), stored_masks(stored))
    np.testing.assert_array_equal(from_nifti_axes(np.asarray(image.dataobj)), np.rint(source_bscans).astype(np.uint8))
    for nifti in (image, label):
        assert nifti.header.get_zooms() == pytest.approx(spacing, rel=1e-6)
        np.testing.assert_allclose(nifti.affine, np.diag([*spacing, 1.0]), rtol=1e-6)
        assert nifti.header.get_xyzt_units()[0] == "mm"
        assert int(nifti.header["sform_code"]) == 2 and int(nifti.header["qform_code"]) == 2


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("nifti")
    study = root / "study"
    write_synthetic_study(study, StudySpec(patients=2, visits=1, bscans=4, width=64, height=48, seed=4))
    db = str(root / "db.sqlite")
    store_fake_results(study, db, seed=1)
    return study, db


def test_round_trip_of_masks_pixels_and_spacing_against_the_source(study_db: tuple[Path, str], tmp_path: Path) -> None:
    with open_store(study_db[1]) as store:
        summary = export_nifti(store, tmp_path)
        volumes = [v for p in ("P001", "P002") for v in store.volume_results(p, masks=True)]
    assert summary.skipped == [] and len(summary.written) == len(volumes) == 4
    for stored in volumes:
        folder = volume_folder(tmp_path, stored)
        assert sorted(p.name for p in summary.written[str(folder)]) == sorted([IMAGE_NAME, LABEL_NAME, SIDECAR_NAME])
        path = Path(stored.source_path)
        source = [v for v in (read_volumes(path) if path.is_file() else []) if v.meta.series_uid == stored.series_uid]
        if not source:  # a single-frame DICOM series is a folder: read it as ingest did
            source = [read_stored_source(stored).volume]
        sp = source[0].meta.spacing
        check_round_trip(folder, stored, source[0].bscans, (sp.lateral_mm, sp.axial_mm, sp.between_bscans_mm))
        assert stored_masks(stored).any()


def test_sidecar_carries_the_provenance_and_identifiers_only_on_request(study_db: tuple[Path, str], tmp_path: Path) -> None:
    with open_store(study_db[1]) as store:
        export_nifti(store, tmp_path / "plain", patient="P001")
        export_nifti(store, tmp_path / "ids", patient="P001", include_identifiers=True)
        stored = store.volume_results("P001", masks=True)[0]
    sidecar = json.loads((volume_folder(tmp_path / "plain", stored) / SIDECAR_NAME).read_text())
    assert sidecar["source_sha256"] == stored.source_sha256 and sidecar["run"]["model_id"] == RUN.model_id
    assert sidecar["run"]["segmenter"] == "region-growing" and sidecar["run"]["parameters"] == {"max_iterations": 2}
    assert sidecar["run"]["code_version"] == "test-1" and sidecar["run"]["params_hash"] == stored.run.params_hash
    assert sidecar["hrf_count"] == sum(b.hrf_count for b in stored.bscans) > 0
    assert sidecar["voxel_size_mm"] == pytest.approx([stored.spacing.lateral_mm, stored.spacing.axial_mm,
                                                      stored.spacing.between_bscans_mm])
    assert "source_path" not in sidecar and not sidecar["slow_axis_mm_nominal"]
    with_ids = json.loads((volume_folder(tmp_path / "ids", stored) / SIDECAR_NAME).read_text())
    assert with_ids["source_path"] == stored.source_path
    assert {p.relative_to(tmp_path / "plain").parts[0] for p in (tmp_path / "plain").rglob("*.nii.gz")} == {"P001"}


def test_real_heyex_vol_keeps_its_header_spacing(fixtures_dir: Path, tmp_path: Path) -> None:
    """A real Spectralis .vol (eyepy's test file): voxel sizes are the ones its header declares."""
    volume, db = real_vol_study(fixtures_dir, tmp_path)
    with open_store(db) as store:
        summary = export_nifti(store, tmp_path / "out")
        (stored,) = store.volume_results(volume.meta.patient_id, masks=True)
    assert summary.skipped == []
    sp = volume.meta.spacing
    assert (sp.lateral_mm, sp.axial_mm, sp.between_bscans_mm) == pytest.approx((0.01182, 0.00387, 0.03144), abs=5e-6)
    check_round_trip(volume_folder(tmp_path / "out", stored), stored, volume.bscans,
                     (sp.lateral_mm, sp.axial_mm, sp.between_bscans_mm))


def test_single_bscan_gets_a_nominal_slow_axis(tmp_path: Path) -> None:
    study = tmp_path / "study"
    write_synthetic_study(study, StudySpec(patients=1, visits=1, bscans=1, width=48, height=32, seed=2))
    db = str(tmp_path / "db.sqlite")
    store_fake_results(study, db)
    with open_store(db) as store:
        export_nifti(store, tmp_path / "out")
        stored = store.volume_results("P001", masks=True)[0]
    folder = volume_folder(tmp_path / "out", stored)
    assert nib.load(folder / LABEL_NAME).header.get_zooms() == pytest.approx(
        (stored.spacing.lateral_mm, stored.spacing.axial_mm, stored.spacing.lateral_mm))
    assert json.loads((folder / SIDECAR_NAME).read_text())["slow_axis_mm_nominal"] is True


def test_cli_nifti_and_a_missing_source(study_db: tuple[Path, str], tmp_path: Path) -> None:
    study = tmp_path / "study"
    shutil.copytree(study_db[0], study)
    db = str(tmp_path / "db.sqlite")
    store_fake_results(study, db)
    gone = sorted(study.rglob("*.vol"))[0]
    gone.unlink()
    done = CliRunner().invoke(main, ["export", "--db", db, "--nifti", str(tmp_path / "n")])
    assert done.exit_code == 1
    assert "wrote 3 volumes (9 files)" in done.output
    assert f"not exported: {gone}: the analysed heyex-vol source is no longer there" in done.output
    assert "1 volume export(s) left out" in done.output
