"""Cohort CSVs for statistics: one file per level (patient, visit, volume, B-scan, lesion) plus the
HRF burden per ETDRS subfield and per layer zone, and the tool's agreement with each grader.

Patient, visit, volume, subfield and zone numbers are the rows of the SQL burden views, so a CSV and
a SQL query give the same answer; the grader review columns (`reviewed_bscans`, `n_graders`,
`graders`: who finished a B-scan of that run) and hrf_review_agreement.csv come from the review
views (migration 0005). Units are in the column names (``_mm``, ``_mm2``, ``_px``, ``_s``, ``_utc``).
Names, birth dates and source paths (which often carry names) are written only on request.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from hrf_batch.report.errors import ReportError
from hrf_batch.store import PatientBurden, PatientRecord, Store, StoredVolume, VolumeBurden
from hrf_batch.store.read import ReviewAgreement, ReviewBScan

EXPORT_FILES = (
    "hrf_patients.csv", "hrf_visits.csv", "hrf_volumes.csv", "hrf_bscans.csv", "hrf_lesions.csv", "hrf_etdrs.csv",
    "hrf_layers.csv", "hrf_review_agreement.csv",
)

# column name → pandas dtype; nullable dtypes so a missing delta stays empty, not "3.0" or "nan"
PATIENT_COLUMNS = {
    "patient_id": "string", "n_visits": "Int64", "n_volumes_analysed": "Int64", "n_volumes_without_results": "Int64",
    "first_visit_date": "string", "latest_visit_date": "string", "latest_hrf_count": "Int64",
    "latest_hrf_area_mm2": "Float64", "max_hrf_count": "Int64", "hrf_count_change": "Int64",
    "hrf_area_mm2_change": "Float64",
}
VISIT_COLUMNS = {
    "patient_id": "string", "visit_date": "string", "eye": "string", "n_volumes": "Int64", "n_bscans": "Int64",
    "hrf_count": "Int64", "hrf_positive_bscans": "Int64", "hrf_area_mm2": "Float64",
    "previous_visit_date": "string", "delta_hrf_count": "Int64", "delta_hrf_area_mm2": "Float64",
}
VOLUME_COLUMNS = {
    "volume_id": "Int64", "run_id": "Int64", "patient_id": "string", "visit_date": "string", "eye": "string",
    "series_uid": "string", "source_format": "string", "source_sha256": "string", "oct_device": "string",
    "scan_pattern": "string", "acquired_at": "string", "n_bscans": "Int64", "bscan_height_px": "Int64",
    "bscan_width_px": "Int64", "lateral_spacing_mm": "Float64", "axial_spacing_mm": "Float64",
    "bscan_spacing_mm": "Float64", "hrf_count": "Int64", "hrf_positive_bscans": "Int64", "hrf_area_px": "Int64",
    "hrf_area_mm2": "Float64", "model_id": "string", "segmenter": "string", "segmenter_checkpoint_sha256": "string",
    "params_hash": "string", "parameters_json": "string", "code_version": "string", "run_device": "string",
    "run_time_s": "Float64", "run_finished_at_utc": "string", "layer_source": "string", "fovea_method": "string",
    "fovea_bscan": "Float64", "fovea_col_px": "Float64", "fovea_x_mm": "Float64", "fovea_y_mm": "Float64",
    "mean_thickness_um": "Float64", "reviewed_bscans": "Int64", "graders": "string",
}
BSCAN_COLUMNS = {
    "volume_id": "Int64", "run_id": "Int64", "patient_id": "string", "visit_date": "string", "eye": "string",
    "bscan_index": "Int64", "score": "Float64", "final_score": "Float64", "n_iterations": "Int64",
    "hrf_count": "Int64", "hrf_area_px": "Int64", "hrf_area_mm2": "Float64", "relevance_max": "Float64",
    "n_graders": "Int64", "graders": "string",
}
LESION_COLUMNS = {
    "volume_id": "Int64", "run_id": "Int64", "patient_id": "string", "visit_date": "string", "eye": "string",
    "bscan_index": "Int64", "lesion_index": "Int64", "centroid_row_px": "Float64", "centroid_col_px": "Float64",
    "bbox_row0_px": "Int64", "bbox_col0_px": "Int64", "bbox_row1_px": "Int64", "bbox_col1_px": "Int64",
    "hrf_area_px": "Int64", "hrf_area_mm2": "Float64", "centroid_lateral_mm": "Float64", "centroid_depth_mm": "Float64",
    "centroid_x_mm": "Float64", "centroid_y_mm": "Float64", "zone": "string", "etdrs_subfield": "string",
}
PLACE_COLUMNS = {"patient_id": "string", "visit_date": "string", "eye": "string"}
ETDRS_COLUMNS = PLACE_COLUMNS | {
    "subfield": "string", "n_volumes": "Int64", "hrf_count": "Int64", "hrf_area_mm2": "Float64",
    "density_per_mm2": "Float64", "mean_thickness_um": "Float64",
}
LAYER_COLUMNS = PLACE_COLUMNS | {
    "zone": "string", "n_volumes": "Int64", "hrf_count": "Int64", "hrf_area_mm2": "Float64",
}
AGREEMENT_COLUMNS = PLACE_COLUMNS | {
    "volume_id": "Int64", "run_id": "Int64", "model_id": "string", "grader": "string", "n_bscans": "Int64",
    "reviewed_bscans": "Int64", "tp_bscans": "Int64", "fn_bscans": "Int64", "fp_bscans": "Int64", "tn_bscans": "Int64",
    "sensitivity": "Float64", "specificity": "Float64", "lesions_judged": "Int64", "lesions_confirmed": "Int64",
    "lesions_missed": "Int64", "lesion_precision": "Float64", "lesion_recall": "Float64", "counted_bscans": "Int64",
    "tool_count": "Int64", "grader_count": "Int64", "abs_count_error": "Int64", "equal_count_bscans": "Int64",
    "mean_abs_count_error": "Float64", "count_bias": "Float64", "equal_count_share": "Float64",
}
IDENTIFIER_COLUMNS = {"patient_name": "string", "birth_date": "string"}


def export_cohort(store: Store, out_dir: Path | str, *, include_identifiers: bool = False) -> list[Path]:
    """Write the cohort CSVs (see EXPORT_FILES) into ``out_dir`` and return their paths.

    Every patient appears in hrf_patients.csv, also one without results (n_visits 0). Identifiers
    (name, birth date, source path) are added as columns only with ``include_identifiers``.
    """
    patients = store.list_patients(include_identifiers=include_identifiers)
    volume_view: list[VolumeBurden] = store.view_rows("hrf_burden_volume")
    volumes = {v.volume_id: v for p in patients for v in store.volume_results(p.patient_id, masks=False)}
    reviewers = finished_by(store.view_rows("hrf_review_bscans"))
    frames = {
        "hrf_patients.csv": patients_frame(patients, store.view_rows("hrf_burden_patient"), volume_view, include_identifiers),
        "hrf_visits.csv": _frame([asdict(v) | _dates(v) for v in store.view_rows("hrf_burden_visit")], VISIT_COLUMNS),
        "hrf_volumes.csv": volumes_frame(volume_view, volumes, include_identifiers, reviewers),
        "hrf_bscans.csv": _frame([row for v in volumes.values() for row in _bscan_rows(v, reviewers)], BSCAN_COLUMNS),
        "hrf_lesions.csv": _frame([row for v in volumes.values() for row in _lesion_rows(v)], LESION_COLUMNS),
        "hrf_etdrs.csv": _frame([asdict(r) | _dates(r) for r in store.view_rows("hrf_burden_etdrs")], ETDRS_COLUMNS),
        "hrf_layers.csv": _frame([asdict(r) | _dates(r) for r in store.view_rows("hrf_burden_layer")], LAYER_COLUMNS),
        "hrf_review_agreement.csv": agreement_frame(store.view_rows("hrf_review_agreement")),
    }
    return [_write_csv(frame, Path(out_dir) / name) for name, frame in frames.items()]


def _iso(value: date | datetime | None) -> str | None:
    return value.isoformat(sep=" ") if isinstance(value, datetime) else (value.isoformat() if value else None)


def _dates(record: Any) -> dict[str, str | None]:
    """The record's date fields as ISO text, so CSVs sort and parse the same everywhere."""
    names = ("visit_date", "previous_visit_date", "first_visit_date", "latest_visit_date")
    return {name: _iso(getattr(record, name)) for name in names if hasattr(record, name)}


def _frame(rows: list[dict[str, Any]], columns: dict[str, str]) -> pd.DataFrame:
    """Rows as a DataFrame with exactly these columns (header even when empty) and nullable dtypes."""
    frame = pd.DataFrame.from_records(rows, columns=list(columns)) if rows else pd.DataFrame(columns=list(columns))
    return frame.astype(columns)


def patients_frame(
    patients: list[PatientRecord], view: list[PatientBurden], volume_view: list[VolumeBurden], include_identifiers: bool
) -> pd.DataFrame:
    """One row per patient: the `hrf_burden_patient` row (or zeros) plus volume counts."""
    by_id = {row.patient_id: row for row in view}
    rows = []
    for p in patients:
        burden = by_id.get(p.patient_id) or PatientBurden(p.patient_id, 0, None, None, None, None, None, None, None)
        analysed = sum(v.patient_id == p.patient_id for v in volume_view)
        row = asdict(burden) | _dates(burden) | {
            "n_volumes_analysed": analysed, "n_volumes_without_results": p.n_volumes - analysed,
        }
        if include_identifiers:
            row |= {"patient_name": p.name or None, "birth_date": _iso(p.birth_date)}
        rows.append(row)
    return _frame(rows, PATIENT_COLUMNS | (IDENTIFIER_COLUMNS if include_identifiers else {}))


def finished_by(rows: list[ReviewBScan]) -> dict[tuple[int, int], list[str]]:
    """(run id, B-scan index) → the graders who finished that B-scan, sorted."""
    out: dict[tuple[int, int], list[str]] = {}
    for r in rows:
        if r.finished:
            out.setdefault((r.run_id, r.bscan_index), []).append(r.grader)
    return {key: sorted(names) for key, names in out.items()}


def _review_columns(reviewers: dict[tuple[int, int], list[str]], run_id: int) -> dict[str, Any]:
    """A run's B-scans finished by at least one grader, and by whom (empty when nobody reviewed it)."""
    mine = {index: names for (run, index), names in reviewers.items() if run == run_id}
    graders = sorted({name for names in mine.values() for name in names})
    return {"reviewed_bscans": len(mine), "graders": ";".join(graders) or None}


def agreement_frame(view: list[ReviewAgreement]) -> pd.DataFrame:
    """One row per reviewed run and grader: the `hrf_review_agreement` row."""
    return _frame([asdict(r) | _dates(r) for r in view], AGREEMENT_COLUMNS)


def volumes_frame(
    view: list[VolumeBurden], volumes: dict[int, StoredVolume], include_identifiers: bool,
    reviewers: dict[tuple[int, int], list[str]] | None = None,
) -> pd.DataFrame:
    """One row per analysed volume: the `hrf_burden_volume` row with scan geometry, provenance and how
    many of its run's B-scans a grader finished."""
    rows = []
    for burden in view:
        row: dict[str, Any] = asdict(burden) | _dates(burden) | {"run_finished_at_utc": _iso(burden.finished_at)}
        row |= _review_columns(reviewers or {}, burden.run_id)
        volume = volumes.get(burden.volume_id)
        if volume is not None:
            row |= _volume_details(volume, include_identifiers)
        rows.append(row)
    columns = VOLUME_COLUMNS | ({"source_path": "string"} if include_identifiers else {})
    return _frame(rows, columns)


def _volume_details(v: StoredVolume, include_identifiers: bool) -> dict[str, Any]:
    run = v.run
    details = {
        "source_format": v.source_format, "source_sha256": v.source_sha256, "oct_device": v.device,
        "scan_pattern": v.scan_pattern, "acquired_at": _iso(v.acquired_at), "bscan_height_px": v.bscan_shape[0],
        "bscan_width_px": v.bscan_shape[1], "lateral_spacing_mm": v.spacing.lateral_mm,
        "axial_spacing_mm": v.spacing.axial_mm, "bscan_spacing_mm": v.spacing.between_bscans_mm,
        "segmenter": run.segmenter, "segmenter_checkpoint_sha256": run.segmenter_checkpoint_sha256,
        "params_hash": run.params_hash, "parameters_json": json.dumps(run.parameters, sort_keys=True),
        "code_version": run.code_version, "run_device": run.device, "run_time_s": float(sum(run.seconds.values())),
    }
    if include_identifiers:
        details["source_path"] = v.source_path
    return details | _anatomy_details(v)


def _anatomy_details(v: StoredVolume) -> dict[str, Any]:
    """Fovea and mean thickness of the volume's run; empty cells for runs without anatomy or fovea."""
    anatomy, fovea = v.anatomy, v.anatomy.fovea if v.anatomy else None
    return {
        "layer_source": anatomy.layer_source if anatomy else None,
        "fovea_method": fovea.method if fovea else None, "fovea_bscan": fovea.bscan if fovea else None,
        "fovea_col_px": fovea.col if fovea else None, "fovea_x_mm": fovea.x_mm if fovea else None,
        "fovea_y_mm": fovea.y_mm if fovea else None,
        "mean_thickness_um": anatomy.mean_thickness_um if anatomy else None,
    }


def _where(v: StoredVolume) -> dict[str, Any]:
    return {
        "volume_id": v.volume_id, "run_id": v.run.run_id, "patient_id": v.patient_id,
        "visit_date": _iso(v.visit_date), "eye": v.eye,
    }


def _bscan_rows(v: StoredVolume, reviewers: dict[tuple[int, int], list[str]] | None = None) -> list[dict[str, Any]]:
    where = _where(v)
    found = reviewers or {}
    return [
        where | {
            "bscan_index": b.index, "score": b.score, "final_score": b.final_score, "n_iterations": len(b.relevance_peaks),
            "hrf_count": b.hrf_count, "hrf_area_px": b.hrf_area_px, "hrf_area_mm2": b.hrf_area_mm2,
            "relevance_max": b.relevance_max, "n_graders": len(found.get((v.run.run_id, b.index), [])),
            "graders": ";".join(found.get((v.run.run_id, b.index), [])) or None,
        }
        for b in v.bscans
    ]


def _lesion_rows(v: StoredVolume) -> list[dict[str, Any]]:
    where = _where(v)
    rows = []
    for b in v.bscans:
        for les in b.lesions:
            (row, col), (r0, c0, r1, c1) = les.centroid_rc, les.bbox_rc
            x_mm, y_mm = les.centroid_mm if les.centroid_mm is not None else (None, None)
            rows.append(where | {
                "bscan_index": b.index, "lesion_index": les.lesion_index, "centroid_row_px": row,
                "centroid_col_px": col, "bbox_row0_px": r0, "bbox_col0_px": c0, "bbox_row1_px": r1,
                "bbox_col1_px": c1, "hrf_area_px": les.area_px, "hrf_area_mm2": les.area_mm2,
                "centroid_lateral_mm": col * v.spacing.lateral_mm, "centroid_depth_mm": row * v.spacing.axial_mm,
                "centroid_x_mm": x_mm, "centroid_y_mm": y_mm, "zone": les.zone, "etdrs_subfield": les.subfield,
            })
    return rows


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells a spreadsheet would run as a formula (=, +, -, @, tab, CR first) get a leading
    apostrophe (the OWASP rule), so an id like ``=HYPERLINK(...)`` opens as text; numbers stay numbers."""
    out = frame.copy()
    for name in out.columns:
        if out[name].dtype == object or pd.api.types.is_string_dtype(out[name].dtype):
            out[name] = out[name].map(lambda v: f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_START) else v)
    return out


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write via a temporary file, so a failed export never leaves a half-written CSV behind."""
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        spreadsheet_safe(frame).to_csv(partial, index=False, na_rep="", lineterminator="\n", encoding="utf-8")
        partial.replace(path)
    except OSError as exc:
        raise ReportError(
            f"cannot write {path}: {exc.strerror or exc}",
            "choose an output folder you can write to and check free disk space",
        ) from exc
    return path
