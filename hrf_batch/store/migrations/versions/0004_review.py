"""Grader review: per-lesion verdicts, lesions a grader added, per-B-scan "HRF yes/no".

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Tables (the model's rows are never touched; every verdict names the run it judges, so a later run of
a new model starts unreviewed while the old verdicts stay with the old run):

* review_lesion_verdicts: one grader's 'accept' or 'reject' of one stored lesion, identified by
  (run, B-scan index, lesion index) as in `bscans`/`lesions`; unique per grader, so a grader's later
  decision replaces their own earlier one and never another grader's.
* review_added_lesions: an HRF the model missed, marked by a grader's click (`click_row`, `click_col`)
  and outlined by the segmenter named in `segmenter`; mask, bounding box and area as in `lesions`.
* review_bscan_verdicts: one grader's "this B-scan has HRF: yes/no"; unique per grader and B-scan.

Deleting a run deletes its review rows (the lesions they judge are gone with it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

def _common(table: str) -> list[sa.Column]:
    return [
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_pk", sa.Integer(),
                  sa.ForeignKey("runs.id", ondelete="CASCADE", name=f"fk_{table}_run_pk"), nullable=False),
        sa.Column("bscan_index", sa.Integer(), nullable=False),
        sa.Column("grader", sa.String(128), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "review_lesion_verdicts", *_common("review_lesion_verdicts"),
        sa.Column("lesion_index", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(8), nullable=False),
        sa.Column("decided_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_review_lesion_verdicts"),
        sa.UniqueConstraint("run_pk", "bscan_index", "lesion_index", "grader", name="uq_review_lesion_verdicts_key"),
        sa.CheckConstraint("verdict IN ('accept', 'reject')", name="ck_review_lesion_verdicts_verdict"),
    )
    op.create_table(
        "review_added_lesions", *_common("review_added_lesions"),
        sa.Column("click_row", sa.Integer(), nullable=False),
        sa.Column("click_col", sa.Integer(), nullable=False),
        sa.Column("centroid_row", sa.Double(), nullable=False),
        sa.Column("centroid_col", sa.Double(), nullable=False),
        sa.Column("bbox_row0", sa.Integer(), nullable=False),
        sa.Column("bbox_col0", sa.Integer(), nullable=False),
        sa.Column("bbox_row1", sa.Integer(), nullable=False),
        sa.Column("bbox_col1", sa.Integer(), nullable=False),
        sa.Column("area_px", sa.Integer(), nullable=False),
        sa.Column("area_mm2", sa.Double(), nullable=False),
        sa.Column("mask_png", sa.LargeBinary(), nullable=False),
        sa.Column("segmenter", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_review_added_lesions"),
    )
    op.create_index("ix_review_added_lesions_run_pk", "review_added_lesions", ["run_pk"])
    op.create_table(
        "review_bscan_verdicts", *_common("review_bscan_verdicts"),
        sa.Column("has_hrf", sa.Boolean(), nullable=False),
        sa.Column("decided_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_review_bscan_verdicts"),
        sa.UniqueConstraint("run_pk", "bscan_index", "grader", name="uq_review_bscan_verdicts_key"),
    )


def downgrade() -> None:
    op.drop_table("review_bscan_verdicts")
    op.drop_index("ix_review_added_lesions_run_pk", table_name="review_added_lesions")
    op.drop_table("review_added_lesions")
    op.drop_table("review_lesion_verdicts")
