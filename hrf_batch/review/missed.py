"""A missed HRF marked by a click: the run's own segmenter outlines it at that point.

The grader's lesion is drawn by the very segmenter (same name, same parameters) and the same prompt
geometry (box and crop size) as the run's lesions, so found and added lesions are comparable. The
weight-free region grower is rebuilt from the parameters stored with the run; SAM 2 needs its
checkpoint installed, and must be the file the run used (same sha256).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
from scipy import ndimage

from hrf_batch.review.errors import ReviewError
from hrf_batch.segment import REGION_NAME, SAM2_MODELS, RegionGrowingSegmenter, RegionParams, Segmenter, make_segmenter
from hrf_batch.segment.prompts import DEFAULT_BOX_PX, DEFAULT_CROP_PX, make_prompt
from hrf_batch.store import RunRecord


class SegmenterCache:
    """Builds each run's segmenter once (SAM 2 takes seconds to load) and serialises its use."""

    def __init__(self, sam2_checkpoint: str | None = None, device: str = "auto") -> None:
        self._sam2_checkpoint = sam2_checkpoint
        self._device = device
        self._built: dict[tuple[str, str], Segmenter] = {}
        self._lock = threading.Lock()

    def segment_at(self, run: RunRecord, image: np.ndarray, click_rc: tuple[int, int]) -> np.ndarray:
        """The bool mask (the B-scan's shape) of the HRF at ``click_rc``; empty when the segmenter finds none."""
        with self._lock:
            segmenter = self._segmenter(run)
            return segment_at(segmenter, run.parameters, image, click_rc)

    def _segmenter(self, run: RunRecord) -> Segmenter:
        key = (run.segmenter, repr(sorted(run.parameters.get("segmenter_params", {}).items())))
        if key not in self._built:
            self._built[key] = segmenter_for(run, self._sam2_checkpoint, self._device)
        return self._built[key]


def segmenter_for(run: RunRecord, sam2_checkpoint: str | None = None, device: str = "auto") -> Segmenter:
    """The segmenter that produced ``run``'s lesions, rebuilt; ReviewError when it cannot be."""
    if run.segmenter == REGION_NAME:
        return RegionGrowingSegmenter(_region_params(run.parameters.get("segmenter_params") or {}))
    sizes = {spec.name: size for size, spec in SAM2_MODELS.items()}
    if run.segmenter not in sizes:
        raise ReviewError(f"run {run.run_id} was segmented with {run.segmenter!r}, which this hrf-batch cannot build",
                          "mark missed HRF on a run of the region grower or SAM 2, or update hrf-batch")
    segmenter = make_segmenter("sam2", sam2_checkpoint=sam2_checkpoint, sam2_size=sizes[run.segmenter], device=device)
    if run.segmenter_checkpoint_sha256 and segmenter.checkpoint_sha256 != run.segmenter_checkpoint_sha256:
        raise ReviewError(
            f"the installed {run.segmenter} checkpoint is not the file run {run.run_id} used (sha256 differs)",
            "install the checkpoint the run was made with (see its sha256 in the run's provenance)")
    return segmenter


def _region_params(stored: dict[str, Any]) -> RegionParams:
    names = {f.name for f in dataclasses.fields(RegionParams)}
    unknown = sorted(set(stored) - names)
    if unknown:
        raise ReviewError(f"the run's region-grower parameters {unknown} are unknown to this hrf-batch",
                          "review this run with the hrf-batch version that made it")
    return RegionParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


def segment_at(segmenter: Segmenter, parameters: dict[str, Any], image: np.ndarray,
               click_rc: tuple[int, int]) -> np.ndarray:
    """Prompt ``segmenter`` at the click as the pipeline prompts a relevance peak; keep one connected
    component: the one under the click, else the largest."""
    height, width = image.shape
    row, col = int(click_rc[0]), int(click_rc[1])
    if not (0 <= row < height and 0 <= col < width):
        raise ReviewError(f"the click ({row}, {col}) is outside the {height} × {width} B-scan", "click on the image")
    crop_px = int(parameters.get("crop_px", DEFAULT_CROP_PX))
    try:
        prompt = make_prompt((row, col), image.shape, int(parameters.get("box_px", DEFAULT_BOX_PX)), crop_px)
    except ValueError as exc:
        raise ReviewError(f"cannot prompt the segmenter at ({row}, {col}): {exc}", "click elsewhere") from exc
    (mask,) = segmenter.segment([np.asarray(image, dtype=np.float32)], [prompt])
    labels, n = ndimage.label(np.asarray(mask, dtype=bool))
    if n <= 1:
        return labels > 0
    keep = labels[row, col] or int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    return labels == keep
