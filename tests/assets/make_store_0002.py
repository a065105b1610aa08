"""Writes store_0002.sqlite: a study database at schema revision 0002 (before anatomy) with two visits.

Kept so the asset can be rebuilt; the rows are inserted with plain SQL matching revision 0002 (whose
tables are those of 0001), so later changes to the ORM do not change what an "old" database looks like.
Patient OLD02, right eye: a volume on 2021-03-04 with 3 HRF over two B-scans, and one on 2021-09-10
with 1 HRF in its done run beside a failed run. Run from the project root:

    .venv/bin/python tests/assets/make_store_0002.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sqlalchemy import Connection, create_engine, text

from hrf_batch.store import codec, upgrade

ASSET = Path(__file__).with_name("store_0002.sqlite")
SHAPE = (8, 12)
LATERAL_MM, AXIAL_MM = 0.01, 0.004

ROWS = [
    "INSERT INTO patients (id, patient_id) VALUES (1, 'OLD02')",
    "INSERT INTO visits (id, patient_pk, visit_date) VALUES (1, 1, '2021-03-04'), (2, 1, '2021-09-10')",
    "INSERT INTO volumes (id, visit_pk, eye, source_path, source_sha256, source_format, series_uid, device,"
    " scan_pattern, n_bscans, bscan_height, bscan_width, spacing_lateral_mm, spacing_axial_mm,"
    " spacing_between_mm, positions, localizer_spacing_mm, acquired_at) VALUES"
    " (1, 1, 'OD', 'old/a.vol', :sha1, 'heyex-vol', 'S1', 'Spectralis', 'volume', 2, 8, 12, 0.01, 0.004, 0.1,"
    " :positions, NULL, NULL),"
    " (2, 2, 'OD', 'old/b.vol', :sha2, 'heyex-vol', 'S1', 'Spectralis', 'volume', 2, 8, 12, 0.01, 0.004, 0.1,"
    " :positions, NULL, NULL)",
    "INSERT INTO runs (id, volume_pk, model_id, segmenter, segmenter_checkpoint_sha256, parameters,"
    " params_hash, code_version, device, seconds, status, started_at, finished_at, error) VALUES"
    " (1, 1, 'cct-old', 'region-growing', '', '{}', :phash, '0.1.0', 'cpu', '{}', 'done',"
    " '2021-03-05 10:00:00.000000', '2021-03-05 10:01:00.000000', NULL),"
    " (2, 2, 'cct-old', 'region-growing', '', '{}', :phash, '0.0.9', 'cpu', '{}', 'failed',"
    " '2021-09-11 10:00:00.000000', '2021-09-11 10:00:30.000000', 'out of memory'),"
    " (3, 2, 'cct-old', 'region-growing', '', '{}', :phash, '0.1.0', 'cpu', '{}', 'done',"
    " '2021-09-11 11:00:00.000000', '2021-09-11 11:01:00.000000', NULL)",
]
BSCAN = (
    "INSERT INTO bscans (id, run_pk, bscan_index, scores, score, final_score, hrf_count, hrf_area_px,"
    " hrf_area_mm2, relevance_peaks, mask_png, relevance_png, relevance_max) VALUES (:id, :run, :index, '[0.5]',"
    " 0.5, 0.5, :count, :area, :area_mm2, '[]', :mask, NULL, NULL)"
)
LESION = (
    "INSERT INTO lesions (id, bscan_pk, lesion_index, centroid_row, centroid_col, bbox_row0, bbox_col0,"
    " bbox_row1, bbox_col1, area_px, area_mm2, mask_png, centroid_x_mm, centroid_y_mm) VALUES (:id, :bscan,"
    " :index, :row, :col, :r0, :c0, :r1, :c1, :area, :area_mm2, :mask, NULL, NULL)"
)
#: (B-scan row id, run, B-scan index, lesion boxes (row0, col0, row1, col1), all pixels set)
BSCANS = [
    (1, 1, 0, [(1, 1, 3, 3), (5, 8, 6, 11)]),
    (2, 1, 1, [(2, 4, 4, 7)]),
    (3, 3, 0, []),
    (4, 3, 1, [(6, 2, 8, 4)]),
]


def _area_mm2(area_px: int) -> float:
    return area_px * LATERAL_MM * AXIAL_MM


def main() -> None:
    ASSET.unlink(missing_ok=True)
    url = f"sqlite:///{ASSET}"
    upgrade(url, "0002")
    engine = create_engine(url)
    with engine.begin() as conn:
        fill(conn)
    with engine.connect() as conn:  # smallest pages (only outside WAL mode): the file is checked in
        conn.exec_driver_sql("PRAGMA journal_mode = DELETE")
        conn.exec_driver_sql("PRAGMA page_size = 512")
        conn.exec_driver_sql("VACUUM")
    engine.dispose()


def fill(conn: Connection) -> None:
    """Insert the rows into a database at revision 0002 (SQLite or PostgreSQL) inside ``conn``'s transaction."""
    params = {"sha1": "1" * 64, "sha2": "2" * 64, "positions": json.dumps([[0, 0, 1, 0], [0, 0.1, 1, 0.1]]),
              "phash": codec.params_hash({})}
    lesion_id = 0
    for sql in ROWS:
        conn.execute(text(sql), params)
    for bscan_id, run, index, boxes in BSCANS:
        mask = np.zeros(SHAPE, dtype=bool)
        for r0, c0, r1, c1 in boxes:
            mask[r0:r1, c0:c1] = True
        area = int(mask.sum())
        conn.execute(text(BSCAN), {"id": bscan_id, "run": run, "index": index, "count": len(boxes), "area": area,
                                   "area_mm2": _area_mm2(area), "mask": codec.encode_mask(mask)})
        for k, (r0, c0, r1, c1) in enumerate(boxes):
            lesion_id += 1
            px = (r1 - r0) * (c1 - c0)
            conn.execute(text(LESION), {
                "id": lesion_id, "bscan": bscan_id, "index": k, "row": (r0 + r1 - 1) / 2, "col": (c0 + c1 - 1) / 2,
                "r0": r0, "c0": c0, "r1": r1, "c1": c1, "area": px, "area_mm2": _area_mm2(px),
                "mask": codec.encode_mask(np.ones((r1 - r0, c1 - c0), dtype=bool)),
            })


if __name__ == "__main__":
    main()
