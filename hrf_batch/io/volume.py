"""The one type every reader returns and every later stage consumes.

Pixel scale: every B-scan is float32 on the 8-bit *display* scale 0..255 that HEYEX and DICOM
exports use. HEYEX `.vol` and `.e2e` files store linear reflectivity; readers map it through
HEYEX's display curve ``t = (ln(x + 2.44e-4) + 8.3) / 8.285`` (clipped to 0..1, times 255), so one
model serves every format. B-scans keep the order in which the file stores them; index 0 is the
first B-scan of the file, and ``positions[i]`` says where B-scan ``i`` lies on the localizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np

from hrf_batch.errors import VolumeError

EYES = ("OD", "OS", "unknown")
SCAN_PATTERNS = ("volume", "line", "circle", "radial", "unknown")
FORMATS = ("heyex-vol", "heyex-e2e", "heyex-xml", "dicom-oct", "topcon-fds")


@dataclass(frozen=True)
class Spacing:
    """Pixel spacing in millimetres; ``between_bscans_mm`` is 0 for a single B-scan."""

    lateral_mm: float
    axial_mm: float
    between_bscans_mm: float = 0.0


@dataclass(frozen=True)
class BScanPosition:
    """Start and end of one B-scan on the localizer, as (x, y) in mm from its top-left corner.

    For circle scans, ``end_mm`` is the circle's centre, as in the HEYEX convention.
    """

    start_mm: tuple[float, float]
    end_mm: tuple[float, float]


@dataclass(frozen=True)
class VolumeMeta:
    """Typed metadata of one OCT volume (one series of B-scans)."""

    source_path: str
    source_sha256: str
    source_format: str
    series_uid: str
    patient_id: str
    eye: str
    visit_date: date | None
    acquired_at: datetime | None
    device: str
    scan_pattern: str
    spacing: Spacing
    positions: tuple[BScanPosition, ...] = ()
    localizer_spacing_mm: tuple[float, float] | None = None  # (x, y) mm per localizer pixel
    birth_date: date | None = None
    patient_name: str = ""

    def __post_init__(self) -> None:
        if self.eye not in EYES:
            raise VolumeError(f"eye must be one of {EYES}, got {self.eye!r}")
        if self.scan_pattern not in SCAN_PATTERNS:
            raise VolumeError(f"scan_pattern must be one of {SCAN_PATTERNS}, got {self.scan_pattern!r}")
        if self.source_format not in FORMATS:
            raise VolumeError(f"source_format must be one of {FORMATS}, got {self.source_format!r}")


@dataclass(frozen=True, eq=False)
class Volume:
    """B-scans ``(n, H, W)`` float32 on the 0..255 display scale, metadata and optional localizer."""

    bscans: np.ndarray
    meta: VolumeMeta
    localizer: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        b = self.bscans
        if not isinstance(b, np.ndarray) or b.ndim != 3 or b.dtype != np.float32:
            raise VolumeError(
                "bscans must be a float32 array of shape (n, H, W), got "
                f"{getattr(b, 'dtype', type(b))} {getattr(b, 'shape', '')}"
            )
        if b.shape[0] == 0:
            raise VolumeError(f"{self.meta.source_path}: volume has no B-scans")
        n_pos = len(self.meta.positions)
        if n_pos not in (0, b.shape[0]):
            raise VolumeError(f"{n_pos} B-scan positions for {b.shape[0]} B-scans in {self.meta.source_path}")
        if self.localizer is not None and (self.localizer.ndim != 2 or self.localizer.dtype != np.float32):
            raise VolumeError("localizer must be a float32 2-D array")

    @property
    def n_bscans(self) -> int:
        return int(self.bscans.shape[0])

    @property
    def bscan_shape(self) -> tuple[int, int]:
        return int(self.bscans.shape[1]), int(self.bscans.shape[2])


def display_from_linear(raw: np.ndarray, *, empty_from: float = 3.0e38) -> np.ndarray:
    """Map linear reflectivity (HEYEX `.vol`/`.e2e`) to the 0..255 display scale, float32.

    Values at or above ``empty_from`` mark pixels without data (HEYEX `.vol` writes float32 max,
    `.e2e` about 2) and become 0; other values above 1 saturate at 255, as HEYEX shows them.
    """
    raw = np.asarray(raw, dtype=np.float32)
    empty = ~np.isfinite(raw) | (raw >= empty_from)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        t = (np.log(np.clip(raw, 0.0, 1.0) + np.float32(2.44e-4)) + np.float32(8.3)) / np.float32(8.285)
    out = np.clip(t, 0.0, 1.0) * np.float32(255.0)
    out[empty] = 0.0
    return out.astype(np.float32, copy=False)


def linear_from_display(display: np.ndarray) -> np.ndarray:
    """Inverse of :func:`display_from_linear` for writers: 0..255 display scale to linear reflectivity."""
    t = np.clip(np.asarray(display, dtype=np.float64), 0.0, 255.0) / 255.0
    return np.maximum(np.exp(t * 8.285 - 8.3) - 2.44e-4, 0.0).astype(np.float32)


def meta_to_dict(meta: VolumeMeta, *, show_identifiers: bool = True) -> dict[str, Any]:
    """JSON-ready dict of the metadata (dates as ISO strings); identifiers dropped on request."""
    out = dataclasses.asdict(meta)
    for key in ("visit_date", "acquired_at", "birth_date"):
        value = getattr(meta, key)
        out[key] = value.isoformat() if value is not None else None
    out["positions"] = [
        {"start_mm": list(p.start_mm), "end_mm": list(p.end_mm)} for p in meta.positions
    ]
    if not show_identifiers:
        out.pop("birth_date")
        out.pop("patient_name")
    return out


def volume_summary(volume: Volume, *, show_identifiers: bool = True) -> dict[str, Any]:
    """What `hrf-batch info` prints: shape, scale, metadata."""
    b = volume.bscans
    return {
        "n_bscans": volume.n_bscans,
        "bscan_height": volume.bscan_shape[0],
        "bscan_width": volume.bscan_shape[1],
        "intensity_min": float(b.min()),
        "intensity_max": float(b.max()),
        "localizer_shape": list(volume.localizer.shape) if volume.localizer is not None else None,
        **meta_to_dict(volume.meta, show_identifiers=show_identifiers),
    }
