"""Play a grader from a synthetic study's ground truth, so `evaluate --reviewed` can be checked against
`evaluate --segmentation` on the same B-scans.

For the latest done run of every volume in the database that the study's ``ground_truth/`` knows,
the grader (default "truth")

* accepts each model lesion that meets a true HRF by the segmentation evaluation's own matching rule
  (:func:`hrf_batch.evaluation.segmentation.lesion_match`, with the run's ``min_lesion_px``), and
  rejects the others;
* adds each true HRF that no model lesion meets, with its true mask (segmenter "ground-truth");
* answers each B-scan's HRF yes/no from the truth.

The graded figures then equal `evaluate --segmentation`'s wherever each model lesion meets at most
one true HRF and each true HRF at most one model lesion; a lesion spanning two HRFs counts as one
accepted lesion (while the segmentation evaluation detects both HRFs), two lesions on one HRF as two
accepted lesions, and the script reports how many B-scans have such a lesion.

    .venv/bin/python scripts/grade_from_truth.py STUDY --db STUDY/x.sqlite [--grader truth]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrf_batch.errors import HrfBatchError
from hrf_batch.evaluation.segmentation import lesion_match
from hrf_batch.io.ground_truth import load_ground_truth
from hrf_batch.store import Store, StoredBScan, StoredLesion, open_store

SEGMENTER = "ground-truth"


@dataclass
class Graded:
    """What the played grader decided."""

    runs: int = 0
    bscans: int = 0
    accepted: int = 0
    rejected: int = 0
    added: int = 0
    not_one_to_one: int = 0  # B-scans where a lesion met two HRFs or an HRF two lesions
    skipped_volumes: int = 0  # volumes the study's truth does not know


def _full_mask(lesion: StoredLesion, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    r0, c0, r1, c1 = lesion.bbox_rc
    out[r0:r1, c0:c1] = lesion.mask
    return out


def _click(hrf: np.ndarray) -> tuple[int, int]:
    """The HRF's pixel nearest its centroid: where a grader would click."""
    rows, cols = np.nonzero(hrf)
    k = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return int(rows[k]), int(cols[k])


def grade_bscan(store: Store, run_id: int, bscan: StoredBScan, labels: np.ndarray, grader: str,
                min_lesion_px: int, graded: Graded) -> None:
    """One B-scan: a verdict on every model lesion, the missed HRFs added, yes/no from the truth."""
    shape = labels.shape
    masks = [_full_mask(les, shape) for les in bscan.lesions]
    hit_ids: list[set[int]] = []
    for lesion, mask in zip(bscan.lesions, masks):
        met = lesion_match(mask, labels, min_lesion_px)["n_tp_lesions"] > 0
        store.save_lesion_verdict(run_id, bscan.index, lesion.lesion_index, grader, "accept" if met else "reject")
        graded.accepted += met
        graded.rejected += not met
        hit_ids.append(set(np.unique(labels[mask & (labels > 0)]).tolist()))
    found = np.logical_or.reduce(masks) if masks else np.zeros(shape, dtype=bool)
    for hrf_id in np.unique(labels[labels > 0]).tolist():
        one = np.where(labels == hrf_id, labels, 0)
        if lesion_match(found, one, min_lesion_px)["n_detected_hrfs"] == 0:
            store.save_added_lesion(run_id, bscan.index, grader, _click(labels == hrf_id), labels == hrf_id, SEGMENTER)
            graded.added += 1
    ids = [i for hits in hit_ids for i in hits]
    graded.not_one_to_one += any(len(h) > 1 for h in hit_ids) or len(ids) != len(set(ids))
    store.save_bscan_verdict(run_id, bscan.index, grader, bool((labels > 0).any()))
    graded.bscans += 1


def grade_from_truth(store: Store, study_dir: Path, grader: str = "truth") -> Graded:
    """Grade the latest done run of every volume the study's ground truth knows (see the module docstring)."""
    truth = load_ground_truth(Path(study_dir), "grading from the ground truth")
    graded = Graded()
    for patient in store.list_patients():
        for volume in store.volume_results(patient.patient_id, masks=False):
            labels = truth.get((volume.patient_id, volume.visit_date, volume.eye))
            if labels is None or labels.shape[1:] != volume.bscan_shape:
                graded.skipped_volumes += 1
                continue
            run = volume.run
            min_px = int(run.parameters.get("min_lesion_px", 1))
            for bscan in store.bscans_for_run(run.run_id, masks=True):
                grade_bscan(store, run.run_id, bscan, labels[bscan.index], grader, min_px, graded)
            graded.runs += 1
    return graded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="synthetic study folder (with ground_truth/)")
    parser.add_argument("--db", required=True, help="database URL or SQLite file the study was ingested into")
    parser.add_argument("--grader", default="truth", help="grader name for the verdicts (default: truth)")
    args = parser.parse_args(argv)
    try:
        with open_store(args.db) as store:
            g = grade_from_truth(store, args.study, args.grader)
    except HrfBatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"graded {g.bscans} B-scans of {g.runs} runs as {args.grader!r}: {g.accepted} lesions accepted, "
          f"{g.rejected} rejected, {g.added} missed HRF added; {g.not_one_to_one} B-scans where lesions and HRFs do "
          f"not pair one to one; {g.skipped_volumes} volumes without ground truth skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
