"""The ground-truth layout of a study with known HRFs (as ``hrf-batch synth`` writes it), in one place.

::

    STUDY/ground_truth/manifest.csv        one row per B-scan: where its volume and masks are, HRF count and area
    STUDY/ground_truth/<stem>.npz          ``labels``: int16 (n, H, W), 0 = background, one id per HRF;
                                           ``layers_<NAME>``: float32 (n, W), the true row of each boundary
                                           of LAYER_NAMES; ``fovea_rc``: float64 [B-scan index, column] of
                                           the foveal centre (both fractional)

Volumes are keyed by (patient id, visit date, eye), which every reader returns, so the masks match
whatever format the volume was written in. Columns are those of the B-scans as written (a left eye's
truth is mirrored like its images). Training labels, segmentation evaluation and prompt calibration
read the masks through :func:`load_ground_truth`; the anatomy evaluation reads layers and fovea
through :func:`load_anatomy_truth`. Both say what to do when the truth is missing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

from hrf_batch.errors import LabelError
from hrf_batch.io.volume import LAYER_NAMES, LayerLines

TRUTH_DIR = "ground_truth"
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("patient_id", "visit_date", "eye", "format", "source", "mask_file", "bscan_index", "hrf_count",
                    "hrf_area_px")
VolumeKey = tuple[str, date, str]
LAYER_PREFIX = "layers_"
FOVEA_KEY = "fovea_rc"
_SYNTH_HINT = "use a study written by `hrf-batch synth`, which writes HRF masks beside the scans"


@dataclass(frozen=True, eq=False)
class SyntheticVolume:
    """What a synthetic generator knows about one volume it drew: the images and HRF labels, and the
    anatomy they were drawn from, so layer and fovea estimates can be scored against it.

    ``layers`` maps LAYER_NAMES keys to float32 ``(n, W)`` rows; the fovea is at fractional B-scan
    index ``fovea_bscan`` and column ``fovea_col``, in the coordinates of ``images``."""

    images: np.ndarray
    labels: np.ndarray
    layers: dict[str, np.ndarray]
    fovea_bscan: float
    fovea_col: float

    def mirrored(self) -> SyntheticVolume:
        """The same volume seen as a left eye: columns reversed, column ``c`` becomes ``W - 1 - c``."""
        width = self.images.shape[2]
        return SyntheticVolume(
            images=self.images[:, :, ::-1].copy(), labels=self.labels[:, :, ::-1].copy(),
            layers={k: v[:, ::-1].copy() for k, v in self.layers.items()},
            fovea_bscan=self.fovea_bscan, fovea_col=width - 1 - self.fovea_col,
        )


@dataclass(frozen=True, eq=False)
class AnatomyTruth:
    """The true layer lines (source "ground-truth") and foveal centre of one synthetic volume."""

    layers: LayerLines
    fovea_bscan: float
    fovea_col: float


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
    return {key: np.load(study_dir / mask_file)["labels"] for key, mask_file in _mask_files(study_dir, needed_for).items()}


def _mask_files(study_dir: Path, needed_for: str) -> dict[VolumeKey, str]:
    """Each volume's ground-truth file (relative to the study), from the manifest, in its order."""
    if not has_ground_truth(study_dir):
        raise LabelError(f"{study_dir} has no {TRUTH_DIR}/{MANIFEST}, which {needed_for} needs", _SYNTH_HINT)
    out: dict[VolumeKey, str] = {}
    with open(manifest_path(study_dir), newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault((row["patient_id"], date.fromisoformat(row["visit_date"]), row["eye"]), row["mask_file"])
    return out


def truth_arrays(truth: SyntheticVolume) -> dict[str, np.ndarray]:
    """The anatomy entries of a volume's ground-truth file (the layout in the module docstring)."""
    out = {f"{LAYER_PREFIX}{name}": np.asarray(rows, dtype=np.float32) for name, rows in truth.layers.items()}
    out[FOVEA_KEY] = np.array([truth.fovea_bscan, truth.fovea_col], dtype=np.float64)
    return out


def load_anatomy_truth(study_dir: Path, needed_for: str = "the anatomy evaluation") -> dict[VolumeKey, AnatomyTruth]:
    """True layer lines and foveal centre of every volume, keyed by (patient id, visit date, eye).

    :class:`LabelError` when the study has no ground truth, or when it was written before the
    ground truth held the anatomy (write it again with `hrf-batch synth`)."""
    study_dir = Path(study_dir)
    out: dict[VolumeKey, AnatomyTruth] = {}
    for key, mask_file in _mask_files(study_dir, needed_for).items():
        with np.load(study_dir / mask_file) as data:
            names = [n for n in LAYER_NAMES if f"{LAYER_PREFIX}{n}" in data.files]
            if not names or FOVEA_KEY not in data.files:
                raise LabelError(
                    f"{study_dir / mask_file} holds HRF masks but no layer lines or fovea, which {needed_for} needs "
                    "(the study was written by an older hrf-batch)",
                    "write the study again with `hrf-batch synth`",
                )
            rows = {n: data[f"{LAYER_PREFIX}{n}"].astype(np.float32) for n in names}
            bscan, col = (float(v) for v in data[FOVEA_KEY])
        out[key] = AnatomyTruth(LayerLines(rows=rows, source="ground-truth"), bscan, col)
    return out


def count_labels(labels: np.ndarray) -> np.ndarray:
    """Number of distinct HRF ids per B-scan of an (n, H, W) label volume."""
    return np.array([len(np.unique(lab[lab > 0])) for lab in labels], dtype=int)


def label_areas(labels: np.ndarray) -> np.ndarray:
    """HRF pixels per B-scan of an (n, H, W) label volume."""
    return (np.asarray(labels) > 0).reshape(len(labels), -1).sum(axis=1)
