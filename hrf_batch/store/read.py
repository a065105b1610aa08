"""Reading rows back as the plain dataclasses of `records.py`, masks decoded to numpy.

"Latest done run" is defined once, in the `hrf_burden_volume` view (see migration 0002), and
:func:`volume_results` reads the run ids from that view so reports and SQL users see the same run.
Rows are sorted in Python because PostgreSQL sorts text by the server's locale and SQLite by bytes.
The grader review views of migration 0005 are read the same way (:class:`ReviewBScan`, :class:`ReviewAgreement`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeVar

from sqlalchemy import Date, DateTime, distinct, func, select, text
from sqlalchemy.orm import Session, selectinload

from hrf_batch.io.volume import BScanPosition, Spacing
from hrf_batch.results import SUBFIELDS, ZONE_UNKNOWN, ZONES
from hrf_batch.store import codec
from hrf_batch.store.anatomy import stored_anatomy
from hrf_batch.store.errors import StoreError
from hrf_batch.store.records import (
    EtdrsBurden,
    IngestErrorRecord,
    LayerBurden,
    PatientBurden,
    PatientRecord,
    PatientSummary,
    RunRecord,
    StoredAnatomy,
    StoredBScan,
    StoredLesion,
    StoredVolume,
    VisitBurden,
    VolumeBurden,
)
from hrf_batch.store.schema import (
    BScanRow,
    IngestErrorRow,
    PatientIdentifierRow,
    PatientRow,
    RunAnatomyRow,
    RunEtdrsThicknessRow,
    RunRow,
    VisitRow,
    VolumeRow,
)
from hrf_batch.store.write import RunKey


@dataclass(frozen=True)
class ReviewBScan:
    """A row of the `hrf_review_bscans` view: one grader's decisions on one B-scan of a run, and the
    truth derived from them (definitions in migration 0005)."""

    run_id: int
    volume_id: int
    model_id: str
    patient_id: str
    visit_date: date | None
    eye: str
    bscan_index: int
    grader: str
    tool_count: int
    lesions_accepted: int
    lesions_rejected: int
    lesions_undecided: int
    lesions_added: int
    bscan_verdict: bool | None  # the grader's "HRF yes/no"; None when not given
    finished: bool
    grader_has_hrf: bool | None  # None while not finished
    grader_count: int | None  # None while unknown
    lesions_judged: int
    lesions_confirmed: int
    lesions_missed: int


@dataclass(frozen=True)
class ReviewAgreement:
    """A row of the `hrf_review_agreement` view: the tool against one grader on one run's finished
    B-scans (definitions in migration 0005; None where a denominator is 0)."""

    run_id: int
    volume_id: int
    model_id: str
    patient_id: str
    visit_date: date | None
    eye: str
    grader: str
    n_bscans: int
    reviewed_bscans: int
    tp_bscans: int
    fn_bscans: int
    fp_bscans: int
    tn_bscans: int
    lesions_judged: int
    lesions_confirmed: int
    lesions_missed: int
    counted_bscans: int
    tool_count: int
    grader_count: int
    abs_count_error: int
    equal_count_bscans: int
    sensitivity: float | None
    specificity: float | None
    lesion_precision: float | None
    lesion_recall: float | None
    mean_abs_count_error: float | None
    count_bias: float | None
    equal_count_share: float | None


VIEWS: dict[str, type] = {
    "hrf_burden_volume": VolumeBurden,
    "hrf_burden_visit": VisitBurden,
    "hrf_burden_patient": PatientBurden,
    "hrf_burden_etdrs": EtdrsBurden,
    "hrf_burden_layer": LayerBurden,
    "hrf_review_bscans": ReviewBScan,
    "hrf_review_agreement": ReviewAgreement,
}
#: Integer 1/0 columns (booleans differ between the engines) read back as bool.
_BOOL_COLUMNS = ("bscan_verdict", "finished", "grader_has_hrf")
#: Subfields and zones are listed in their anatomical order, not alphabetically.
_ORDER = {name: i for i, name in enumerate((*SUBFIELDS, *ZONES, ZONE_UNKNOWN))}
_TYPED_COLUMNS = {
    "visit_date": Date, "previous_visit_date": Date, "first_visit_date": Date, "latest_visit_date": Date,
    "finished_at": DateTime,
}
T = TypeVar("T")


def run_record(row: RunRow) -> RunRecord:
    """A run row as a RunRecord ('' checkpoint hash back to None)."""
    return RunRecord(
        run_id=row.id, volume_id=row.volume_pk, model_id=row.model_id, segmenter=row.segmenter,
        segmenter_checkpoint_sha256=row.segmenter_checkpoint_sha256 or None, parameters=dict(row.parameters),
        params_hash=row.params_hash, code_version=row.code_version, device=row.device,
        seconds=dict(row.seconds), status=row.status, started_at=row.started_at, finished_at=row.finished_at,
        error=row.error,
    )


def find_done_run(session: Session, key: RunKey) -> RunRecord | None:
    """The done run with exactly these inputs, if any."""
    row = session.scalars(
        select(RunRow).join(VolumeRow, RunRow.volume_pk == VolumeRow.id).where(
            VolumeRow.source_sha256 == key.source_sha256, VolumeRow.series_uid == key.series_uid,
            RunRow.model_id == key.model_id, RunRow.segmenter == key.segmenter,
            RunRow.segmenter_checkpoint_sha256 == key.segmenter_checkpoint_sha256,
            RunRow.params_hash == key.params_hash, RunRow.code_version == key.code_version,
            RunRow.status == "done",
        )
    ).one_or_none()
    return run_record(row) if row is not None else None


def stored_bscan(row: BScanRow, masks: bool) -> StoredBScan:
    """A B-scan row with its lesions; masks and relevance decoded only when ``masks``."""
    lesions = tuple(
        StoredLesion(
            lesion_index=les.lesion_index, bscan_index=row.bscan_index,
            centroid_rc=(les.centroid_row, les.centroid_col),
            bbox_rc=(les.bbox_row0, les.bbox_col0, les.bbox_row1, les.bbox_col1), area_px=les.area_px,
            area_mm2=les.area_mm2,
            centroid_mm=(les.centroid_x_mm, les.centroid_y_mm) if les.centroid_x_mm is not None else None,
            mask=codec.decode_mask(les.mask_png) if masks else None, zone=les.zone, subfield=les.etdrs_subfield,
        )
        for les in row.lesions
    )
    relevance = None
    if masks and row.relevance_png is not None:
        relevance = codec.decode_relevance(row.relevance_png, row.relevance_max or 0.0)
    return StoredBScan(
        index=row.bscan_index, scores=tuple(row.scores), score=row.score, final_score=row.final_score,
        hrf_count=row.hrf_count, hrf_area_px=row.hrf_area_px, hrf_area_mm2=row.hrf_area_mm2,
        relevance_peaks=tuple((int(r), int(c)) for r, c in row.relevance_peaks),
        mask=codec.decode_mask(row.mask_png) if masks else None, relevance=relevance,
        relevance_max=row.relevance_max, lesions=lesions,
    )


def bscans_for_run(session: Session, run_id: int, masks: bool = True) -> tuple[StoredBScan, ...]:
    """All B-scans of one run in index order; StoreError when the run does not exist."""
    if session.get(RunRow, run_id) is None:
        raise StoreError(f"no run {run_id} in the database", "take run ids from find_done_run or volume_results")
    rows = session.scalars(
        select(BScanRow).where(BScanRow.run_pk == run_id).order_by(BScanRow.bscan_index)
        .options(selectinload(BScanRow.lesions))
    ).all()
    return tuple(stored_bscan(row, masks) for row in rows)


def volume_results(session: Session, patient_id: str, masks: bool = True) -> list[StoredVolume]:
    """The patient's volumes, each with the B-scans of its latest done run, by visit date and eye."""
    summary = view_rows(session, "hrf_burden_volume", patient_id)
    out = []
    for burden in summary:
        volume = session.get(VolumeRow, burden.volume_id)
        run = session.get(RunRow, burden.run_id)
        out.append(_stored_volume(volume, run, burden.patient_id, burden.visit_date,
                                  bscans_for_run(session, burden.run_id, masks), run_anatomy(session, run.id, masks)))
    return out


def run_anatomy(session: Session, run_id: int, layers: bool = True) -> StoredAnatomy | None:
    """The anatomy stored with a run (layer lines decoded only when ``layers``); None for runs without."""
    row = session.get(RunAnatomyRow, run_id)
    if row is None:
        return None
    thickness = session.scalars(select(RunEtdrsThicknessRow).where(RunEtdrsThicknessRow.run_pk == run_id)).all()
    return stored_anatomy(row, list(thickness), layers)


def unfinished_volumes(session: Session, patient_id: str) -> list[StoredVolume]:
    """The patient's volumes without a done run, each with its latest run (failed or running) and no B-scans.

    Reports list them so a reader sees which scans were not analysed, instead of silently fewer volumes.
    """
    has_done = select(RunRow.id).where(RunRow.volume_pk == VolumeRow.id, RunRow.status == "done").exists()
    stmt = (
        select(VolumeRow, VisitRow.visit_date)
        .join(VisitRow, VolumeRow.visit_pk == VisitRow.id)
        .join(PatientRow, VisitRow.patient_pk == PatientRow.id)
        .where(PatientRow.patient_id == patient_id, ~has_done)
    )
    out = []
    for volume, visit_date in session.execute(stmt).all():
        run = session.scalars(
            select(RunRow).where(RunRow.volume_pk == volume.id).order_by(RunRow.started_at.desc(), RunRow.id.desc())
        ).first()
        if run is None:
            continue
        out.append(_stored_volume(volume, run, patient_id, visit_date, ()))
    return sorted(out, key=_sort_key)


def _stored_volume(volume: VolumeRow, run: RunRow, patient_id: str, visit_date: date | None,
                   bscans: tuple[StoredBScan, ...], anatomy: StoredAnatomy | None = None) -> StoredVolume:
    return StoredVolume(
        volume_id=volume.id, patient_id=patient_id, visit_date=visit_date, eye=volume.eye,
        source_path=volume.source_path, source_sha256=volume.source_sha256, source_format=volume.source_format,
        series_uid=volume.series_uid, device=volume.device, scan_pattern=volume.scan_pattern,
        n_bscans=volume.n_bscans, bscan_shape=(volume.bscan_height, volume.bscan_width),
        spacing=Spacing(volume.spacing_lateral_mm, volume.spacing_axial_mm, volume.spacing_between_mm),
        positions=tuple(BScanPosition((p[0], p[1]), (p[2], p[3])) for p in volume.positions),
        acquired_at=volume.acquired_at, run=run_record(run), bscans=bscans, anatomy=anatomy,
    )


def _sort_key(row: Any) -> tuple:
    visit_date = getattr(row, "visit_date", None)
    return (
        row.patient_id, visit_date is None, visit_date or date.min, getattr(row, "eye", ""),
        getattr(row, "volume_id", 0), _ORDER.get(getattr(row, "subfield", None) or getattr(row, "zone", None), 0),
        getattr(row, "run_id", 0), getattr(row, "bscan_index", 0), getattr(row, "grader", ""),
    )


def view_rows(session: Session, view: str, patient_id: str | None = None) -> list[Any]:
    """Rows of one burden or review view as its dataclass, optionally for one patient, in a stable order."""
    if view not in VIEWS:
        raise StoreError(f"unknown view {view!r}", f"use one of {', '.join(VIEWS)}")
    record = VIEWS[view]
    names = [f.name for f in dataclasses.fields(record)]
    one = patient_id is not None  # an empty id is an id ('' = stored without one), never "everyone"
    sql = f"SELECT {', '.join(names)} FROM {view}" + (" WHERE patient_id = :patient_id" if one else "")
    typed = {name: kind for name, kind in _TYPED_COLUMNS.items() if name in names}
    result = session.execute(text(sql).columns(**typed), {"patient_id": patient_id} if one else {})
    return sorted((record(**_booleans(row._mapping)) for row in result), key=_sort_key)


def _booleans(mapping: Any) -> dict[str, Any]:
    out = dict(mapping)
    for name in _BOOL_COLUMNS:
        if out.get(name) is not None:
            out[name] = bool(out[name])
    return out


def patient_summary(session: Session, patient_id: str) -> PatientSummary:
    """The patient's burden over time; StoreError when the patient is not in the database."""
    if session.scalars(select(PatientRow.id).where(PatientRow.patient_id == patient_id)).first() is None:
        raise StoreError(f"no patient {patient_id!r} in the database", "check the id against the list of patients")
    rows = view_rows(session, "hrf_burden_patient", patient_id)
    patient = rows[0] if rows else PatientBurden(patient_id, 0, None, None, None, None, None, None, None)
    return PatientSummary(
        patient=patient,
        visits=tuple(view_rows(session, "hrf_burden_visit", patient_id)),
        volumes=tuple(view_rows(session, "hrf_burden_volume", patient_id)),
        etdrs=tuple(view_rows(session, "hrf_burden_etdrs", patient_id)),
        layers=tuple(view_rows(session, "hrf_burden_layer", patient_id)),
    )


def list_patients(session: Session, include_identifiers: bool = False) -> list[PatientRecord]:
    """Every patient with visit and volume counts; names and birth dates only on request."""
    stmt = (
        select(
            PatientRow.id, PatientRow.patient_id, func.count(distinct(VolumeRow.visit_pk)),
            func.count(VolumeRow.id), func.min(VisitRow.visit_date), func.max(VisitRow.visit_date),
        )
        .select_from(PatientRow)
        .outerjoin(VisitRow, VisitRow.patient_pk == PatientRow.id)
        .outerjoin(VolumeRow, VolumeRow.visit_pk == VisitRow.id)
        .group_by(PatientRow.id, PatientRow.patient_id)
    )
    identifiers: dict[int, PatientIdentifierRow] = {}
    if include_identifiers:
        identifiers = {row.patient_pk: row for row in session.scalars(select(PatientIdentifierRow))}
    out = []
    for pk, patient_id, n_visits, n_volumes, first, latest in session.execute(stmt):
        ident = identifiers.get(pk)
        out.append(PatientRecord(
            patient_id, n_visits, n_volumes, first, latest,
            name=ident.name if ident else None, birth_date=ident.birth_date if ident else None,
        ))
    return sorted(out, key=lambda p: p.patient_id)


def ingest_errors(session: Session, batch_id: str | None = None) -> list[IngestErrorRecord]:
    """Files left out by ingests, oldest first; only one batch's when ``batch_id`` is given."""
    stmt = select(IngestErrorRow).order_by(IngestErrorRow.recorded_at, IngestErrorRow.id)
    if batch_id is not None:
        stmt = stmt.where(IngestErrorRow.batch_id == batch_id)
    return [
        IngestErrorRecord(row.path, row.reason, row.kind, row.recorded_at, row.batch_id)
        for row in session.scalars(stmt)
    ]
