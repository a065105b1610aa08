"""Turning a VolumeResult into rows: validate and encode first (no database), then write in one go.

The anatomy (layer lines, fovea, thickness) goes with the run; see :mod:`hrf_batch.store.anatomy`.

:func:`prepare` does all the numpy work and every check, so the transaction in :func:`persist` is short
and a bad result never touches the database. Patients, visits and volumes are upserted: a volume is the
same when its source file hash and series uid are; its metadata is refreshed from the latest reading.

Concurrent writers: on PostgreSQL a transaction that creates or updates a patient's rows first takes a
transaction advisory lock on the patient id (and one that records a file on its path), so two ingests
queue for the same patient instead of clashing on its unique keys or adding a second visit without a
date; on SQLite ``BEGIN IMMEDIATE`` already lets one writer in at a time.

Text reaches the tables through :func:`stored_meta` and :func:`~hrf_batch.io.discover.display_text`, so
both backends get the same rows: the patient id normalised by the readers' own rule, and file names that
are not UTF-8 (and any NUL, which PostgreSQL refuses) as ``\\xNN`` escapes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from hrf_batch.errors import VolumeError
from hrf_batch.io.discover import display_text
from hrf_batch.io.geometry import localizer_mm
from hrf_batch.io.volume import VolumeMeta, normalise_patient_id
from hrf_batch.results import BScanResult, Lesion, RunInfo, VolumeResult
from hrf_batch.store import anatomy, codec
from hrf_batch.store.claims import lock_key
from hrf_batch.store.errors import StoreError
from hrf_batch.store.schema import (
    BScanRow,
    IngestErrorRow,
    LesionRow,
    PatientIdentifierRow,
    PatientRow,
    RunRow,
    VisitRow,
    VolumeRow,
)

_BUG_HINT = "this is a bug in the pipeline output; please report it with the file that caused it"
NAME_MAX = 256  # patient_identifiers.name and volumes.device are VARCHAR(256)


def stored_meta(meta: VolumeMeta) -> VolumeMeta:
    """The metadata as it is stored: the patient id through the one normalisation rule (readers
    already apply it; a library caller's metadata gets the same), text columns valid UTF-8 without NUL."""
    try:
        patient_id = normalise_patient_id(meta.patient_id, meta.source_sha256)
    except VolumeError as exc:
        raise StoreError(f"{display_text(meta.source_path)}: {exc.problem}", "give the volume a patient id or its "
                         "source file's sha256") from exc
    return dataclasses.replace(
        meta,
        patient_id=patient_id,
        source_path=display_text(meta.source_path),
        series_uid=display_text(meta.series_uid),
        device=display_text(meta.device)[:NAME_MAX],
        patient_name=display_text(meta.patient_name)[:NAME_MAX],
    )


def utc_now() -> datetime:
    """Naive UTC: both backends store it the same way and it sorts correctly as text in SQLite."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class RunKey:
    """Everything that makes two runs the same run (the unique key of `runs` plus the volume)."""

    source_sha256: str
    series_uid: str
    model_id: str
    segmenter: str
    segmenter_checkpoint_sha256: str  # '' when the segmenter has no checkpoint
    params_hash: str
    code_version: str

    @classmethod
    def of(cls, meta: VolumeMeta, run: RunInfo) -> RunKey:
        return cls(
            meta.source_sha256, display_text(meta.series_uid), run.model_id, run.segmenter,
            run.segmenter_checkpoint_sha256 or "", codec.params_hash(run.parameters), run.code_version,
        )


@dataclass(frozen=True)
class Prepared:
    """A VolumeResult checked and encoded, ready to become rows."""

    meta: VolumeMeta
    run: RunInfo
    key: RunKey
    parameters: dict[str, Any]
    n_bscans: int
    bscan_shape: tuple[int, int]
    bscans: tuple[dict[str, Any], ...]  # BScanRow fields, plus 'lesions': LesionRow fields
    anatomy: dict[str, Any] | None = None  # RunAnatomyRow fields plus 'etdrs'; None: no anatomy stage


def prepare(result: VolumeResult) -> Prepared:
    """Check a result for consistency and encode its masks; raises StoreError before any write."""
    height, width = (int(s) for s in result.bscan_shape)
    if not result.bscans:
        raise StoreError(f"{result.meta.source_path}: result has no B-scans", _BUG_HINT)
    indices = [b.index for b in result.bscans]
    if len(set(indices)) != len(indices) or min(indices) < 0:
        raise StoreError(f"{result.meta.source_path}: B-scan indices repeat or are negative", _BUG_HINT)
    n_bscans = max(len(result.meta.positions), max(indices) + 1)
    bscans = tuple(_bscan_fields(b, result.meta, (height, width)) for b in result.bscans)
    meta = stored_meta(result.meta)
    fields = None
    if result.anatomy is not None:
        fields = anatomy.anatomy_fields(result.anatomy, width, display_text(result.meta.source_path))
    return Prepared(
        meta=meta, run=result.run, key=RunKey.of(meta, result.run),
        parameters=codec.normalise_parameters(result.run.parameters), n_bscans=n_bscans,
        bscan_shape=(height, width), bscans=bscans, anatomy=fields,
    )


def _bscan_fields(b: BScanResult, meta: VolumeMeta, shape: tuple[int, int]) -> dict[str, Any]:
    mask = np.asarray(b.mask)
    if mask.shape != shape:
        raise StoreError(f"B-scan {b.index}: mask shape {mask.shape} is not the B-scan shape {shape}", _BUG_HINT)
    scores = [float(s) for s in b.scores]
    if not all(math.isfinite(s) for s in scores):
        raise StoreError(f"B-scan {b.index}: scores {scores} are not all finite", _BUG_HINT)
    relevance_png, relevance_max = (None, None)
    if b.relevance is not None:
        relevance_png, relevance_max = codec.encode_relevance(b.relevance, shape)
    return {
        "bscan_index": int(b.index),
        "scores": scores,
        "score": scores[0] if scores else None,
        "final_score": scores[-1] if scores else None,
        "hrf_count": b.hrf_count,
        "hrf_area_px": b.hrf_area_px,
        "hrf_area_mm2": area_mm2(b.hrf_area_px, meta),
        "relevance_peaks": [[int(r), int(c)] for r, c in b.relevance_peaks],
        "mask_png": codec.encode_mask(mask),
        "relevance_png": relevance_png,
        "relevance_max": relevance_max,
        "lesions": [_lesion_fields(i, les, b.index, meta, shape) for i, les in enumerate(b.lesions)],
    }


def _lesion_fields(i: int, les: Lesion, index: int, meta: VolumeMeta, shape: tuple[int, int]) -> dict[str, Any]:
    r0, c0, r1, c1 = (int(v) for v in les.bbox_rc)
    if les.bscan_index != index or not (0 <= r0 < r1 <= shape[0] and 0 <= c0 < c1 <= shape[1]):
        raise StoreError(
            f"B-scan {index}: lesion {i} has B-scan {les.bscan_index} or box {les.bbox_rc} outside {shape}", _BUG_HINT
        )
    if np.shape(les.mask) != (r1 - r0, c1 - c0) or int(les.area_px) <= 0:
        raise StoreError(
            f"B-scan {index}: lesion {i} mask {np.shape(les.mask)} does not fit its box or has no area", _BUG_HINT
        )
    anatomy.check_lesion_place(les.zone, les.subfield, f"B-scan {index}: lesion {i}")
    row, col = (float(v) for v in les.centroid_rc)
    on_localizer = localizer_mm(meta, index, col, shape[1])
    return {
        "lesion_index": i, "centroid_row": row, "centroid_col": col,
        "bbox_row0": r0, "bbox_col0": c0, "bbox_row1": r1, "bbox_col1": c1,
        "area_px": int(les.area_px), "area_mm2": area_mm2(int(les.area_px), meta),
        "mask_png": codec.encode_mask(np.asarray(les.mask)),
        "centroid_x_mm": on_localizer[0] if on_localizer else None,
        "centroid_y_mm": on_localizer[1] if on_localizer else None,
        "zone": les.zone, "etdrs_subfield": les.subfield,
    }


def area_mm2(area_px: int, meta: VolumeMeta) -> float:
    """px × lateral × axial, multiplied in this order, as the SQL views do, so the numbers agree."""
    return area_px * float(meta.spacing.lateral_mm) * float(meta.spacing.axial_mm)


def persist(session: Session, prepared: Prepared, started_at: datetime, finished_at: datetime) -> RunRow:
    """Write a prepared result as a 'done' run; an existing done run with the same key is returned as is."""
    volume = upsert_volume(session, prepared.meta, prepared.n_bscans, prepared.bscan_shape)
    existing = _run_with_key(session, volume.id, prepared.key)
    if existing is not None and existing.status == "done":
        return existing
    if existing is not None:  # a failed or interrupted attempt with the same inputs: replace it
        session.delete(existing)
        session.flush()
    run = _new_run(volume, prepared.run, prepared.key, prepared.parameters, "done", started_at)
    run.finished_at = finished_at
    session.add(run)
    for fields in prepared.bscans:
        _add_bscan(run, fields)
    if prepared.anatomy is not None:
        run.anatomy = anatomy.anatomy_row(prepared.anatomy)
        run.etdrs_thickness = anatomy.thickness_rows(prepared.anatomy)
    session.flush()
    return run


def _add_bscan(run: RunRow, fields: dict[str, Any]) -> None:
    lesions = [LesionRow(**lesion) for lesion in fields["lesions"]]
    run.bscans.append(BScanRow(**{k: v for k, v in fields.items() if k != "lesions"}, lesions=lesions))


def persist_failed(
    session: Session, meta: VolumeMeta, n_bscans: int, bscan_shape: tuple[int, int], run: RunInfo, error: str,
    started_at: datetime,
) -> RunRow:
    """Record a run that failed; a done run with the same key stays untouched and is returned."""
    meta = stored_meta(meta)
    volume = upsert_volume(session, meta, n_bscans, bscan_shape)
    key = RunKey.of(meta, run)
    row = _run_with_key(session, volume.id, key)
    if row is None:
        row = _new_run(volume, run, key, codec.normalise_parameters(run.parameters), "failed", started_at)
        session.add(row)
    elif row.status == "done":
        return row
    row.status, row.error, row.started_at, row.finished_at = "failed", display_text(error), started_at, utc_now()
    session.flush()
    return row


def claim_run(
    session: Session, meta: VolumeMeta, n_bscans: int, bscan_shape: tuple[int, int], run: RunInfo,
    started_at: datetime,
) -> int | None:
    """Mark the volume's run 'running' before computing it (new row, or a failed or abandoned one taken
    over); returns its id, or None when a done run with the same key exists (nothing to do)."""
    meta = stored_meta(meta)
    volume = upsert_volume(session, meta, n_bscans, bscan_shape)
    key = RunKey.of(meta, run)
    row = _run_with_key(session, volume.id, key)
    if row is not None and row.status == "done":
        return None
    if row is None:
        row = _new_run(volume, run, key, codec.normalise_parameters(run.parameters), "running", started_at)
        session.add(row)
    else:
        row.status, row.error, row.started_at, row.finished_at = "running", None, started_at, None
    session.flush()
    return row.id


def drop_claim(session: Session, run_id: int) -> bool:
    """Delete run ``run_id`` if it is still 'running' (its claim ends with no result); True if it was."""
    gone = session.execute(delete(RunRow).where(RunRow.id == run_id, RunRow.status == "running"))
    return bool(gone.rowcount)


def _queue_for(session: Session, *parts: str) -> None:
    """PostgreSQL: wait for other transactions writing the same thing (``parts``) to end; SQLite already has
    one writer at a time. The lock ends with the transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key(*parts)})


def _new_run(
    volume: VolumeRow, run: RunInfo, key: RunKey, parameters: dict[str, Any], status: str, started_at: datetime
) -> RunRow:
    return RunRow(
        volume=volume, model_id=run.model_id, segmenter=run.segmenter,
        segmenter_checkpoint_sha256=key.segmenter_checkpoint_sha256, parameters=parameters,
        params_hash=key.params_hash, code_version=run.code_version, device=run.device,
        seconds={str(k): float(v) for k, v in run.seconds.items()}, status=status, started_at=started_at,
    )


def _run_with_key(session: Session, volume_pk: int, key: RunKey) -> RunRow | None:
    return session.scalars(
        select(RunRow).where(
            RunRow.volume_pk == volume_pk, RunRow.model_id == key.model_id, RunRow.segmenter == key.segmenter,
            RunRow.segmenter_checkpoint_sha256 == key.segmenter_checkpoint_sha256,
            RunRow.params_hash == key.params_hash, RunRow.code_version == key.code_version,
        )
    ).one_or_none()


def upsert_patient(session: Session, meta: VolumeMeta) -> PatientRow:
    """The patient row for ``meta.patient_id``; name/birth date are updated when the file has them."""
    _queue_for(session, "patient", meta.patient_id)
    patient = session.scalars(select(PatientRow).where(PatientRow.patient_id == meta.patient_id)).one_or_none()
    if patient is None:
        patient = PatientRow(patient_id=meta.patient_id)
        session.add(patient)
        session.flush()
    if meta.patient_name or meta.birth_date:
        ident = session.get(PatientIdentifierRow, patient.id) or PatientIdentifierRow(patient_pk=patient.id, name="")
        ident.name = meta.patient_name or ident.name
        ident.birth_date = meta.birth_date or ident.birth_date
        session.add(ident)
    return patient


def upsert_visit(session: Session, patient: PatientRow, visit_date: date | None) -> VisitRow:
    """The visit of ``patient`` on ``visit_date``; None (date unknown) is one visit of its own."""
    same_date = VisitRow.visit_date.is_(None) if visit_date is None else VisitRow.visit_date == visit_date
    visit = session.scalars(select(VisitRow).where(VisitRow.patient_pk == patient.id, same_date)).one_or_none()
    if visit is None:
        visit = VisitRow(patient=patient, visit_date=visit_date)
        session.add(visit)
        session.flush()
    return visit


def upsert_volume(session: Session, meta: VolumeMeta, n_bscans: int, bscan_shape: tuple[int, int]) -> VolumeRow:
    """The volume row for (source hash, series uid), its metadata refreshed from ``meta``."""
    visit = upsert_visit(session, upsert_patient(session, meta), meta.visit_date)
    volume = session.scalars(
        select(VolumeRow).where(VolumeRow.source_sha256 == meta.source_sha256, VolumeRow.series_uid == meta.series_uid)
    ).one_or_none()
    if volume is None:
        volume = VolumeRow(source_sha256=meta.source_sha256, series_uid=meta.series_uid)
        session.add(volume)
    volume.visit = visit
    volume.eye, volume.source_path, volume.source_format = meta.eye, meta.source_path, meta.source_format
    volume.device, volume.scan_pattern, volume.n_bscans = meta.device, meta.scan_pattern, int(n_bscans)
    volume.bscan_height, volume.bscan_width = (int(s) for s in bscan_shape)
    volume.spacing_lateral_mm = float(meta.spacing.lateral_mm)
    volume.spacing_axial_mm = float(meta.spacing.axial_mm)
    volume.spacing_between_mm = float(meta.spacing.between_bscans_mm)
    volume.positions = [[*map(float, p.start_mm), *map(float, p.end_mm)] for p in meta.positions]
    volume.localizer_spacing_mm = list(meta.localizer_spacing_mm) if meta.localizer_spacing_mm else None
    volume.acquired_at = meta.acquired_at
    session.flush()
    return volume


def add_ingest_error(session: Session, path: str, reason: str, kind: str, batch_id: str | None) -> None:
    """One row in `ingest_errors`; ``kind`` is checked so a typo cannot hide a file."""
    if kind not in ("error", "skipped"):
        raise StoreError(f"ingest error kind must be 'error' or 'skipped', got {kind!r}", "pass one of the two kinds")
    path, reason = display_text(path), display_text(reason)
    _queue_for(session, "ingest error", path)
    # the same file left out for the same reason again (a rerun) refreshes its row, adds none
    existing = session.scalars(
        select(IngestErrorRow).where(IngestErrorRow.path == str(path), IngestErrorRow.reason == reason,
                                     IngestErrorRow.kind == kind)
    ).first()
    if existing is not None:
        existing.recorded_at, existing.batch_id = utc_now(), batch_id
        return
    session.add(IngestErrorRow(path=str(path), reason=reason, kind=kind, recorded_at=utc_now(), batch_id=batch_id))
