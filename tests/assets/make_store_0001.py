"""Writes store_0001.sqlite: a study database at schema revision 0001 holding one small result.

Kept so the asset can be rebuilt; the rows are inserted with plain SQL matching revision 0001, so later
changes to the ORM do not change what an "old" database looks like. Run from the project root:

    .venv/bin/python tests/assets/make_store_0001.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, text

from hrf_batch.store import codec, upgrade

ASSET = Path(__file__).with_name("store_0001.sqlite")

ROWS = [
    "INSERT INTO patients (id, patient_id) VALUES (1, 'OLD01')",
    "INSERT INTO patient_identifiers (patient_pk, name, birth_date) VALUES (1, 'Old Roe', '1940-02-03')",
    "INSERT INTO visits (id, patient_pk, visit_date) VALUES (1, 1, '2020-05-06')",
    "INSERT INTO volumes (id, visit_pk, eye, source_path, source_sha256, source_format, series_uid, device,"
    " scan_pattern, n_bscans, bscan_height, bscan_width, spacing_lateral_mm, spacing_axial_mm,"
    " spacing_between_mm, positions, localizer_spacing_mm, acquired_at) VALUES (1, 1, 'OS', 'old/a.vol',"
    " :sha, 'heyex-vol', 'S9', 'Spectralis', 'volume', 2, 8, 12, 0.01, 0.004, 0.1, :positions, NULL, NULL)",
    "INSERT INTO runs (id, volume_pk, model_id, segmenter, segmenter_checkpoint_sha256, parameters,"
    " params_hash, code_version, device, seconds, status, started_at, finished_at, error) VALUES (1, 1,"
    " 'cct-old', 'region-growing', '', '{}', :phash, '0.0.9', 'cpu', '{}', 'done',"
    " '2020-05-07 10:00:00.000000', '2020-05-07 10:01:00.000000', NULL)",
]
BSCAN = (
    "INSERT INTO bscans (id, run_pk, bscan_index, scores, score, final_score, hrf_count, hrf_area_px,"
    " hrf_area_mm2, relevance_peaks, mask_png, relevance_png, relevance_max) VALUES (:id, 1, :index, '[0.5]',"
    " 0.5, 0.5, :count, :area, :area_mm2, '[]', :mask, NULL, NULL)"
)
LESION = (
    "INSERT INTO lesions (id, bscan_pk, lesion_index, centroid_row, centroid_col, bbox_row0, bbox_col0,"
    " bbox_row1, bbox_col1, area_px, area_mm2, mask_png, centroid_x_mm, centroid_y_mm) VALUES (1, 2, 0, 3.5,"
    " 4.5, 3, 4, 5, 6, 4, :area_mm2, :mask, NULL, NULL)"
)


def main() -> None:
    ASSET.unlink(missing_ok=True)
    url = f"sqlite:///{ASSET}"
    upgrade(url, "0001")
    empty = np.zeros((8, 12), dtype=bool)
    found = empty.copy()
    found[3:5, 4:6] = True
    engine = create_engine(url)
    with engine.begin() as conn:
        params = {"sha": "0" * 64, "positions": json.dumps([[0, 0, 1, 0], [0, 0.1, 1, 0.1]]), "phash": codec.params_hash({})}
        for sql in ROWS:
            conn.execute(text(sql), params)
        conn.execute(text(BSCAN), {"id": 1, "index": 0, "count": 0, "area": 0, "area_mm2": 0.0, "mask": codec.encode_mask(empty)})
        conn.execute(text(BSCAN), {"id": 2, "index": 1, "count": 1, "area": 4, "area_mm2": 4 * 0.01 * 0.004, "mask": codec.encode_mask(found)})
        conn.execute(text(LESION), {"area_mm2": 4 * 0.01 * 0.004, "mask": codec.encode_mask(np.ones((2, 2), dtype=bool))})
    with engine.connect() as conn:  # smallest pages: the file is checked in
        conn.exec_driver_sql("PRAGMA page_size = 512")
        conn.exec_driver_sql("VACUUM")
    engine.dispose()


if __name__ == "__main__":
    main()
