"""The study database on SQLite and PostgreSQL: schema, round trips, reruns, views, atomicity, upgrades."""

from __future__ import annotations

import dataclasses
import math
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from hrf_batch.results import BScanResult, Lesion, RunInfo, VolumeResult
from hrf_batch.store import (
    SchemaOutdatedError,
    StoreError,
    head_revision,
    open_store,
    params_hash,
    upgrade,
    write,
)
from hrf_batch.store.codec import decode_mask, decode_relevance, encode_mask, encode_relevance
from hrf_batch.store.schema import VERSION_TABLE, Base

from conftest import PROJECT_ROOT, make_test_volume, readme_queries
from conftest_store import row_counts

ASSETS = Path(__file__).with_name("assets")
TABLES = ("patients", "patient_identifiers", "visits", "volumes", "runs", "bscans", "lesions", "ingest_errors")
VIEWS = ("hrf_burden_volume", "hrf_burden_visit", "hrf_burden_patient")
SHAPE = (40, 64)


def make_meta(patient: str = "P012", eye: str = "OD", visit: date | None = date(2024, 3, 5), sha: str = "a"):
    meta = make_test_volume(n=3, height=SHAPE[0], width=SHAPE[1], eye=eye).meta
    return dataclasses.replace(
        meta, patient_id=patient, visit_date=visit, source_sha256=sha * 64, series_uid="S1", source_path=f"/study/{sha}.vol"
    )


def make_bscan(index: int, n_lesions: int, rng: np.random.Generator) -> BScanResult:
    mask = np.zeros(SHAPE, dtype=bool)
    lesions = []
    for k in range(n_lesions):
        r0, c0, h, w = 5 + 9 * k, 3 + 13 * k, 4 + k, 5
        crop = rng.random((h, w)) > 0.4
        crop[h // 2, w // 2] = True
        mask[r0 : r0 + h, c0 : c0 + w] |= crop
        rows, cols = np.nonzero(crop)
        lesions.append(Lesion(index, (r0 + rows.mean(), c0 + cols.mean()), (r0, c0, r0 + h, c0 + w), int(crop.sum()), crop))
    relevance = rng.normal(size=(SHAPE[0] // 4, SHAPE[1] // 4)).astype(np.float32)
    relevance[0, 0] = 0.0
    return BScanResult(
        index=index, scores=(0.91, 0.42, 0.03)[: n_lesions + 1], mask=mask, lesions=tuple(lesions),
        relevance_peaks=tuple((7 + k, 9 + k) for k in range(n_lesions)), relevance=relevance,
    )


def make_run(model: str = "cct-1a2b", params: dict | None = None) -> RunInfo:
    return RunInfo(
        model_id=model, segmenter="region-growing", segmenter_checkpoint_sha256=None,
        parameters=params if params is not None else {"threshold": 0.05, "crop_px": (50, 100), "iterations": 6},
        code_version="0.1.0", device="cpu", seconds={"score": 1.25, "segment": 0.5},
    )


def make_result(meta=None, lesions=(0, 2, 1), run: RunInfo | None = None, seed: int = 0) -> VolumeResult:
    rng = np.random.default_rng(seed)
    bscans = tuple(make_bscan(i, n, rng) for i, n in enumerate(lesions))
    return VolumeResult(meta=meta or make_meta(), bscan_shape=SHAPE, bscans=bscans, run=run or make_run())


def test_new_database_is_created_at_head_and_matches_the_models(store_url: str) -> None:
    open_store(store_url).close()
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            found = inspect(conn)
            assert set(TABLES) <= set(found.get_table_names())
            assert set(VIEWS) <= set(found.get_view_names())
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            assert context.get_current_revision() == head_revision() == "0005"
            # the frozen migrations and the ORM models describe the same schema
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_round_trip_keeps_masks_relevance_and_counts(store_url: str) -> None:
    result = make_result()
    with open_store(store_url) as store:
        record = store.save_volume_result(result)
        (volume,) = store.volume_results("P012")
        again = store.bscans_for_run(record.run_id)
    assert record.status == "done" and record.segmenter_checkpoint_sha256 is None
    assert record.parameters == {"threshold": 0.05, "crop_px": [50, 100], "iterations": 6}
    assert record.params_hash == params_hash(result.run.parameters) and record.seconds == {"score": 1.25, "segment": 0.5}
    assert volume.run == record and volume.n_bscans == 3 and volume.bscan_shape == SHAPE
    assert volume.visit_date == date(2024, 3, 5) and volume.positions == result.meta.positions
    assert volume.spacing == result.meta.spacing
    lat, ax = result.meta.spacing.lateral_mm, result.meta.spacing.axial_mm
    for original, stored, stored_again in zip(result.bscans, volume.bscans, again):
        assert stored.index == stored_again.index == original.index
        assert np.array_equal(stored.mask, original.mask) and stored.mask.dtype == np.bool_
        assert stored.scores == original.scores and stored.score == original.scores[0]
        assert stored.final_score == original.scores[-1] and stored.relevance_peaks == original.relevance_peaks
        assert stored.hrf_count == original.hrf_count and stored.hrf_area_px == original.hrf_area_px
        assert stored.hrf_area_mm2 == original.hrf_area_px * lat * ax
        peak = float(np.abs(original.relevance).max())
        assert stored.relevance_max == pytest.approx(peak)
        assert np.abs(stored.relevance - original.relevance).max() <= peak / 254 + 1e-6
        assert stored.relevance[0, 0] == 0.0
        for les, got in zip(original.lesions, stored.lesions):
            assert np.array_equal(got.mask, les.mask) and got.bbox_rc == les.bbox_rc and got.area_px == les.area_px
            assert got.centroid_rc == pytest.approx(les.centroid_rc)
            start, end = result.meta.positions[les.bscan_index].start_mm, result.meta.positions[les.bscan_index].end_mm
            t = les.centroid_rc[1] / (SHAPE[1] - 1)
            assert got.centroid_mm == pytest.approx((start[0] + t * (end[0] - start[0]), start[1]))
    assert sum(b.hrf_count for b in volume.bscans) == result.hrf_count == 3


def test_rerun_with_same_inputs_is_found_and_is_a_no_op(store_url: str) -> None:
    result = make_result()
    meta, run = result.meta, result.run
    key = (
        meta.source_sha256, meta.series_uid, run.model_id, run.segmenter, None, params_hash(run.parameters),
        run.code_version,
    )
    with open_store(store_url) as store:
        assert store.find_done_run(*key) is None
        first = store.save_volume_result(result)
        assert store.find_done_run(*key) == first == store.find_done_run_for(meta, run)
        # key order and tuple/list do not change the hash, other values do
        reordered = dict(reversed(list(run.parameters.items())), crop_px=[50, 100])
        assert store.find_done_run(*key[:5], params_hash(reordered), key[6]) == first
        assert store.find_done_run(*key[:5], params_hash({**run.parameters, "threshold": 0.1}), key[6]) is None
        assert store.find_done_run(*key[:2], "other-model", *key[3:]) is None
        assert store.save_volume_result(result).run_id == first.run_id
        counts = row_counts(store_url, TABLES)
        assert (counts["runs"], counts["bscans"], counts["lesions"], counts["volumes"]) == (1, 3, 3, 1)
        newer = store.save_volume_result(make_result(lesions=(1, 1, 1), run=make_run(model="cct-9f8e")))
        assert newer.run_id != first.run_id
        (volume,) = store.volume_results("P012", masks=False)
        assert volume.run.run_id == newer.run_id and volume.bscans[0].mask is None  # latest done run


def test_failed_run_is_recorded_and_replaced_by_a_successful_one(store_url: str) -> None:
    result = make_result()
    with open_store(store_url) as store:
        failed = store.record_failed_run(result.meta, result.run, "out of memory", n_bscans=3, bscan_shape=SHAPE)
        assert failed.status == "failed" and failed.error == "out of memory"
        assert store.find_done_run_for(result.meta, result.run) is None
        assert store.view_rows("hrf_burden_volume") == []  # views only show done runs
        done = store.save_volume_result(result)
        assert done.status == "done" and store.find_done_run_for(result.meta, result.run) == done
        assert row_counts(store_url, TABLES)["runs"] == 1


def test_a_save_that_fails_midway_leaves_no_rows(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_add = write._add_bscan

    def failing_add(run, fields):
        calls.append(fields["bscan_index"])
        if len(calls) == 2:
            raise RuntimeError("disk pulled out mid-save")
        real_add(run, fields)

    with open_store(store_url) as store:
        monkeypatch.setattr(write, "_add_bscan", failing_add)
        with pytest.raises(RuntimeError, match="mid-save"):
            store.save_volume_result(make_result())
        assert calls == [0, 1]
        assert row_counts(store_url, TABLES) == dict.fromkeys(TABLES, 0)
        monkeypatch.setattr(write, "_add_bscan", real_add)
        store.save_volume_result(make_result())
        assert row_counts(store_url, TABLES)["bscans"] == 3


def test_an_inconsistent_result_is_refused_before_writing(store_url: str) -> None:
    good = make_result()
    bad_bscan = dataclasses.replace(good.bscans[1], mask=np.zeros((SHAPE[0], SHAPE[1] + 1), dtype=bool))
    with open_store(store_url) as store:
        with pytest.raises(StoreError, match="mask shape") as info:
            store.save_volume_result(dataclasses.replace(good, bscans=(good.bscans[0], bad_bscan)))
        assert "report it" in str(info.value)
        assert row_counts(store_url, TABLES) == dict.fromkeys(TABLES, 0)


def save_study(url: str) -> None:
    """Two patients, both eyes, repeat visits, two volumes at one visit, an undated one, reruns."""
    with open_store(url) as store:
        store.save_volume_result(make_result(make_meta("P1", "OD", date(2023, 1, 10), "b"), lesions=(1, 0, 2), seed=1))
        store.save_volume_result(make_result(make_meta("P1", "OD", date(2024, 1, 9), "c"), lesions=(2, 2, 1), seed=2))
        store.save_volume_result(make_result(make_meta("P1", "OD", date(2024, 1, 9), "d"), lesions=(0, 1, 0), seed=3))
        old = make_result(make_meta("P1", "OS", date(2024, 1, 9), "e"), lesions=(2, 2, 2), seed=4)
        store.save_volume_result(old)
        rerun = dataclasses.replace(old, bscans=make_result(lesions=(0, 0, 1)).bscans, run=make_run("cct-new"))
        store.save_volume_result(rerun)
        store.save_volume_result(make_result(make_meta("P2", "OS", None, "f"), lesions=(1, 1, 0), seed=5))
        store.record_ingest_error("/study/x.dcm", "CT image, not OCT", "skipped", batch_id="b1")


def test_views_give_identical_rows_on_sqlite_and_postgresql(tmp_path: Path, pg_cluster) -> None:  # noqa: F811
    urls = {"sqlite": f"sqlite:///{tmp_path / 'study.sqlite'}", "postgresql": pg_cluster.create_database()}
    rows = {}
    for backend, url in urls.items():
        save_study(url)
        with open_store(url) as store:
            rows[backend] = {view: store.view_rows(view) for view in VIEWS}
    for views in rows.values():  # the time a run finished is the one thing that differs
        views["hrf_burden_volume"] = [dataclasses.replace(v, finished_at=None) for v in views["hrf_burden_volume"]]
    assert rows["sqlite"] == rows["postgresql"]
    visits = {(v.patient_id, v.visit_date, v.eye): v for v in rows["sqlite"]["hrf_burden_visit"]}
    first, second = visits[("P1", date(2023, 1, 10), "OD")], visits[("P1", date(2024, 1, 9), "OD")]
    assert (first.hrf_count, first.n_volumes, first.delta_hrf_count, first.previous_visit_date) == (3, 1, None, None)
    assert (second.hrf_count, second.n_volumes, second.n_bscans, second.hrf_positive_bscans) == (6, 2, 6, 4)
    assert second.delta_hrf_count == 3 and second.previous_visit_date == date(2023, 1, 10)
    assert second.delta_hrf_area_mm2 == pytest.approx(second.hrf_area_mm2 - first.hrf_area_mm2, abs=1e-9)
    assert visits[("P1", date(2024, 1, 9), "OS")].hrf_count == 1  # latest done run (cct-new), not the first
    assert visits[("P2", None, "OS")].delta_hrf_count is None
    patients = {p.patient_id: p for p in rows["sqlite"]["hrf_burden_patient"]}
    p1 = patients["P1"]
    assert (p1.n_visits, p1.latest_hrf_count, p1.max_hrf_count, p1.hrf_count_change) == (2, 7, 7, 4)
    assert (p1.first_visit_date, p1.latest_visit_date) == (date(2023, 1, 10), date(2024, 1, 9))
    assert (patients["P2"].n_visits, patients["P2"].latest_hrf_count) == (1, None)
    volume_area = sum(
        v.hrf_area_px for v in rows["sqlite"]["hrf_burden_volume"]
        if (v.patient_id, v.visit_date, v.eye) == ("P1", date(2024, 1, 9), "OD")
    )
    assert second.hrf_area_mm2 == pytest.approx(volume_area * 0.01182 * 0.00387, abs=1e-9)


def test_patient_readers_hide_identifiers_unless_asked(store_url: str) -> None:
    save_study(store_url)
    with open_store(store_url) as store:
        plain = {p.patient_id: p for p in store.list_patients()}
        named = {p.patient_id: p for p in store.list_patients(include_identifiers=True)}
        summary = store.patient_summary("P1")
        errors = store.ingest_errors("b1")
        with pytest.raises(StoreError, match="no patient 'P9'"):
            store.patient_summary("P9")
        with pytest.raises(StoreError, match="'error' or 'skipped'"):
            store.record_ingest_error("/x", "why", "oops")
    assert (plain["P1"].n_visits, plain["P1"].n_volumes, plain["P1"].name) == (2, 4, None)
    assert (named["P1"].name, named["P1"].birth_date) == ("Jane Roe", date(1950, 6, 1))
    assert [v.visit_date for v in summary.visits] == [date(2023, 1, 10), date(2024, 1, 9), date(2024, 1, 9)]
    assert summary.patient.latest_hrf_count == 7 and len(summary.volumes) == 4
    assert [(e.path, e.kind, e.batch_id) for e in errors] == [("/study/x.dcm", "skipped", "b1")]


def test_old_sqlite_database_is_refused_then_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    shutil.copy(ASSETS / "store_0001.sqlite", path)
    with pytest.raises(SchemaOutdatedError, match="hrf-batch db upgrade") as info:
        open_store(str(path))
    assert (info.value.current, info.value.head) == ("0001", "0005")
    assert upgrade(str(path)) == "0005"
    with open_store(f"sqlite:///{path}") as store:
        (volume,) = store.view_rows("hrf_burden_volume")
        (stored,) = store.volume_results("OLD01")
    assert (volume.patient_id, volume.eye, volume.hrf_count, volume.hrf_positive_bscans) == ("OLD01", "OS", 1, 1)
    assert volume.hrf_area_px == 4 and volume.hrf_area_mm2 == pytest.approx(4 * 0.01 * 0.004)
    assert stored.bscans[1].mask.sum() == 4 and stored.bscans[1].lesions[0].mask.all()


def test_old_postgresql_database_is_refused_then_upgraded(pg_cluster) -> None:  # noqa: F811
    url = pg_cluster.create_database()
    assert upgrade(url, "0001") == "0001"
    with pytest.raises(SchemaOutdatedError, match="run `hrf-batch db upgrade`"):
        open_store(url)
    assert upgrade(url) == "0005"
    with open_store(url) as store:
        store.save_volume_result(make_result())
        assert store.view_rows("hrf_burden_patient")[0].latest_hrf_count == 3


def test_database_from_a_newer_version_or_a_bad_url_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.sqlite'}"
    open_store(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(StoreError, match="newer hrf-batch"):
        open_store(url)
    with pytest.raises(StoreError, match="SQLite or PostgreSQL"):
        open_store("mysql://localhost/db")
    with pytest.raises(StoreError, match="does not exist"):
        open_store(str(tmp_path / "missing-folder" / "db.sqlite"))


def test_default_database_is_a_sqlite_file_in_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store(None) as store:
        assert store.backend == "sqlite"
    assert (tmp_path / "hrf_batch.sqlite").is_file()


def test_codec_is_exact_for_masks_and_bounded_for_relevance() -> None:
    rng = np.random.default_rng(7)
    for shape in ((1, 1), (3, 17), (496, 1024)):
        mask = rng.random(shape) > 0.9
        assert np.array_equal(decode_mask(encode_mask(mask)), mask)
    with pytest.raises(StoreError, match="bool"):
        encode_mask(np.zeros((4, 4), dtype=np.uint8))
    full = rng.normal(size=(40, 64))  # full resolution: stored at 1/4 per side
    data, peak = encode_relevance(full, (40, 64))
    small = decode_relevance(data, peak)
    blocks = full.reshape(10, 4, 16, 4).mean(axis=(1, 3))
    assert small.shape == (10, 16) and np.abs(small - blocks).max() <= peak / 254 + 1e-6
    zeros, zero_peak = encode_relevance(np.zeros((5, 5)), (40, 64))
    assert zero_peak == 0.0 and not decode_relevance(zeros, zero_peak).any()
    with pytest.raises(StoreError, match="JSON"):
        params_hash({"bad": math.nan})


def test_migrations_ship_inside_the_package() -> None:
    from setuptools import find_packages

    from hrf_batch.store.engine import MIGRATIONS_DIR

    packages = find_packages(str(PROJECT_ROOT), include=["hrf_batch*"])
    assert {"hrf_batch.store.migrations", "hrf_batch.store.migrations.versions"} <= set(packages)
    assert MIGRATIONS_DIR == PROJECT_ROOT / "hrf_batch" / "store" / "migrations"
    revisions = sorted(p.name for p in (MIGRATIONS_DIR / "versions").glob("0*.py"))
    assert revisions == ["0001_core_tables.py", "0002_burden_views.py", "0003_anatomy.py", "0004_review.py",
                         "0005_review_views.py"]


def test_readme_queries_give_the_designed_answers(store_url: str) -> None:
    """The README's example SQL, run as written on both backends, against a cohort built to know the answers."""
    designed = {  # (patient, eye, visit): lesions per B-scan
        ("P001", "OD", date(2024, 1, 10)): (1, 0, 0), ("P001", "OD", date(2024, 4, 10)): (2, 1, 0),
        ("P001", "OS", date(2024, 1, 10)): (0, 0, 0), ("P001", "OS", date(2024, 4, 10)): (1, 0, 0),
        ("P002", "OD", date(2024, 2, 1)): (2, 2, 0), ("P002", "OD", date(2024, 5, 1)): (1, 0, 0),
    }
    areas = {}
    with open_store(store_url) as store:
        for k, ((patient, eye, visit), lesions) in enumerate(designed.items()):
            result = make_result(make_meta(patient, eye, visit, sha="abcdef"[k]), lesions=lesions, seed=k)
            store.save_volume_result(result)
            sp = result.meta.spacing
            areas[(patient, eye, visit)] = sum(b.hrf_area_px for b in result.bscans) * sp.lateral_mm * sp.axial_mm
    grew, per_visit = readme_queries()[:2]
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            grew_rows = [tuple(r) for r in conn.execute(text(grew))]
            visit_rows = [tuple(r) for r in conn.execute(text(per_visit))]
    finally:
        engine.dispose()
    # P001: 1 HRF at the first visit (both eyes), 4 at the latest: +3; P002 went from 4 to 1 and is not listed
    assert [(p, n, str(first), str(last), change) for p, n, first, last, change in grew_rows] == \
        [("P001", 2, "2024-01-10", "2024-04-10", 3)]
    expected = [  # patient, visit, eye, count, positive B-scans, delta; ordered by patient, eye, visit
        ("P001", "2024-01-10", "OD", 1, 1, None), ("P001", "2024-04-10", "OD", 3, 2, 2),
        ("P001", "2024-01-10", "OS", 0, 0, None), ("P001", "2024-04-10", "OS", 1, 1, 1),
        ("P002", "2024-02-01", "OD", 4, 2, None), ("P002", "2024-05-01", "OD", 1, 1, -3),
    ]
    assert [(p, str(d), e, n, pos, delta) for p, d, e, n, pos, _, delta in visit_rows] == expected
    for p, d, e, _, _, area, _ in visit_rows:
        assert area == pytest.approx(areas[(p, e, date.fromisoformat(str(d)))], rel=1e-6, abs=1e-9)
