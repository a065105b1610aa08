"""Segmentation quality against ground-truth HRF masks, as in Morelle et al. (BVM 2025), Tables 1-2.

Why these definitions: the paper reports per-B-scan averages without spelling out which B-scans
enter them, so the choice is fixed here and every number carries its ``n``.

Pixel metrics (:func:`bscan_scores`, :func:`aggregate`), per B-scan with prediction ``P`` and truth ``G``:
Dice ``2|P∩G| / (|P|+|G|)``, recall ``|P∩G| / |G|`` (defined only when ``G`` is non-empty),
precision ``|P∩G| / |P|`` (defined only when ``P`` is non-empty). A B-scan with neither HRF nor
prediction is perfect and left out. ``dice`` is the mean over B-scans with a ground-truth HRF *or*
a prediction; ``recall`` the mean over GT-positive B-scans; ``precision`` the mean over B-scans
with a prediction. ``*_gt_positive`` repeat Dice and precision over GT-positive B-scans only
(recall is the same by definition); ``*_pooled`` sum the pixels of all B-scans first.

Lesions: predicted lesions are the 8-connected components of at least ``min_lesion_px`` pixels of
the mask after ``k`` iterations (:meth:`BScanResult.mask_after`); ground-truth HRFs are the label
ids of the ground truth. A predicted lesion is a true positive when it overlaps any ground-truth
HRF pixel; an HRF is detected when any pixel of a predicted lesion overlaps it. Counts are pooled
over the whole study: precision = TP lesions / predicted lesions, recall = detected / HRFs.

Baselines (Table 2) threshold the first iteration's relevance map of each GT-positive B-scan,
normalised per map by its largest positive value (so 1 is the peak; non-positive relevance is
never foreground), on :data:`THRESHOLD_GRID`. The global threshold maximises the mean Dice over
the GT-positive B-scans of ``val_study``, or, without one, of the first half (rounded down) of the
study's patients with an HRF (sorted ids), the baselines then reported on the other half. The
per-sample oracle takes each B-scan's best threshold over *all* values of its map, so it is >= the
global baseline on every B-scan.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from hrf_batch.errors import LabelError
from hrf_batch.io.discover import FileIssue
from hrf_batch.io.ground_truth import load_ground_truth
from hrf_batch.io.study import iter_study
from hrf_batch.io.volume import Volume
from hrf_batch.model.classify import Classifier
from hrf_batch.model.explain import relevance_maps
from hrf_batch.pipeline import PipelineParams, run_info, run_volume
from hrf_batch.results import VolumeResult
from hrf_batch.segment import Segmenter
from hrf_batch.segment.lesions import components, lesion_labels

log = logging.getLogger(__name__)

HEAVY_HRFS = 6  # B-scans with more HRFs than the paper's iterations: what several peaks per iteration are for
THRESHOLD_GRID = np.geomspace(1e-3, 1.0, 61)  # on relevance / max positive relevance of the map
AVERAGING = ("Dice: mean over B-scans with a GT HRF or a prediction; recall: over GT-positive B-scans; "
             "precision: over B-scans with a prediction; lesions pooled over the study")


# --------------------------------------------------------------------------- per-B-scan metrics


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def _gt_labels(gt: np.ndarray) -> np.ndarray:
    """Integer HRF labels; a boolean mask is split into lesions' connected components first."""
    gt = np.asarray(gt)
    if gt.dtype == bool:
        return components(gt)[0]
    return gt.astype(np.int64, copy=False)


def lesion_match(pred: np.ndarray, gt: np.ndarray, min_lesion_px: int) -> dict[str, int]:
    """Lesion counts of one B-scan: predicted components (>= ``min_lesion_px``), how many overlap an
    HRF, ground-truth HRFs (label ids) and how many are touched by a predicted lesion."""
    labels = _gt_labels(gt)
    comp, kept_ids = lesion_labels(pred, min_lesion_px)
    kept = np.isin(comp, kept_ids)
    hit = np.unique(comp[kept & (labels > 0)])
    hrf_ids = np.unique(labels[labels > 0])
    detected = np.unique(labels[kept & (labels > 0)])
    return {"n_pred_lesions": int(kept_ids.size), "n_tp_lesions": int(hit.size),
            "n_gt_hrfs": int(hrf_ids.size), "n_detected_hrfs": int(detected.size)}


def bscan_scores(pred: np.ndarray, gt: np.ndarray, min_lesion_px: int = 5) -> dict[str, float]:
    """Pixel and lesion metrics of one B-scan: ``pred`` bool (H, W), ``gt`` HRF labels (or bool)."""
    p = np.asarray(pred, dtype=bool)
    labels = _gt_labels(gt)
    if p.shape != labels.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {labels.shape} differ in shape; "
                         "compare masks of the same B-scan")
    g = labels > 0
    tp, n_pred, n_gt = int((p & g).sum()), int(p.sum()), int(g.sum())
    out: dict[str, float] = {"tp_px": tp, "pred_px": n_pred, "gt_px": n_gt,
                             "dice": 1.0 if n_pred + n_gt == 0 else 2.0 * tp / (n_pred + n_gt),
                             "recall": _ratio(tp, n_gt), "precision": _ratio(tp, n_pred)}
    out.update(lesion_match(p, labels, min_lesion_px))
    return out


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _f1(p: float, r: float) -> float:
    if not (np.isfinite(p) and np.isfinite(r)):
        return float("nan")
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


def aggregate(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Study-level metrics from :func:`bscan_scores` of every B-scan (averaging in the module doc)."""
    evaluated = [s for s in scores if s["gt_px"] > 0 or s["pred_px"] > 0]
    gt_pos = [s for s in scores if s["gt_px"] > 0]
    gt_neg = [s for s in scores if s["gt_px"] == 0]
    heavy = [s for s in scores if s["n_gt_hrfs"] > HEAVY_HRFS]
    pred_pos = [s for s in scores if s["pred_px"] > 0]
    total = {k: float(sum(s[k] for s in scores)) for k in
             ("tp_px", "pred_px", "gt_px", "n_pred_lesions", "n_tp_lesions", "n_gt_hrfs", "n_detected_hrfs")}
    lesion_p = _ratio(total["n_tp_lesions"], total["n_pred_lesions"])
    lesion_r = _ratio(total["n_detected_hrfs"], total["n_gt_hrfs"])
    return {
        "dice": _mean([s["dice"] for s in evaluated]),
        "recall": _mean([s["recall"] for s in gt_pos]),
        "precision": _mean([s["precision"] for s in pred_pos]),
        "dice_gt_positive": _mean([s["dice"] for s in gt_pos]),
        "precision_gt_positive": _mean([s["precision"] for s in gt_pos if s["pred_px"] > 0]),
        "dice_pooled": _ratio(2 * total["tp_px"], total["pred_px"] + total["gt_px"]),
        "recall_pooled": _ratio(total["tp_px"], total["gt_px"]),
        "precision_pooled": _ratio(total["tp_px"], total["pred_px"]),
        "lesion_precision": lesion_p, "lesion_recall": lesion_r, "lesion_f1": _f1(lesion_p, lesion_r),
        "false_lesions_per_hrf_free_bscan": _ratio(sum(s["n_pred_lesions"] for s in gt_neg), len(gt_neg)),
        "n_gt_negative": len(gt_neg), "n_bscans": len(scores),
        "lesion_recall_heavy": _ratio(sum(s["n_detected_hrfs"] for s in heavy), sum(s["n_gt_hrfs"] for s in heavy)),
        "n_heavy_bscans": len(heavy), "n_evaluated": len(evaluated), "n_gt_positive": len(gt_pos),
        "n_pred_positive": len(pred_pos), **{k: int(v) for k, v in total.items()},
    }


def volume_count_errors(counts: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Per-volume HRF counts (found, true) → mean absolute error, mean signed error (over-counting
    is positive) and the largest count in a volume without HRF: what a study's burden numbers carry."""
    found = np.array([f for f, _ in counts], dtype=float)
    true = np.array([t for _, t in counts], dtype=float)
    free = found[true == 0]
    return {"n_volumes": len(counts), "mean_abs_error": _mean(np.abs(found - true).tolist()),
            "mean_error": _mean((found - true).tolist()), "n_hrf_free_volumes": int(free.size),
            "max_count_in_hrf_free_volume": float(free.max()) if free.size else float("nan")}


# --------------------------------------------------------------------------- relevance thresholds


def normalise_relevance(relevance: np.ndarray) -> np.ndarray:
    """Relevance divided by the map's largest positive value (all zeros when none is positive)."""
    rel = np.nan_to_num(np.asarray(relevance, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(rel.max(initial=0.0))
    return rel / top if top > 0 else np.zeros_like(rel)


def threshold_dice(relevance: np.ndarray, gt: np.ndarray,
                   thresholds: np.ndarray = THRESHOLD_GRID) -> tuple[np.ndarray, float, float]:
    """Dice of ``normalised relevance >= t`` for each ``t``, and the oracle (best Dice over every
    threshold the map allows, the empty mask included) with its threshold.

    Sorting the positive values once gives the Dice of every top-k set; only k at the boundary
    between distinct values is a threshold, so ties never split.
    """
    vals = normalise_relevance(relevance).ravel()
    g = (np.asarray(gt) > 0).ravel()
    pos = vals > 0
    order = np.argsort(-vals[pos], kind="stable")
    desc, hits = vals[pos][order], g[pos][order]
    k = np.arange(desc.size + 1)
    cum = np.concatenate([[0], np.cumsum(hits)])
    den = k + int(g.sum())
    dice_k = np.where(den > 0, 2.0 * cum / np.maximum(den, 1), 1.0)
    boundary = np.ones(desc.size + 1, dtype=bool)
    boundary[1:-1] = desc[:-1] != desc[1:]
    counts = desc.size - np.searchsorted(desc[::-1], np.asarray(thresholds, dtype=np.float64), side="left")
    best = int(np.argmax(np.where(boundary, dice_k, -1.0)))
    best_t = float(desc[best - 1]) if best > 0 else float("inf")
    return dice_k[counts], float(dice_k[best]), best_t


# --------------------------------------------------------------------------- study access


def labelled_volumes(study_dir: Path, limit_volumes: int | None = None, *, progress: bool = False,
                     issues: list[FileIssue] | None = None) -> Iterator[tuple[Volume, np.ndarray]]:
    """Each readable volume of a study with ground truth, with its HRF labels ``(n, H, W)``.

    Unreadable files are logged and appended to ``issues`` (when given) so callers can report them.
    """
    study_dir = Path(study_dir)
    truth = load_ground_truth(study_dir, "scoring masks against pixel ground truth")
    done = 0
    for item in tqdm(iter_study(study_dir), desc="volumes", unit="vol", disable=not progress):
        if isinstance(item, FileIssue):
            if item.kind == "error":
                log.warning("left out of the evaluation: %s (%s)", item.path, item.reason)
                if issues is not None:
                    issues.append(item)
            continue
        if limit_volumes is not None and done >= limit_volumes:
            return
        key = (item.meta.patient_id, item.meta.visit_date, item.meta.eye)
        labels = truth.get(key)
        if labels is None or labels.shape != item.bscans.shape:
            found = "none" if labels is None else f"shape {labels.shape} vs {item.bscans.shape}"
            raise LabelError(f"no matching ground truth for {key} ({item.meta.source_path}): {found}",
                             "regenerate the study or its ground_truth folder")
        done += 1
        yield item, labels


def _gt_positive(labels: np.ndarray) -> list[int]:
    return [i for i in range(len(labels)) if labels[i].any()]


def _first_relevance(vol: Volume, clf: Classifier, idx: list[int],
                     result: VolumeResult | None = None) -> dict[int, np.ndarray]:
    """First-iteration relevance of the B-scans ``idx``: reused from ``result`` where the pipeline
    kept it (same model, same original image), computed in one batched call for the rest."""
    have = {i: result.bscans[i].relevance for i in idx
            if result is not None and result.bscans[i].relevance is not None}
    missing = [i for i in idx if i not in have]
    if missing:
        maps = relevance_maps(clf, vol.bscans[missing]).relevance
        have.update(zip(missing, maps))
    return have


# --------------------------------------------------------------------------- evaluation


def _report_iterations(iterations: Sequence[int] | None, params: PipelineParams) -> tuple[int, ...]:
    ks = tuple(sorted({int(k) for k in (iterations or (1, params.max_iterations))}))
    bad = [k for k in ks if not 1 <= k <= params.max_iterations]
    if bad:
        raise ValueError(f"iterations to report {bad} are outside 1..{params.max_iterations}; "
                         "report at most the pipeline's max_iterations")
    return ks


def _baseline_rows(vol: Volume, labels: np.ndarray, clf: Classifier, result: VolumeResult | None,
                   ks: tuple[int, ...], tolerance_px: float | None = None) -> list[dict[str, Any]]:
    """Per GT-positive B-scan: Dice on the threshold grid, oracle Dice, the pipeline's Dice, and,
    with ``tolerance_px``, the pointing-game result of the same map."""
    idx = _gt_positive(labels)
    maps = _first_relevance(vol, clf, idx, result)
    rows = []
    for i in idx:
        grid, oracle, _ = threshold_dice(maps[i], labels[i])
        pipe = {} if result is None else {k: bscan_scores(result.bscans[i].mask_after(k), labels[i])["dice"] for k in ks}
        row = {"patient": vol.meta.patient_id, "grid": grid, "oracle": oracle, "pipeline": pipe}
        if tolerance_px is not None:
            row["pointing"] = _pointing(maps[i], labels[i], tolerance_px)
        rows.append(row)
    return rows


def _calibration_rows(val_study: Path | None, rows: list[dict[str, Any]], clf: Classifier,
                      limit_volumes: int | None, progress: bool) -> tuple[list, list, dict[str, Any]]:
    """(calibration rows, test rows, description) for the global-threshold baseline."""
    if val_study is not None:
        calib = [r for vol, labels in labelled_volumes(val_study, limit_volumes, progress=progress)
                 for r in _baseline_rows(vol, labels, clf, None, ())]
        return calib, rows, {"calibration": f"validation study {Path(val_study).name}"}
    patients = sorted({r["patient"] for r in rows})
    half = set(patients[: len(patients) // 2])
    calib = [r for r in rows if r["patient"] in half]
    test = [r for r in rows if r["patient"] not in half]
    return calib, test, {"calibration": "patient split of the evaluation study",
                         "calibration_patients": sorted(half), "test_patients": sorted(set(patients) - half)}


def _baselines(calib: list, test: list, info: dict[str, Any], ks: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {**info, "threshold_space": "relevance / max positive relevance of the map",
                           "n_calibration_bscans": len(calib), "n_test_bscans": len(test)}
    if not calib or not test:
        out.update(global_threshold=float("nan"), global_dice=float("nan"), oracle_dice=float("nan"),
                   pipeline_dice={f"after_{k}": float("nan") for k in ks},
                   note="needs GT-positive B-scans on both sides: pass a validation study or more patients")
        return out
    mean_grid = np.mean([r["grid"] for r in calib], axis=0)
    best = int(np.argmax(mean_grid))
    out.update(global_threshold=float(THRESHOLD_GRID[best]), calibration_dice=float(mean_grid[best]),
               global_dice=_mean([float(r["grid"][best]) for r in test]),
               oracle_dice=_mean([r["oracle"] for r in test]),
               pipeline_dice={f"after_{k}": _mean([r["pipeline"][k] for r in test]) for k in ks})
    return out


def evaluate_segmentation(study_dir: Path, clf: Classifier, segmenter: Segmenter,
                          params: PipelineParams = PipelineParams(), *, val_study: Path | None = None,
                          iterations_report: tuple[int, ...] | None = None, limit_volumes: int | None = None,
                          progress: bool = False, pointing_tolerance_px: float = 3) -> dict[str, Any]:
    """Run the pipeline on every volume of a study with ground truth and score its masks after each
    of ``iterations_report`` iterations (default: 1 and ``max_iterations``), next to the Table 2
    relevance-threshold baselines. Keys: ``after_<k>`` blocks of :func:`aggregate`, ``baselines``, and
    ``pointing_game`` (:func:`pointing_game` from the same relevance maps, which are computed once).
    ``limit_volumes`` caps the volumes read from each study (evaluation and validation), for quick runs."""
    ks = _report_iterations(iterations_report, params)
    _check_tolerance(pointing_tolerance_px)
    per_k: dict[int, list[dict[str, float]]] = {k: [] for k in ks}
    counts: list[tuple[int, int]] = []  # (found, true) HRF count per volume, after all iterations
    rows: list[dict[str, Any]] = []
    issues: list[FileIssue] = []
    n_volumes = 0
    seconds: dict[str, float] = {}
    for vol, labels in labelled_volumes(study_dir, limit_volumes, progress=progress, issues=issues):
        result = run_volume(vol, clf, segmenter, params)
        n_volumes += 1
        for stage, t in result.run.seconds.items():
            seconds[stage] = seconds.get(stage, 0.0) + t
        for k in ks:
            per_k[k] += [bscan_scores(b.mask_after(k), labels[b.index], params.min_lesion_px) for b in result.bscans]
        last = per_k[ks[-1]][-len(result.bscans):]
        counts.append((sum(s["n_pred_lesions"] for s in last), sum(s["n_gt_hrfs"] for s in last)))
        rows += _baseline_rows(vol, labels, clf, result, ks, pointing_tolerance_px)
    if n_volumes == 0:
        raise LabelError(f"no readable volume with ground truth in {study_dir}",
                         "check the study folder (see `hrf-batch scan`) or regenerate it")
    calib, test, info = _calibration_rows(val_study, rows, clf, limit_volumes, progress)
    return {
        "model_id": clf.model_id, "segmenter": segmenter.name, "parameters": run_info(clf, segmenter, params).parameters,
        "study": str(study_dir), "n_volumes": n_volumes, "n_unreadable": len(issues), "averaging": AVERAGING,
        "iterations_reported": list(ks), **{f"after_{k}": aggregate(per_k[k]) for k in ks},
        "volume_counts": volume_count_errors(counts), "pipeline_seconds": seconds,
        "baselines": _baselines(calib, test, info, ks),
        "pointing_game": _pointing_summary(clf, [r["pointing"] for r in rows], pointing_tolerance_px),
    }


# --------------------------------------------------------------------------- pointing game


def _check_tolerance(tolerance_px: float) -> None:
    """Checked before any work, so a bad value never costs a study's worth of computing."""
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}; 0 means on an HRF pixel")


def _pointing(relevance: np.ndarray, labels: np.ndarray, tolerance_px: float) -> tuple[float, float]:
    """Distance (px) from the relevance argmax to the nearest HRF pixel, and the fraction of the
    B-scan's pixels within ``tolerance_px`` of an HRF (what a random point would score)."""
    dist = ndimage.distance_transform_edt(labels == 0)
    rel = np.nan_to_num(relevance, nan=-np.inf)
    return float(dist.flat[int(np.argmax(rel))]), float((dist <= tolerance_px).mean())


def _pointing_summary(clf: Classifier, found: list[tuple[float, float]], tolerance_px: float) -> dict[str, Any]:
    distances = [d for d, _ in found]
    hits = [d <= tolerance_px for d in distances]
    return {"model_id": clf.model_id, "tolerance_px": float(tolerance_px), "n_bscans": len(hits),
            "hits": int(sum(hits)), "fraction": _mean([float(h) for h in hits]),
            "median_distance_px": float(np.median(distances)) if distances else float("nan"),
            "chance": _mean([c for _, c in found])}


def pointing_game(study_dir: Path, clf: Classifier, *, tolerance_px: float = 3,
                  limit_volumes: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Over GT-positive B-scans, the fraction whose relevance argmax lies on or within
    ``tolerance_px`` of an HRF pixel: does the explanation point where the prompt should go?
    ``chance`` is the mean fraction of pixels within tolerance (what a random point would score).
    :func:`evaluate_segmentation` reports the same from the maps it computes anyway."""
    _check_tolerance(tolerance_px)
    found = []
    for vol, labels in labelled_volumes(study_dir, limit_volumes, progress=progress):
        idx = _gt_positive(labels)
        maps = _first_relevance(vol, clf, idx)
        found += [_pointing(maps[i], labels[i], tolerance_px) for i in idx]
    return _pointing_summary(clf, found, tolerance_px)


# --------------------------------------------------------------------------- formatting


def _f(value: Any, width: int = 7) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return " " * (width - 1) + "-"
    return f"{v:{width}.3f}" if np.isfinite(v) else " " * (width - 1) + "-"


def _row(name: str, m: dict[str, Any]) -> str:
    cols = ("dice", "recall", "precision", "dice_gt_positive", "lesion_precision", "lesion_recall", "lesion_f1")
    return f"{name:<30}" + "".join(_f(m.get(c)) for c in cols)


def format_segmentation(metrics: dict[str, Any]) -> str:
    """Plain-text table: the pipeline after 1 and N iterations, then the Table 2 baselines."""
    ks = metrics["iterations_reported"]
    first = metrics[f"after_{ks[0]}"]
    base = metrics["baselines"]
    lines = [
        f"model       {metrics['model_id']}   segmenter {metrics['segmenter']}",
        f"study       {metrics['n_volumes']} volumes, {first['n_bscans']} B-scans ({first['n_gt_positive']} with HRF, "
        f"{first['n_gt_hrfs']} HRFs)" + (f", {metrics['n_unreadable']} unreadable" if metrics["n_unreadable"] else ""),
        f"averaging   {metrics['averaging']}",
        "",
        f"{'':<30}{'Dice':>7}{'recall':>7}{'prec.':>7}{'Dice+':>7}{'les.P':>7}{'les.R':>7}{'les.F1':>7}",
    ]
    for k in ks:
        m = metrics[f"after_{k}"]
        lines.append(_row(f"after {k} iteration{'s' if k > 1 else ''} (n={m['n_evaluated']})", m))
    t = base.get("global_threshold", float("nan"))
    lines.append(_row(f"global threshold (t={t:.3g})", {"dice_gt_positive": base["global_dice"]}))
    lines.append(_row("per-sample oracle threshold", {"dice_gt_positive": base["oracle_dice"]}))
    pipe = "  ".join(f"after {k}: {_f(v, 5).strip()}" for k, v in
                     ((int(key.split("_")[1]), val) for key, val in base["pipeline_dice"].items()))
    lines += ["", "Dice+ = mean Dice over GT-positive B-scans. Baselines: "
              f"{base['n_test_bscans']} GT-positive test B-scans, threshold calibrated on "
              f"{base['n_calibration_bscans']} ({base['calibration']}); pipeline on the same B-scans: {pipe}"]
    last = metrics[f"after_{ks[-1]}"]
    vc = metrics["volume_counts"]
    lines += [f"false HRFs per HRF-free B-scan: {_f(last['false_lesions_per_hrf_free_bscan']).strip()} "
              f"({last['n_gt_negative']} B-scans); per-volume count error: mean |found - true| "
              f"{_f(vc['mean_abs_error']).strip()}, mean found - true {_f(vc['mean_error']).strip()} over {vc['n_volumes']} volumes"]
    if "note" in base:
        lines.append(f"note: {base['note']}")
    return "\n".join(lines)
