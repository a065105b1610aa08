"""Batched classifier scores for many B-scans: numpy in, numpy out.

The model sees full-resolution B-scans normalised with the training set's mean/std; scores are
the task head's HRF-presence score in [0, 1] (binary: probability; 3-class: 1 − p(no HRF);
regression: 1 − exp(−count)), passed through the model's calibration
(:mod:`hrf_batch.model.calibration`) when it has one, so thresholds are probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hrf_batch.model.calibration import Calibration, log_odds
from hrf_batch.model.files import ModelInfo, load_model, resolve_device
from hrf_batch.model.nets import Task, get_task


@dataclass
class Classifier:
    """A loaded model with what is needed to feed it; built once per run, passed down."""

    model: nn.Module
    info: ModelInfo
    task: Task
    device: torch.device
    batch_size: int = 8

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def calibration(self) -> Calibration:
        """The score calibration fitted on validation data (identity for uncalibrated models)."""
        return Calibration.from_dict(self.info.config.calibration)

    @property
    def threshold(self) -> float:
        """The decision threshold chosen on validation data when the model was trained (0.5 if the
        model folder records none): a B-scan scoring at or above it is taken to hold HRF."""
        return float(self.info.config.metrics.get("threshold", 0.5))


def default_batch_size(device: torch.device) -> int:
    """B-scans per forward pass: batches pay off on a GPU; on a CPU, LRP over 8 B-scans at once was
    measured slower per B-scan than over 2 (memory-bound), so CPUs get small batches."""
    return 8 if device.type == "cuda" else 2


def load_classifier(model_dir: str, device: str = "auto", batch_size: int | None = None) -> Classifier:
    """Load a model folder for inference on ``device`` ("auto" picks CUDA when available)."""
    dev = resolve_device(device)
    batch_size = batch_size or default_batch_size(dev)
    model, info = load_model(model_dir, device=str(dev))
    model.eval()
    return Classifier(model=model, info=info, task=get_task(info.config.task), device=dev, batch_size=batch_size)


def to_tensor(images: np.ndarray, mean: float, std: float, device: torch.device) -> torch.Tensor:
    """(B, H, W) display-scale pixels → normalised (B, 1, H, W) float32 tensor on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
    return ((x - mean) / std).unsqueeze(1)


def normalise(clf: Classifier, images: np.ndarray) -> torch.Tensor:
    """The classifier's input tensor for a batch of display-scale B-scans."""
    return to_tensor(images, clf.info.config.norm_mean, clf.info.config.norm_std, clf.device)


def score_images(model: torch.nn.Module, task_name: str, images: list[np.ndarray], mean: float, std: float,
                 device: torch.device, batch_size: int = 8) -> np.ndarray:
    """HRF scores (float64) for B-scans of possibly different sizes (batched per size)."""
    task = get_task(task_name)
    out = np.empty(len(images), dtype=np.float64)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(i)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for idx in by_shape.values():
            for start in range(0, len(idx), batch_size):
                pick = idx[start : start + batch_size]
                x = to_tensor(np.stack([images[i] for i in pick]), mean, std, device)
                out[pick] = task.score(model(x).double()).cpu().numpy()
    model.train(was_training)
    return out


def raw_scores(clf: Classifier, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Uncalibrated HRF-presence scores ``(n,)`` in float64 (keeps the log-odds of saturated scores)."""
    cfg = clf.info.config
    return score_images(clf.model, cfg.task, list(images), cfg.norm_mean, cfg.norm_std, clf.device, clf.batch_size)


def presence(clf: Classifier, images: np.ndarray | list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated HRF-presence probabilities ``(n,)`` and their log-odds (float64, no saturation)
    for display-scale B-scans ``(n, H, W)`` (or a list of sizes)."""
    raw = raw_scores(clf, images)
    cal = clf.calibration
    return cal.apply(raw), cal.apply_logits(log_odds(raw))


def score_bscans(clf: Classifier, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Calibrated HRF-presence scores ``(n,)`` for display-scale B-scans ``(n, H, W)`` (or a list of sizes)."""
    return clf.calibration.apply(raw_scores(clf, images))
