"""Grader review rows in the study database (migration 0004) on SQLite and PostgreSQL: verdicts replace only
their grader's own, several graders per run, a new run starts unreviewed, undo, progress, refusals."""

from __future__ import annotations

import dataclasses
from datetime import date, datetime

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from hrf_batch.results import BScanResult, Lesion, RunInfo, VolumeResult
from hrf_batch.store import StoreError, head_revision, open_store, upgrade
from hrf_batch.store.engine import _alembic_config, make_engine, resolve_url, writer
from hrf_batch.store.schema import VERSION_TABLE, Base

from conftest import make_test_volume
from conftest_store import row_counts

SHAPE = (40, 64)
REVIEW_TABLES = ("review_lesion_verdicts", "review_added_lesions", "review_bscan_verdicts")
MODEL_TABLES = ("runs", "bscans", "lesions")
T0 = datetime(2026, 1, 2, 3, 4, 5)


def make_result(lesions: tuple[int, ...] = (2, 0, 1), model: str = "cct-old") -> VolumeResult:
    """A 3-B-scan result with ``lesions[i]`` square lesions on B-scan i."""
    meta = dataclasses.replace(make_test_volume(n=len(lesions), height=SHAPE[0], width=SHAPE[1]).meta,
                               patient_id="P1", visit_date=date(2024, 3, 5), source_sha256="a" * 64,
                               source_path="/study/a.vol")
    bscans = []
    for index, n in enumerate(lesions):
        mask = np.zeros(SHAPE, dtype=bool)
        found = []
        for k in range(n):
            r0, c0 = 5 + 10 * k, 4 + 12 * k
            crop = np.ones((3, 4), dtype=bool)
            mask[r0:r0 + 3, c0:c0 + 4] = True
            found.append(Lesion(index, (r0 + 1.0, c0 + 1.5), (r0, c0, r0 + 3, c0 + 4), 12, crop))
        bscans.append(BScanResult(index=index, scores=(0.9, 0.1), relevance_peaks=(), mask=mask, lesions=tuple(found)))
    run = RunInfo(model_id=model, segmenter="region-growing", segmenter_checkpoint_sha256=None,
                  parameters={"threshold": 0.05}, code_version="0.1.0", device="cpu")
    return VolumeResult(meta=meta, bscan_shape=SHAPE, bscans=tuple(bscans), run=run)


def blob(r0: int, c0: int, h: int = 3, w: int = 2) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[r0:r0 + h, c0:c0 + w] = True
    return mask


def test_the_migrated_review_tables_match_the_models(store_url: str) -> None:
    open_store(store_url).close()
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            assert context.get_current_revision() == head_revision() >= "0004"
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_verdicts_round_trip_and_a_later_decision_replaces_only_the_graders_own(store_url: str) -> None:
    with open_store(store_url) as store:
        run = store.save_volume_result(make_result()).run_id
        first = store.save_lesion_verdict(run, 0, 0, "AB", "accept", decided_at=T0)
        store.save_lesion_verdict(run, 0, 0, "CD", "reject", decided_at=T0)
        store.save_lesion_verdict(run, 0, 0, "AB", "reject", decided_at=datetime(2026, 1, 3))
        store.save_lesion_verdict(run, 0, 1, "AB", "accept")
        store.save_bscan_verdict(run, 1, "AB", False, decided_at=T0)
        store.save_bscan_verdict(run, 1, "AB", True)
        store.save_bscan_verdict(run, 2, " CD ", True)
        state = store.review_state(run)
        only_ab = store.review_state(run, grader="AB")
    assert first.verdict == "accept" and first.decided_at == T0 and first.run_id == run
    assert [(v.bscan_index, v.lesion_index, v.grader, v.verdict) for v in state.lesion_verdicts] == [
        (0, 0, "AB", "reject"), (0, 0, "CD", "reject"), (0, 1, "AB", "accept")]
    assert state.lesion_verdicts[0].decided_at == datetime(2026, 1, 3)
    assert [(v.bscan_index, v.grader, v.has_hrf) for v in state.bscan_verdicts] == [(1, "AB", True), (2, "CD", True)]
    assert state.graders == ("AB", "CD") and only_ab.graders == ("AB",) and len(only_ab.lesion_verdicts) == 2
    assert row_counts(store_url, REVIEW_TABLES) == {
        "review_lesion_verdicts": 3, "review_added_lesions": 0, "review_bscan_verdicts": 2}


def test_an_added_lesion_keeps_its_mask_and_can_be_undone_by_its_grader_only(store_url: str) -> None:
    with open_store(store_url) as store:
        run = store.save_volume_result(make_result()).run_id
        added = store.save_added_lesion(run, 1, "AB", (21, 31), blob(20, 30), "region-growing")
        (again,) = store.review_state(run).added_lesions
        assert not store.delete_added_lesion(added.added_id, "CD")
        assert store.review_state(run).added_lesions != ()
        assert store.delete_added_lesion(added.added_id, "AB")
        assert not store.delete_added_lesion(added.added_id, "AB")
        assert store.review_state(run).added_lesions == ()
    assert again.bbox_rc == (20, 30, 23, 32) and again.area_px == 6 and again.click_rc == (21, 31)
    assert again.centroid_rc == (21.0, 30.5) and again.segmenter == "region-growing" and again.grader == "AB"
    assert np.array_equal(again.mask, np.ones((3, 2), dtype=bool))
    assert again.area_mm2 == pytest.approx(6 * 0.01182 * 0.00387)


def test_verdicts_can_be_withdrawn(store_url: str) -> None:
    with open_store(store_url) as store:
        run = store.save_volume_result(make_result()).run_id
        store.save_lesion_verdict(run, 0, 0, "AB", "accept")
        store.save_bscan_verdict(run, 0, "AB", True)
        assert not store.delete_lesion_verdict(run, 0, 0, "CD")
        assert store.delete_lesion_verdict(run, 0, 0, "AB") and store.delete_bscan_verdict(run, 0, "AB")
        assert not store.delete_bscan_verdict(run, 0, "AB")
        state = store.review_state(run)
    assert state.lesion_verdicts == () and state.bscan_verdicts == ()


def test_a_new_run_starts_unreviewed_and_the_old_verdicts_stay_with_the_old_run(store_url: str) -> None:
    with open_store(store_url) as store:
        old = store.save_volume_result(make_result()).run_id
        store.save_lesion_verdict(old, 0, 1, "AB", "reject")
        store.save_added_lesion(old, 1, "AB", (21, 31), blob(20, 30), "region-growing")
        before = row_counts(store_url, MODEL_TABLES)
        new = store.save_volume_result(make_result((1, 1, 1), model="cct-new")).run_id
        (volume,) = store.volume_results("P1", masks=False)
        reviewed = store.reviewed_runs()
        progress = store.review_progress([new, old])
    assert new != old and volume.run.run_id == new
    assert [s.run_id for s in reviewed] == [old] and len(reviewed[0].lesion_verdicts) == 1
    assert [p.run_id for p in progress] == [new, old]
    assert (progress[0].lesions_decided, progress[0].lesions_added, progress[0].n_lesions) == (0, 0, 3)
    assert (progress[1].lesions_decided, progress[1].lesions_added, progress[1].n_lesions) == (1, 1, 3)
    assert row_counts(store_url, MODEL_TABLES)["lesions"] == before["lesions"] + 3  # the model's rows untouched


def test_progress_counts_lesions_and_bscans_per_grader_and_for_anyone(store_url: str) -> None:
    with open_store(store_url) as store:
        run = store.save_volume_result(make_result()).run_id  # 3 lesions on 3 B-scans
        store.save_lesion_verdict(run, 0, 0, "AB", "accept")
        store.save_lesion_verdict(run, 0, 1, "AB", "reject")
        store.save_lesion_verdict(run, 0, 1, "CD", "accept")
        store.save_lesion_verdict(run, 2, 0, "CD", "accept")
        for index in range(3):
            store.save_bscan_verdict(run, index, "AB", index != 1)
        (ab,) = store.review_progress([run], grader="AB")
        (anyone,) = store.review_progress([run])
        (cd,) = store.review_progress([run], grader="CD")
    assert (ab.n_bscans, ab.n_lesions, ab.lesions_decided, ab.lesions_accepted, ab.lesions_rejected) == (3, 3, 2, 1, 1)
    assert ab.bscans_decided == 3 and not ab.done and ab.grader == "AB"
    assert (anyone.lesions_decided, anyone.lesions_accepted, anyone.lesions_rejected) == (3, 3, 1)
    assert anyone.done and anyone.grader is None
    assert (cd.lesions_decided, cd.bscans_decided, cd.done) == (2, 0, False)


@pytest.mark.parametrize(("call", "message"), [
    (lambda s, run: s.save_lesion_verdict(run, 0, 5, "AB", "accept"), "has no lesion 5"),
    (lambda s, run: s.save_lesion_verdict(run, 9, 0, "AB", "accept"), "has no B-scan 9"),
    (lambda s, run: s.save_lesion_verdict(run + 100, 0, 0, "AB", "accept"), "no run"),
    (lambda s, run: s.save_lesion_verdict(run, 0, 0, "AB", "maybe"), "is not one of"),
    (lambda s, run: s.save_lesion_verdict(run, 0, 0, "   ", "accept"), "grader name is empty"),
    (lambda s, run: s.save_bscan_verdict(run, 0, "x" * 129, True), "at most 128"),
    (lambda s, run: s.save_added_lesion(run, 0, "AB", (1, 1), np.zeros(SHAPE, bool), "region-growing"),
     "found nothing"),
    (lambda s, run: s.save_added_lesion(run, 0, "AB", (1, 1), np.ones((4, 4), bool), "region-growing"),
     "not a bool mask of the B-scan's shape"),
    (lambda s, run: s.save_added_lesion(run, 0, "AB", (99, 1), blob(1, 1), "region-growing"), "outside the B-scan"),
    (lambda s, run: s.review_progress([run, run + 100]), "no run"),
])
def test_bad_review_input_is_refused_with_a_message_and_writes_nothing(tmp_path, call, message: str) -> None:
    url = f"sqlite:///{tmp_path / 'study.sqlite'}"
    with open_store(url) as store:
        run = store.save_volume_result(make_result()).run_id
        with pytest.raises(StoreError, match=message):
            call(store, run)
    assert set(row_counts(url, REVIEW_TABLES).values()) == {0}


def test_a_run_that_is_not_done_cannot_be_reviewed(tmp_path) -> None:
    result = make_result()
    with open_store(str(tmp_path / "s.sqlite")) as store:
        failed = store.record_failed_run(result.meta, result.run, "boom", n_bscans=3, bscan_shape=SHAPE)
        with pytest.raises(StoreError, match="'failed', not done"):
            store.save_bscan_verdict(failed.run_id, 0, "AB", True)
        assert store.run_record(failed.run_id).status == "failed"


def test_the_review_tables_downgrade_to_0003_keeping_the_results_and_upgrades_again(store_url: str) -> None:
    with open_store(store_url) as store:
        run = store.save_volume_result(make_result()).run_id
        store.save_lesion_verdict(run, 0, 0, "AB", "accept")
    before = row_counts(store_url, MODEL_TABLES)
    engine = make_engine(resolve_url(store_url))
    try:
        with writer(engine).begin() as conn:
            command.downgrade(_alembic_config(conn), "0003")
        with engine.connect() as conn:
            tables = {r[0] for r in conn.execute(text(
                "SELECT table_name FROM information_schema.tables" if engine.dialect.name == "postgresql"
                else "SELECT name FROM sqlite_master WHERE type = 'table'"))}
    finally:
        engine.dispose()
    assert not tables & set(REVIEW_TABLES) and row_counts(store_url, MODEL_TABLES) == before
    assert upgrade(store_url) == head_revision()
    with open_store(store_url) as store:
        assert store.review_state(run).lesion_verdicts == ()
