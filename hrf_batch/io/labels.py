"""Image-level labels for training and evaluation: which B-scan has how many HRFs.

Two sources: a study folder with ground truth (``ground_truth/manifest.csv`` and label masks, as
``hrf-batch synth`` writes them), or a CSV with one row per B-scan:
``file, bscan_index, count`` (or ``label`` 0/1), optional ``eye`` for files holding both eyes.
Paths in the CSV are relative to the study folder. B-scans are kept as uint8 (the 0..255 display
scale) to hold thousands in memory.
"""

from __future__ import annotations

import csv
import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrf_batch.errors import LabelError
from hrf_batch.io.discover import FileIssue
from hrf_batch.io.ground_truth import count_labels, load_ground_truth
from hrf_batch.io.readers import read_volumes
from hrf_batch.io.study import iter_study
from hrf_batch.io.volume import Volume, VolumeMeta


@dataclass
class LabelledBScans:
    """B-scans with HRF counts and the patient each belongs to (for patient-level splits)."""

    images: list[np.ndarray]  # uint8 (H, W) each; sizes may differ between volumes
    counts: np.ndarray  # int (N,)
    patients: np.ndarray  # str (N,)
    masks: list[np.ndarray] | None = None  # int label masks (H, W) when ground truth has them
    keys: list[str] | None = None  # "source#eye#index", for reports

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> "LabelledBScans":
        pick = [int(i) for i in index]
        return LabelledBScans(
            images=[self.images[i] for i in pick], counts=self.counts[pick], patients=self.patients[pick],
            masks=[self.masks[i] for i in pick] if self.masks is not None else None,
            keys=[self.keys[i] for i in pick] if self.keys is not None else None,
        )


def combine(parts: list[tuple[str, LabelledBScans]]) -> LabelledBScans:
    """Several labelled studies as one training set. Patient ids are prefixed with the study's name
    (``name/P001``), so two studies that both number their patients P001.. never share a patient
    across the train/validation split."""
    if len(parts) == 1:
        return parts[0][1]
    names = [name for name, _ in parts]
    if len(set(names)) != len(names):
        raise LabelError(f"studies with the same folder name {sorted(names)} cannot be told apart",
                         "rename one of the study folders")
    have_masks = all(d.masks is not None for _, d in parts)
    return LabelledBScans(
        images=[img for _, d in parts for img in d.images],
        counts=np.concatenate([d.counts for _, d in parts]),
        patients=np.concatenate([np.char.add(f"{name}/", d.patients.astype(str)) for name, d in parts]),
        masks=[m for _, d in parts for m in d.masks] if have_masks else None,  # type: ignore[union-attr]
        keys=[k for _, d in parts for k in (d.keys or [""] * len(d))],
    )


def as_uint8(bscans: np.ndarray) -> np.ndarray:
    """B-scans as training sees them (display scale rounded to 8 bits), the same in memory and streamed."""
    return np.clip(np.rint(bscans), 0, 255).astype(np.uint8)


def _collect(volumes: list[tuple[Volume, np.ndarray, np.ndarray | None]]) -> LabelledBScans:
    images, counts, patients, masks, keys = [], [], [], [], []
    have_masks = all(m is not None for _, _, m in volumes)
    for vol, vol_counts, vol_masks in volumes:
        pixels = as_uint8(vol.bscans)
        for i in range(vol.n_bscans):
            images.append(pixels[i])
            counts.append(int(vol_counts[i]))
            patients.append(vol.meta.patient_id)
            keys.append(f"{vol.meta.source_path}#{vol.meta.eye}#{i}")
            if have_masks:
                masks.append(vol_masks[i])
    if not images:
        raise LabelError("no labelled B-scans found", "check that the study folder holds OCT files and labels")
    return LabelledBScans(images, np.asarray(counts), np.asarray(patients), masks if have_masks else None, keys)


def load_study_labels(study_dir: Path) -> LabelledBScans:
    """B-scans of a study with ground truth written by ``hrf-batch synth`` (masks included)."""
    study_dir = Path(study_dir)
    truth = load_ground_truth(study_dir, "image-level labels without --labels CSV (columns file, bscan_index, count)")
    found = []
    for item in iter_study(study_dir):
        if isinstance(item, FileIssue):
            continue
        key = (item.meta.patient_id, item.meta.visit_date, item.meta.eye)
        if key not in truth:
            raise LabelError(f"no ground truth for {key} ({item.meta.source_path})", "regenerate the study or its manifest")
        found.append((item, count_labels(truth[key]), truth[key]))
    return _collect(found)


def _read_csv(csv_path: Path) -> list[dict[str, str]]:
    try:
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise LabelError(f"cannot read labels file {csv_path}: {exc.strerror}", "check the path") from exc
    if not rows:
        raise LabelError(f"labels file {csv_path} has no rows", "add one row per B-scan")
    cols = set(rows[0])
    if not {"file", "bscan_index"} <= cols or not ({"count", "label"} & cols):
        raise LabelError(
            f"labels file {csv_path} has columns {sorted(cols)}",
            "it needs file, bscan_index and count (or label 0/1); eye is optional",
        )
    return rows


def _row_count(row: dict[str, str], csv_path: Path, line: int) -> int:
    raw = row.get("count") if row.get("count") not in (None, "") else row.get("label")
    try:
        value = int(float(raw))
    except (TypeError, ValueError) as exc:
        raise LabelError(f"{csv_path} line {line}: count/label {raw!r} is not a number", "use an integer HRF count or 0/1") from exc
    if value < 0:
        raise LabelError(f"{csv_path} line {line}: negative count {value}", "use an HRF count ≥ 0")
    return value


def wanted_bscans(csv_path: Path) -> dict[tuple[str, str], dict[int, int]]:
    """The labels CSV as {(file, eye or ""): {B-scan index: HRF count}}, checked row by row."""
    wanted: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for line, row in enumerate(_read_csv(Path(csv_path)), start=2):
        wanted[(row["file"], row.get("eye", "") or "")][int(row["bscan_index"])] = _row_count(row, Path(csv_path), line)
    return wanted


def load_csv_labels(csv_path: Path, study_dir: Path) -> LabelledBScans:
    """B-scans named in a labels CSV (paths relative to ``study_dir``)."""
    wanted = wanted_bscans(csv_path)
    found = []
    for (file, eye), by_index in sorted(wanted.items()):
        volumes = [v for v in read_volumes(Path(study_dir) / file) if eye in ("", v.meta.eye)]
        if len(volumes) != 1:
            raise LabelError(f"{file}: {len(volumes)} volumes match eye {eye or '(any)'}", "add an eye column (OD/OS) to the labels CSV")
        vol = volumes[0]
        bad = [i for i in by_index if not 0 <= i < vol.n_bscans]
        if bad:
            raise LabelError(f"{file}: B-scan indices {bad[:5]} out of range 0..{vol.n_bscans - 1}", "fix the labels CSV")
        keep = sorted(by_index)
        sub = Volume(bscans=vol.bscans[keep], meta=_no_positions(vol), localizer=None)
        found.append((sub, np.array([by_index[i] for i in keep]), None))
    return _collect(found)


def _no_positions(vol: Volume) -> VolumeMeta:
    """Metadata for a subset of B-scans: positions no longer line up, so they are dropped."""
    return dataclasses.replace(vol.meta, positions=())
