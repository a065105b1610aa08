"""Anatomy: lesion layer zone and ETDRS subfield, per-run layer lines, fovea and thickness, HRF burden
per ETDRS subfield and per layer zone.

Revision ID: 0003
Revises: 0002
Create Date: 2026-01-20

Tables and columns:

* lesions.zone (one of ZONES below or 'unknown') and lesions.etdrs_subfield (one of SUBFIELDS,
  'outside' or 'unknown'): NOT NULL with default 'unknown', so lesions stored before this revision
  stay valid and read as "not known".
* run_anatomy: one row per run that went through the anatomy stage. The layer lines are one
  compressed npz blob (one int16 array per boundary: the row × 10, -32768 where unknown; int32 when
  a B-scan is too tall for int16), NULL when the run had no layer lines. A run without a fovea has
  NULL fovea columns and says why in `fovea_note`. `mean_thickness_um` is the mean ILM–BM thickness
  over every A-scan that has both lines.
* run_etdrs_thickness: the mean ILM–BM thickness of a run in each ETDRS subfield its scan covers.

Views (the same numbers on SQLite and PostgreSQL; "latest done run" as in hrf_burden_volume):

* hrf_burden_etdrs: one row for each of the 9 ETDRS subfields per patient, visit date and eye that
  has at least one volume whose latest done run found a fovea; only those volumes count
  (`n_volumes`). `hrf_count` and `hrf_area_mm2` sum the lesions of that subfield (zero when none);
  `density_per_mm2` is hrf_count / (n_volumes × the subfield's area on the ETDRS grid), i.e. the
  mean density per volume: C0 π·0.5², an inner-ring quadrant π(1.5² − 0.5²)/4, an outer-ring
  quadrant π(3² − 1.5²)/4 mm² (whether or not the scan covers all of it). `mean_thickness_um` is
  the mean over those volumes of the subfield's mean thickness (NULL when no volume covers it).
* hrf_burden_layer: one row for each layer zone, 'unknown' included, per patient, visit date and eye
  with a done volume (`n_volumes` counts them all); zero counts included.

Areas are a lesion pixel sum × the volume's lateral × axial spacing, rounded to 1e-9 mm² per volume
and again after summing over volumes, as in 0002; densities and mean thicknesses are rounded to 9
decimals because the engines may add and divide in different orders.
"""

from __future__ import annotations

import math

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ZONES = ("above-ilm", "inner-retina", "outer-retina", "elm-bm", "below-bm", "unknown")
SUBFIELDS = ("C0", "S1", "N1", "I1", "T1", "S2", "N2", "I2", "T2")
LESION_SUBFIELDS = (*SUBFIELDS, "outside", "unknown")
LAYER_SOURCES = ("device", "estimated", "ground-truth")
FOVEA_METHODS = ("thickness-map", "device", "ground-truth")

#: Area of each subfield on the ETDRS grid (radii 0.5, 1.5 and 3 mm), in mm².
CENTRE_AREA_MM2 = math.pi * 0.5**2
INNER_QUADRANT_AREA_MM2 = math.pi * (1.5**2 - 0.5**2) / 4
OUTER_QUADRANT_AREA_MM2 = math.pi * (3.0**2 - 1.5**2) / 4
GRID_AREAS_MM2 = {
    "C0": CENTRE_AREA_MM2,
    **{f"{q}1": INNER_QUADRANT_AREA_MM2 for q in "SNIT"},
    **{f"{q}2": OUTER_QUADRANT_AREA_MM2 for q in "SNIT"},
}


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _add_lesion_columns() -> None:
    for column, values in (("zone", ZONES), ("etdrs_subfield", LESION_SUBFIELDS)):
        op.add_column("lesions", sa.Column(
            column, sa.String(16), sa.CheckConstraint(_in(column, values), name=f"ck_lesions_{column}"),
            nullable=False, server_default="unknown",
        ))


def _create_anatomy_tables() -> None:
    op.create_table(
        "run_anatomy",
        sa.Column("run_pk", sa.Integer(),
                  sa.ForeignKey("runs.id", ondelete="CASCADE", name="fk_run_anatomy_run_pk"), nullable=False),
        sa.Column("layer_source", sa.String(16), nullable=True),
        sa.Column("layer_names", sa.JSON(), nullable=False),
        sa.Column("estimated_layer_names", sa.JSON(), nullable=False),
        sa.Column("layers_npz", sa.LargeBinary(), nullable=True),
        sa.Column("fovea_bscan", sa.Double(), nullable=True),
        sa.Column("fovea_col", sa.Double(), nullable=True),
        sa.Column("fovea_x_mm", sa.Double(), nullable=True),
        sa.Column("fovea_y_mm", sa.Double(), nullable=True),
        sa.Column("fovea_method", sa.String(16), nullable=True),
        sa.Column("fovea_note", sa.Text(), nullable=False),
        sa.Column("mean_thickness_um", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("run_pk", name="pk_run_anatomy"),
        sa.CheckConstraint(f"layer_source IS NULL OR {_in('layer_source', LAYER_SOURCES)}",
                           name="ck_run_anatomy_layer_source"),
        sa.CheckConstraint(f"fovea_method IS NULL OR {_in('fovea_method', FOVEA_METHODS)}",
                           name="ck_run_anatomy_fovea_method"),
    )
    op.create_table(
        "run_etdrs_thickness",
        sa.Column("run_pk", sa.Integer(),
                  sa.ForeignKey("runs.id", ondelete="CASCADE", name="fk_run_etdrs_thickness_run_pk"), nullable=False),
        sa.Column("subfield", sa.String(8), nullable=False),
        sa.Column("mean_thickness_um", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("run_pk", "subfield", name="pk_run_etdrs_thickness"),
        sa.CheckConstraint(_in("subfield", SUBFIELDS), name="ck_run_etdrs_thickness_subfield"),
    )


ETDRS_VIEW = """
CREATE VIEW hrf_burden_etdrs AS
WITH foveal AS (
    SELECT b.volume_id, b.run_id, b.patient_id, b.visit_date, b.eye
    FROM hrf_burden_volume b
    JOIN run_anatomy a ON a.run_pk = b.run_id
    WHERE a.fovea_method IS NOT NULL
),
grid AS (
{grid}
),
lesion_counts AS (
    SELECT bs.run_pk, l.etdrs_subfield AS subfield, COUNT(*) AS hrf_count, SUM(l.area_px) AS area_px
    FROM lesions l
    JOIN bscans bs ON bs.id = l.bscan_pk
    GROUP BY bs.run_pk, l.etdrs_subfield
)
SELECT f.patient_id, f.visit_date, f.eye, g.subfield,
       COUNT(*) AS n_volumes,
       CAST(SUM(COALESCE(c.hrf_count, 0)) AS BIGINT) AS hrf_count,
       {sum_area} AS hrf_area_mm2,
       {density} AS density_per_mm2,
       {thickness} AS mean_thickness_um
FROM foveal f
CROSS JOIN grid g
JOIN volumes v ON v.id = f.volume_id
LEFT JOIN lesion_counts c ON c.run_pk = f.run_id AND c.subfield = g.subfield
LEFT JOIN run_etdrs_thickness t ON t.run_pk = f.run_id AND t.subfield = g.subfield
GROUP BY f.patient_id, f.visit_date, f.eye, g.subfield
"""

LAYER_VIEW = """
CREATE VIEW hrf_burden_layer AS
WITH zones AS (
{zones}
),
lesion_counts AS (
    SELECT bs.run_pk, l.zone, COUNT(*) AS hrf_count, SUM(l.area_px) AS area_px
    FROM lesions l
    JOIN bscans bs ON bs.id = l.bscan_pk
    GROUP BY bs.run_pk, l.zone
)
SELECT b.patient_id, b.visit_date, b.eye, z.zone,
       COUNT(*) AS n_volumes,
       CAST(SUM(COALESCE(c.hrf_count, 0)) AS BIGINT) AS hrf_count,
       {sum_area} AS hrf_area_mm2
FROM hrf_burden_volume b
CROSS JOIN zones z
JOIN volumes v ON v.id = b.volume_id
LEFT JOIN lesion_counts c ON c.run_pk = b.run_id AND c.zone = z.zone
GROUP BY b.patient_id, b.visit_date, b.eye, z.zone
"""

VIEWS = (("hrf_burden_etdrs", ETDRS_VIEW), ("hrf_burden_layer", LAYER_VIEW))


def _round9(expression: str) -> str:
    """SQL rounding ``expression`` (a double) to 9 decimals, as a double, on the current backend."""
    if op.get_bind().dialect.name == "postgresql":  # ROUND(double, int) does not exist there
        return f"CAST(ROUND(CAST({expression} AS NUMERIC), 9) AS DOUBLE PRECISION)"
    return f"ROUND({expression}, 9)"


def _double(value: float) -> str:
    """A double constant both engines read exactly (repr round-trips; SQLite reads the cast as REAL)."""
    return f"CAST({value!r} AS DOUBLE PRECISION)"


def _rows(column: str, values: dict[str, str]) -> str:
    """A constant table as UNION ALL of one-row SELECTs (the one spelling both engines accept in a view)."""
    selects = [f"    SELECT '{key}' AS {column}" + (f", {extra} AS grid_area_mm2" if extra else "")
               for key, extra in values.items()]
    return "\n    UNION ALL\n".join(selects)


def upgrade() -> None:
    _add_lesion_columns()
    _create_anatomy_tables()
    volume_area = _round9("COALESCE(c.area_px, 0) * v.spacing_lateral_mm * v.spacing_axial_mm")
    sum_area = _round9(f"SUM({volume_area})")
    density = _round9("CAST(SUM(COALESCE(c.hrf_count, 0)) AS DOUBLE PRECISION) / (COUNT(*) * MIN(g.grid_area_mm2))")
    op.execute(ETDRS_VIEW.format(
        grid=_rows("subfield", {s: _double(GRID_AREAS_MM2[s]) for s in SUBFIELDS}),
        sum_area=sum_area, density=density, thickness=_round9("AVG(t.mean_thickness_um)"),
    ))
    op.execute(LAYER_VIEW.format(zones=_rows("zone", dict.fromkeys(ZONES, "")), sum_area=sum_area))


def downgrade() -> None:
    for view, _template in reversed(VIEWS):
        op.execute(f"DROP VIEW {view}")
    op.drop_table("run_etdrs_thickness")
    op.drop_table("run_anatomy")
    with op.batch_alter_table("lesions") as batch:  # SQLite copies the table; PostgreSQL alters it
        for column in ("etdrs_subfield", "zone"):
            batch.drop_constraint(f"ck_lesions_{column}", type_="check")
            batch.drop_column(column)
