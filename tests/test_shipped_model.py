"""The shipped classifier: it loads, leaves healthy real B-scans alone, finds synthetic HRFs, and
its relevance points at them. Uses a fresh synthetic study (a seed not used in training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hrf_batch.config import DEFAULT_MODEL, MODELS_DIR
from hrf_batch.evaluation.classification import evaluate_classifier
from hrf_batch.evaluation.segmentation import evaluate_segmentation
from hrf_batch.io.labels import load_study_labels
from hrf_batch.io.readers import read_volume
from hrf_batch.model.catalog import list_models
from hrf_batch.model.classify import load_classifier, score_bscans
from hrf_batch.pipeline import PipelineParams, run_volume
from hrf_batch.segment import make_segmenter
from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

SHIPPED = MODELS_DIR / DEFAULT_MODEL


@pytest.fixture(scope="module")
def clf():
    return load_classifier(str(SHIPPED), "cpu", batch_size=8)


@pytest.fixture(scope="module")
def fresh_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fresh")
    write_synthetic_study(root, StudySpec(patients=3, visits=1, bscans=6, width=512, height=496, seed=909))
    return root


def test_shipped_model_is_listed_intact_with_a_card(clf) -> None:
    (entry,) = [m for m in list_models(MODELS_DIR) if Path(m["path"]).name == DEFAULT_MODEL]
    assert entry["intact"] and entry["model_id"] == clf.model_id
    assert "synthetic" in (SHIPPED / "MODEL_CARD.md").read_text().lower()


@pytest.mark.parametrize("name", ["Willis_B_716_0.vol", "Willis_B_716_2.vol"])
def test_healthy_real_macular_bscans_score_below_threshold(clf, fixtures_dir: Path, name: str) -> None:
    vol = read_volume(fixtures_dir / "spectralis-raw-data" / name)
    scores = score_bscans(clf, vol.bscans)
    assert (scores < clf.threshold).all(), f"{name}: {scores} vs threshold {clf.threshold:.3f}"


@pytest.mark.parametrize("name", ["Willis_B_716_0.vol", "Willis_B_716_2.vol", "valid.vol"])
def test_healthy_real_bscans_get_no_hrf_from_the_default_pipeline(clf, fixtures_dir: Path, name: str) -> None:
    vol = read_volume(fixtures_dir / "spectralis-raw-data" / name)
    result = run_volume(vol, clf, make_segmenter("region"), PipelineParams())
    assert result.hrf_count == 0, [b.scores for b in result.bscans]


def test_detects_hrf_on_a_fresh_synthetic_study(clf, fresh_study: Path) -> None:
    metrics = evaluate_classifier(clf, load_study_labels(fresh_study))
    assert metrics["auroc"] >= 0.9, metrics


def test_detects_hrf_on_a_fresh_study_of_the_second_generator(clf, tmp_path: Path) -> None:
    spec = StudySpec(patients=3, visits=1, bscans=6, width=512, height=496, seed=919, generator="b", widths=(512, 768))
    write_synthetic_study(tmp_path, spec)
    metrics = evaluate_classifier(clf, load_study_labels(tmp_path))
    assert metrics["n_positive"] >= 5 and metrics["auroc"] >= 0.9, metrics


@pytest.fixture(scope="module")
def segmentation(clf, fresh_study: Path) -> dict:
    """The pipeline over the fresh study, scored against its masks: relevance maps computed once for
    the pipeline, the baselines and the pointing game."""
    return evaluate_segmentation(fresh_study, clf, make_segmenter("region"), PipelineParams(max_iterations=6),
                                 pointing_tolerance_px=3)


@pytest.mark.slow
def test_pointing_game(segmentation: dict) -> None:
    result = segmentation["pointing_game"]
    assert result["n_bscans"] >= 10
    assert result["fraction"] >= 0.8, result


@pytest.mark.slow
def test_iterations_raise_lesion_recall_and_prompting_beats_global_threshold(segmentation: dict) -> None:
    metrics = segmentation
    first, last = metrics["after_1"], metrics["after_6"]
    assert last["lesion_recall"] > first["lesion_recall"]
    base = metrics["baselines"]  # same held-out GT-positive B-scans for all three numbers
    assert base["pipeline_dice"]["after_6"] > base["global_dice"], base
    assert base["oracle_dice"] >= base["global_dice"]
