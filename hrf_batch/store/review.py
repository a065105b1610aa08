"""Grader review rows in and out: verdicts on a run's lesions, lesions a grader added, B-scan HRF yes/no.

Every function takes an open session (the :class:`~hrf_batch.store.api.Store` runs it in one
transaction). Verdicts only ever name a *done* run and a B-scan/lesion that run stored, so a verdict
can never point at nothing; a grader's later decision replaces their own row (upsert on the unique
key), never another grader's, and never the model's rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from hrf_batch.io.discover import display_text
from hrf_batch.store import codec, read
from hrf_batch.store.errors import StoreError
from hrf_batch.store.records import (
    AddedLesion,
    BScanVerdict,
    LesionVerdict,
    ReviewProgress,
    ReviewState,
    RunRecord,
    StoredVolume,
)
from hrf_batch.store.schema import (
    REVIEW_VERDICTS,
    BScanRow,
    LesionRow,
    PatientRow,
    ReviewAddedLesionRow,
    ReviewBScanVerdictRow,
    ReviewLesionVerdictRow,
    RunRow,
    VisitRow,
    VolumeRow,
)

GRADER_MAX = 128  # VARCHAR(128) in the review tables
_RUN_HINT = "take run ids, B-scan and lesion indices from the stored results (Store.volume_results)"


def check_grader(name: str) -> str:
    """The grader name as stored (trimmed, valid UTF-8); StoreError for an empty or too long name."""
    cleaned = display_text(str(name)).strip()
    if not cleaned:
        raise StoreError("the grader name is empty", "give a grader name, e.g. your initials")
    if len(cleaned) > GRADER_MAX:
        raise StoreError(f"the grader name is {len(cleaned)} characters long; at most {GRADER_MAX} fit",
                         "use a shorter grader name, e.g. your initials")
    return cleaned


def run_record(session: Session, run_id: int) -> RunRecord:
    """The run with this id, whatever its status; StoreError when there is none."""
    run = session.get(RunRow, run_id)
    if run is None:
        raise StoreError(f"no run {run_id} in the database", _RUN_HINT)
    return read.run_record(run)


def run_volume(session: Session, run_id: int, masks: bool = True) -> StoredVolume:
    """The volume of one run (any run, not only the latest) with that run's B-scans and anatomy."""
    run = session.get(RunRow, run_id)
    if run is None:
        raise StoreError(f"no run {run_id} in the database", _RUN_HINT)
    volume = session.get(VolumeRow, run.volume_pk)
    visit = session.get(VisitRow, volume.visit_pk)
    patient = session.get(PatientRow, visit.patient_pk)
    return read._stored_volume(  # the one place a volume row becomes a StoredVolume
        volume, run, patient.patient_id, visit.visit_date, read.bscans_for_run(session, run_id, masks),
        read.run_anatomy(session, run_id, masks))


def _done_run(session: Session, run_id: int) -> RunRow:
    run = session.get(RunRow, run_id)
    if run is None:
        raise StoreError(f"no run {run_id} in the database", _RUN_HINT)
    if run.status != "done":
        raise StoreError(f"run {run_id} is {run.status!r}, not done; only finished runs can be reviewed", _RUN_HINT)
    return run


def _bscan(session: Session, run_id: int, bscan_index: int) -> BScanRow:
    _done_run(session, run_id)
    row = session.scalars(
        select(BScanRow).where(BScanRow.run_pk == run_id, BScanRow.bscan_index == bscan_index)
    ).one_or_none()
    if row is None:
        raise StoreError(f"run {run_id} has no B-scan {bscan_index}", _RUN_HINT)
    return row


def save_lesion_verdict(session: Session, run_id: int, bscan_index: int, lesion_index: int, grader: str,
                        verdict: str, decided_at: datetime) -> LesionVerdict:
    """Store (or replace this grader's) 'accept'/'reject' of one stored lesion."""
    if verdict not in REVIEW_VERDICTS:
        raise StoreError(f"verdict {verdict!r} is not one of {REVIEW_VERDICTS}", "accept or reject the lesion")
    grader = check_grader(grader)
    bscan = _bscan(session, run_id, bscan_index)
    exists = session.scalars(
        select(LesionRow.id).where(LesionRow.bscan_pk == bscan.id, LesionRow.lesion_index == lesion_index)
    ).first()
    if exists is None:
        raise StoreError(f"B-scan {bscan_index} of run {run_id} has no lesion {lesion_index}", _RUN_HINT)
    row = session.scalars(select(ReviewLesionVerdictRow).where(
        ReviewLesionVerdictRow.run_pk == run_id, ReviewLesionVerdictRow.bscan_index == bscan_index,
        ReviewLesionVerdictRow.lesion_index == lesion_index, ReviewLesionVerdictRow.grader == grader,
    )).one_or_none()
    if row is None:
        row = ReviewLesionVerdictRow(run_pk=run_id, bscan_index=bscan_index, lesion_index=lesion_index, grader=grader)
        session.add(row)
    row.verdict, row.decided_at = verdict, decided_at
    session.flush()
    return _lesion_verdict(row)


def delete_lesion_verdict(session: Session, run_id: int, bscan_index: int, lesion_index: int, grader: str) -> bool:
    """Withdraw this grader's verdict on one lesion; False when there was none."""
    result = session.execute(delete(ReviewLesionVerdictRow).where(
        ReviewLesionVerdictRow.run_pk == run_id, ReviewLesionVerdictRow.bscan_index == bscan_index,
        ReviewLesionVerdictRow.lesion_index == lesion_index, ReviewLesionVerdictRow.grader == check_grader(grader),
    ))
    return bool(result.rowcount)


def save_bscan_verdict(session: Session, run_id: int, bscan_index: int, grader: str, has_hrf: bool,
                       decided_at: datetime) -> BScanVerdict:
    """Store (or replace this grader's) "B-scan has HRF: yes/no"."""
    grader = check_grader(grader)
    _bscan(session, run_id, bscan_index)
    row = session.scalars(select(ReviewBScanVerdictRow).where(
        ReviewBScanVerdictRow.run_pk == run_id, ReviewBScanVerdictRow.bscan_index == bscan_index,
        ReviewBScanVerdictRow.grader == grader,
    )).one_or_none()
    if row is None:
        row = ReviewBScanVerdictRow(run_pk=run_id, bscan_index=bscan_index, grader=grader)
        session.add(row)
    row.has_hrf, row.decided_at = bool(has_hrf), decided_at
    session.flush()
    return _bscan_verdict(row)


def delete_bscan_verdict(session: Session, run_id: int, bscan_index: int, grader: str) -> bool:
    """Withdraw this grader's HRF yes/no on one B-scan; False when there was none."""
    result = session.execute(delete(ReviewBScanVerdictRow).where(
        ReviewBScanVerdictRow.run_pk == run_id, ReviewBScanVerdictRow.bscan_index == bscan_index,
        ReviewBScanVerdictRow.grader == check_grader(grader),
    ))
    return bool(result.rowcount)


def save_added_lesion(session: Session, run_id: int, bscan_index: int, grader: str, click_rc: tuple[int, int],
                      mask: np.ndarray, segmenter: str, created_at: datetime) -> AddedLesion:
    """Store a grader's lesion: ``mask`` is the full B-scan-sized bool mask the segmenter drew at the click."""
    grader = check_grader(grader)
    bscan = _bscan(session, run_id, bscan_index)
    volume = session.get(VolumeRow, bscan.run.volume_pk)
    shape = (volume.bscan_height, volume.bscan_width)
    arr = np.asarray(mask)
    if arr.dtype != np.bool_ or arr.shape != shape:
        raise StoreError(f"the added lesion's mask is {arr.dtype} {arr.shape}, not a bool mask of the B-scan's "
                         f"shape {shape}", "pass the segmenter's mask pasted into a B-scan-sized bool array")
    if not arr.any():
        raise StoreError(f"the segmenter found nothing at row {click_rc[0]}, column {click_rc[1]} of B-scan "
                         f"{bscan_index}", "click on the bright spot itself, or choose another point")
    row_c, col_c = int(click_rc[0]), int(click_rc[1])
    if not (0 <= row_c < shape[0] and 0 <= col_c < shape[1]):
        raise StoreError(f"the click ({row_c}, {col_c}) is outside the B-scan ({shape[0]} × {shape[1]})",
                         "click inside the image")
    rows, cols = np.nonzero(arr)
    r0, c0, r1, c1 = int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1
    area_px = int(rows.size)
    row = ReviewAddedLesionRow(
        run_pk=run_id, bscan_index=bscan_index, grader=grader, click_row=row_c, click_col=col_c,
        centroid_row=float(rows.mean()), centroid_col=float(cols.mean()),
        bbox_row0=r0, bbox_col0=c0, bbox_row1=r1, bbox_col1=c1, area_px=area_px,
        area_mm2=area_px * volume.spacing_lateral_mm * volume.spacing_axial_mm,
        mask_png=codec.encode_mask(np.ascontiguousarray(arr[r0:r1, c0:c1])),
        segmenter=display_text(segmenter)[:128], created_at=created_at,
    )
    session.add(row)
    session.flush()
    return _added(row, masks=True)


def delete_added_lesion(session: Session, added_id: int, grader: str) -> bool:
    """Remove a lesion this grader added (undo); False when no such lesion of theirs exists."""
    result = session.execute(delete(ReviewAddedLesionRow).where(
        ReviewAddedLesionRow.id == added_id, ReviewAddedLesionRow.grader == check_grader(grader),
    ))
    return bool(result.rowcount)


def review_states(session: Session, run_ids: Sequence[int] | None = None, grader: str | None = None,
                  masks: bool = True) -> list[ReviewState]:
    """The review rows of the given runs (None: every run that has any), one grader's or everyone's, by run id.

    A run asked for by id comes back even without rows (empty tuples), so callers need not special-case it.
    """
    rows: dict[type, list] = {}
    for table in (ReviewLesionVerdictRow, ReviewAddedLesionRow, ReviewBScanVerdictRow):
        stmt = select(table)
        if run_ids is not None:
            stmt = stmt.where(table.run_pk.in_(list(run_ids)))
        if grader is not None:
            stmt = stmt.where(table.grader == check_grader(grader))
        rows[table] = list(session.scalars(stmt))
    wanted = set(run_ids) if run_ids is not None else {r.run_pk for found in rows.values() for r in found}
    volumes = dict(session.execute(select(RunRow.id, RunRow.volume_pk).where(RunRow.id.in_(wanted))).all())
    missing = wanted - volumes.keys()
    if missing:
        raise StoreError(f"no run {min(missing)} in the database", _RUN_HINT)
    by_run: dict[int, dict[type, list]] = defaultdict(lambda: defaultdict(list))
    for table, found in rows.items():
        for row in found:
            by_run[row.run_pk][table].append(row)
    out = []
    for run_id in sorted(wanted):
        mine = by_run[run_id]
        out.append(ReviewState(
            run_id=run_id, volume_id=volumes[run_id],
            lesion_verdicts=tuple(sorted((_lesion_verdict(r) for r in mine[ReviewLesionVerdictRow]),
                                         key=lambda v: (v.bscan_index, v.lesion_index, v.grader))),
            added_lesions=tuple(sorted((_added(r, masks) for r in mine[ReviewAddedLesionRow]),
                                       key=lambda a: (a.bscan_index, a.grader, a.added_id))),
            bscan_verdicts=tuple(sorted((_bscan_verdict(r) for r in mine[ReviewBScanVerdictRow]),
                                        key=lambda v: (v.bscan_index, v.grader))),
        ))
    return out


def review_progress(session: Session, run_ids: Sequence[int], grader: str | None = None) -> list[ReviewProgress]:
    """How much of each run is reviewed, in the order asked; with ``grader`` None a lesion or B-scan counts
    as decided (accepted, rejected) when any grader decided it (so)."""
    ids = list(dict.fromkeys(run_ids))
    if not ids:
        return []
    volumes = dict(session.execute(select(RunRow.id, RunRow.volume_pk).where(RunRow.id.in_(ids))).all())
    missing = set(ids) - volumes.keys()
    if missing:
        raise StoreError(f"no run {min(missing)} in the database", _RUN_HINT)
    n_bscans = _counts(session, select(BScanRow.run_pk, func.count()).where(BScanRow.run_pk.in_(ids))
                       .group_by(BScanRow.run_pk))
    n_lesions = _counts(session, select(BScanRow.run_pk, func.count()).join(LesionRow, LesionRow.bscan_pk == BScanRow.id)
                        .where(BScanRow.run_pk.in_(ids)).group_by(BScanRow.run_pk))
    states = {s.run_id: s for s in review_states(session, ids, grader, masks=False)}
    out = []
    for run_id in ids:
        state = states[run_id]
        verdicts: dict[tuple[int, int], set[str]] = defaultdict(set)
        for v in state.lesion_verdicts:
            verdicts[(v.bscan_index, v.lesion_index)].add(v.verdict)
        out.append(ReviewProgress(
            run_id=run_id, volume_id=volumes[run_id], grader=None if grader is None else check_grader(grader),
            n_bscans=n_bscans.get(run_id, 0), n_lesions=n_lesions.get(run_id, 0),
            lesions_decided=len(verdicts),
            lesions_accepted=sum("accept" in v for v in verdicts.values()),
            lesions_rejected=sum("reject" in v for v in verdicts.values()),
            lesions_added=len(state.added_lesions),
            bscans_decided=len({v.bscan_index for v in state.bscan_verdicts}),
        ))
    return out


def _counts(session: Session, stmt) -> dict[int, int]:  # noqa: ANN001 - a grouped (run, count) select
    return {int(run): int(n) for run, n in session.execute(stmt)}


def _lesion_verdict(row: ReviewLesionVerdictRow) -> LesionVerdict:
    return LesionVerdict(row.run_pk, row.bscan_index, row.lesion_index, row.grader, row.verdict, row.decided_at)


def _bscan_verdict(row: ReviewBScanVerdictRow) -> BScanVerdict:
    return BScanVerdict(row.run_pk, row.bscan_index, row.grader, bool(row.has_hrf), row.decided_at)


def _added(row: ReviewAddedLesionRow, masks: bool) -> AddedLesion:
    return AddedLesion(
        added_id=row.id, run_id=row.run_pk, bscan_index=row.bscan_index, grader=row.grader,
        click_rc=(row.click_row, row.click_col), centroid_rc=(row.centroid_row, row.centroid_col),
        bbox_rc=(row.bbox_row0, row.bbox_col0, row.bbox_row1, row.bbox_col1), area_px=row.area_px,
        area_mm2=row.area_mm2, mask=codec.decode_mask(row.mask_png) if masks else None,
        segmenter=row.segmenter, created_at=row.created_at,
    )
