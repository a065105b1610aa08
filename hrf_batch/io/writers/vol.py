"""Write a Volume as a HEYEX `.vol` raw export (HSF-OCT-103 layout), for synthetic studies and tests.

The inverse of :mod:`hrf_batch.io.readers.heyex_vol`: display-scale pixels are mapped back to linear
reflectivity, so reading the file returns the same pixels within float rounding.
"""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import numpy as np

from hrf_batch.errors import VolumeError
from hrf_batch.io.readers.heyex_vol import (
    BSCAN_HEADER_FIXED,
    BSCAN_STRUCT,
    FILE_HEADER_SIZE,
    FILETIME_EPOCH,
    HEADER_STRUCT,
    OLE_EPOCH,
)
from hrf_batch.io.volume import Volume, linear_from_display

_PATTERN_CODES = {"line": 1, "circle": 2, "volume": 3, "radial": 5, "unknown": 0}


def _ole(value: date | None) -> float:
    return float((value - OLE_EPOCH).days) if value is not None else 0.0


def _filetime(value: datetime | None) -> int:
    if value is None:
        return 0
    delta = value.replace(tzinfo=None) - FILETIME_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10_000_000 + delta.microseconds * 10


def _ascii(value: str, size: int, what: str) -> bytes:
    raw = value.encode("ascii", errors="strict") if value.isascii() else b""
    if not value.isascii() or len(raw) >= size:
        raise VolumeError(f"{what} {value!r} does not fit a HEYEX .vol header ({size - 1} ASCII characters at most)")
    return raw


def _file_header(volume: Volume) -> bytes:
    m, (h, w) = volume.meta, volume.bscan_shape
    slo_h, slo_w = volume.localizer.shape if volume.localizer is not None else (0, 0)
    slo_sx, slo_sy = m.localizer_spacing_mm or (0.0, 0.0)
    acquired = m.acquired_at or (datetime.combine(m.visit_date, datetime.min.time()) if m.visit_date else None)
    header = HEADER_STRUCT.pack(
        b"HSF-OCT-103", w, volume.n_bscans, h, m.spacing.lateral_mm, m.spacing.between_bscans_mm,
        m.spacing.axial_mm, slo_w, slo_h, slo_sx, slo_sy, 30, 0.0,
        m.eye.encode() if m.eye in ("OD", "OS") else b"", _filetime(acquired),
        _PATTERN_CODES[m.scan_pattern], BSCAN_HEADER_FIXED, _ascii(m.series_uid, 16, "series id"), b"", 0,
        _ascii(m.patient_id, 21, "patient id"), _ole(m.birth_date), 0, b"", _ole(m.visit_date), 0, 0, 0, 0, b"",
    )
    return header.ljust(FILE_HEADER_SIZE, b"\0")


def _bscan_header(volume: Volume, index: int) -> bytes:
    if volume.meta.positions:
        pos = volume.meta.positions[index]
        (sx, sy), (ex, ey) = pos.start_mm, pos.end_mm
    else:
        sx = sy = ex = ey = 0.0
    raw = BSCAN_STRUCT.pack(b"HSF-BS-103", BSCAN_HEADER_FIXED, sx, sy, ex, ey, 0, BSCAN_HEADER_FIXED, 0.0, 0)
    return raw.ljust(BSCAN_HEADER_FIXED, b"\0")


def write_vol(volume: Volume, path: Path) -> Path:
    """Write ``volume`` to ``path`` as a HEYEX `.vol` file and return the path."""
    path = Path(path)
    linear = linear_from_display(volume.bscans).astype("<f4", copy=False)
    parts = [_file_header(volume)]
    if volume.localizer is not None:
        parts.append(np.clip(np.rint(volume.localizer), 0, 255).astype(np.uint8).tobytes())
    for i in range(volume.n_bscans):
        parts.append(_bscan_header(volume, i))
        parts.append(linear[i].tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(parts))
    return path
