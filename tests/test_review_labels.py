"""The graders' verdicts as a training labels CSV (`export --labels`): which B-scans go in with which count
and label, one grader at a time, sources checked again, and `train --labels` reading the file unedited."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hrf_batch.cli import main
from hrf_batch.errors import LabelError
from hrf_batch.io.discover import discover
from hrf_batch.io.labels import load_csv_labels
from hrf_batch.io.readers import read_source
from hrf_batch.io.volume import Volume
from hrf_batch.results import BScanResult, Lesion, RunInfo, VolumeResult
from hrf_batch.review.labels import LABEL_COLUMNS, export_labels
from hrf_batch.store import open_store
from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

SPEC = StudySpec(patients=2, visits=1, bscans=3, width=64, height=64, seed=4)
LESIONS = (2, 0, 1)  # model lesions per B-scan in every volume


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("labels") / "study"
    write_synthetic_study(folder, SPEC)
    return folder


def volumes_of(study: Path) -> list[Volume]:
    return sorted((v for s in discover(study).sources for v in read_source(s.format, s.paths)),
                  key=lambda v: (v.meta.patient_id, v.meta.eye))


def result_for(volume: Volume, model: str = "cct-a") -> VolumeResult:
    """The volume's own metadata with LESIONS[i] small square lesions on B-scan i."""
    shape = volume.bscans.shape[1:]
    bscans = []
    for index, n in enumerate(LESIONS):
        mask = np.zeros(shape, dtype=bool)
        found = []
        for k in range(n):
            r0, c0 = 10 + 12 * k, 8 + 14 * k
            mask[r0:r0 + 3, c0:c0 + 3] = True
            found.append(Lesion(index, (r0 + 1.0, c0 + 1.0), (r0, c0, r0 + 3, c0 + 3), 9, np.ones((3, 3), dtype=bool)))
        bscans.append(BScanResult(index=index, scores=(0.9, 0.1), relevance_peaks=(), mask=mask, lesions=tuple(found)))
    run = RunInfo(model_id=model, segmenter="region-growing", segmenter_checkpoint_sha256=None,
                  parameters={"threshold": 0.5}, code_version="0.1.0", device="cpu")
    return VolumeResult(meta=volume.meta, bscan_shape=shape, bscans=tuple(bscans), run=run)


def blob(shape: tuple[int, int], r0: int = 40, c0: int = 40) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[r0:r0 + 3, c0:c0 + 2] = True
    return mask


def grade(store, run: int, shape: tuple[int, int], grader: str = "AB") -> None:
    """B-scan 0: one of two accepted + one added (count 2); 1: "no" (0); 2: lesion undecided, no answer (left out)."""
    store.save_lesion_verdict(run, 0, 0, grader, "accept")
    store.save_lesion_verdict(run, 0, 1, grader, "reject")
    store.save_added_lesion(run, 0, grader, (41, 40), blob(shape), "region-growing")
    store.save_bscan_verdict(run, 1, grader, False)
    store.save_added_lesion(run, 2, grader, (41, 40), blob(shape), "region-growing")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def vol_files(volumes: list[Volume]) -> list[Volume]:
    """The volumes stored as one file (.vol); the DICOM ones are stored as their folder."""
    return [v for v in volumes if Path(v.meta.source_path).is_file()]


def test_one_graders_finished_bscans_become_rows_that_the_loader_reads(study: Path, tmp_path: Path) -> None:
    volumes = vol_files(volumes_of(study))
    db = str(tmp_path / "l.sqlite")
    with open_store(db) as store:
        for volume in volumes:
            run = store.save_volume_result(result_for(volume)).run_id
            grade(store, run, volume.bscans.shape[1:])
        # a "yes" with nothing marked: label 1, count unknown
        store.save_bscan_verdict(run, 2, "AB", True)
        export = export_labels(store, tmp_path / "labels.csv")
    rows = read_rows(tmp_path / "labels.csv")
    assert tuple(rows[0]) == LABEL_COLUMNS and export.grader == "AB" and not export.left_out
    last = str(Path(volumes[-1].meta.source_path).resolve())
    want = [(str(Path(v.meta.source_path).resolve()), v.meta.eye, "0", "2", "1") for v in volumes]
    want += [(str(Path(v.meta.source_path).resolve()), v.meta.eye, "1", "0", "0") for v in volumes]
    want += [(last, volumes[-1].meta.eye, "2", "", "1")]
    assert sorted(tuple(r.values()) for r in rows) == sorted(want)
    loaded = load_csv_labels(tmp_path / "labels.csv", tmp_path / "anywhere")
    by_key = dict(zip(loaded.keys, loaded.counts.tolist()))
    assert len(loaded) == len(rows) and by_key[f"{volumes[0].meta.source_path}#{volumes[0].meta.eye}#0"] == 2
    assert by_key[f"{volumes[-1].meta.source_path}#{volumes[-1].meta.eye}#2"] == 1  # the label stands in


def test_several_graders_need_a_choice_and_a_missing_or_changed_source_is_left_out(study: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    write_synthetic_study(copy, SPEC)
    volumes = vol_files(volumes_of(copy))
    db = str(tmp_path / "g.sqlite")
    with open_store(db) as store:
        for volume in volumes:
            run = store.save_volume_result(result_for(volume)).run_id
            grade(store, run, volume.bscans.shape[1:], "AB")
            store.save_bscan_verdict(run, 1, "CD", True)
        with pytest.raises(LabelError, match="2 graders reviewed B-scans: AB, CD") as refused:
            export_labels(store, tmp_path / "l.csv")
        assert "--grader" in str(refused.value)
        with pytest.raises(LabelError, match="'XY' has finished no B-scan"):
            export_labels(store, tmp_path / "l.csv", grader="XY")
        gone, changed, kept = volumes[0], volumes[1], volumes[2:]
        Path(gone.meta.source_path).unlink()
        with open(changed.meta.source_path, "ab") as fh:
            fh.write(b"\0")
        export = export_labels(store, tmp_path / "l.csv", grader="CD")
        assert export.left_out == {gone.meta.source_path: "the source is no longer there",
                                   changed.meta.source_path: "changed since it was analysed (its sha256 differs "
                                                             "from the stored one)"}
        assert [r["file"] for r in read_rows(tmp_path / "l.csv")] == [str(Path(v.meta.source_path).resolve()) for v in kept]
        assert "left out 2 reviewed B-scans of 2 sources" in export.text()
        for v in kept:
            Path(v.meta.source_path).unlink()
        with pytest.raises(LabelError, match="none of the .* B-scans CD finished could be exported"):
            export_labels(store, tmp_path / "none.csv", grader="CD")
    assert not (tmp_path / "none.csv").exists()


def test_two_runs_labelling_a_bscan_differently_are_refused(study: Path, tmp_path: Path) -> None:
    volume = vol_files(volumes_of(study))[0]
    with open_store(str(tmp_path / "c.sqlite")) as store:
        first = store.save_volume_result(result_for(volume, "cct-a")).run_id
        second = store.save_volume_result(result_for(volume, "cct-b")).run_id
        store.save_bscan_verdict(first, 1, "AB", False)
        store.save_bscan_verdict(second, 1, "AB", False)
        assert len(export_labels(store, tmp_path / "same.csv").rows) == 1  # the same label twice is one row
        store.save_bscan_verdict(second, 1, "AB", True)
        with pytest.raises(LabelError, match=f"differently in runs {first} and {second}"):
            export_labels(store, tmp_path / "differ.csv")


def test_a_dicom_series_of_single_frame_files_is_left_out_with_why(study: Path, tmp_path: Path) -> None:
    volumes = volumes_of(study)
    series = [v for v in volumes if Path(v.meta.source_path).is_dir()]
    assert series and vol_files(volumes), "the synthetic study should hold single-frame DICOM series and single files"
    with open_store(str(tmp_path / "d.sqlite")) as store:
        for volume in volumes:
            run = store.save_volume_result(result_for(volume)).run_id
            store.save_bscan_verdict(run, 0, "AB", True)
        export = export_labels(store, tmp_path / "d.csv")
    assert sorted(export.left_out) == sorted(v.meta.source_path for v in series)
    assert all("DICOM series of single-frame files" in why for why in export.left_out.values())
    assert len(load_csv_labels(tmp_path / "d.csv", tmp_path)) == len(export.rows) == len(volumes) - len(series)


def test_the_exported_labels_train_a_model_unedited(study: Path, tmp_path: Path) -> None:
    """Must-show: `export --labels` then `train --labels` on the file as written."""
    db = str(tmp_path / "t.sqlite")
    volumes = vol_files(volumes_of(study))
    with open_store(db) as store:
        for volume in volumes:
            run = store.save_volume_result(result_for(volume)).run_id
            grade(store, run, volume.bscans.shape[1:])
    runner = CliRunner()
    labels = tmp_path / "labels.csv"
    exported = runner.invoke(main, ["export", "--labels", str(labels), "--db", db])
    assert exported.exit_code == 0, exported.output
    assert f"wrote {labels}: {2 * len(volumes)} B-scans of {len(volumes)} files reviewed by AB" in exported.output
    before = labels.read_bytes()
    out = tmp_path / "model"
    trained = runner.invoke(main, ["train", str(study), "--labels", str(labels), "--out", str(out), "--preset", "cct-tiny",
                                   "--steps", "2", "--batch-size", "2", "--eval-every", "1", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    assert (out / "config.json").is_file() and labels.read_bytes() == before
    assert runner.invoke(main, ["export", "--grader", "AB", "--db", db]).exit_code == 2
