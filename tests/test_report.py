"""Per-patient PDF reports and cohort CSVs, checked against the SQL views and a synthetic ground truth.

The study database is filled through the public store API with results made from the synthetic
study's ground-truth masks (one lesion per labelled HRF), so every expected count is known.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pypdf import PdfReader

from hrf_batch import __version__
from hrf_batch.errors import HrfBatchError
from hrf_batch.io.ground_truth import load_ground_truth
from hrf_batch.io.study import iter_study
from hrf_batch.io.volume import Volume
from hrf_batch.report import EXPORT_FILES, NOTICE, UnknownPatientError, export_cohort, render_patient_report
from hrf_batch.report.figures import dot_sizes, mm_to_px
from hrf_batch.results import BScanResult, Lesion, RunInfo, VolumeResult
from hrf_batch.store import Store, open_store
from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

from conftest import make_test_volume

SPEC = StudySpec(patients=2, visits=2, bscans=3, width=128, height=96, seed=1)
TEST_MODEL_ID = "TEST-ONLY-fake-model-0000"
TEST_RUN = RunInfo(
    model_id=TEST_MODEL_ID, segmenter="ground-truth-masks (test)", segmenter_checkpoint_sha256=None,
    parameters={"source": "synthetic ground truth", "threshold": 0.05, "max_iterations": 6},
    code_version=__version__, device="cpu", seconds={"score": 0.25, "segment": 0.5},
)
GtKey = tuple[str, date, str]


def lesions_from_labels(index: int, labels: np.ndarray) -> tuple[Lesion, ...]:
    """One lesion per ground-truth HRF id (its pixels, box and centroid)."""
    out = []
    for hrf_id in np.unique(labels)[1:]:
        pixels = labels == hrf_id
        rows, cols = np.nonzero(pixels)
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        out.append(Lesion(index, (float(rows.mean()), float(cols.mean())), (r0, c0, r1, c1), int(pixels.sum()), pixels[r0:r1, c0:c1]))
    return tuple(out)


def fake_relevance(shape: tuple[int, int], lesions: tuple[Lesion, ...], rng: np.random.Generator) -> np.ndarray:
    """Gaussian blobs at the lesion centres on weak noise: a made-up but plausible relevance map."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    relevance = rng.normal(0.0, 0.03, size=shape)
    for les in lesions:
        r, c = les.centroid_rc
        relevance += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * 6.0**2))
    return relevance.astype(np.float32)


def result_from_truth(volume: Volume, labels: np.ndarray, seed: int = 0) -> VolumeResult:
    """A VolumeResult whose HRFs are exactly the labelled ones, with made-up scores and relevance."""
    rng = np.random.default_rng(seed)
    bscans = []
    for i, lab in enumerate(labels):
        lesions = lesions_from_labels(i, lab)
        scores = tuple(float(s) for s in np.linspace(0.93, 0.03, len(lesions) + 1))
        peaks = tuple((int(round(les.centroid_rc[0])), int(round(les.centroid_rc[1]))) for les in lesions)
        bscans.append(BScanResult(
            index=i, scores=scores, relevance_peaks=peaks, mask=lab > 0, lesions=lesions,
            relevance=fake_relevance(lab.shape, lesions, rng),
        ))
    return VolumeResult(meta=volume.meta, bscan_shape=volume.bscan_shape, bscans=tuple(bscans), run=TEST_RUN)


def fill_store(store: Store, study_dir: Path) -> dict[GtKey, np.ndarray]:
    """Save one ground-truth result per volume of the study; returns the labels by (patient, date, eye)."""
    truth = load_ground_truth(study_dir)
    for k, volume in enumerate(v for v in iter_study(study_dir) if isinstance(v, Volume)):
        key = (volume.meta.patient_id, volume.meta.visit_date, volume.meta.eye)
        store.save_volume_result(result_from_truth(volume, truth[key], seed=k))
    return truth


def truth_counts(truth: dict[GtKey, np.ndarray]) -> dict[GtKey, int]:
    return {key: sum(len(np.unique(lab)) - 1 for lab in labels) for key, labels in truth.items()}


def pdf_text(path: Path) -> str:
    return "\n".join(page.extract_text() or "" for page in PdfReader(path).pages)


def flat(text: str) -> str:
    """Text with line breaks made spaces, for phrases that the layout may wrap."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study")
    write_synthetic_study(out, SPEC)
    return out


@pytest.fixture(scope="module")
def sqlite_study(study: Path, tmp_path_factory: pytest.TempPathFactory):
    """A SQLite study database shared by the PDF tests (they only read it)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'study.sqlite'}"
    with open_store(url) as store:
        truth = fill_store(store, study)
        yield store, truth


def visit_table_counts(text: str) -> dict[tuple[str, str], int]:
    """(visit date, eye) → HRF count from the report's visit table rows."""
    rows = re.findall(r"^(\d{4}-\d{2}-\d{2}) (OD|OS) (\d+) (\d+) (\d+) (\d+) ([\d.]+)", text, flags=re.MULTILINE)
    return {(d, eye): int(hrf) for d, eye, _vols, _bscans, hrf, _pos, _area in rows}


def test_report_shows_counts_provenance_and_no_identifiers_by_default(sqlite_study, tmp_path: Path) -> None:
    store, truth = sqlite_study
    expected = {(k[1].isoformat(), k[2]): n for k, n in truth_counts(truth).items() if k[0] == "P001"}
    assert sum(expected.values()) > 0, "the synthetic patient must have HRFs for this test to mean anything"

    path = render_patient_report(store, "P001", tmp_path)
    assert path == tmp_path / "P001_hrf_report.pdf"
    text = pdf_text(path)
    assert "P001" in text and "Research use only" in text and NOTICE in text
    assert TEST_MODEL_ID in text and "ground-truth-masks (test)" in text
    assert visit_table_counts(text) == expected
    assert "P002" not in text

    ident = next(p for p in store.list_patients(include_identifiers=True) if p.patient_id == "P001")
    assert ident.name and ident.birth_date
    assert ident.name not in text and ident.birth_date.isoformat() not in text
    assert str(Path(store.volume_results("P001", masks=False)[0].source_path).name) not in text

    shown = pdf_text(render_patient_report(store, "P001", tmp_path / "with_ids", show_identifiers=True))
    assert ident.name in shown and ident.birth_date.isoformat() in shown


def test_report_gallery_uses_the_source_images_when_unchanged(sqlite_study, tmp_path: Path) -> None:
    store, _truth = sqlite_study
    text = pdf_text(render_patient_report(store, "P001", tmp_path))
    assert "B-scans with most HRF" in text
    assert "source file changed or missing" not in flat(text)
    positive = sum(b.hrf_count > 0 for v in store.volume_results("P001", masks=False) for b in v.bscans)
    shown = min(positive, 6)
    assert shown > 0 and re.findall(r"^(\d)\. \d{4}-\d{2}-\d{2} · O[DS] · B-scan \d+", text, re.MULTILINE) == [
        str(i + 1) for i in range(shown)
    ]
    pages = PdfReader(tmp_path / "P001_hrf_report.pdf").pages  # pages share one image dictionary
    # trend + 2 figures per volume + one per gallery B-scan; identical figures (e.g. two volumes
    # without HRF) are stored once, gallery images always differ
    unique = len({image.name for page in pages for image in page.images})
    assert 1 + shown < unique <= 1 + 2 * 4 + shown


def test_report_says_when_a_source_changed(tmp_path: Path) -> None:
    copy = tmp_path / "study"
    write_synthetic_study(copy, SPEC)
    with open_store(f"sqlite:///{tmp_path / 'db.sqlite'}") as store:
        fill_store(store, copy)
        changed = store.volume_results("P001", masks=False)
        for volume in changed:
            if Path(volume.source_path).is_file() and volume.source_format == "heyex-vol":
                with open(volume.source_path, "ab") as fh:
                    fh.write(b"\0")
        text = pdf_text(render_patient_report(store, "P001", tmp_path / "out"))
    assert "source file changed or missing" in flat(text)
    assert "P001" in text


def test_report_for_a_patient_without_hrf_or_with_only_failed_volumes(tmp_path: Path) -> None:
    volume = make_test_volume(n=3, height=40, width=64)  # no source file: the report must say so, not fail
    quiet = dataclasses.replace(volume.meta, patient_id="P777", source_sha256="7" * 64, source_path="/gone/P777.vol")
    failed = dataclasses.replace(volume.meta, patient_id="P888", source_sha256="8" * 64)
    with open_store(f"sqlite:///{tmp_path / 'db.sqlite'}") as store:
        empty_labels = np.zeros((volume.n_bscans, *volume.bscan_shape), dtype=np.int16)
        store.save_volume_result(result_from_truth(dataclasses.replace(volume, meta=quiet), empty_labels))
        store.record_failed_run(failed, TEST_RUN, "CUDA out of memory while segmenting", n_bscans=3, bscan_shape=(40, 64))
        quiet_text = pdf_text(render_patient_report(store, "P777", tmp_path))
        failed_text = pdf_text(render_patient_report(store, "P888", tmp_path))
    assert "No HRF were found in any B-scan" in flat(quiet_text)
    assert visit_table_counts(quiet_text) == {(quiet.visit_date.isoformat(), quiet.eye): 0}
    assert "source file changed or missing" in flat(quiet_text) and "B-scan and lateral position" in flat(quiet_text)
    assert "No analysed volumes" in flat(failed_text) and "Volumes without results" in failed_text
    assert "CUDA out of memory while segmenting" in flat(failed_text) and "Research use only" in failed_text
    assert visit_table_counts(failed_text) == {}


def test_unknown_patient_names_the_patients_that_exist(sqlite_study, tmp_path: Path) -> None:
    store, _truth = sqlite_study
    with pytest.raises(UnknownPatientError) as info:
        render_patient_report(store, "p001", tmp_path)
    assert isinstance(info.value, HrfBatchError)
    assert "'p001'" in str(info.value) and "P001" in str(info.value) and "P002" in str(info.value)
    assert info.value.hint
    assert not list(tmp_path.iterdir())


def test_export_agrees_with_views_and_ground_truth(store_url: str, study: Path, tmp_path: Path) -> None:
    with open_store(store_url) as store:
        truth = fill_store(store, study)
        paths = export_cohort(store, tmp_path)
        views = {name: store.view_rows(name) for name in ("hrf_burden_patient", "hrf_burden_visit", "hrf_burden_volume")}
    assert [p.name for p in paths] == list(EXPORT_FILES)
    csv = {p.stem: pd.read_csv(p, dtype={"visit_date": str}) for p in paths}

    for name, frame in (("hrf_burden_patient", csv["hrf_patients"]), ("hrf_burden_visit", csv["hrf_visits"]),
                        ("hrf_burden_volume", csv["hrf_volumes"])):
        rows = views[name]
        assert len(frame) == len(rows)
        for column in ("n_visits", "hrf_count", "hrf_positive_bscans", "n_bscans", "hrf_area_mm2", "latest_hrf_count",
                       "max_hrf_count", "hrf_count_change", "delta_hrf_count", "delta_hrf_area_mm2", "hrf_area_px"):
            if column in frame:
                expected = [getattr(r, column) for r in rows]
                got = [None if pd.isna(x) else x for x in frame[column]]
                assert got == expected, (name, column)  # exact: CSVs hold the views' numbers, not roundings

    visits = csv["hrf_visits"].set_index(["patient_id", "visit_date", "eye"])["hrf_count"].to_dict()
    assert visits == {(p, d.isoformat(), e): n for (p, d, e), n in truth_counts(truth).items()}
    assert len(csv["hrf_lesions"]) == sum(truth_counts(truth).values())
    per_volume = csv["hrf_bscans"].groupby("volume_id")["hrf_count"].sum()
    assert per_volume.to_dict() == csv["hrf_volumes"].set_index("volume_id")["hrf_count"].to_dict()
    lesion_px = csv["hrf_lesions"].groupby("volume_id")["hrf_area_px"].sum().to_dict()
    volume_px = csv["hrf_volumes"].set_index("volume_id")["hrf_area_px"].to_dict()
    assert lesion_px == {k: n for k, n in volume_px.items() if n > 0}
    assert csv["hrf_lesions"]["centroid_x_mm"].notna().all()
    assert {"hrf_area_mm2", "lateral_spacing_mm", "centroid_row_px", "centroid_x_mm"} <= set().union(*map(set, csv.values()))


def test_export_leaves_identifiers_out_unless_asked(sqlite_study, tmp_path: Path) -> None:
    store, _truth = sqlite_study
    names = {p.name for p in store.list_patients(include_identifiers=True) if p.name}
    plain = "".join(p.read_text() for p in export_cohort(store, tmp_path / "plain"))
    assert names and not any(name in plain for name in names)
    assert "patient_name" not in plain and "birth_date" not in plain and "source_path" not in plain
    with_ids = pd.read_csv(export_cohort(store, tmp_path / "ids", include_identifiers=True)[0])
    assert names <= set(with_ids["patient_name"].dropna())
    assert with_ids["birth_date"].notna().any()


def test_localizer_mapping_and_dot_sizes() -> None:
    px = mm_to_px(np.array([[1.5, 3.0], [0.0, 0.0]]), (0.015, 0.03))
    np.testing.assert_allclose(px, [[100.0, 100.0], [0.0, 0.0]])
    sizes = dot_sizes(np.array([0.0, 0.5, 1.0, 2.0]), 1.0)
    assert sizes[0] < sizes[1] < sizes[2] == sizes[3]


def test_empty_patient_id_is_refused_and_never_means_everyone(sqlite_study, tmp_path: Path) -> None:
    """`report --patient ""` once put every patient into one PDF; an empty id is refused, and the
    store's views read with an empty id hold only patients stored without one."""
    store, _truth = sqlite_study
    for blank in ("", "  "):
        with pytest.raises(HrfBatchError, match="patient id is empty"):
            render_patient_report(store, blank, tmp_path)
    assert not list(tmp_path.iterdir())
    assert store.view_rows("hrf_burden_volume", "") == []
    assert {r.patient_id for r in store.view_rows("hrf_burden_volume")} >= {"P001", "P002"}


def test_unknown_patient_lists_close_matches_first(sqlite_study, tmp_path: Path) -> None:
    store, _truth = sqlite_study
    with pytest.raises(UnknownPatientError, match="close matches: P001") as info:
        render_patient_report(store, "P01", tmp_path)
    assert "P001" in str(info.value)


def test_export_escapes_cells_a_spreadsheet_would_run(tmp_path: Path) -> None:
    """A patient id that starts like a formula leaves as text (OWASP CSV injection rule); others are untouched."""
    volume = make_test_volume(n=3, height=40, width=64)
    ids = {"=HYPERLINK(\"http://x\",\"y\")": "1", "@SUM(1)": "2", "P012": "3"}
    with open_store(f"sqlite:///{tmp_path / 'db.sqlite'}") as store:
        for pid, sha in ids.items():
            meta = dataclasses.replace(volume.meta, patient_id=pid, source_sha256=sha * 64)
            labels = np.zeros((volume.n_bscans, *volume.bscan_shape), dtype=np.int16)
            store.save_volume_result(result_from_truth(dataclasses.replace(volume, meta=meta), labels))
        paths = export_cohort(store, tmp_path / "out")
    for path in paths:
        text = path.read_text(encoding="utf-8")
        assert "\n=" not in text and ",=" not in text and "\n@" not in text and ",@" not in text, path.name
    patients = pd.read_csv(paths[0], dtype=str)["patient_id"].tolist()
    assert sorted(patients) == sorted(["'=HYPERLINK(\"http://x\",\"y\")", "'@SUM(1)", "P012"])
    visits = pd.read_csv(tmp_path / "out" / "hrf_visits.csv")
    assert pd.api.types.is_numeric_dtype(visits["hrf_count"])  # numbers are not touched


def review_first_volume(store: Store, patient: str) -> tuple[int, int]:
    """On the patient's volume with most HRF (an HRF on every B-scan), grader AB rejects the first lesion,
    accepts the others and says "HRF yes" on every B-scan but the last ("no": a false positive of the
    tool); CD answers B-scan 0 only. Returns (run id, number of B-scans)."""
    volume = max(store.volume_results(patient, masks=False), key=lambda v: sum(b.hrf_count for b in v.bscans))
    assert all(b.hrf_count > 0 for b in volume.bscans) and volume.n_bscans > 1
    rejected = False
    for b in volume.bscans:
        for les in b.lesions:
            verdict = "reject" if not rejected else "accept"
            rejected = True
            store.save_lesion_verdict(volume.run.run_id, b.index, les.lesion_index, "AB", verdict)
        store.save_bscan_verdict(volume.run.run_id, b.index, "AB", b.index < volume.n_bscans - 1)
    store.save_bscan_verdict(volume.run.run_id, 0, "CD", True)
    return volume.run.run_id, volume.n_bscans


def test_cohort_csvs_carry_who_reviewed_and_the_agreement_view(study: Path, tmp_path: Path) -> None:
    with open_store(str(tmp_path / "r.sqlite")) as store:
        fill_store(store, study)
        run, n = review_first_volume(store, "P001")
        view = store.view_rows("hrf_review_agreement")
        paths = export_cohort(store, tmp_path / "csv")
    assert [p.name for p in paths] == list(EXPORT_FILES) and "hrf_review_agreement.csv" in EXPORT_FILES
    volumes = pd.read_csv(tmp_path / "csv" / "hrf_volumes.csv", keep_default_na=False)
    mine = volumes[volumes.run_id == run].iloc[0]
    assert (mine.reviewed_bscans, mine.graders) == (n, "AB;CD")
    assert set(volumes[volumes.run_id != run].reviewed_bscans) == {0}
    bscans = pd.read_csv(tmp_path / "csv" / "hrf_bscans.csv", keep_default_na=False)
    reviewed = bscans[bscans.run_id == run].sort_values("bscan_index")
    assert list(reviewed.n_graders) == [2] + [1] * (n - 1) and list(reviewed.graders) == ["AB;CD"] + ["AB"] * (n - 1)
    agreement = pd.read_csv(tmp_path / "csv" / "hrf_review_agreement.csv")
    assert list(agreement.grader) == [r.grader for r in view] == ["AB", "CD"]
    ab = agreement[agreement.grader == "AB"].iloc[0]
    assert (ab.reviewed_bscans, ab.tp_bscans, ab.fp_bscans, ab.sensitivity, ab.specificity) == (n, n - 1, 1, 1.0, 0.0)
    assert ab.lesion_precision == pytest.approx(view[0].lesion_precision) and ab.lesion_precision < 1.0


def test_report_shows_the_grader_review_only_when_there_is_one(study: Path, tmp_path: Path) -> None:
    with open_store(str(tmp_path / "p.sqlite")) as store:
        fill_store(store, study)
        assert "Grader review" not in pdf_text(render_patient_report(store, "P001", tmp_path / "before"))
        run, n = review_first_volume(store, "P001")
        (ab, cd) = [r for r in store.view_rows("hrf_review_agreement") if r.run_id == run]
        text = flat(pdf_text(render_patient_report(store, "P001", tmp_path / "after")))
        other = pdf_text(render_patient_report(store, "P002", tmp_path / "other"))
    assert "Grader review" in text and "Grader review" not in other
    precision = f"{ab.lesion_precision:.3f} ({ab.lesions_confirmed}/{ab.lesions_judged})"
    assert f"AB {n} of {n} 1.000 ({n - 1}/{n - 1}) 0.000 (0/1) {precision}" in text
    assert f"CD 1 of {n}" in text and cd.reviewed_bscans == 1
