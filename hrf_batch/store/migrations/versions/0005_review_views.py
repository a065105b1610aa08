"""Grader review views: what each grader decided per B-scan, and how the tool agrees with each grader.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Both views read only the review tables of 0004 and the run's own rows, on every done run that has
review rows (not only a volume's latest run: a verdict judges the run it names). The same numbers on
SQLite and PostgreSQL: every figure is a count or a quotient of two integer sums.

* hrf_review_bscans: one row per run, B-scan and grader who left any row on that B-scan.
  `tool_count` is the run's HRF count of the B-scan; `lesions_accepted`/`_rejected`/`_undecided`
  count that grader's verdicts on the run's lesions; `lesions_added` the HRFs they added;
  `bscan_verdict` their "HRF yes/no" (1/0, NULL when not given).
  The grader's truth for the B-scan:

  - `finished` (1/0): the grader answered yes/no, or judged every model lesion and left at least one
    row (a verdict or an added lesion) on the B-scan. Only finished B-scans enter labels and figures.
  - `grader_has_hrf`: the yes/no answer when given, else whether any lesion was accepted or added;
    NULL while not finished.
  - `grader_count`: 0 after a "no" (a "no" wins over lesion verdicts); else accepted + added once
    every model lesion is judged, except that a "yes" with nothing accepted or added has an unknown
    count (NULL); NULL while any model lesion is undecided.
  - `lesions_judged`/`lesions_confirmed`: model lesions judged and accepted; after a "no" every model
    lesion counts as judged and none as confirmed. `lesions_missed`: the added lesions (0 after a "no").

* hrf_review_agreement: one row per run and grader, over that grader's finished B-scans of the run:
  B-scans where the tool found >= 1 lesion ("tool positive") against `grader_has_hrf` (`tp_bscans`,
  `fn_bscans`, `fp_bscans`, `tn_bscans`), `sensitivity` = tp / (tp + fn), `specificity` =
  tn / (tn + fp), `lesion_precision` = confirmed / judged, `lesion_recall` = confirmed / (confirmed +
  missed); on the `counted_bscans` with a known `grader_count`: `mean_abs_count_error` (mean
  |tool − grader|), `count_bias` (mean tool − grader; over-counting is positive) and
  `equal_count_share`. A quotient with a zero denominator is NULL.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BSCAN_VIEW = """
CREATE VIEW hrf_review_bscans AS
WITH marks AS (
    SELECT run_pk, bscan_index, grader FROM review_lesion_verdicts
    UNION
    SELECT run_pk, bscan_index, grader FROM review_added_lesions
    UNION
    SELECT run_pk, bscan_index, grader FROM review_bscan_verdicts
),
verdicts AS (
    SELECT run_pk, bscan_index, grader,
           SUM(CASE WHEN verdict = 'accept' THEN 1 ELSE 0 END) AS accepted,
           SUM(CASE WHEN verdict = 'reject' THEN 1 ELSE 0 END) AS rejected
    FROM review_lesion_verdicts
    GROUP BY run_pk, bscan_index, grader
),
added AS (
    SELECT run_pk, bscan_index, grader, COUNT(*) AS added
    FROM review_added_lesions
    GROUP BY run_pk, bscan_index, grader
),
marked AS (
    SELECT m.run_pk, m.bscan_index, m.grader, b.hrf_count AS tool_count,
           CAST(COALESCE(v.accepted, 0) AS INTEGER) AS accepted,
           CAST(COALESCE(v.rejected, 0) AS INTEGER) AS rejected,
           CAST(COALESCE(a.added, 0) AS INTEGER) AS added,
           CASE WHEN bv.has_hrf IS NULL THEN NULL WHEN bv.has_hrf THEN 1 ELSE 0 END AS answer
    FROM marks m
    JOIN bscans b ON b.run_pk = m.run_pk AND b.bscan_index = m.bscan_index
    LEFT JOIN verdicts v ON v.run_pk = m.run_pk AND v.bscan_index = m.bscan_index AND v.grader = m.grader
    LEFT JOIN added a ON a.run_pk = m.run_pk AND a.bscan_index = m.bscan_index AND a.grader = m.grader
    LEFT JOIN review_bscan_verdicts bv
           ON bv.run_pk = m.run_pk AND bv.bscan_index = m.bscan_index AND bv.grader = m.grader
),
judged AS (
    SELECT *,
           CASE WHEN accepted + rejected = tool_count THEN 1 ELSE 0 END AS all_judged,
           CASE WHEN answer IS NOT NULL OR (accepted + rejected = tool_count AND tool_count + added > 0)
                THEN 1 ELSE 0 END AS finished
    FROM marked
)
SELECT j.run_pk AS run_id, r.volume_pk AS volume_id, r.model_id, p.patient_id, vi.visit_date, vo.eye,
       j.bscan_index, j.grader, j.tool_count,
       j.accepted AS lesions_accepted, j.rejected AS lesions_rejected,
       j.tool_count - j.accepted - j.rejected AS lesions_undecided, j.added AS lesions_added,
       j.answer AS bscan_verdict, j.finished,
       CASE WHEN j.finished = 0 THEN NULL
            WHEN j.answer IS NOT NULL THEN j.answer
            WHEN j.accepted + j.added > 0 THEN 1 ELSE 0 END AS grader_has_hrf,
       CASE WHEN j.answer = 0 THEN 0
            WHEN j.all_judged = 0 THEN NULL
            WHEN j.answer = 1 AND j.accepted + j.added = 0 THEN NULL
            ELSE j.accepted + j.added END AS grader_count,
       CASE WHEN j.answer = 0 THEN j.tool_count ELSE j.accepted + j.rejected END AS lesions_judged,
       CASE WHEN j.answer = 0 THEN 0 ELSE j.accepted END AS lesions_confirmed,
       CASE WHEN j.answer = 0 THEN 0 ELSE j.added END AS lesions_missed
FROM judged j
JOIN runs r ON r.id = j.run_pk
JOIN volumes vo ON vo.id = r.volume_pk
JOIN visits vi ON vi.id = vo.visit_pk
JOIN patients p ON p.id = vi.patient_pk
"""

AGREEMENT_VIEW = """
CREATE VIEW hrf_review_agreement AS
WITH sums AS (
    SELECT run_id, volume_id, model_id, patient_id, visit_date, eye, grader,
           COUNT(*) AS reviewed_bscans,
           SUM(CASE WHEN tool_count > 0 AND grader_has_hrf = 1 THEN 1 ELSE 0 END) AS tp_bscans,
           SUM(CASE WHEN tool_count = 0 AND grader_has_hrf = 1 THEN 1 ELSE 0 END) AS fn_bscans,
           SUM(CASE WHEN tool_count > 0 AND grader_has_hrf = 0 THEN 1 ELSE 0 END) AS fp_bscans,
           SUM(CASE WHEN tool_count = 0 AND grader_has_hrf = 0 THEN 1 ELSE 0 END) AS tn_bscans,
           SUM(lesions_judged) AS lesions_judged,
           SUM(lesions_confirmed) AS lesions_confirmed,
           SUM(lesions_missed) AS lesions_missed,
           SUM(CASE WHEN grader_count IS NULL THEN 0 ELSE 1 END) AS counted_bscans,
           SUM(CASE WHEN grader_count IS NULL THEN 0 ELSE tool_count END) AS tool_count,
           SUM(grader_count) AS grader_count,
           SUM(CASE WHEN grader_count IS NULL THEN 0
                    WHEN tool_count >= grader_count THEN tool_count - grader_count
                    ELSE grader_count - tool_count END) AS abs_count_error,
           SUM(CASE WHEN grader_count = tool_count THEN 1 ELSE 0 END) AS equal_count_bscans
    FROM hrf_review_bscans
    WHERE finished = 1
    GROUP BY run_id, volume_id, model_id, patient_id, visit_date, eye, grader
),
counts AS (
    SELECT run_id, volume_id, model_id, patient_id, visit_date, eye, grader,
           CAST(reviewed_bscans AS BIGINT) AS reviewed_bscans, CAST(tp_bscans AS BIGINT) AS tp_bscans,
           CAST(fn_bscans AS BIGINT) AS fn_bscans, CAST(fp_bscans AS BIGINT) AS fp_bscans,
           CAST(tn_bscans AS BIGINT) AS tn_bscans, CAST(lesions_judged AS BIGINT) AS lesions_judged,
           CAST(lesions_confirmed AS BIGINT) AS lesions_confirmed, CAST(lesions_missed AS BIGINT) AS lesions_missed,
           CAST(counted_bscans AS BIGINT) AS counted_bscans, CAST(tool_count AS BIGINT) AS tool_count,
           CAST(COALESCE(grader_count, 0) AS BIGINT) AS grader_count,
           CAST(abs_count_error AS BIGINT) AS abs_count_error,
           CAST(equal_count_bscans AS BIGINT) AS equal_count_bscans
    FROM sums
)
SELECT c.run_id, c.volume_id, c.model_id, c.patient_id, c.visit_date, c.eye, c.grader, vo.n_bscans,
       c.reviewed_bscans, c.tp_bscans, c.fn_bscans, c.fp_bscans, c.tn_bscans,
       c.lesions_judged, c.lesions_confirmed, c.lesions_missed,
       c.counted_bscans, c.tool_count, c.grader_count, c.abs_count_error, c.equal_count_bscans,
       {sensitivity} AS sensitivity,
       {specificity} AS specificity,
       {lesion_precision} AS lesion_precision,
       {lesion_recall} AS lesion_recall,
       {mean_abs_count_error} AS mean_abs_count_error,
       {count_bias} AS count_bias,
       {equal_count_share} AS equal_count_share
FROM counts c
JOIN volumes vo ON vo.id = c.volume_id
"""

#: Each figure as (numerator, denominator) over the integer columns of `counts`.
QUOTIENTS = {
    "sensitivity": ("c.tp_bscans", "c.tp_bscans + c.fn_bscans"),
    "specificity": ("c.tn_bscans", "c.tn_bscans + c.fp_bscans"),
    "lesion_precision": ("c.lesions_confirmed", "c.lesions_judged"),
    "lesion_recall": ("c.lesions_confirmed", "c.lesions_confirmed + c.lesions_missed"),
    "mean_abs_count_error": ("c.abs_count_error", "c.counted_bscans"),
    "count_bias": ("c.tool_count - c.grader_count", "c.counted_bscans"),
    "equal_count_share": ("c.equal_count_bscans", "c.counted_bscans"),
}

VIEWS = ("hrf_review_bscans", "hrf_review_agreement")


def _quotient(numerator: str, denominator: str) -> str:
    """numerator / denominator as a double, NULL when the denominator is 0 (the same on both engines)."""
    return f"CAST({numerator} AS DOUBLE PRECISION) / NULLIF({denominator}, 0)"


def upgrade() -> None:
    op.execute(BSCAN_VIEW)
    op.execute(AGREEMENT_VIEW.format(**{name: _quotient(*parts) for name, parts in QUOTIENTS.items()}))


def downgrade() -> None:
    for view in reversed(VIEWS):
        op.execute(f"DROP VIEW {view}")
