"""The device path: precision setting, bf16 scoring and LRP with its conservation check, batches sized
to the device. Runs on CPU (bf16 autocast works there too); the tests named *cuda* need a CUDA device.

Tolerances (measured on the shipped model, see the classify and explain module docstrings):
* bf16 score vs fp32 score: <= BF16_SCORE_TOLERANCE = 0.03 (measured <= 0.013 on CPU).
* bf16 LRP conservation error (change of sum(R) - logit over the fp32 map's total |R|): <= 0.03 per
  checked B-scan (measured median 0.003); on CUDA the median over a batch must stay below 0.01.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from hrf_batch.config import DEFAULT_MODEL, MODELS_DIR, load_settings
from hrf_batch.errors import HrfBatchError
from hrf_batch.model import explain as explain_mod
from hrf_batch.model.classify import (
    BF16_SCORE_TOLERANCE,
    Classifier,
    device_batch_size,
    load_classifier,
    raw_scores,
    resolve_precision,
)
from hrf_batch.model.explain import BF16_CONSERVATION_TOLERANCE, Explainer, conservation_error
from hrf_batch.synthetic.study import StudySpec, synthetic_volume

SHIPPED = str(MODELS_DIR / DEFAULT_MODEL)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bscans(n: int, width: int, seed: int = 5) -> np.ndarray:
    """Synthetic B-scans of 496 x ``width`` with HRF (display scale, float32)."""
    spec = StudySpec(bscans=n, width=width, height=496, seed=seed)
    volume, _ = synthetic_volume(np.random.default_rng(seed), spec, "P1", date(2024, 1, 1), "OD", 0.8,
                                 datetime(2024, 1, 1, 9))
    return np.asarray(volume.bscans, dtype=np.float32)


def _peaks(relevance: np.ndarray) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in np.unravel_index(np.argmax(r), r.shape)) for r in relevance]


# --------------------------------------------------------------------------- precision setting


def test_auto_precision_is_fp32_on_cpu_and_unknown_values_are_refused() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(HrfBatchError, match="unknown precision 'fp16'.*auto, fp32, bf16"):
        resolve_precision("fp16", cpu)


def test_precision_comes_from_flags_environment_and_defaults_to_auto() -> None:
    assert load_settings({}, env={}).precision == "auto"
    assert load_settings({}, env={"HRF_BATCH_PRECISION": "bf16"}).precision == "bf16"
    assert load_settings({"precision": "fp32"}, env={"HRF_BATCH_PRECISION": "bf16"}).precision == "fp32"


def test_loaded_classifier_carries_the_resolved_precision(tiny_model: Path) -> None:
    assert load_classifier(str(tiny_model), "cpu").precision == "fp32"
    assert load_classifier(str(tiny_model), "cpu", precision="bf16").precision == "bf16"
    with pytest.raises(HrfBatchError, match="unknown precision"):
        load_classifier(str(tiny_model), "cpu", precision="half")


def test_fp32_runs_keep_their_rerun_key_and_bf16_runs_get_their_own(tiny_model: Path) -> None:
    from hrf_batch.pipeline import PipelineParams, run_info
    from hrf_batch.segment import make_segmenter
    from hrf_batch.store import params_hash

    seg, params = make_segmenter("region"), PipelineParams()
    fp32 = run_info(load_classifier(str(tiny_model), "cpu"), seg, params)
    bf16 = run_info(load_classifier(str(tiny_model), "cpu", precision="bf16"), seg, params)
    assert "precision" not in fp32.parameters  # the parameters, and so the key, of a run made before precision existed
    assert bf16.parameters == {**fp32.parameters, "precision": "bf16"}
    assert params_hash(bf16.parameters) != params_hash(fp32.parameters)


def test_ingest_precision_flag_is_stored_with_the_run(tmp_path: Path, tiny_model: Path) -> None:
    import sqlite3

    from click.testing import CliRunner

    from hrf_batch.cli import main
    from hrf_batch.synthetic.study import write_synthetic_study

    study = tmp_path / "s"
    write_synthetic_study(study, StudySpec(patients=1, visits=1, bscans=2, width=64, height=64, seed=2))
    db = tmp_path / "db.sqlite"
    args = ["--db", str(db), "--model", str(tiny_model), "--device", "cpu", "--segmenter", "region",
            "--max-iterations", "1", "--quiet"]
    for precision in ("bf16", "fp32"):
        result = CliRunner().invoke(main, ["ingest", str(study), *args, "--precision", precision])
        assert result.exit_code == 0, result.output
        assert "2 processed" in result.output  # fp32 is a different run, not 'already done'
    with sqlite3.connect(db) as con:
        stored = [json_params for (json_params,) in con.execute("select parameters from runs order by id")]
    assert sum('"precision": "bf16"' in p or '"precision":"bf16"' in p for p in stored) == 2
    assert sum("precision" not in p for p in stored) == 2
    bad = CliRunner().invoke(main, ["ingest", str(study), *args, "--precision", "fp16"])
    assert bad.exit_code != 0 and "fp16" in bad.output


# --------------------------------------------------------------------------- bf16 on CPU


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return load_classifier(SHIPPED, "cpu", batch_size=2)


def test_bf16_scores_are_close_to_fp32(shipped: Classifier) -> None:
    images = _bscans(4, 512)
    fp32 = raw_scores(shipped, images)
    bf16 = raw_scores(dataclasses.replace(shipped, precision="bf16"), images)
    assert np.abs(bf16 - fp32).max() <= BF16_SCORE_TOLERANCE
    assert np.abs(bf16 - fp32).max() > 0, "bf16 gave fp32's exact scores: autocast did not run"
    assert np.array_equal(raw_scores(shipped, images), fp32)  # fp32 is deterministic


def test_bf16_lrp_conserves_within_tolerance_and_finds_the_same_peaks(shipped: Classifier) -> None:
    images = _bscans(4, 512)[:2]
    with Explainer(shipped) as explainer:
        fp32 = explainer.explain(images)
        assert explainer.conservation_errors == []  # fp32 is not checked: it conserves by construction
    with Explainer(dataclasses.replace(shipped, precision="bf16")) as explainer:
        bf16 = explainer.explain(images)
        errors, fallbacks = explainer.conservation_errors, explainer.fallbacks
    assert len(errors) == 1 and 0 < errors[0] <= BF16_CONSERVATION_TOLERANCE and fallbacks == 0
    assert not np.array_equal(bf16.relevance, fp32.relevance)
    assert _peaks(bf16.relevance) == _peaks(fp32.relevance)
    assert np.abs(bf16.scores - fp32.scores).max() <= BF16_SCORE_TOLERANCE


def test_a_batch_that_breaks_conservation_is_explained_again_in_fp32_and_logged_once(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    clf = load_classifier(str(tiny_model), "cpu", batch_size=2)
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 96)).astype(np.float32)
    with Explainer(clf) as explainer:
        fp32 = explainer.explain(images)
    monkeypatch.setattr(explain_mod, "_fallback_logged", False)
    bf16_clf = dataclasses.replace(clf, precision="bf16")
    with caplog.at_level(logging.WARNING, logger="hrf_batch.model.explain"):
        with Explainer(bf16_clf, conservation_tolerance=-1.0) as explainer:  # every batch fails the check
            forced = explainer.explain(images)
            assert explainer.fallbacks == 3 and len(explainer.conservation_errors) == 3
        with Explainer(bf16_clf) as explainer:
            kept = explainer.explain(images)
            assert explainer.fallbacks == 0
    assert np.array_equal(forced.relevance, fp32.relevance) and np.array_equal(forced.logits, fp32.logits)
    assert not np.array_equal(kept.relevance, fp32.relevance)  # the normal tolerance keeps bf16 maps
    warnings = [r for r in caplog.records if "explained again in fp32" in r.getMessage()]
    assert len(warnings) == 1


def test_conservation_error_is_the_change_of_the_balance_over_the_total_relevance() -> None:
    reference = np.array([[6.0, -2.0], [3.0, 3.0]])  # sum 10, total |R| 14
    moved = reference + np.array([[0.7, 0.0], [0.0, 0.0]])  # sum 10.7
    assert conservation_error(reference, 4.0, reference, 4.0) == 0.0
    assert conservation_error(moved, 4.0, reference, 4.0) == pytest.approx(0.7 / 14)
    assert conservation_error(moved, 4.7, reference, 4.0) == pytest.approx(0.0)  # the logit moved with it
    assert conservation_error(np.ones((2, 2)), 1.0, np.zeros((2, 2)), 1.0) == float("inf")


def test_bf16_pipeline_runs_on_cpu_and_labels_its_run(tiny_model: Path) -> None:
    from hrf_batch.pipeline import PipelineParams, run_volume
    from hrf_batch.segment import make_segmenter

    spec = StudySpec(bscans=3, width=96, height=64)
    volume, _ = synthetic_volume(np.random.default_rng(1), spec, "P1", date(2024, 1, 1), "OD", 0.8,
                                 datetime(2024, 1, 1, 9))
    clf = load_classifier(str(tiny_model), "cpu", batch_size=2, precision="bf16")
    result = run_volume(volume, clf, make_segmenter("region"), PipelineParams(max_iterations=2))
    assert result.run.parameters["precision"] == "bf16"
    assert len(result.bscans) == 3 and all(0.0 <= b.scores[0] <= 1.0 for b in result.bscans)


# --------------------------------------------------------------------------- batches sized to the device


def test_device_batch_size_from_free_memory_and_bscan_size() -> None:
    shape = (496, 1024)  # 507,904 px; 640 B/px: 325 MB per B-scan
    assert device_batch_size(2_000_000_000, shape, 640) == 3  # half of 2 GB holds three
    assert device_batch_size(8_000_000_000, shape, 640) == 12
    assert device_batch_size(8_000_000_000, (496, 512), 640) == 24  # half the width: twice the batch
    assert device_batch_size(140_000_000_000, shape, 640) == 32  # capped
    assert device_batch_size(140_000_000_000, shape, 640, cap=64) == 64
    assert device_batch_size(100_000_000, shape, 640) == 1  # too little memory: still one B-scan
    assert device_batch_size(8_000_000_000, shape, 96) == 32  # scoring costs less per pixel
    with pytest.raises(ValueError, match="must be positive"):
        device_batch_size(1_000_000, (0, 512), 640)


def test_batch_for_asks_the_device_only_on_cuda_without_an_explicit_batch_size(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.device] = []

    def free_memory(device: torch.device) -> tuple[int, int]:
        calls.append(device)
        return 2_000_000_000, 8_000_000_000

    monkeypatch.setattr(torch.cuda, "mem_get_info", free_memory)
    explicit = load_classifier(str(tiny_model), "cpu", batch_size=5)
    assert (explicit.batch_size, explicit.fit_batch_to_memory) == (5, False)
    default = load_classifier(str(tiny_model), "cpu")
    assert (default.batch_size, default.fit_batch_to_memory) == (2, False)
    assert default.batch_for((496, 1024)) == 2 and calls == []
    on_cuda = dataclasses.replace(default, device=torch.device("cuda", 0), fit_batch_to_memory=True)
    assert on_cuda.batch_for((496, 1024), 640) == 3
    assert on_cuda.batch_for((496, 1024), 96) == 20
    assert calls == [torch.device("cuda", 0)] * 2
    assert dataclasses.replace(on_cuda, fit_batch_to_memory=False).batch_for((496, 1024)) == 2


def test_a_volume_crosses_to_the_device_once_per_batch_not_once_per_bscan(
        tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hrf_batch.model import classify

    transfers: list[int] = []
    real = classify.to_tensor

    def counted(images: np.ndarray, *args: object) -> torch.Tensor:
        transfers.append(len(images))
        return real(images, *args)

    monkeypatch.setattr(classify, "to_tensor", counted)
    clf = load_classifier(str(tiny_model), "cpu", batch_size=4)
    images = np.random.default_rng(0).integers(0, 256, (10, 64, 96)).astype(np.float32)
    raw_scores(clf, images)
    assert transfers == [4, 4, 2]
    transfers.clear()
    with Explainer(clf) as explainer:
        explainer.explain(images)
    assert transfers == [4, 4, 2]
    transfers.clear()
    with Explainer(dataclasses.replace(clf, precision="bf16"), conservation_tolerance=float("inf")) as explainer:
        explainer.explain(images)
    assert transfers == [4, 1, 4, 1, 2, 1]  # each bf16 batch and the fp32 check of its first B-scan


# --------------------------------------------------------------------------- CUDA (where present)


@needs_cuda
def test_cuda_bf16_relevance_matches_fp32_on_cuda() -> None:
    fp32 = load_classifier(SHIPPED, "cuda", batch_size=8, precision="fp32")
    bf16 = dataclasses.replace(fp32, precision="bf16")
    images = _bscans(8, 1024)
    with Explainer(fp32) as explainer:
        ref = explainer.explain(images)
    with Explainer(dataclasses.replace(bf16, batch_size=1), conservation_tolerance=float("inf")) as explainer:
        per_bscan = explainer.explain(images)  # one batch per B-scan: every map's conservation is measured
        errors = np.array(explainer.conservation_errors)
    with Explainer(bf16) as explainer:
        batched = explainer.explain(images)
        assert len(explainer.conservation_errors) == 1
    assert len(errors) == 8 and np.median(errors) < 0.01 and np.mean(errors <= BF16_CONSERVATION_TOLERANCE) >= 0.75
    for out in (per_bscan, batched):
        assert sum(a == b for a, b in zip(_peaks(out.relevance), _peaks(ref.relevance))) >= 6
        assert np.abs(out.scores - ref.scores).max() <= BF16_SCORE_TOLERANCE
    print(f"bf16 conservation errors on CUDA: {np.round(errors, 4).tolist()}")


@needs_cuda
def test_cuda_classifier_defaults_to_bf16_and_memory_sized_batches() -> None:
    clf = load_classifier(SHIPPED, "cuda")
    assert clf.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert clf.fit_batch_to_memory
    size = clf.batch_for((496, 1024))
    assert 1 <= size <= 32
    images = _bscans(4, 1024)
    fp32 = raw_scores(dataclasses.replace(clf, precision="fp32"), images)
    assert np.abs(raw_scores(clf, images) - fp32).max() <= BF16_SCORE_TOLERANCE
    torch.cuda.reset_peak_memory_stats()
    with Explainer(dataclasses.replace(clf, precision="fp32", batch_size=4, fit_batch_to_memory=False)) as explainer:
        explainer.explain(images)
    per_bscan = torch.cuda.max_memory_allocated() / 4 / (496 * 1024)
    print(f"batch size for 496x1024 on this device: {size}; fp32 LRP peak {per_bscan:.0f} bytes per B-scan pixel")
