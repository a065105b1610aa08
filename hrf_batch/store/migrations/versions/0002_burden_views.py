"""HRF burden views per volume, per visit and eye, and per patient.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-26

Definitions (the same numbers on SQLite and PostgreSQL):

* latest done run of a volume: among its runs with status 'done', the one with the latest
  `finished_at`; equal times go to the higher run id. Volumes without a done run are left out.
* hrf_burden_volume: one row per volume with a done run; counts from that run's B-scans. The area is
  the summed pixel count × lateral × axial spacing, an exact integer times the volume's own spacing.
* hrf_burden_visit: one row per patient, visit date and eye, summed over that eye's volumes at the
  visit; `delta_*` is the change since the same patient's previous dated visit of the same eye
  (NULL for the first one, and for results whose visit date is unknown).
* hrf_burden_patient: one row per patient over both eyes: `n_visits` counts the distinct visit dates
  with results (an unknown date counts once); first/latest are the earliest and latest known dates;
  `latest_hrf_count` and the `*_change` (latest − first) use the per-visit totals over both eyes;
  `max_hrf_count` is the largest per-visit total.

Areas are rounded to 1e-9 mm² (0.001 µm²) in SQL, because the two engines may add floating-point
numbers in different orders; sums of counts are cast to BIGINT because PostgreSQL's SUM(bigint) is
NUMERIC.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VOLUME_VIEW = """
CREATE VIEW hrf_burden_volume AS
WITH done AS (
    SELECT r.id AS run_id, r.volume_pk, r.model_id, r.finished_at,
           ROW_NUMBER() OVER (
               PARTITION BY r.volume_pk
               ORDER BY CASE WHEN r.finished_at IS NULL THEN 1 ELSE 0 END, r.finished_at DESC, r.id DESC
           ) AS recency
    FROM runs r
    WHERE r.status = 'done'
),
counts AS (
    SELECT b.run_pk,
           SUM(b.hrf_count) AS hrf_count,
           SUM(CASE WHEN b.hrf_count > 0 THEN 1 ELSE 0 END) AS hrf_positive_bscans,
           SUM(b.hrf_area_px) AS hrf_area_px
    FROM bscans b
    GROUP BY b.run_pk
)
SELECT v.id AS volume_id, d.run_id, d.model_id, d.finished_at, p.patient_id, vi.visit_date, v.eye,
       v.series_uid, v.n_bscans,
       COALESCE(c.hrf_count, 0) AS hrf_count,
       COALESCE(c.hrf_positive_bscans, 0) AS hrf_positive_bscans,
       COALESCE(c.hrf_area_px, 0) AS hrf_area_px,
       {volume_area} AS hrf_area_mm2
FROM done d
JOIN volumes v ON v.id = d.volume_pk
JOIN visits vi ON vi.id = v.visit_pk
JOIN patients p ON p.id = vi.patient_pk
LEFT JOIN counts c ON c.run_pk = d.run_id
WHERE d.recency = 1
"""

VISIT_VIEW = """
CREATE VIEW hrf_burden_visit AS
WITH per_visit AS (
    SELECT patient_id, visit_date, eye,
           COUNT(*) AS n_volumes,
           CAST(SUM(n_bscans) AS BIGINT) AS n_bscans,
           CAST(SUM(hrf_count) AS BIGINT) AS hrf_count,
           CAST(SUM(hrf_positive_bscans) AS BIGINT) AS hrf_positive_bscans,
           {sum_area} AS hrf_area_mm2
    FROM hrf_burden_volume
    GROUP BY patient_id, visit_date, eye
)
SELECT patient_id, visit_date, eye, n_volumes, n_bscans, hrf_count, hrf_positive_bscans, hrf_area_mm2,
       LAG(visit_date) OVER w AS previous_visit_date,
       hrf_count - LAG(hrf_count) OVER w AS delta_hrf_count,
       {delta_area} AS delta_hrf_area_mm2
FROM per_visit
WINDOW w AS (PARTITION BY patient_id, eye, CASE WHEN visit_date IS NULL THEN 1 ELSE 0 END ORDER BY visit_date)
"""

PATIENT_VIEW = """
CREATE VIEW hrf_burden_patient AS
WITH per_visit AS (
    SELECT patient_id, visit_date, CAST(SUM(hrf_count) AS BIGINT) AS hrf_count, {sum_area} AS hrf_area_mm2
    FROM hrf_burden_visit
    GROUP BY patient_id, visit_date
),
ends AS (
    SELECT patient_id, COUNT(*) AS n_visits, MAX(hrf_count) AS max_hrf_count,
           MIN(visit_date) AS first_visit_date, MAX(visit_date) AS latest_visit_date
    FROM per_visit
    GROUP BY patient_id
)
SELECT e.patient_id, e.n_visits, e.first_visit_date, e.latest_visit_date,
       l.hrf_count AS latest_hrf_count, l.hrf_area_mm2 AS latest_hrf_area_mm2, e.max_hrf_count,
       l.hrf_count - f.hrf_count AS hrf_count_change,
       {change_area} AS hrf_area_mm2_change
FROM ends e
LEFT JOIN per_visit f ON f.patient_id = e.patient_id AND f.visit_date = e.first_visit_date
LEFT JOIN per_visit l ON l.patient_id = e.patient_id AND l.visit_date = e.latest_visit_date
"""

VIEWS = (("hrf_burden_volume", VOLUME_VIEW), ("hrf_burden_visit", VISIT_VIEW), ("hrf_burden_patient", PATIENT_VIEW))

AREAS = {
    "volume_area": "COALESCE(c.hrf_area_px, 0) * v.spacing_lateral_mm * v.spacing_axial_mm",
    "sum_area": "SUM(hrf_area_mm2)",
    "delta_area": "hrf_area_mm2 - LAG(hrf_area_mm2) OVER w",
    "change_area": "l.hrf_area_mm2 - f.hrf_area_mm2",
}


def _round9(expression: str) -> str:
    """SQL rounding ``expression`` (a double) to 9 decimals, as a double, on the current backend."""
    if op.get_bind().dialect.name == "postgresql":  # ROUND(double, int) does not exist there
        return f"CAST(ROUND(CAST({expression} AS NUMERIC), 9) AS DOUBLE PRECISION)"
    return f"ROUND({expression}, 9)"


def upgrade() -> None:
    rounded = {name: _round9(expression) for name, expression in AREAS.items()}
    for _view, template in VIEWS:
        op.execute(template.format(**rounded))


def downgrade() -> None:
    for view, _template in reversed(VIEWS):
        op.execute(f"DROP VIEW {view}")
