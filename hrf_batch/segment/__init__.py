"""Segmenters: a prompt (box + crop window) on a B-scan → a bool mask of the B-scan's shape.

One small protocol, two implementations: SAM 2.1 (:mod:`.sam`, needs an official checkpoint) and a
weight-free region-growing fallback (:mod:`.region`). Every result records ``segmenter.name`` and
``segmenter.checkpoint_sha256`` so masks from different segmenters are never mixed up.
torch stays inside this package: images, prompts and masks are numpy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hrf_batch.segment.prompts import Prompt
from hrf_batch.segment.region import REGION_NAME, RegionGrowingSegmenter, RegionParams
from hrf_batch.segment.weights import (
    CHECKPOINT_ENV,
    SAM2_MODELS,
    SegmenterSetupError,
    checkpoint_candidate,
    default_checkpoint_dir,
    how_to_install,
    require_checkpoint,
    sam2_spec,
    sam2_status,
)

__all__ = [
    "CHECKPOINT_ENV", "KINDS", "REGION_NAME", "SAM2_MODELS", "RegionGrowingSegmenter", "RegionParams",
    "Segmenter", "SegmenterSetupError", "checkpoint_candidate", "default_checkpoint_dir", "how_to_install",
    "make_segmenter", "require_checkpoint", "sam2_spec", "sam2_status",
]

log = logging.getLogger(__name__)
KINDS = ("auto", "sam2", "region")


@runtime_checkable
class Segmenter(Protocol):
    """Anything that turns (B-scan, prompt) pairs into masks.

    ``name`` is recorded with every output and must say exactly what produced it
    (``sam2.1-hiera-tiny``, ``region-growing``); ``checkpoint_sha256`` is None without weights;
    ``params`` is everything else that decides the masks (JSON-ready), stored with each run and part
    of its rerun key. Images are display-scale float32 ``(H, W)``; each mask is bool ``(H, W)``.
    """

    name: str
    checkpoint_sha256: str | None

    @property
    def params(self) -> dict[str, Any]: ...

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[Prompt]) -> list[np.ndarray]: ...


def make_segmenter(kind: str = "auto", *, sam2_checkpoint: str | os.PathLike[str] | None = None,
                   sam2_size: str = "tiny", device: str = "auto") -> Segmenter:
    """Build the segmenter the settings ask for.

    ``"sam2"`` needs the checkpoint (SegmenterSetupError saying what to download otherwise);
    ``"region"`` is the weight-free fallback; ``"auto"`` takes SAM 2 when its checkpoint (configured
    path, or the default folder) exists, else the fallback with a warning naming the missing file.
    """
    key = kind.strip().lower()
    if key not in KINDS:
        raise SegmenterSetupError(f"unknown segmenter {kind!r}", f"use one of {', '.join(KINDS)}")
    if key == "region":
        return RegionGrowingSegmenter()
    if key == "auto":
        status = sam2_status(sam2_checkpoint, sam2_size)
        if not status["ready"]:
            log.warning("SAM 2 not used, falling back to the %s segmenter: %s", REGION_NAME, status["message"])
            return RegionGrowingSegmenter()
    path = require_checkpoint(sam2_checkpoint, sam2_size)  # fail fast, before torch loads
    from hrf_batch.segment.sam import Sam2Segmenter  # torch and sam2 load only when needed

    return Sam2Segmenter(path, sam2_size, device=device)
