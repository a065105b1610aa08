"""The anatomy stage against a synthetic study's truth: layer lines, fovea, ETDRS counts, retina band.

Why: lesion zones, ETDRS counts and the retina band are only as good as the layer lines and the
fovea they rest on, and the counts per subfield must agree with the truth up to what the
segmentation itself gets wrong. One pipeline run per volume gives every figure:

* layer lines: mean absolute error in µm per boundary over the A-scans where both the estimate and
  the truth are known (estimated lines are compared even when the study's files carry none);
* fovea: distance in µm on the localizer between the found and the true foveal centre;
* ETDRS: per subfield, the true HRFs (ground-truth components placed with the *true* fovea) and the
  lesions found (placed by the pipeline with its own fovea). A found lesion is true when it overlaps
  an HRF, as in :mod:`hrf_batch.evaluation.segmentation`; ``explained`` holds when the difference
  of the two counts is at most the lesions missed, the false lesions, and the matched ones that
  landed in another subfield;
* retina band: found lesions that overlap no HRF, by the *true* zone of their centre (above ILM,
  inside ILM..BM, below BM), with lesion precision and recall.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from hrf_batch.anatomy.etdrs import lesion_subfield
from hrf_batch.anatomy.fovea import fovea_mm
from hrf_batch.anatomy.zones import zone_of
from hrf_batch.errors import LabelError
from hrf_batch.evaluation.segmentation import labelled_volumes, lesion_match
from hrf_batch.io.ground_truth import AnatomyTruth, load_anatomy_truth
from hrf_batch.io.volume import Volume
from hrf_batch.model.classify import Classifier
from hrf_batch.pipeline import PipelineParams, run_volume
from hrf_batch.results import SUBFIELD_OUTSIDE, SUBFIELD_UNKNOWN, SUBFIELDS, Fovea, Lesion, VolumeResult
from hrf_batch.segment import Segmenter

BOUNDARIES = ("ILM", "INL", "ELM", "EZ", "BM")
SUBFIELD_ROWS = (*SUBFIELDS, SUBFIELD_OUTSIDE, SUBFIELD_UNKNOWN)


def truth_fovea(volume: Volume, truth: AnatomyTruth) -> Fovea:
    """The true foveal centre as a Fovea (localizer position through the volume's own positions)."""
    where = fovea_mm(volume.meta, truth.fovea_bscan, truth.fovea_col, volume.bscan_shape[1])
    x, y = where if where is not None else (None, None)
    return Fovea(truth.fovea_bscan, truth.fovea_col, x, y, "ground-truth")


def layer_errors_um(result: VolumeResult, truth: AnatomyTruth, axial_mm: float) -> dict[str, list[float]]:
    """Absolute errors (µm) per boundary over the A-scans where both lines are known."""
    out: dict[str, list[float]] = {}
    layers = result.anatomy.layers if result.anatomy is not None else None
    for name in BOUNDARIES:
        found = layers.get(name) if layers is not None else None
        true = truth.layers.get(name)
        if found is None or true is None:
            continue
        ok = np.isfinite(found) & np.isfinite(true)
        out[name] = (np.abs(found[ok] - true[ok]) * axial_mm * 1000.0).tolist()
    return out


def fovea_error_um(result: VolumeResult, true: Fovea) -> float | None:
    """Distance on the localizer between the found and the true fovea; None when none was found."""
    found = result.anatomy.fovea if result.anatomy is not None else None
    if found is None or found.x_mm is None or true.x_mm is None:
        return None
    return float(np.hypot(found.x_mm - true.x_mm, found.y_mm - true.y_mm) * 1000.0)


def hrfs_hit(gt: np.ndarray, les: Lesion) -> list[int]:
    """The HRF label ids a found lesion overlaps (empty: a false lesion)."""
    r0, c0, r1, c1 = les.bbox_rc
    return [int(h) for h in np.unique(gt[r0:r1, c0:c1][les.mask]) if h > 0]


def subfield_counts(volume: Volume, labels: np.ndarray, result: VolumeResult, true_fovea: Fovea) -> Counter:
    """Per subfield: 'true' HRFs, 'found' lesions, 'false' found lesions, 'missed' HRFs and 'moved'
    (matched pairs whose subfields differ, counted once in each of the two subfields)."""
    width = volume.bscan_shape[1]
    out: Counter = Counter()
    for b in result.bscans:
        gt = labels[b.index]
        ids = np.unique(gt[gt > 0])
        true_sub: dict[int, str] = {}
        for k in ids.tolist():
            rows, cols = np.nonzero(gt == k)
            true_sub[k] = lesion_subfield(volume.meta, true_fovea, b.index, float(cols.mean()), width)
            out[(true_sub[k], "true")] += 1
        detected: set[int] = set()
        for les in b.lesions:
            hit = hrfs_hit(gt, les)
            out[(les.subfield, "found")] += 1
            if not hit:
                out[(les.subfield, "false")] += 1
                continue
            detected.update(hit)
            if all(true_sub[h] != les.subfield for h in hit):
                out[(les.subfield, "moved")] += 1
                out[(true_sub[hit[0]], "moved")] += 1
        for k in ids.tolist():
            if k not in detected:
                out[(true_sub[k], "missed")] += 1
    return out


def false_lesion_zones(volume: Volume, labels: np.ndarray, result: VolumeResult, truth: AnatomyTruth) -> Counter:
    """Found lesions overlapping no HRF, by the true zone of their centre: 'above-ilm', 'retina', 'below-bm'."""
    out: Counter = Counter()
    for b in result.bscans:
        gt = labels[b.index]
        for les in b.lesions:
            if hrfs_hit(gt, les):
                continue
            zone = zone_of(truth.layers, b.index, *les.centroid_rc)
            out[zone if zone in ("above-ilm", "below-bm") else "retina"] += 1
    return out


def evaluate_anatomy(study_dir: Path, clf: Classifier, segmenter: Segmenter, params: PipelineParams = PipelineParams(),
                     *, limit_volumes: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Run the pipeline over a synthetic study and score its anatomy against the study's truth."""
    truth = load_anatomy_truth(Path(study_dir))
    errors: dict[str, list[float]] = {name: [] for name in BOUNDARIES}
    fovea_errors: list[float] = []
    no_fovea = 0
    per_subfield: Counter = Counter()
    false_zones: Counter = Counter()
    lesions: Counter = Counter()
    n_volumes = 0
    for vol, labels in labelled_volumes(study_dir, limit_volumes, progress=progress):
        key = (vol.meta.patient_id, vol.meta.visit_date, vol.meta.eye)
        if key not in truth:
            raise LabelError(f"no anatomy ground truth for {key} ({vol.meta.source_path})",
                             "write the study again with `hrf-batch synth`, which stores the true layers and fovea")
        t = truth[key]
        result = run_volume(vol, clf, segmenter, params)
        n_volumes += 1
        for name, errs in layer_errors_um(result, t, vol.meta.spacing.axial_mm).items():
            errors[name] += errs
        true_fovea = truth_fovea(vol, t)
        err = fovea_error_um(result, true_fovea)
        if err is None:
            no_fovea += 1
        else:
            fovea_errors.append(err)
        per_subfield += subfield_counts(vol, labels, result, true_fovea)
        false_zones += false_lesion_zones(vol, labels, result, t)
        for b in result.bscans:  # the segmentation evaluation's lesion matching, on the kept lesions' mask
            lesions.update(lesion_match(b.mask, labels[b.index], params.min_lesion_px))
    if n_volumes == 0:
        raise LabelError(f"no readable volume with ground truth in {study_dir}",
                         "check the study folder (see `hrf-batch scan`) or regenerate it")
    etdrs = {}
    for sub in SUBFIELD_ROWS:
        row = {k: int(per_subfield[(sub, k)]) for k in ("true", "found", "false", "missed", "moved")}
        row["explained"] = abs(row["found"] - row["true"]) <= row["false"] + row["missed"] + row["moved"]
        etdrs[sub] = row
    return {
        "n_volumes": n_volumes,
        "retina_band": params.retina_band,
        "layer_mae_um": {k: float(np.mean(v)) if v else None for k, v in errors.items()},
        "fovea_error_um": {"mean": float(np.mean(fovea_errors)) if fovea_errors else None,
                           "max": float(np.max(fovea_errors)) if fovea_errors else None,
                           "n_found": len(fovea_errors), "n_not_found": no_fovea},
        "etdrs": etdrs,
        "false_lesions_by_true_zone": {z: int(false_zones[z]) for z in ("above-ilm", "retina", "below-bm")},
        "lesions": {"found": int(lesions["n_pred_lesions"]), "true_positive": int(lesions["n_tp_lesions"]),
                    "hrfs": int(lesions["n_gt_hrfs"]), "detected": int(lesions["n_detected_hrfs"]),
                    "precision": lesions["n_tp_lesions"] / lesions["n_pred_lesions"] if lesions["n_pred_lesions"] else None,
                    "recall": lesions["n_detected_hrfs"] / lesions["n_gt_hrfs"] if lesions["n_gt_hrfs"] else None},
    }


def format_anatomy(report: dict[str, Any]) -> str:
    """The report as plain-text tables."""
    def num(v: Any, fmt: str = ".1f") -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = [f"volumes: {report['n_volumes']}, retina band {'on' if report['retina_band'] else 'off'}",
             "layer lines, mean absolute error (µm): "
             + ", ".join(f"{k} {num(v)}" for k, v in report["layer_mae_um"].items())]
    fov = report["fovea_error_um"]
    lines.append(f"fovea error (µm): mean {num(fov['mean'])}, max {num(fov['max'])} "
                 f"({fov['n_found']} found, {fov['n_not_found']} not found)")
    lines.append("ETDRS subfield   true  found  false  missed  moved  explained")
    for sub, row in report["etdrs"].items():
        lines.append(f"  {sub:<13}{row['true']:>6}{row['found']:>7}{row['false']:>7}{row['missed']:>8}"
                     f"{row['moved']:>7}  {'yes' if row['explained'] else 'NO'}")
    fz = report["false_lesions_by_true_zone"]
    les = report["lesions"]
    lines.append(f"false lesions by true zone: above ILM {fz['above-ilm']}, retina {fz['retina']}, below BM {fz['below-bm']}")
    lines.append(f"lesions: precision {num(les['precision'], '.3f')}, recall {num(les['recall'], '.3f')} "
                 f"({les['found']} found, {les['hrfs']} HRFs)")
    return "\n".join(lines)
