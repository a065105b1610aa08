"""Tables of the study database (SQLAlchemy 2.0 declarative). These rows never leave `store/`.

The migrations under `migrations/versions` create the same tables with frozen code; a test compares
the migrated database with this module so the two cannot drift apart. Names of constraints are
explicit because PostgreSQL cuts identifiers at 63 characters and migrations refer to them by name.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from hrf_batch.io.volume import LAYER_SOURCES
from hrf_batch.results import FOVEA_METHODS, SUBFIELD_OUTSIDE, SUBFIELD_UNKNOWN, SUBFIELDS, ZONE_UNKNOWN, ZONES

#: Alembic's bookkeeping table; own name so a shared PostgreSQL database can host other projects.
VERSION_TABLE = "hrf_batch_schema_version"

RUN_STATUSES = ("running", "done", "failed")
LESION_ZONES = (*ZONES, ZONE_UNKNOWN)
LESION_SUBFIELDS = (*SUBFIELDS, SUBFIELD_OUTSIDE, SUBFIELD_UNKNOWN)
INGEST_ERROR_KINDS = ("error", "skipped")
EYES = ("OD", "OS", "unknown")

NAMING = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class PatientRow(Base):
    """One pseudonymous patient id; name and birth date live apart in `patient_identifiers`."""

    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(128), unique=True)
    visits: Mapped[list[VisitRow]] = relationship(back_populates="patient")


class PatientIdentifierRow(Base):
    """Identifying data, kept out of every view so reports and exports can leave it out."""

    __tablename__ = "patient_identifiers"
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), default="")
    birth_date: Mapped[date | None] = mapped_column(Date)


class VisitRow(Base):
    """A patient's visit; `visit_date` NULL means the files did not say when."""

    __tablename__ = "visits"
    __table_args__ = (UniqueConstraint("patient_pk", "visit_date", name="uq_visits_patient_date"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"))
    visit_date: Mapped[date | None] = mapped_column(Date)
    patient: Mapped[PatientRow] = relationship(back_populates="visits")


class VolumeRow(Base):
    """One OCT series, identified by the source file's hash and the series uid."""

    __tablename__ = "volumes"
    __table_args__ = (
        UniqueConstraint("source_sha256", "series_uid", name="uq_volumes_source"),
        CheckConstraint(_in("eye", EYES), name="eye"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    visit_pk: Mapped[int] = mapped_column(ForeignKey("visits.id", ondelete="CASCADE"), index=True)
    eye: Mapped[str] = mapped_column(String(8))
    source_path: Mapped[str] = mapped_column(Text)
    source_sha256: Mapped[str] = mapped_column(String(64))
    source_format: Mapped[str] = mapped_column(String(32))
    series_uid: Mapped[str] = mapped_column(String(128))
    device: Mapped[str] = mapped_column(String(256))
    scan_pattern: Mapped[str] = mapped_column(String(16))
    n_bscans: Mapped[int] = mapped_column(Integer)
    bscan_height: Mapped[int] = mapped_column(Integer)
    bscan_width: Mapped[int] = mapped_column(Integer)
    spacing_lateral_mm: Mapped[float] = mapped_column(Double)
    spacing_axial_mm: Mapped[float] = mapped_column(Double)
    spacing_between_mm: Mapped[float] = mapped_column(Double)
    positions: Mapped[list[Any]] = mapped_column(JSON)  # [[x0, y0, x1, y1], ...] in mm
    localizer_spacing_mm: Mapped[list[Any] | None] = mapped_column(JSON)
    acquired_at: Mapped[datetime | None] = mapped_column(DateTime)
    visit: Mapped[VisitRow] = relationship()


class RunRow(Base):
    """One pipeline run over one volume; the unique key makes a rerun with equal inputs visible."""

    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint(
            "volume_pk", "model_id", "segmenter", "segmenter_checkpoint_sha256", "params_hash",
            "code_version", name="uq_runs_inputs",
        ),
        CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        Index("ix_runs_volume_status", "volume_pk", "status"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    volume_pk: Mapped[int] = mapped_column(ForeignKey("volumes.id", ondelete="CASCADE"))
    model_id: Mapped[str] = mapped_column(String(128))
    segmenter: Mapped[str] = mapped_column(String(128))
    # '' when the segmenter has no checkpoint: NULL would defeat the unique key on both backends
    segmenter_checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    params_hash: Mapped[str] = mapped_column(String(64))
    code_version: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(64))
    seconds: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(8))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)
    volume: Mapped[VolumeRow] = relationship()
    bscans: Mapped[list[BScanRow]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True, order_by="BScanRow.bscan_index"
    )
    anatomy: Mapped[RunAnatomyRow | None] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )
    etdrs_thickness: Mapped[list[RunEtdrsThicknessRow]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True,
        order_by="RunEtdrsThicknessRow.subfield",
    )


class BScanRow(Base):
    """Per-B-scan result; masks are 1-bit PNG, relevance an 8-bit PNG scaled by `relevance_max`."""

    __tablename__ = "bscans"
    __table_args__ = (UniqueConstraint("run_pk", "bscan_index", name="uq_bscans_run_index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    bscan_index: Mapped[int] = mapped_column(Integer)
    scores: Mapped[list[Any]] = mapped_column(JSON)
    score: Mapped[float | None] = mapped_column(Double)  # classifier score of the original B-scan
    final_score: Mapped[float | None] = mapped_column(Double)  # score before the last iteration
    hrf_count: Mapped[int] = mapped_column(Integer)
    hrf_area_px: Mapped[int] = mapped_column(Integer)
    hrf_area_mm2: Mapped[float] = mapped_column(Double)
    relevance_peaks: Mapped[list[Any]] = mapped_column(JSON)
    mask_png: Mapped[bytes] = mapped_column(LargeBinary)
    relevance_png: Mapped[bytes | None] = mapped_column(LargeBinary)
    relevance_max: Mapped[float | None] = mapped_column(Double)
    run: Mapped[RunRow] = relationship(back_populates="bscans")
    lesions: Mapped[list[LesionRow]] = relationship(
        back_populates="bscan", cascade="all, delete-orphan", passive_deletes=True, order_by="LesionRow.lesion_index"
    )


class LesionRow(Base):
    """One HRF; `centroid_x_mm`/`centroid_y_mm` locate it on the localizer when positions are known;
    `zone` and `etdrs_subfield` say where it sits ('unknown' for lesions stored before anatomy)."""

    __tablename__ = "lesions"
    __table_args__ = (
        UniqueConstraint("bscan_pk", "lesion_index", name="uq_lesions_bscan_index"),
        CheckConstraint(_in("zone", LESION_ZONES), name="zone"),
        CheckConstraint(_in("etdrs_subfield", LESION_SUBFIELDS), name="etdrs_subfield"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bscan_pk: Mapped[int] = mapped_column(ForeignKey("bscans.id", ondelete="CASCADE"))
    lesion_index: Mapped[int] = mapped_column(Integer)
    centroid_row: Mapped[float] = mapped_column(Double)
    centroid_col: Mapped[float] = mapped_column(Double)
    bbox_row0: Mapped[int] = mapped_column(Integer)
    bbox_col0: Mapped[int] = mapped_column(Integer)
    bbox_row1: Mapped[int] = mapped_column(Integer)
    bbox_col1: Mapped[int] = mapped_column(Integer)
    area_px: Mapped[int] = mapped_column(Integer)
    area_mm2: Mapped[float] = mapped_column(Double)
    mask_png: Mapped[bytes] = mapped_column(LargeBinary)
    centroid_x_mm: Mapped[float | None] = mapped_column(Double)
    centroid_y_mm: Mapped[float | None] = mapped_column(Double)
    zone: Mapped[str] = mapped_column(String(16), default=ZONE_UNKNOWN, server_default=ZONE_UNKNOWN)
    etdrs_subfield: Mapped[str] = mapped_column(String(16), default=SUBFIELD_UNKNOWN, server_default=SUBFIELD_UNKNOWN)
    bscan: Mapped[BScanRow] = relationship(back_populates="lesions")


class RunAnatomyRow(Base):
    """Layer lines, fovea and mean thickness of one run; `layers_npz` is :func:`codec.encode_layers`'s
    blob (NULL without layer lines), the fovea columns are NULL when none was found (`fovea_note` says why)."""

    __tablename__ = "run_anatomy"
    __table_args__ = (
        CheckConstraint(f"layer_source IS NULL OR {_in('layer_source', LAYER_SOURCES)}", name="layer_source"),
        CheckConstraint(f"fovea_method IS NULL OR {_in('fovea_method', FOVEA_METHODS)}", name="fovea_method"),
    )
    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    layer_source: Mapped[str | None] = mapped_column(String(16))
    layer_names: Mapped[list[Any]] = mapped_column(JSON)
    estimated_layer_names: Mapped[list[Any]] = mapped_column(JSON)  # of a device set: lines the estimate added
    layers_npz: Mapped[bytes | None] = mapped_column(LargeBinary)
    fovea_bscan: Mapped[float | None] = mapped_column(Double)
    fovea_col: Mapped[float | None] = mapped_column(Double)
    fovea_x_mm: Mapped[float | None] = mapped_column(Double)
    fovea_y_mm: Mapped[float | None] = mapped_column(Double)
    fovea_method: Mapped[str | None] = mapped_column(String(16))
    fovea_note: Mapped[str] = mapped_column(Text)
    mean_thickness_um: Mapped[float | None] = mapped_column(Double)
    run: Mapped[RunRow] = relationship(back_populates="anatomy")


class RunEtdrsThicknessRow(Base):
    """Mean ILM–BM thickness of one run in one ETDRS subfield its scan covers."""

    __tablename__ = "run_etdrs_thickness"
    __table_args__ = (CheckConstraint(_in("subfield", SUBFIELDS), name="subfield"),)
    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    subfield: Mapped[str] = mapped_column(String(8), primary_key=True)
    mean_thickness_um: Mapped[float] = mapped_column(Double)
    run: Mapped[RunRow] = relationship(back_populates="etdrs_thickness")


class IngestErrorRow(Base):
    """A file an ingest left out: 'skipped' (not OCT) or 'error' (OCT that could not be read)."""

    __tablename__ = "ingest_errors"
    __table_args__ = (CheckConstraint(_in("kind", INGEST_ERROR_KINDS), name="kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(8))
    recorded_at: Mapped[datetime] = mapped_column(DateTime)
    batch_id: Mapped[str | None] = mapped_column(String(64), index=True)


REVIEW_VERDICTS = ("accept", "reject")


class ReviewLesionVerdictRow(Base):
    """A grader's accept/reject of one stored lesion of one run; their later decision replaces this row."""

    __tablename__ = "review_lesion_verdicts"
    __table_args__ = (
        UniqueConstraint("run_pk", "bscan_index", "lesion_index", "grader", name="uq_review_lesion_verdicts_key"),
        CheckConstraint(_in("verdict", REVIEW_VERDICTS), name="verdict"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    bscan_index: Mapped[int] = mapped_column(Integer)
    grader: Mapped[str] = mapped_column(String(128))
    lesion_index: Mapped[int] = mapped_column(Integer)
    verdict: Mapped[str] = mapped_column(String(8))
    decided_at: Mapped[datetime] = mapped_column(DateTime)


class ReviewAddedLesionRow(Base):
    """An HRF the model missed: a grader's click, outlined by the segmenter named in `segmenter`."""

    __tablename__ = "review_added_lesions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    bscan_index: Mapped[int] = mapped_column(Integer)
    grader: Mapped[str] = mapped_column(String(128))
    click_row: Mapped[int] = mapped_column(Integer)
    click_col: Mapped[int] = mapped_column(Integer)
    centroid_row: Mapped[float] = mapped_column(Double)
    centroid_col: Mapped[float] = mapped_column(Double)
    bbox_row0: Mapped[int] = mapped_column(Integer)
    bbox_col0: Mapped[int] = mapped_column(Integer)
    bbox_row1: Mapped[int] = mapped_column(Integer)
    bbox_col1: Mapped[int] = mapped_column(Integer)
    area_px: Mapped[int] = mapped_column(Integer)
    area_mm2: Mapped[float] = mapped_column(Double)
    mask_png: Mapped[bytes] = mapped_column(LargeBinary)
    segmenter: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ReviewBScanVerdictRow(Base):
    """A grader's "this B-scan has HRF: yes/no" for one run; their later decision replaces this row."""

    __tablename__ = "review_bscan_verdicts"
    __table_args__ = (UniqueConstraint("run_pk", "bscan_index", "grader", name="uq_review_bscan_verdicts_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    bscan_index: Mapped[int] = mapped_column(Integer)
    grader: Mapped[str] = mapped_column(String(128))
    has_hrf: Mapped[bool] = mapped_column(Boolean)
    decided_at: Mapped[datetime] = mapped_column(DateTime)
