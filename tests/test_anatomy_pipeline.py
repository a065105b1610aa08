"""The anatomy stage inside the pipeline: retina band, lesion zones and ETDRS subfields, and its evaluation."""

from __future__ import annotations

import dataclasses
from datetime import date, datetime

import numpy as np
import pytest

from hrf_batch.anatomy.zones import retina_band, zone_of
from hrf_batch.io.volume import LayerLines, Volume
from hrf_batch.model.classify import load_classifier
from hrf_batch.pipeline import PipelineParams, run_volume
from hrf_batch.results import SUBFIELD_OUTSIDE, SUBFIELD_UNKNOWN, SUBFIELDS, ZONE_UNKNOWN, ZONES
from hrf_batch.segment import make_segmenter
from hrf_batch.synthetic.study import StudySpec, synthetic_volume

from conftest import save_tiny_model


@pytest.fixture(scope="module")
def clf(tmp_path_factory: pytest.TempPathFactory):
    folder = save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", threshold=0.0, seed=3)
    return load_classifier(str(folder), "cpu", batch_size=4)


@pytest.fixture(scope="module")
def volume() -> Volume:
    spec = StudySpec(bscans=9, width=256, height=256, generator="b")
    vol, _ = synthetic_volume(np.random.default_rng(11), spec, "P1", date(2024, 1, 1), "OD", 0.8, datetime(2024, 1, 1, 9))
    return vol


def _lines(n: int, width: int, rows: dict[str, float]) -> LayerLines:
    return LayerLines({k: np.full((n, width), v, np.float32) for k, v in rows.items()}, "estimated")


def test_zone_of_follows_the_boundaries() -> None:
    layers = _lines(1, 10, {"ILM": 10, "INL": 20, "ELM": 30, "BM": 40})
    assert [zone_of(layers, 0, r, 5) for r in (5, 15, 25, 35, 45)] == list(ZONES)
    assert zone_of(None, 0, 15, 5) == ZONE_UNKNOWN
    missing = LayerLines({"ILM": layers.rows["ILM"], "BM": layers.rows["BM"]}, "device")
    assert zone_of(missing, 0, 15, 5) == ZONE_UNKNOWN  # no INL: inner or outer cannot be told
    assert zone_of(missing, 0, 5, 5) == "above-ilm" and zone_of(missing, 0, 45, 5) == "below-bm"


def test_retina_band_leaves_unknown_columns_whole() -> None:
    layers = _lines(1, 6, {"ILM": 2, "BM": 5})
    layers.rows["ILM"][0, 4] = np.nan
    band = retina_band(layers, 0, (8, 6))
    assert band[:, 4].all()  # unknown line: nothing excluded
    np.testing.assert_array_equal(band[:, 0], [r in (2, 3, 4, 5) for r in range(8)])
    assert retina_band(None, 0, (8, 6)) is None


def test_pipeline_places_every_lesion_and_prompts_only_inside_the_band(clf, volume: Volume) -> None:
    params = PipelineParams(threshold=0.0, max_iterations=3, crop_px=50, lesion_filter=None)
    res = run_volume(volume, clf, make_segmenter("region"), params)
    anatomy = res.anatomy
    assert anatomy is not None and anatomy.layers is not None and anatomy.layers.source == "estimated"
    assert res.run.parameters["retina_band"] is True and "anatomy" in res.run.seconds
    assert anatomy.fovea is not None and 0 <= anatomy.fovea.bscan <= volume.n_bscans - 1
    ilm, bm = anatomy.layers.rows["ILM"], anatomy.layers.rows["BM"]
    n_peaks = 0
    for b in res.bscans:
        for r, c in b.relevance_peaks:
            n_peaks += 1
            if np.isfinite(ilm[b.index, c]) and np.isfinite(bm[b.index, c]):
                assert ilm[b.index, c] <= r <= bm[b.index, c], f"B-scan {b.index}: peak ({r}, {c}) outside ILM..BM"
        for les in b.lesions:
            assert les.zone in ZONES and les.zone not in ("above-ilm", "below-bm")
            assert les.subfield in (*SUBFIELDS, SUBFIELD_OUTSIDE)
    assert n_peaks > 0


def test_band_off_prompts_where_the_model_points(clf, volume: Volume) -> None:
    """With the band off the loop is the paper's: peaks may land anywhere, lesions keep their zone."""
    params = PipelineParams(threshold=0.0, max_iterations=2, crop_px=50, lesion_filter=None, retina_band=False)
    res = run_volume(volume, clf, make_segmenter("region"), params)
    assert res.run.parameters["retina_band"] is False
    assert all(les.zone in (*ZONES, ZONE_UNKNOWN) for b in res.bscans for les in b.lesions)


def test_line_scan_lesions_have_no_subfield(clf, volume: Volume) -> None:
    meta = dataclasses.replace(volume.meta, scan_pattern="line", positions=(volume.meta.positions[4],))
    single = Volume(volume.bscans[4:5], meta)
    res = run_volume(single, clf, make_segmenter("region"), PipelineParams(threshold=0.0, max_iterations=2, crop_px=50))
    assert res.anatomy.fovea is None and "line" in res.anatomy.fovea_note
    assert all(les.subfield == SUBFIELD_UNKNOWN for b in res.bscans for les in b.lesions)


def test_evaluate_anatomy_scores_against_the_study_truth(tmp_path, clf) -> None:
    from hrf_batch.evaluation.anatomy import evaluate_anatomy, format_anatomy
    from hrf_batch.synthetic.study import write_synthetic_study

    study = tmp_path / "study"
    write_synthetic_study(study, StudySpec(patients=1, visits=1, bscans=7, width=256, height=256, seed=4, generator="b"))
    report = evaluate_anatomy(study, clf, make_segmenter("region"),
                              PipelineParams(threshold=0.0, max_iterations=2, crop_px=50))
    assert report["n_volumes"] == 2
    mae = report["layer_mae_um"]
    assert set(mae) == {"ILM", "INL", "ELM", "EZ", "BM"} and all(v is not None and v < 30 for v in mae.values())
    fovea = report["fovea_error_um"]
    assert fovea["n_found"] + fovea["n_not_found"] == 2
    etdrs = report["etdrs"]
    assert sum(row["found"] for row in etdrs.values()) == report["lesions"]["found"]
    assert sum(row["true"] for row in etdrs.values()) == report["lesions"]["hrfs"]
    assert all(row["explained"] for row in etdrs.values())
    assert "ETDRS subfield" in format_anatomy(report)
