"""The one type the pipeline returns per volume and the store persists (numpy + dataclasses only).

Masks are full B-scan-sized boolean arrays in memory; the store encodes them compactly. Every
result carries the provenance that makes a rerun with the same inputs a no-op: the model id
(weights sha256), the segmenter and its checkpoint hash, the parameters and the code version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hrf_batch.io.volume import VolumeMeta


@dataclass(frozen=True)
class Lesion:
    """One HRF: a connected component of at least ``min_lesion_px`` pixels in one B-scan."""

    bscan_index: int
    centroid_rc: tuple[float, float]
    bbox_rc: tuple[int, int, int, int]  # row0, col0, row1, col1 (end exclusive)
    area_px: int
    mask: np.ndarray  # bool (row1 - row0, col1 - col0): the lesion's pixels inside its box


@dataclass(frozen=True)
class Segment:
    """One segmenter answer: the mask found at one iteration around one relevance peak."""

    iteration: int  # 0-based
    peak_rc: tuple[int, int]
    window: tuple[int, int, int, int]  # row0, col0, row1, col1 of the crop (end exclusive)
    mask: np.ndarray  # bool, the crop's shape: pixels taken as HRF


@dataclass(frozen=True)
class BScanResult:
    """What the iterative pipeline found in one B-scan."""

    index: int
    scores: tuple[float, ...]  # classifier score before each iteration (first = original B-scan)
    relevance_peaks: tuple[tuple[int, int], ...]  # (row, col) prompted at each iteration
    mask: np.ndarray  # bool (H, W): union of the HRF masks kept
    lesions: tuple[Lesion, ...]
    relevance: np.ndarray | None = None  # float32 relevance map of the first iteration, for QC
    segments: tuple[Segment, ...] = ()  # every segmenter answer, to rebuild the mask after k iterations

    def mask_after(self, iterations: int) -> np.ndarray:
        """Union of the segments of the first ``iterations`` iterations, within lesions kept."""
        out = np.zeros_like(self.mask)
        for seg in self.segments:
            if seg.iteration < iterations:
                r0, c0, r1, c1 = seg.window
                out[r0:r1, c0:c1] |= seg.mask
        return out & self.mask

    @property
    def hrf_count(self) -> int:
        return len(self.lesions)

    @property
    def hrf_area_px(self) -> int:
        return int(sum(les.area_px for les in self.lesions))


@dataclass(frozen=True)
class RunInfo:
    """Provenance of one pipeline run over one volume."""

    model_id: str
    segmenter: str  # e.g. "sam2.1-hiera-tiny" or "region-growing"; never ambiguous
    segmenter_checkpoint_sha256: str | None
    parameters: dict[str, Any]
    code_version: str
    device: str
    seconds: dict[str, float] = field(default_factory=dict)  # time per stage: score, explain, segment


@dataclass(frozen=True)
class VolumeResult:
    """Everything found in one volume, B-scans in the volume's order."""

    meta: VolumeMeta
    bscan_shape: tuple[int, int]
    bscans: tuple[BScanResult, ...]
    run: RunInfo

    @property
    def hrf_count(self) -> int:
        return sum(b.hrf_count for b in self.bscans)
