"""The iterative pipeline's invariants, with a tiny real CCT and the weight-free segmenter."""

from __future__ import annotations

import dataclasses
from datetime import date, datetime

import numpy as np
import pytest

from hrf_batch.io.volume import Volume
from hrf_batch.model.classify import load_classifier
from hrf_batch.pipeline import PipelineParams, lesions_of, run_volume
from hrf_batch.segment import make_segmenter
from hrf_batch.synthetic.study import StudySpec, synthetic_volume

from conftest import save_tiny_model


@pytest.fixture(scope="module")
def clf(tmp_path_factory: pytest.TempPathFactory):
    folder = save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", threshold=0.3, seed=1)
    return load_classifier(str(folder), "cpu", batch_size=3)


@pytest.fixture(scope="module")
def volume() -> Volume:
    spec = StudySpec(bscans=5, width=128, height=96)
    vol, _ = synthetic_volume(np.random.default_rng(2), spec, "P1", date(2024, 1, 1), "OD", 0.8, datetime(2024, 1, 1, 9))
    return vol


def test_lesions_of_counts_components_of_min_size() -> None:
    mask = np.zeros((20, 20), bool)
    mask[1:4, 1:4] = True  # 9 px
    mask[10, 10:14] = True  # 4 px: below the minimum
    mask[15:17, 15:18] = True  # 6 px
    mask[4, 4] = True  # touches the first one diagonally: same lesion (8-connected)
    lesions = lesions_of(mask, index=7, min_px=5)
    assert [les.area_px for les in lesions] == [10, 6]
    assert lesions[0].bbox_rc == (1, 1, 5, 5) and lesions[0].bscan_index == 7
    assert lesions[1].centroid_rc == pytest.approx((15.5, 16.0))
    assert lesions[1].mask.shape == (2, 3) and lesions[1].mask.all()


def test_run_volume_invariants(clf, volume: Volume) -> None:
    params = PipelineParams(threshold=0.0, max_iterations=3, crop_px=50)
    res = run_volume(volume, clf, make_segmenter("region"), params)
    assert res.run.model_id == clf.model_id and res.run.segmenter == "region-growing"
    assert res.run.parameters["threshold"] == 0.0 and set(res.run.seconds) == {"anatomy", "score", "explain", "segment"}
    assert [b.index for b in res.bscans] == list(range(volume.n_bscans))
    for b in res.bscans:
        assert 1 <= len(b.scores) <= params.max_iterations + 1
        assert len(b.relevance_peaks) <= params.max_iterations
        assert b.mask.shape == volume.bscan_shape and b.relevance.shape == volume.bscan_shape
        assert int(b.mask.sum()) == b.hrf_area_px
        assert all(les.area_px >= params.min_lesion_px for les in b.lesions)
        np.testing.assert_array_equal(b.mask_after(params.max_iterations), b.mask)
        assert (b.mask_after(1) <= b.mask).all()
        for seg in b.segments:
            r0, c0, r1, c1 = seg.window
            assert seg.mask.shape == (r1 - r0, c1 - c0) and r0 <= seg.peak_rc[0] < r1 and c0 <= seg.peak_rc[1] < c1
        if len(b.scores) < params.max_iterations + 1 and len(b.scores) == len(b.relevance_peaks) + 1 and b.relevance_peaks:
            assert b.scores[-1] < params.stop_score  # stopped early only because the score fell


def test_below_threshold_bscans_are_left_alone(clf, volume: Volume) -> None:
    res = run_volume(volume, clf, make_segmenter("region"), PipelineParams(threshold=1.0))
    assert all(len(b.scores) == 1 and not b.mask.any() and b.relevance is None for b in res.bscans)
    assert res.hrf_count == 0


def test_batched_equals_one_bscan_at_a_time(clf, volume: Volume) -> None:
    params = PipelineParams(threshold=0.0, max_iterations=2, crop_px=50)
    seg = make_segmenter("region")
    batched = run_volume(volume, clf, seg, params)
    for i in range(volume.n_bscans):
        meta = dataclasses.replace(volume.meta, positions=(volume.meta.positions[i],))
        single = run_volume(Volume(volume.bscans[i : i + 1], meta), clf, seg, params).bscans[0]
        b = batched.bscans[i]
        np.testing.assert_array_equal(single.mask, b.mask)
        assert single.relevance_peaks == b.relevance_peaks
        np.testing.assert_allclose(single.scores, b.scores, atol=1e-5)
