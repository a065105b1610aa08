"""The one type the pipeline returns per volume and the store persists (numpy + dataclasses only).

Masks are full B-scan-sized boolean arrays in memory; the store encodes them compactly. Every
result carries the provenance that makes a rerun with the same inputs a no-op: the model id
(weights sha256), the segmenter and its checkpoint hash, the parameters and the code version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hrf_batch.io.volume import LayerLines, VolumeMeta

#: Where a lesion sits between the layer lines (clinical zones): above the ILM (vitreous, not
#: retina); the inner retina, ILM to the INL/OPL boundary; the outer retina, INL/OPL to the ELM;
#: ELM to Bruch's membrane (photoreceptors and RPE); below BM (choroid). "unknown" when the
#: B-scan has no layer lines at the lesion's columns.
ZONES = ("above-ilm", "inner-retina", "outer-retina", "elm-bm", "below-bm")
ZONE_UNKNOWN = "unknown"
#: ETDRS subfields: the central 1 mm disc, the inner ring (1-3 mm) and the outer ring (3-6 mm), each
#: ring split into superior, nasal, inferior and temporal quadrants.
SUBFIELDS = ("C0", "S1", "N1", "I1", "T1", "S2", "N2", "I2", "T2")
ETDRS_RADII_MM = (0.5, 1.5, 3.0)  # outer radius of the centre, the inner ring and the outer ring
SUBFIELD_OUTSIDE = "outside"  # more than 3 mm from the foveal centre
SUBFIELD_UNKNOWN = "unknown"  # no fovea (line and circle scans, or none found), or no position on the localizer


@dataclass(frozen=True)
class Lesion:
    """One HRF: a connected component of at least ``min_lesion_px`` pixels in one B-scan."""

    bscan_index: int
    centroid_rc: tuple[float, float]
    bbox_rc: tuple[int, int, int, int]  # row0, col0, row1, col1 (end exclusive)
    area_px: int
    mask: np.ndarray  # bool (row1 - row0, col1 - col0): the lesion's pixels inside its box
    zone: str = ZONE_UNKNOWN  # one of ZONES, or ZONE_UNKNOWN
    subfield: str = SUBFIELD_UNKNOWN  # one of SUBFIELDS, SUBFIELD_OUTSIDE or SUBFIELD_UNKNOWN


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


FOVEA_METHODS = ("thickness-map", "device", "ground-truth")


@dataclass(frozen=True)
class Fovea:
    """The foveal centre of a volume scan: B-scan (fractional: it may lie between two) and column,
    and where that is on the localizer in mm (None when the volume has no B-scan positions)."""

    bscan: float
    col: float
    x_mm: float | None
    y_mm: float | None
    method: str  # one of FOVEA_METHODS


@dataclass(frozen=True, eq=False)
class VolumeAnatomy:
    """What the anatomy stage knows of a volume: layer lines, the fovea, the retinal thickness."""

    layers: LayerLines | None  # None: neither the export nor the estimate gave any
    fovea: Fovea | None
    fovea_note: str  # how the fovea was found, or why there is none ("line scan: no fovea", ...)
    thickness_um: np.ndarray | None  # float32 (n_bscans, width): ILM to BM in micrometres, NaN where unknown
    etdrs_thickness_um: dict[str, float] = field(default_factory=dict)  # mean per subfield the scan covers


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
    anatomy: VolumeAnatomy | None = None

    @property
    def hrf_count(self) -> int:
        return sum(b.hrf_count for b in self.bscans)
