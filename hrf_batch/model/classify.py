"""Batched classifier scores for many B-scans: numpy in, numpy out.

The model sees full-resolution B-scans normalised with the training set's mean/std; scores are
the task head's HRF-presence score in [0, 1] (binary: probability; 3-class: 1 − p(no HRF);
regression: 1 − exp(−count)), passed through the model's calibration
(:mod:`hrf_batch.model.calibration`) when it has one, so thresholds are probabilities.

Precision: ``"fp32"`` runs the model as stored; ``"bf16"`` runs it under ``torch.autocast`` with
bfloat16 (matmuls and convolutions in bf16, reductions in fp32), which a CUDA device with tensor cores
runs several times faster. ``"auto"`` is bf16 on a CUDA device that supports it and fp32 elsewhere, so
CPU results stay bit-identical to fp32. Measured on the shipped model (12 synthetic 496x512 B-scans,
CPU autocast): bf16 moves the uncalibrated score by at most 0.013 (:data:`BF16_SCORE_TOLERANCE`).

Batch size: an explicit batch size wins; otherwise a CPU gets :func:`default_batch_size` and a CUDA
device a batch fitted to its free memory and the B-scan size (:func:`device_batch_size`), so one
volume is scored in one or a few passes with no per-B-scan transfers.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from hrf_batch.errors import HrfBatchError
from hrf_batch.model.calibration import Calibration, log_odds
from hrf_batch.model.files import ModelInfo, load_model, resolve_device
from hrf_batch.model.nets import Task, get_task

PRECISIONS = ("auto", "fp32", "bf16")
BF16_SCORE_TOLERANCE = 0.03  # |score_bf16 - score_fp32| allowed; measured at most 0.013 (module docstring)
# Device memory per input pixel of one B-scan in a batch, measured on the shipped model in fp32 (peak
# memory of 4 vs 1 B-scans of 496x512): explaining ~500 B, scoring ~64 B; rounded up for a margin.
EXPLAIN_BYTES_PER_PIXEL = 640
SCORE_BYTES_PER_PIXEL = 96
MAX_DEVICE_BATCH = 32  # beyond this a GPU is already busy; bigger batches only hold more memory
MEMORY_FRACTION = 0.5  # of the free device memory a batch may plan to use (the segmenter needs some)


@dataclass
class Classifier:
    """A loaded model with what is needed to feed it; built once per run, passed down."""

    model: nn.Module
    info: ModelInfo
    task: Task
    device: torch.device
    batch_size: int = 8
    precision: str = "fp32"  # resolved: "fp32" or "bf16" (:func:`resolve_precision`)
    fit_batch_to_memory: bool = False  # True: batch size from free device memory (:meth:`batch_for`)

    def autocast(self) -> AbstractContextManager[object]:
        """The context the model runs in: bf16 autocast on the model's device, or nothing for fp32."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def batch_for(self, bscan_shape: tuple[int, ...], bytes_per_pixel: float = EXPLAIN_BYTES_PER_PIXEL) -> int:
        """B-scans per pass for B-scans of ``bscan_shape``: the fixed batch size, or on CUDA without an
        explicit one, what fits in half of the device's free memory now (:func:`device_batch_size`)."""
        if not self.fit_batch_to_memory or self.device.type != "cuda":
            return self.batch_size
        free, _total = torch.cuda.mem_get_info(self.device)
        return device_batch_size(free, bscan_shape, bytes_per_pixel)

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


def device_batch_size(free_bytes: int, bscan_shape: tuple[int, ...], bytes_per_pixel: float = EXPLAIN_BYTES_PER_PIXEL,
                      *, fraction: float = MEMORY_FRACTION, cap: int = MAX_DEVICE_BATCH) -> int:
    """B-scans per pass that fit in ``fraction`` of ``free_bytes`` when each B-scan pixel costs
    ``bytes_per_pixel``; at least 1 (a B-scan that does not fit alone fails as it would have) and at
    most ``cap``."""
    pixels = int(np.prod(bscan_shape[-2:]))
    if pixels <= 0 or bytes_per_pixel <= 0:
        raise ValueError(f"B-scan shape {tuple(bscan_shape)} and bytes per pixel {bytes_per_pixel} must be positive")
    fits = int(free_bytes * fraction // (pixels * bytes_per_pixel))
    return max(1, min(int(cap), fits))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` → ``"bf16"`` on a CUDA device that supports bfloat16, else ``"fp32"``; explicit
    values are checked so that a typo or an unsupported device stops before any work."""
    if precision not in PRECISIONS:
        raise HrfBatchError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if cuda_bf16 else "fp32"
    if precision == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise HrfBatchError(f"CUDA device {torch.cuda.get_device_name(device)} has no bfloat16 support",
                            "use --precision fp32 (or auto)")
    return precision


def load_classifier(model_dir: str, device: str = "auto", batch_size: int | None = None,
                    precision: str = "auto") -> Classifier:
    """Load a model folder for inference on ``device`` ("auto" picks CUDA when available) in
    ``precision`` (see the module docstring); without ``batch_size`` a CUDA device sizes its batches
    from free memory."""
    dev = resolve_device(device)
    resolved = resolve_precision(precision, dev)
    model, info = load_model(model_dir, device=str(dev))
    model.eval()
    return Classifier(model=model, info=info, task=get_task(info.config.task), device=dev,
                      batch_size=batch_size or default_batch_size(dev), precision=resolved,
                      fit_batch_to_memory=batch_size is None and dev.type == "cuda")


def to_tensor(images: np.ndarray, mean: float, std: float, device: torch.device) -> torch.Tensor:
    """(B, H, W) display-scale pixels → normalised (B, 1, H, W) float32 tensor on ``device``.

    The batch crosses to a CUDA device in one copy from pinned memory, without waiting for it."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    return ((x - mean) / std).unsqueeze(1)


def normalise(clf: Classifier, images: np.ndarray) -> torch.Tensor:
    """The classifier's input tensor for a batch of display-scale B-scans."""
    return to_tensor(images, clf.info.config.norm_mean, clf.info.config.norm_std, clf.device)


def score_images(model: torch.nn.Module, task_name: str, images: list[np.ndarray], mean: float, std: float,
                 device: torch.device, batch_size: int | Callable[[tuple[int, ...]], int] = 8,
                 autocast: Callable[[], AbstractContextManager[object]] = nullcontext) -> np.ndarray:
    """HRF scores (float64) for B-scans of possibly different sizes (batched per size).

    ``batch_size`` may be a function of the B-scan shape; the model runs inside ``autocast()``. The
    scores stay on the device until every batch is done and then cross to the host in one copy."""
    task = get_task(task_name)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(i)
    order: list[int] = []
    parts: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast():
        for shape, idx in by_shape.items():
            step = max(1, int(batch_size(shape) if callable(batch_size) else batch_size))
            for start in range(0, len(idx), step):
                pick = idx[start : start + step]
                x = to_tensor(np.stack([images[i] for i in pick]), mean, std, device)
                parts.append(task.score(model(x).double()))
                order += pick
    model.train(was_training)
    out = np.empty(len(images), dtype=np.float64)
    if parts:
        out[order] = torch.cat(parts).cpu().numpy()
    return out


def raw_scores(clf: Classifier, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Uncalibrated HRF-presence scores ``(n,)`` in float64 (keeps the log-odds of saturated scores)."""
    cfg = clf.info.config
    return score_images(clf.model, cfg.task, list(images), cfg.norm_mean, cfg.norm_std, clf.device,
                        lambda shape: clf.batch_for(shape, SCORE_BYTES_PER_PIXEL), clf.autocast)


def presence(clf: Classifier, images: np.ndarray | list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated HRF-presence probabilities ``(n,)`` and their log-odds (float64, no saturation)
    for display-scale B-scans ``(n, H, W)`` (or a list of sizes)."""
    raw = raw_scores(clf, images)
    cal = clf.calibration
    return cal.apply(raw), cal.apply_logits(log_odds(raw))


def score_bscans(clf: Classifier, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """Calibrated HRF-presence scores ``(n,)`` for display-scale B-scans ``(n, H, W)`` (or a list of sizes)."""
    return clf.calibration.apply(raw_scores(clf, images))
