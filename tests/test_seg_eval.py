"""Segmentation evaluation and prompt calibration: exact metrics on hand-made masks, then the whole
evaluation on a tiny synthetic study with a random-initialised CCT saved through the real writer."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from hrf_batch.errors import LabelError
from hrf_batch.evaluation import segmentation as seg_eval
from hrf_batch.evaluation.calibrate import calibrate, format_calibration, hrf_centre, hrf_dice
from hrf_batch.evaluation.segmentation import (
    aggregate,
    bscan_scores,
    evaluate_segmentation,
    format_segmentation,
    lesion_match,
    pointing_game,
    threshold_dice,
    volume_count_errors,
)
from hrf_batch.io.ground_truth import load_ground_truth
from hrf_batch.model.classify import Classifier, load_classifier
from hrf_batch.model.explain import Explanation
from hrf_batch.pipeline import PipelineParams
from hrf_batch.segment import make_segmenter
from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

from conftest import save_tiny_model

# --------------------------------------------------------------------------- hand-made masks


def _case() -> tuple[np.ndarray, np.ndarray]:
    """Three HRFs (6, 6, 5 px) and a prediction: a 6-px lesion half on HRF 1, a 5-px false
    positive, and a 2-px speck on HRF 2 (below the 5-px lesion size)."""
    gt = np.zeros((10, 20), np.int16)
    gt[1:3, 1:4] = 1
    gt[6:8, 10:13] = 2
    gt[1, 15:20] = 3
    pred = np.zeros((10, 20), bool)
    pred[1:3, 2:5] = True
    pred[8, 0:5] = True
    pred[7, 11:13] = True
    return pred, gt


def test_bscan_scores_are_exact() -> None:
    pred, gt = _case()
    s = bscan_scores(pred, gt, min_lesion_px=5)
    assert (s["tp_px"], s["pred_px"], s["gt_px"]) == (6, 13, 17)
    assert s["dice"] == pytest.approx(12 / 30)
    assert s["recall"] == pytest.approx(6 / 17)
    assert s["precision"] == pytest.approx(6 / 13)
    assert lesion_match(pred, gt, 5) == {"n_pred_lesions": 2, "n_tp_lesions": 1, "n_gt_hrfs": 3, "n_detected_hrfs": 1}
    # with 2-px lesions allowed the speck counts and detects HRF 2
    assert lesion_match(pred, gt, 2) == {"n_pred_lesions": 3, "n_tp_lesions": 2, "n_gt_hrfs": 3, "n_detected_hrfs": 2}


def test_empty_cases_and_boolean_truth() -> None:
    empty = np.zeros((6, 6), bool)
    s = bscan_scores(empty, empty)
    assert s["dice"] == 1.0 and math.isnan(s["recall"]) and math.isnan(s["precision"])
    gt = np.zeros((6, 6), bool)
    gt[0:2, 0:2] = gt[2:4, 2:4] = True  # diagonal neighbours: one 8-connected HRF
    s = bscan_scores(empty, gt)
    assert s["dice"] == 0.0 and s["recall"] == 0.0 and math.isnan(s["precision"]) and s["n_gt_hrfs"] == 1
    with pytest.raises(ValueError, match="same B-scan"):
        bscan_scores(np.zeros((5, 6), bool), gt)


def test_aggregate_averages_as_documented() -> None:
    pred, gt = _case()
    empty = np.zeros_like(pred)
    only_gt = np.zeros_like(gt)
    only_gt[4:6, 4:7] = 1
    only_pred = np.zeros_like(pred)
    only_pred[0, 0:6] = True
    scores = [bscan_scores(pred, gt), bscan_scores(empty, np.zeros_like(gt)),
              bscan_scores(empty, only_gt), bscan_scores(only_pred, np.zeros_like(gt))]
    m = aggregate(scores)
    assert (m["n_bscans"], m["n_evaluated"], m["n_gt_positive"], m["n_pred_positive"]) == (4, 3, 2, 2)
    assert m["dice"] == pytest.approx((12 / 30 + 0 + 0) / 3)  # the perfect empty B-scan is left out
    assert m["recall"] == pytest.approx((6 / 17 + 0) / 2)
    assert m["precision"] == pytest.approx((6 / 13 + 0) / 2)
    assert m["dice_gt_positive"] == pytest.approx(0.2)
    assert m["precision_gt_positive"] == pytest.approx(6 / 13)
    assert m["dice_pooled"] == pytest.approx(2 * 6 / (19 + 23))
    assert m["lesion_precision"] == pytest.approx(1 / 3)
    assert m["lesion_recall"] == pytest.approx(1 / 4)
    assert m["lesion_f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))


def test_threshold_dice_grid_oracle_and_ties() -> None:
    rel = np.array([[4.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    gt = np.array([[1, 0, 0, 1], [1, 0, 0, 0]])
    grid, oracle, t = threshold_dice(rel, gt, np.array([0.1, 0.5, 0.8, 1.0, 1.5]))
    np.testing.assert_allclose(grid, [4 / 7, 2 / 3, 0.5, 0.5, 0.0])
    assert oracle == pytest.approx(0.8) and t == pytest.approx(0.75)
    # tied values are one threshold: the top-1 set {first 2} is not reachable
    _, oracle, t = threshold_dice(np.array([[2.0, 2.0, 1.0]]), np.array([[1, 0, 0]]), np.array([0.5]))
    assert oracle == pytest.approx(2 / 3) and t == pytest.approx(1.0)


def test_hrf_centre_and_per_hrf_dice() -> None:
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False  # centroid (4, 4) is a hole
    r, c = hrf_centre(ring)
    assert ring[r, c] and abs(r - 4) + abs(c - 4) == 2
    blob = np.zeros((9, 9), bool)
    blob[1:4, 5:8] = True
    assert hrf_centre(blob) == (2, 6)
    labels = np.zeros((9, 9), np.int16)
    labels[1:4, 1:4] = 1
    labels[1:4, 4:7] = 2
    pred = np.zeros((9, 9), bool)
    pred[1:4, 1:7] = True  # both touching HRFs; the neighbour's pixels are ignored
    pred[5, 1:4] = True  # 3 px of real false positive
    assert hrf_dice(pred, labels, 1) == pytest.approx(2 * 9 / (12 + 9))


# --------------------------------------------------------------------------- on a tiny study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two patients, each with at least one HRF (so the patient split has both halves): the first
    such seed, since the generator's draws change whenever the generator does."""
    root = tmp_path_factory.mktemp("segstudy")
    for seed in range(7, 40):
        out = root / f"seed{seed}"
        write_synthetic_study(out, StudySpec(patients=2, visits=1, bscans=3, width=128, height=96, seed=seed))
        positive = {key[0] for key, labels in load_ground_truth(out).items() if labels.any()}
        if positive == {"P001", "P002"}:
            return out
    pytest.fail("no seed in 7..39 gives both synthetic patients an HRF; check hrf_batch.synthetic.generator_a")


@pytest.fixture(scope="module")
def clf(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    """A random-initialised tiny CCT through the real model writer; threshold 0: every B-scan runs."""
    return load_classifier(str(save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")), device="cpu")


def _truth(study: Path) -> list[np.ndarray]:
    return [lab for labels in load_ground_truth(study).values() for lab in labels]


@pytest.fixture(scope="module")
def metrics(study: Path, clf: Classifier) -> dict:
    return evaluate_segmentation(study, clf, make_segmenter("region"), PipelineParams(max_iterations=3))


def test_evaluate_segmentation_reports_1_and_n_iterations(metrics: dict, study: Path) -> None:
    truth = _truth(study)
    assert metrics["iterations_reported"] == [1, 3] and metrics["segmenter"] == "region-growing"
    one, three = metrics["after_1"], metrics["after_3"]
    for m in (one, three):
        assert m["n_bscans"] == 12 == len(truth)
        assert m["n_gt_positive"] == sum(bool(t.any()) for t in truth) > 0
        assert m["n_gt_hrfs"] == sum(len(np.unique(t[t > 0])) for t in truth)
        assert m["gt_px"] == sum(int((t > 0).sum()) for t in truth)
        for key in ("dice", "recall", "dice_gt_positive", "dice_pooled", "recall_pooled", "lesion_recall"):
            assert 0.0 <= m[key] <= 1.0, key
        # undefined (NaN) exactly when nothing was predicted
        assert (0.0 <= m["precision"] <= 1.0) if m["n_pred_positive"] else math.isnan(m["precision"])
        for key in ("lesion_precision", "lesion_f1"):
            assert (0.0 <= m[key] <= 1.0) if m["n_pred_lesions"] else math.isnan(m[key]), key
        assert math.isnan(m["precision_gt_positive"]) or 0.0 <= m["precision_gt_positive"] <= 1.0
    # more iterations only add pixels: recall and detected HRFs cannot drop
    assert three["pred_px"] >= one["pred_px"] and three["recall"] >= one["recall"] - 1e-12
    assert three["n_detected_hrfs"] >= one["n_detected_hrfs"]


def test_baselines_oracle_bounds_global(metrics: dict) -> None:
    base = metrics["baselines"]
    assert base["calibration_patients"] == ["P001"] and base["test_patients"] == ["P002"]
    assert base["n_calibration_bscans"] + base["n_test_bscans"] == metrics["after_1"]["n_gt_positive"]
    assert 0.0 <= base["global_dice"] <= base["oracle_dice"] <= 1.0
    assert 0.0 < base["global_threshold"] <= 1.0
    assert set(base["pipeline_dice"]) == {"after_1", "after_3"}
    text = format_segmentation(metrics)
    for part in (metrics["model_id"], "region-growing", "after 1 iteration", "after 3 iterations",
                 "global threshold", "oracle"):
        assert part in text


def test_baselines_without_calibration_data_are_nan_with_a_note() -> None:
    row = {"patient": "P001", "grid": np.zeros_like(seg_eval.THRESHOLD_GRID), "oracle": 0.5, "pipeline": {1: 0.2}}
    base = seg_eval._baselines([], [row], {"calibration": "patient split"}, (1,))
    assert math.isnan(base["global_dice"]) and math.isnan(base["oracle_dice"]) and "validation study" in base["note"]


def test_validation_study_calibrates_the_global_threshold(study: Path, clf: Classifier, tmp_path: Path) -> None:
    val = tmp_path / "val"
    write_synthetic_study(val, StudySpec(patients=3, visits=1, bscans=3, width=128, height=96, seed=4))
    assert any(lab.any() for _, labels in seg_eval.labelled_volumes(val, 2) for lab in labels), \
        "the first two validation volumes need an HRF: pick another seed"
    m = evaluate_segmentation(study, clf, make_segmenter("region"), PipelineParams(max_iterations=2),
                              val_study=val, iterations_report=(2,), limit_volumes=2)
    base = m["baselines"]
    assert m["iterations_reported"] == [2] and m["n_volumes"] == 2
    assert base["calibration"].startswith("validation study")
    assert base["n_test_bscans"] == m["after_2"]["n_gt_positive"]
    # the volume cap applies to the validation study too
    assert base["n_calibration_bscans"] == sum(int(lab.any()) for _, labels in seg_eval.labelled_volumes(val, 2)
                                               for lab in labels)
    assert base["global_dice"] <= base["oracle_dice"]


def test_bad_requests_say_what_to_do(study: Path, clf: Classifier, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_iterations"):
        evaluate_segmentation(study, clf, make_segmenter("region"), PipelineParams(max_iterations=2), iterations_report=(3,))
    with pytest.raises(LabelError, match="ground_truth"):
        evaluate_segmentation(tmp_path, clf, make_segmenter("region"))


def _fake_relevance(study: Path, where: str) -> Callable[..., Explanation]:
    """relevance_maps stand-in whose peak sits on an HRF ('on'), exactly 3 px away ('near') or at the
    pixel farthest from any HRF ('far'), looked up by the B-scan's pixels."""
    from scipy import ndimage

    table = {}
    for vol, labels in seg_eval.labelled_volumes(study):
        for img, lab in zip(vol.bscans, labels):
            if not lab.any():
                continue
            dist = ndimage.distance_transform_edt(lab == 0)
            pick = {"on": dist == 0, "near": dist == 3.0, "far": dist == dist.max()}[where]
            rel = np.zeros(lab.shape, np.float32)
            rel.flat[int(np.flatnonzero(pick)[0])] = 1.0
            table[hashlib.sha256(img.tobytes()).hexdigest()] = rel

    def fake(clf: Classifier, images: np.ndarray, **_: object) -> Explanation:
        maps = np.stack([table[hashlib.sha256(np.ascontiguousarray(i).tobytes()).hexdigest()] for i in images])
        return Explanation(relevance=maps, logits=np.zeros(len(images)), scores=np.zeros(len(images)), log_odds=np.zeros(len(images)))

    return fake


def test_pointing_game_counts_hrf_positive_bscans(study: Path, clf: Classifier, monkeypatch: pytest.MonkeyPatch) -> None:
    n_pos = sum(bool(t.any()) for t in _truth(study))
    real = pointing_game(study, clf)
    assert real["n_bscans"] == n_pos and 0.0 <= real["fraction"] <= 1.0 and 0.0 < real["chance"] < 1.0
    assert real["hits"] == round(real["fraction"] * n_pos)
    for where, tol, expected in (("on", 0, 1.0), ("near", 3, 1.0), ("near", 2.9, 0.0), ("far", 3, 0.0)):
        monkeypatch.setattr(seg_eval, "relevance_maps", _fake_relevance(study, where))
        got = pointing_game(study, clf, tolerance_px=tol)
        assert got["n_bscans"] == n_pos and got["fraction"] == expected, (where, tol)


def test_calibration_at_true_centres(study: Path) -> None:
    n_hrfs = sum(len(np.unique(t[t > 0])) for t in _truth(study))
    rows = calibrate(study, make_segmenter("region"), box_sizes=(2, 4), crop_sizes=(75,))
    assert [(r["box_px"], r["crop_px"]) for r in rows] == [(2, 75), (4, 75)]
    default = rows[1]
    assert default["n_hrfs"] == n_hrfs and default["dice"] > 0.5 and default["segmenter"] == "region-growing"
    few = calibrate(study, make_segmenter("region"), box_sizes=(4,), crop_sizes=(50,), limit_hrfs=5, seed=1)
    assert few[0]["n_hrfs"] == 5
    text = format_calibration(rows + few)
    best = max(rows + few, key=lambda r: r["dice"])
    assert text.splitlines()[2].startswith("*") and f"{best['dice']:6.3f}" in text.splitlines()[2]
    assert "(default)" in text


def test_evaluation_reports_the_same_pointing_game_from_its_own_maps(study: Path, clf: Classifier) -> None:
    """evaluate_segmentation reuses the pipeline's first relevance maps for the pointing game: the same
    answer as computing every map afresh."""
    metrics = evaluate_segmentation(study, clf, make_segmenter("region"), PipelineParams(max_iterations=2))
    assert metrics["pointing_game"] == pointing_game(study, clf)


def test_false_hrfs_on_hrf_free_bscans_and_volume_count_errors() -> None:
    gt = np.zeros((20, 20), int)
    gt[2:5, 2:5] = 1
    fp = np.zeros((20, 20), bool)
    fp[10:13, 10:13] = True
    fp[15:18, 15:18] = True
    scores = [bscan_scores(gt > 0, gt), bscan_scores(fp, np.zeros_like(gt)), bscan_scores(np.zeros_like(fp), np.zeros_like(gt))]
    agg = aggregate(scores)
    assert agg["n_gt_negative"] == 2 and agg["false_lesions_per_hrf_free_bscan"] == pytest.approx(1.0)
    vc = volume_count_errors([(3, 1), (0, 2), (4, 0)])
    assert vc["mean_abs_error"] == pytest.approx(8 / 3) and vc["mean_error"] == pytest.approx(4 / 3)
    assert vc["n_hrf_free_volumes"] == 1 and vc["max_count_in_hrf_free_volume"] == 4


def test_lesion_recall_on_bscans_with_more_hrfs_than_iterations() -> None:
    gt = np.zeros((20, 80), int)
    for i in range(7):
        gt[5:8, 10 * i + 2 : 10 * i + 5] = i + 1
    pred = np.isin(gt, [1, 2, 3])
    agg = aggregate([bscan_scores(pred, gt), bscan_scores(gt == 1, (gt == 1).astype(int))])
    assert agg["n_heavy_bscans"] == 1 and agg["lesion_recall_heavy"] == pytest.approx(3 / 7)
