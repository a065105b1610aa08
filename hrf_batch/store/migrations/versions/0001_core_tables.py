"""Core tables: patients, identifiers, visits, volumes, runs, B-scans, lesions, ingest errors.

Revision ID: 0001
Revises:
Create Date: 2025-11-26

Written out in full (not imported from schema.py) so this revision keeps creating the schema it
created on the day it was written, whatever later code looks like.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _pk() -> sa.Column:
    return sa.Column("id", sa.Integer(), nullable=False)


def _fk(name: str, target: str, table: str) -> sa.Column:
    return sa.Column(
        name, sa.Integer(), sa.ForeignKey(f"{target}.id", ondelete="CASCADE", name=f"fk_{table}_{name}"), nullable=False
    )


def _create_people() -> None:
    op.create_table(
        "patients", _pk(), sa.Column("patient_id", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_patients"),
        sa.UniqueConstraint("patient_id", name="uq_patients_patient_id"),
    )
    op.create_table(
        "patient_identifiers",
        sa.Column(
            "patient_pk", sa.Integer(),
            sa.ForeignKey("patients.id", ondelete="CASCADE", name="fk_patient_identifiers_patient_pk"), nullable=False,
        ),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("birth_date", sa.Date(), nullable=True),
        sa.PrimaryKeyConstraint("patient_pk", name="pk_patient_identifiers"),
    )
    op.create_table(
        "visits", _pk(), _fk("patient_pk", "patients", "visits"), sa.Column("visit_date", sa.Date(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_visits"),
        sa.UniqueConstraint("patient_pk", "visit_date", name="uq_visits_patient_date"),
    )


def _create_volumes() -> None:
    op.create_table(
        "volumes", _pk(), _fk("visit_pk", "visits", "volumes"),
        sa.Column("eye", sa.String(8), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=False),
        sa.Column("source_sha256", sa.String(64), nullable=False),
        sa.Column("source_format", sa.String(32), nullable=False),
        sa.Column("series_uid", sa.String(128), nullable=False),
        sa.Column("device", sa.String(256), nullable=False),
        sa.Column("scan_pattern", sa.String(16), nullable=False),
        sa.Column("n_bscans", sa.Integer(), nullable=False),
        sa.Column("bscan_height", sa.Integer(), nullable=False),
        sa.Column("bscan_width", sa.Integer(), nullable=False),
        sa.Column("spacing_lateral_mm", sa.Double(), nullable=False),
        sa.Column("spacing_axial_mm", sa.Double(), nullable=False),
        sa.Column("spacing_between_mm", sa.Double(), nullable=False),
        sa.Column("positions", sa.JSON(), nullable=False),
        sa.Column("localizer_spacing_mm", sa.JSON(), nullable=True),
        sa.Column("acquired_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_volumes"),
        sa.UniqueConstraint("source_sha256", "series_uid", name="uq_volumes_source"),
        sa.CheckConstraint("eye IN ('OD', 'OS', 'unknown')", name="ck_volumes_eye"),
    )
    op.create_index("ix_volumes_visit_pk", "volumes", ["visit_pk"])


def _create_runs() -> None:
    op.create_table(
        "runs", _pk(), _fk("volume_pk", "volumes", "runs"),
        sa.Column("model_id", sa.String(128), nullable=False),
        sa.Column("segmenter", sa.String(128), nullable=False),
        sa.Column("segmenter_checkpoint_sha256", sa.String(64), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("params_hash", sa.String(64), nullable=False),
        sa.Column("code_version", sa.String(64), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("seconds", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        sa.UniqueConstraint(
            "volume_pk", "model_id", "segmenter", "segmenter_checkpoint_sha256", "params_hash", "code_version",
            name="uq_runs_inputs",
        ),
        sa.CheckConstraint("status IN ('running', 'done', 'failed')", name="ck_runs_status"),
    )
    op.create_index("ix_runs_volume_status", "runs", ["volume_pk", "status"])


def _create_bscans() -> None:
    op.create_table(
        "bscans", _pk(), _fk("run_pk", "runs", "bscans"),
        sa.Column("bscan_index", sa.Integer(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("score", sa.Double(), nullable=True),
        sa.Column("final_score", sa.Double(), nullable=True),
        sa.Column("hrf_count", sa.Integer(), nullable=False),
        sa.Column("hrf_area_px", sa.Integer(), nullable=False),
        sa.Column("hrf_area_mm2", sa.Double(), nullable=False),
        sa.Column("relevance_peaks", sa.JSON(), nullable=False),
        sa.Column("mask_png", sa.LargeBinary(), nullable=False),
        sa.Column("relevance_png", sa.LargeBinary(), nullable=True),
        sa.Column("relevance_max", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_bscans"),
        sa.UniqueConstraint("run_pk", "bscan_index", name="uq_bscans_run_index"),
    )


def _create_lesions() -> None:
    ints = ("bbox_row0", "bbox_col0", "bbox_row1", "bbox_col1", "area_px")
    op.create_table(
        "lesions", _pk(), _fk("bscan_pk", "bscans", "lesions"),
        sa.Column("lesion_index", sa.Integer(), nullable=False),
        sa.Column("centroid_row", sa.Double(), nullable=False),
        sa.Column("centroid_col", sa.Double(), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in ints),
        sa.Column("area_mm2", sa.Double(), nullable=False),
        sa.Column("mask_png", sa.LargeBinary(), nullable=False),
        sa.Column("centroid_x_mm", sa.Double(), nullable=True),
        sa.Column("centroid_y_mm", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_lesions"),
        sa.UniqueConstraint("bscan_pk", "lesion_index", name="uq_lesions_bscan_index"),
    )


def _create_ingest_errors() -> None:
    op.create_table(
        "ingest_errors", _pk(),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_ingest_errors"),
        sa.CheckConstraint("kind IN ('error', 'skipped')", name="ck_ingest_errors_kind"),
    )
    op.create_index("ix_ingest_errors_batch_id", "ingest_errors", ["batch_id"])


def upgrade() -> None:
    _create_people()
    _create_volumes()
    _create_runs()
    _create_bscans()
    _create_lesions()
    _create_ingest_errors()


def downgrade() -> None:
    for table in ("ingest_errors", "lesions", "bscans", "runs", "volumes", "visits", "patient_identifiers", "patients"):
        op.drop_table(table)
