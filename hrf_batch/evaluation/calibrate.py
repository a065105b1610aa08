"""Grid search of the prompt's box and crop size with prompts at ground-truth HRF centres.

Morelle et al. (BVM 2025) chose the 4-px box and the crop size by prompting SAM at the centres of
the annotated HRFs, which separates the segmenter's quality from the relevance maps' (Dice about
0.67 there). This does the same for any :class:`Segmenter` on a study with ground truth.

Definitions:

* centre of an HRF: the pixel holding its centroid, or, when the centroid falls outside a
  non-convex HRF, the HRF pixel nearest to it;
* per-HRF Dice: the segmenter's whole answer for that prompt (it lies inside the crop) against
  that HRF's pixels, with the pixels of *other* ground-truth HRFs ignored — catching a touching
  neighbour is not counted against the segmenter, anything else it returns is; an empty answer
  scores 0;
* each setting's score: the mean (and median) over the same HRFs, a seeded sample of at most
  ``limit_hrfs`` of them, so settings are compared on identical prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from hrf_batch.errors import LabelError
from hrf_batch.evaluation.segmentation import labelled_volumes
from hrf_batch.io.ground_truth import load_ground_truth
from hrf_batch.segment import Segmenter
from hrf_batch.segment.prompts import DEFAULT_BOX_PX, DEFAULT_CROP_PX, make_prompt

_CHUNK = 32  # prompts per segmenter call: bounds the memory of full-size masks


@dataclass(frozen=True)
class _Hrf:
    key: tuple[str, date, str]  # (patient, visit date, eye) of the volume
    bscan: int
    label: int


def hrf_centre(hrf: np.ndarray) -> tuple[int, int]:
    """(row, col) of the HRF's centroid pixel, or the HRF pixel nearest the centroid."""
    rows, cols = np.nonzero(hrf)
    if rows.size == 0:
        raise ValueError("the HRF mask is empty; pass the mask of one ground-truth HRF")
    cr, cc = rows.mean(), cols.mean()
    r, c = int(np.rint(cr)), int(np.rint(cc))  # index coordinates: the pixel whose centre is nearest
    if hrf[r, c]:
        return r, c
    i = int(np.argmin((rows - cr) ** 2 + (cols - cc) ** 2))
    return int(rows[i]), int(cols[i])


def hrf_dice(pred: np.ndarray, labels: np.ndarray, label: int) -> float:
    """Dice of ``pred`` against HRF ``label`` of the label mask, other HRFs' pixels ignored."""
    target = labels == label
    p = np.asarray(pred, dtype=bool) & ~((labels > 0) & ~target)
    den = int(p.sum()) + int(target.sum())
    return 2.0 * int((p & target).sum()) / den if den else 1.0


def _sample_hrfs(study_dir: Path, limit_hrfs: int | None, seed: int) -> list[_Hrf]:
    """Every ground-truth HRF of the study (or a seeded sample), in a stable order."""
    truth = load_ground_truth(Path(study_dir), "calibration (it prompts at true HRF centres)")
    hrfs = [_Hrf(key, b, int(lab)) for key in sorted(truth) for b in range(len(truth[key]))
            for lab in np.unique(truth[key][b]) if lab > 0]
    if limit_hrfs is not None and len(hrfs) > limit_hrfs:
        pick = np.sort(np.random.default_rng(seed).choice(len(hrfs), size=int(limit_hrfs), replace=False))
        hrfs = [hrfs[i] for i in pick]
    return hrfs


def _load_targets(study_dir: Path, hrfs: list[_Hrf]) -> list[tuple[np.ndarray, np.ndarray, int, tuple[int, int]]]:
    """(image, labels, label, centre) per sampled HRF; images shared between HRFs of a B-scan."""
    wanted: dict[tuple, list[_Hrf]] = {}
    for h in hrfs:
        wanted.setdefault(h.key, []).append(h)
    out = []
    for vol, labels in labelled_volumes(study_dir):
        key = (vol.meta.patient_id, vol.meta.visit_date, vol.meta.eye)
        scans: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # copies, so the volume itself can be freed
        for h in wanted.pop(key, []):
            if h.bscan not in scans:
                scans[h.bscan] = (vol.bscans[h.bscan].copy(), labels[h.bscan].copy())
            img, lab = scans[h.bscan]
            out.append((img, lab, h.label, hrf_centre(lab == h.label)))
    return out


def _score_setting(segmenter: Segmenter, targets: list, box: int, crop_px: int) -> dict[str, Any]:
    dice = []
    for start in range(0, len(targets), _CHUNK):
        part = targets[start:start + _CHUNK]
        prompts = [make_prompt(centre, img.shape, box, crop_px) for img, _, _, centre in part]
        masks = segmenter.segment([img for img, *_ in part], prompts)
        dice += [hrf_dice(m, lab, label) for m, (_, lab, label, _) in zip(masks, part)]
    d = np.asarray(dice)
    return {"box_px": int(box), "crop_px": int(crop_px), "dice": float(d.mean()), "dice_median": float(np.median(d)),
            "empty_fraction": float(np.mean(d == 0.0)), "n_hrfs": int(d.size), "segmenter": segmenter.name}


def calibrate(study_dir: Path, segmenter: Segmenter, *, box_sizes: tuple[int, ...] = (2, 4, 6, 8),
              crop_sizes: tuple[int, ...] = (50, 75, 100), limit_hrfs: int | None = 300,
              seed: int = 0) -> list[dict[str, Any]]:
    """Mean per-HRF Dice of ``segmenter`` prompted at true HRF centres, one row per (box, crop)
    setting in grid order. Shows what the segmenter can do when the prompt is right."""
    if limit_hrfs is not None and limit_hrfs < 1:
        raise ValueError(f"limit_hrfs must be >= 1 or None (all HRFs), got {limit_hrfs}")
    targets = _load_targets(Path(study_dir), _sample_hrfs(Path(study_dir), limit_hrfs, seed))
    if not targets:
        raise LabelError(f"no ground-truth HRF found in a readable volume of {study_dir}",
                         "calibrate on a study with HRFs (e.g. `hrf-batch synth` with more B-scans)")
    return [_score_setting(segmenter, targets, box, crop_px) for crop_px in crop_sizes for box in box_sizes]


def format_calibration(rows: list[dict[str, Any]]) -> str:
    """Settings sorted by mean Dice (ties in grid order), the best marked with '*'; the default noted."""
    if not rows:
        return "no calibration results"
    ranked = sorted(rows, key=lambda r: -r["dice"])
    lines = [f"segmenter {ranked[0]['segmenter']}, prompts at {ranked[0]['n_hrfs']} ground-truth HRF centres",
             f"  {'box px':>6} {'crop px':>7} {'Dice':>6} {'median':>6} {'empty':>6}"]
    for r in ranked:
        mark = "*" if r["dice"] == ranked[0]["dice"] else " "  # ties share the mark
        note = "  (default)" if (r["box_px"], r["crop_px"]) == (DEFAULT_BOX_PX, DEFAULT_CROP_PX) else ""
        lines.append(f"{mark} {r['box_px']:>6} {r['crop_px']:>7} {r['dice']:6.3f} {r['dice_median']:6.3f} "
                     f"{r['empty_fraction']:6.2f}{note}")
    lines.append("* best mean Dice")
    return "\n".join(lines)
