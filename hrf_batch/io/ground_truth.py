"""The ground-truth layout of a study with known HRFs (as ``hrf-batch synth`` writes it), in one place.

::

    STUDY/ground_truth/manifest.csv        one row per B-scan: where its volume and masks are, HRF count and area
    STUDY/ground_truth/<stem>.npz          ``labels``: int16 (n, H, W), 0 = background, one id per HRF

Volumes are keyed by (patient id, visit date, eye), which every reader returns, so the masks match
whatever format the volume was written in. Training labels, segmentation evaluation and prompt
calibration all read it through :func:`load_ground_truth`, which says what to do when it is missing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

from hrf_batch.errors import LabelError

TRUTH_DIR = "ground_truth"
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("patient_id", "visit_date", "eye", "format", "source", "mask_file", "bscan_index", "hrf_count",
                    "hrf_area_px")
VolumeKey = tuple[str, date, str]


@dataclass(frozen=True)
class GroundTruthVolume:
    """Where one volume with known HRFs and its label masks were written."""

    patient_id: str
    visit_date: date
    eye: str
    format: str
    source: Path
    mask_file: Path
    hrf_counts: tuple[int, ...]  # per B-scan
    hrf_areas_px: tuple[int, ...]  # per B-scan: HRF pixels


def manifest_path(study_dir: Path) -> Path:
    return Path(study_dir) / TRUTH_DIR / MANIFEST


def has_ground_truth(study_dir: Path) -> bool:
    return manifest_path(study_dir).is_file()


def write_manifest(study_dir: Path, records: list[GroundTruthVolume]) -> Path:
    """``ground_truth/manifest.csv`` for ``records`` (paths stored relative to ``study_dir``)."""
    study_dir = Path(study_dir)
    path = manifest_path(study_dir)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for rec in records:
            for i, (count, area) in enumerate(zip(rec.hrf_counts, rec.hrf_areas_px, strict=True)):
                writer.writerow([
                    rec.patient_id, rec.visit_date.isoformat(), rec.eye, rec.format,
                    rec.source.relative_to(study_dir).as_posix(), rec.mask_file.relative_to(study_dir).as_posix(),
                    i, count, area,
                ])
    return path


def load_ground_truth(study_dir: Path, needed_for: str = "this command") -> dict[VolumeKey, np.ndarray]:
    """HRF label masks ``(n, H, W)`` keyed by (patient id, visit date, eye).

    :class:`LabelError` when the study has no ground truth, naming ``needed_for`` so the user knows
    why it was looked for."""
    study_dir = Path(study_dir)
    if not has_ground_truth(study_dir):
        raise LabelError(f"{study_dir} has no {TRUTH_DIR}/{MANIFEST}, which {needed_for} needs",
                         "use a study written by `hrf-batch synth`, which writes HRF masks beside the scans")
    out: dict[VolumeKey, np.ndarray] = {}
    with open(manifest_path(study_dir), newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["patient_id"], date.fromisoformat(row["visit_date"]), row["eye"])
            if key not in out:
                out[key] = np.load(study_dir / row["mask_file"])["labels"]
    return out


def count_labels(labels: np.ndarray) -> np.ndarray:
    """Number of distinct HRF ids per B-scan of an (n, H, W) label volume."""
    return np.array([len(np.unique(lab[lab > 0])) for lab in labels], dtype=int)


def label_areas(labels: np.ndarray) -> np.ndarray:
    """HRF pixels per B-scan of an (n, H, W) label volume."""
    return (np.asarray(labels) > 0).reshape(len(labels), -1).sum(axis=1)
