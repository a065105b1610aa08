"""Score calibration and the loop's guards: what each one keeps and what it drops."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from hrf_batch.config import load_settings
from hrf_batch.errors import HrfBatchError
from hrf_batch.model.calibration import Calibration, expected_calibration_error, fit_calibration, log_odds
from hrf_batch.model.classify import load_classifier, presence, raw_scores
from hrf_batch.model.files import ModelFileError, load_model
from hrf_batch.pipeline import PipelineParams, _State, run_info
from hrf_batch.results import Segment
from hrf_batch.segment import make_segmenter
from hrf_batch.segment.lesion_filter import REFERENCE_SPACING_MM, LesionFilter, area_limits, check, elongation, solidity
from hrf_batch.segment.prompts import peaks

from conftest import save_tiny_model

# --------------------------------------------------------------------------- calibration


def test_fit_recovers_a_known_temperature_and_bias() -> None:
    rng = np.random.default_rng(0)
    true_z = rng.normal(0, 2.5, 20000)
    y = rng.random(true_z.size) < 1 / (1 + np.exp(-true_z))
    raw = 1 / (1 + np.exp(-(3.0 * true_z + 2.0)))  # an over-confident, shifted classifier
    cal, summary = fit_calibration(raw, y)
    assert cal.temperature == pytest.approx(3.0, rel=0.05) and cal.bias == pytest.approx(2.0, abs=0.15)
    assert summary["nll_after"] < summary["nll_before"] and summary["ece_after"] < summary["ece_before"]
    assert summary["ece_after"] < 0.02
    # the map is monotone: the ranking, hence AUROC, is unchanged
    assert roc_auc_score(y, cal.apply(raw)) == pytest.approx(roc_auc_score(y, raw), abs=1e-4)
    assert np.all(np.diff(cal.apply(np.sort(raw))) >= 0)


def test_calibration_identity_and_refusals() -> None:
    s = np.array([0.0, 0.2, 0.5, 1.0], np.float32)
    np.testing.assert_array_equal(Calibration().apply(s), s)
    assert np.isfinite(log_odds(s)).all()
    with pytest.raises(ValueError, match="temperature"):
        Calibration(temperature=0.0)
    with pytest.raises(ValueError, match="with and without HRF"):
        fit_calibration(np.array([0.2, 0.9]), np.array([True, True]))
    with pytest.raises(ValueError, match="unknown calibration method"):
        Calibration.from_dict({"method": "isotonic"})
    assert Calibration.from_dict({}) == Calibration()
    assert expected_calibration_error(np.array([0.9, 0.9]), np.array([1, 0])) == pytest.approx(0.4)


def test_model_with_calibration_scores_calibrated_probabilities(tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "m", threshold=0.5)
    images = np.random.default_rng(1).uniform(0, 255, (3, 64, 96)).astype(np.float32)
    before = raw_scores(load_classifier(str(folder), "cpu"), images)
    record = json.loads((folder / "config.json").read_text())
    record["calibration"] = {"method": "temperature-bias", "temperature": 2.0, "bias": 1.0}
    (folder / "config.json").write_text(json.dumps(record))
    clf = load_classifier(str(folder), "cpu")
    assert clf.model_id == load_model(folder)[1].model_id  # the weights, hence the id, are unchanged
    probs, z = presence(clf, images)
    expected = 1 / (1 + np.exp(-(log_odds(before) - 1.0) / 2.0))
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    np.testing.assert_allclose(z, (log_odds(before) - 1.0) / 2.0, rtol=1e-6)
    # the calibration is part of every run's parameters, so a recalibrated model makes a new run
    info = run_info(clf, make_segmenter("region"), PipelineParams())
    assert info.parameters["calibration"] == {"method": "temperature-bias", "temperature": 2.0, "bias": 1.0}
    record["calibration"] = {"method": "temperature-bias", "temperature": -1, "bias": 0}
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(ModelFileError, match="calibration"):
        load_model(folder)


# --------------------------------------------------------------------------- lesion filter


def _image_with(mask: np.ndarray, fg: float, bg: float = 60.0) -> np.ndarray:
    return np.where(mask, fg, bg).astype(np.float32)


def _blob(shape: tuple[int, int], centre: tuple[int, int], radii: tuple[float, float]) -> np.ndarray:
    r, c = np.ogrid[: shape[0], : shape[1]]
    return ((r - centre[0]) / radii[0]) ** 2 + ((c - centre[1]) / radii[1]) ** 2 <= 1


def _bbox(mask: np.ndarray) -> tuple[tuple[int, int, int, int], np.ndarray]:
    rows, cols = np.nonzero(mask)
    box = (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
    return box, mask[box[0] : box[2], box[1] : box[3]]


def test_lesion_filter_keeps_a_focus_and_drops_layer_pieces_and_faint_spots() -> None:
    spacing = REFERENCE_SPACING_MM
    limits = LesionFilter()
    focus = _blob((80, 80), (40, 40), (4.5, 1.6))  # ~40 µm round in physical units: 3:1 in pixels
    assert elongation(focus, spacing) < 1.5
    assert check(_image_with(focus, 220), *_bbox(focus), spacing, limits) is None
    line = np.zeros((80, 80), bool)
    line[40:42, 10:60] = True  # a piece of a bright layer: 100 px, 586 µm long, 8 µm thick
    assert "elongation" in check(_image_with(line, 220), *_bbox(line), spacing, limits)
    big = _blob((200, 200), (100, 100), (30, 10))
    assert "above" in check(_image_with(big, 220), *_bbox(big), spacing, limits)
    assert "contrast" in check(_image_with(focus, 65), *_bbox(focus), spacing, limits)


def test_a_focus_round_in_pixels_passes_and_a_short_layer_piece_does_not() -> None:
    spacing = REFERENCE_SPACING_MM
    dot = _blob((80, 80), (40, 40), (3.5, 3.5))  # round on the pixel grid: 3:1 in µm
    assert elongation(dot, spacing) > 2.5 and elongation(dot, (1.0, 1.0)) < 1.2
    assert check(_image_with(dot, 220), *_bbox(dot), spacing, LesionFilter()) is None
    assert "elongation" in check(_image_with(dot, 220), *_bbox(dot), spacing, LesionFilter(max_elongation=2.5,
                                                                                           elongation_frame="um"))
    piece = np.zeros((80, 80), bool)
    piece[40:43, 30:48] = True  # 3 x 18 px of a bright layer: a line in pixels and in µm
    assert "elongation" in check(_image_with(piece, 220), *_bbox(piece), spacing, LesionFilter())
    with pytest.raises(ValueError, match="elongation_frame"):
        LesionFilter(elongation_frame="mm")  # refused when the settings are made, not at the first lesion


def test_a_crescent_cyst_wall_is_dropped_and_a_filled_focus_or_small_cluster_kept() -> None:
    spacing = REFERENCE_SPACING_MM
    yy, xx = np.mgrid[:80, :80]
    r = np.hypot((yy - 40) / 1.0, (xx - 40) / 1.6)
    crescent = (r >= 9) & (r < 11) & (xx > 44)  # the bright wall on one side of a round cyst
    assert 20 <= crescent.sum() <= 150 and min(elongation(crescent, spacing), elongation(crescent, (1.0, 1.0))) < 4
    assert solidity(crescent) < 0.5
    assert "solidity" in check(_image_with(crescent, 220), *_bbox(crescent), spacing, LesionFilter())
    assert check(_image_with(crescent, 220), *_bbox(crescent), spacing, LesionFilter(min_solidity=0.0)) is None
    focus = _blob((80, 80), (40, 40), (4.5, 1.6))
    assert solidity(focus) > 0.8 and check(_image_with(focus, 220), *_bbox(focus), spacing, LesionFilter()) is None
    cluster = _blob((80, 80), (40, 37), (2.5, 2.5)) | _blob((80, 80), (40, 42), (2.5, 2.5))  # two touching dots
    assert solidity(cluster) > LesionFilter().min_solidity
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    assert solidity(one) == pytest.approx(1.0)


def test_lesion_area_limits_scale_with_the_pixel_size() -> None:
    lo, hi = area_limits(REFERENCE_SPACING_MM, (5, 150))
    assert (lo, hi) == pytest.approx((5, 150))
    lo3, hi3 = area_limits((REFERENCE_SPACING_MM[0] / 3, REFERENCE_SPACING_MM[1]), (5, 150))  # 1536 wide
    assert (lo3, hi3) == pytest.approx((15, 450))
    assert area_limits((math.nan, 0.0), (5, 150)) == (5, 150)  # unknown spacing: the reference range


# --------------------------------------------------------------------------- several peaks


def test_peaks_are_separated_strongest_first_and_above_a_floor() -> None:
    rel = np.zeros((60, 60))
    rel[10, 10], rel[12, 12], rel[40, 40], rel[50, 5] = 1.0, 0.9, 0.5, 0.1
    assert peaks(rel, k=1) == [(10, 10)]
    assert peaks(rel, k=5, radius_px=5, min_fraction=0.25) == [(10, 10), (40, 40)]  # (12,12) suppressed, (50,5) too weak
    assert peaks(rel, k=5, radius_px=1, min_fraction=0.05) == [(10, 10), (12, 12), (40, 40), (50, 5)]
    tried = np.zeros_like(rel, bool)
    tried[10, 10] = True
    assert peaks(rel, tried, k=2, radius_px=5)[0] == (12, 12)
    with pytest.raises(ValueError):
        peaks(rel, k=0)


# --------------------------------------------------------------------------- score-drop guard


def _state_with_one_segment() -> tuple[_State, np.ndarray]:
    image = np.full((20, 20), 50.0, np.float32)
    image[5:8, 5:8] = 200.0
    st = _State(image=image, work=image.copy(), fill=float(image.mean()), scores=[0.9], log_odds=2.0,
                mask=np.zeros((20, 20), bool), tried=np.zeros((20, 20), bool))
    seg_mask = np.zeros((10, 10), bool)
    seg_mask[5:8, 5:8] = True
    st.pending = (st.log_odds, 0)
    st.segments.append(Segment(0, (6, 6), (0, 0, 10, 10), seg_mask))
    st.mask[0:10, 0:10] |= seg_mask
    st.work[st.mask] = st.fill
    return st, image


def test_guard_keeps_an_object_whose_inpainting_lowered_the_score() -> None:
    st, _ = _state_with_one_segment()
    assert st.update(0.3, -0.8, guard=True)
    assert len(st.segments) == 1 and st.mask.sum() == 9 and st.pending is None and st.scores == [0.9, 0.3]


def test_guard_drops_an_object_that_did_not_lower_the_score_and_restores_the_pixels() -> None:
    st, image = _state_with_one_segment()
    assert not st.update(0.92, 2.1, guard=True)
    assert st.segments == [] and not st.mask.any()
    np.testing.assert_array_equal(st.work, image)
    st2, _ = _state_with_one_segment()
    assert st2.update(0.92, 2.1, guard=False) and st2.mask.sum() == 9  # guard off: the paper's loop


def test_guard_settings_reach_the_stored_parameters() -> None:
    settings = load_settings({"score_drop_guard": None}, env={"HRF_BATCH_LESION_FILTER": "off",
                                                             "HRF_BATCH_PEAKS_PER_ITERATION": "3"})
    params = PipelineParams.from_settings(settings)
    assert not params.score_drop_guard and params.lesion_filter is None and params.peaks_per_iteration == 3
    on = PipelineParams.from_settings(load_settings({"score_drop_guard": True}, env={}))
    assert on.score_drop_guard and on.lesion_filter is not None
    with pytest.raises(HrfBatchError, match="not true or false"):
        load_settings(env={"HRF_BATCH_SCORE_DROP_GUARD": "maybe"})
