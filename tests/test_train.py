"""Training from image-level labels: split, batches, augmentation, resume, restart, evaluation, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hrf_batch.cli import main
from hrf_batch.config import load_settings
from hrf_batch.errors import HrfBatchError, LabelError
from hrf_batch.evaluation.classification import evaluate_classifier
from hrf_batch.io.labels import combine, load_csv_labels, load_study_labels
from hrf_batch.model.classify import load_classifier, score_bscans, score_images
from hrf_batch.training import train as train_mod
from hrf_batch.training.augment import IDENTITY, augment
from hrf_batch.training.sampling import BalancedBatchSampler
from hrf_batch.training.source import InMemory
from hrf_batch.training.train import TrainConfig, split_by_patient, train_model

from conftest import TINY_TRAIN


@pytest.fixture(scope="module")
def study(train_study: Path) -> Path:
    return train_study


@pytest.fixture(scope="module")
def data(study: Path):
    return load_study_labels(study)


def test_labels_from_study(data) -> None:
    assert len(data) == 4 * 2 * 3
    assert data.images[0].dtype == np.uint8 and data.images[0].shape == (64, 96)
    assert set(data.patients.tolist()) == {"P001", "P002", "P003", "P004"}
    assert all(int(c) == len(np.unique(m[m > 0])) for c, m in zip(data.counts, data.masks))


def test_patient_split_is_disjoint() -> None:
    patients = np.array(["A"] * 5 + ["B"] * 3 + ["C"] * 4 + ["D"] * 2)
    tr, va = split_by_patient(patients, 0.25, seed=1)
    assert set(patients[tr]).isdisjoint(patients[va])
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(patients)))
    with pytest.raises(HrfBatchError, match="at least 2 patients"):
        split_by_patient(np.array(["A", "A"]), 0.2, 0)


def test_balanced_batches(data) -> None:
    source = InMemory(data)
    batches = BalancedBatchSampler(source.counts, source.shapes, 4, seed=0, stop=5)
    drawn = list(batches)
    assert len(drawn) == len(batches) == 5
    for idx in drawn:
        assert len(idx) == 4 and (data.counts[idx] > 0).sum() == 2
    assert list(BalancedBatchSampler(source.counts, source.shapes, 4, seed=0, start=3, stop=5)) == drawn[3:]
    two = [BalancedBatchSampler(source.counts, source.shapes, 4, seed=0, stop=5, rank=r, world_size=2) for r in (0, 1)]
    shares = [s.batch(1) for s in two]  # each process: its half of one global batch, still balanced
    assert all(len(s) == 4 and (data.counts[s] > 0).sum() == 2 for s in shares)
    assert sorted(shares[0] + shares[1]) == sorted(two[0].global_batch(1).tolist())


def test_augment_keeps_range_and_identity_is_identity() -> None:
    x = torch.rand(3, 1, 40, 60) * 255
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 255
    same = augment(x, torch.Generator().manual_seed(0), IDENTITY)
    assert torch.allclose(same, x, atol=1e-3)


def test_augment_moves_each_dimension_it_claims() -> None:
    img = torch.zeros(1, 1, 64, 64)
    img[0, 0, 30:34, 30:34] = 200.0  # one focus
    only = lambda **kw: dataclasses.replace(IDENTITY, **kw)  # noqa: E731
    wide = augment(img, torch.Generator().manual_seed(0), only(lateral_stretch=(1.6, 1.6)))
    cols = torch.nonzero(wide[0, 0] > 100)[:, 1]
    rows = torch.nonzero(wide[0, 0] > 100)[:, 0]
    assert int(cols.max() - cols.min()) + 1 >= 6 and int(rows.max() - rows.min()) + 1 == 4  # wider, not taller
    blurred = augment(img, torch.Generator().manual_seed(0), only(blur_p=1.0, blur_sigma=(1.5, 1.5)))
    assert float(blurred.max()) < 200 and float(blurred[0, 0, 28, 32]) > 0 and float(blurred.sum()) == pytest.approx(float(img.sum()), rel=0.01)
    flat = torch.full((2, 1, 64, 64), 100.0)
    noisy = augment(flat, torch.Generator().manual_seed(0), only(noise_p=1.0, noise_std=(10.0, 10.0), noise_grain=(3, 3)))
    assert 7 < float(noisy.std()) < 13
    bright = augment(flat, torch.Generator().manual_seed(0), only(gain=(1.5, 1.5), offset=(10.0, 10.0)))
    assert torch.allclose(bright, torch.full_like(flat, 160.0))


@pytest.mark.parametrize("task", ["binary", "3class", "regression"])
def test_train_saves_best_model_with_training_stats(tmp_path: Path, data, task: str) -> None:
    cfg = TrainConfig(task=task, steps=6, eval_every=3, **TINY_TRAIN)
    info = train_model(data, cfg, tmp_path / "m", source="unit", progress=False)
    saved = json.loads((tmp_path / "m/config.json").read_text())
    assert saved["task"] == task and saved["model_id"] == info.model_id
    train_idx, _ = split_by_patient(data.patients, cfg.val_fraction, cfg.seed)
    pixels = np.concatenate([data.images[i].ravel()[::7] for i in train_idx]).astype(float)
    assert saved["norm_mean"] == pytest.approx(pixels.mean()) and saved["norm_std"] == pytest.approx(pixels.std())
    assert [h["step"] for h in saved["training"]["history"]] == [3.0, 6.0]
    assert 0.0 <= saved["metrics"]["threshold"] <= 1.0
    _, val_idx = split_by_patient(data.patients, cfg.val_fraction, cfg.seed)
    if len(set((data.counts[val_idx] > 0).tolist())) == 2:  # calibration is fitted on the validation split
        cal = saved["calibration"]
        assert cal["method"] == "temperature-bias" and cal["nll_after"] <= cal["nll_before"] + 1e-9
        assert saved["metrics"]["threshold"] == 0.5 and "uncalibrated_threshold" in saved["metrics"]
    else:  # one class only: scores stay raw and the best-F1 threshold is kept
        assert saved["calibration"] == {}
    clf = load_classifier(str(tmp_path / "m"), "cpu")
    scores = score_bscans(clf, np.stack(data.images[:4]).astype(np.float32))
    assert scores.shape == (4,) and np.all((scores >= 0) & (scores <= 1))
    raw = score_images(clf.model, task, list(data.images[:4]), clf.info.config.norm_mean, clf.info.config.norm_std, clf.device)
    np.testing.assert_allclose(scores, clf.calibration.apply(raw), atol=1e-5)
    metrics = evaluate_classifier(clf, data)
    assert metrics["n"] == len(data) and {"auroc", "ap", "f1"} <= set(metrics)


def test_training_calibrates_on_a_validation_split_with_both_classes(tmp_path: Path, data) -> None:
    seeds = [s for s in range(40) if len(set((data.counts[split_by_patient(data.patients, 0.5, s)[1]] > 0).tolist())) == 2]
    assert seeds, "the test study has no split whose validation holds both classes"
    cfg = TrainConfig(steps=4, eval_every=2, val_fraction=0.5, **{**TINY_TRAIN, "seed": seeds[0]})
    train_model(data, cfg, tmp_path / "m", source="unit", progress=False)
    saved = json.loads((tmp_path / "m/config.json").read_text())
    cal = saved["calibration"]
    assert cal["method"] == "temperature-bias" and cal["temperature"] > 0 and cal["nll_after"] <= cal["nll_before"] + 1e-9
    assert saved["metrics"]["threshold"] == 0.5 and "uncalibrated_threshold" in saved["metrics"]


def test_resume_after_interruption(tmp_path: Path, data, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(steps=8, eval_every=4, **TINY_TRAIN)
    real_step = train_mod._train_step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_model(data, cfg, tmp_path / "m", progress=False)
    monkeypatch.setattr(train_mod, "_train_step", real_step)
    info = train_model(data, cfg, tmp_path / "m", progress=False, resume=True)
    history = info.config.training["history"]
    assert [h["step"] for h in history] == [4.0, 8.0]
    with pytest.raises(HrfBatchError, match="other data or settings"):
        train_model(data, TrainConfig(steps=9, eval_every=4, **TINY_TRAIN), tmp_path / "m", progress=False, resume=True)


def test_run_that_does_not_take_off_is_restarted(tmp_path: Path, data) -> None:
    cfg = TrainConfig(steps=6, eval_every=2, takeoff_steps=2, takeoff_auroc=1.01, max_restarts=1, seed=5, **TINY_TRAIN)
    info = train_model(data, cfg, tmp_path / "m", progress=False)
    restarts = info.config.training["restarts"]
    assert len(restarts) == 1 and restarts[0]["seed"] == 5
    assert info.config.metrics["seed"] in (5.0, 6.0)


def test_csv_labels(tmp_path: Path, study: Path) -> None:
    vol = next(study.rglob("*.vol"))
    rel = vol.relative_to(study).as_posix()
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "bscan_index", "count"])
        w.writerows([[rel, 0, 2], [rel, 2, 0]])
    data = load_csv_labels(path, study)
    assert data.counts.tolist() == [2, 0] and len(data.images) == 2
    path.write_text("file,bscan_index,count\n" + f"{rel},7,1\n")
    with pytest.raises(LabelError, match="out of range"):
        load_csv_labels(path, study)
    path.write_text("name,index\nx,1\n")
    with pytest.raises(LabelError, match="needs file, bscan_index and count"):
        load_csv_labels(path, study)


def test_settings_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "hrf-batch.toml"
    cfg.write_text('device = "cuda"\nbatch_size = 4\ndb = "from_file.sqlite"\n')
    s = load_settings({"device": None}, cfg, env={"HRF_BATCH_BATCH_SIZE": "2"})
    assert (s.device, s.batch_size, s.db) == ("cuda", 2, "from_file.sqlite")  # the store resolves paths
    s = load_settings({"device": "cpu"}, cfg, env={"HRF_BATCH_BATCH_SIZE": "2"})
    assert s.device == "cpu"
    with pytest.raises(HrfBatchError, match="not a number"):
        load_settings({}, None, env={"HRF_BATCH_CROP_PX": "big"})
    cfg.write_text("colour = 1\n")
    with pytest.raises(HrfBatchError, match="unknown settings"):
        load_settings({}, cfg, env={})


def test_train_and_evaluate_commands(tmp_path: Path, study: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "model"
    result = runner.invoke(main, ["train", str(study), "--out", str(out), "--preset", "cct-tiny", "--steps", "4",
                                  "--eval-every", "2", "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "validation AUROC" in result.output
    result = runner.invoke(main, ["evaluate", str(study), "--model", str(out), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["n"] == 24 and metrics["model_id"].startswith("cct-")
    missing = runner.invoke(main, ["evaluate", str(study), "--model", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "model folder not found" in missing.output


def test_studies_combine_with_patients_kept_apart(data) -> None:
    both = combine([("gen_a", data), ("gen_b", data)])
    assert len(both) == 2 * len(data) and both.counts.sum() == 2 * data.counts.sum()
    assert {p.split("/")[0] for p in both.patients.tolist()} == {"gen_a", "gen_b"}
    train_idx, val_idx = split_by_patient(both.patients, 0.5, 0)
    assert not set(both.patients[train_idx].tolist()) & set(both.patients[val_idx].tolist())
    assert len(set(both.patients.tolist())) == 2 * len(set(data.patients.tolist()))
    with pytest.raises(LabelError, match="same folder name"):
        combine([("s", data), ("s", data)])


def test_train_command_takes_several_studies(tmp_path: Path, study: Path) -> None:
    other = tmp_path / "second_study"
    shutil.copytree(study, other)
    runner = CliRunner()
    out = tmp_path / "model"
    args = ["train", str(study), str(other), "--out", str(out), "--preset", "cct-tiny", "--steps", "2",
            "--eval-every", "2", "--batch-size", "4", "--device", "cpu"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["training"]["data"]["n_train"] + saved["training"]["data"]["n_val"] == 48
    assert str(other) in saved["training"]["source"] and str(study) in saved["training"]["source"]
    refused = runner.invoke(main, [*args, "--labels", str(tmp_path / "labels.csv")])
    assert refused.exit_code == 2 and "--labels describes one study" in refused.output
