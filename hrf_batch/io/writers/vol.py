"""Write a Volume as a HEYEX `.vol` raw export (HSF-OCT-103 layout), for synthetic studies and tests.

The inverse of :mod:`hrf_batch.io.readers.heyex_vol`: display-scale pixels are mapped back to linear
reflectivity, so reading the file returns the same pixels within float rounding. When the Volume has
layer lines they follow each B-scan header as HEYEX lays them out (one float32 row per A-scan and
line, float32 max where unknown), at the line index HEYEX uses for that boundary; boundaries without
a HEYEX line (``RPE``) are not written. Without layers the B-scan headers are the bare 256 bytes.
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
    HEYEX_LAYER_IDS,
    NO_BOUNDARY,
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


def layer_block(volume: Volume) -> np.ndarray:
    """The device lines of every B-scan as HEYEX stores them: float32 ``(n, lines, W)`` in HEYEX line
    order, float32 max where unknown; ``(n, 0, W)`` when the volume has no layers."""
    n, width = volume.n_bscans, volume.bscan_shape[1]
    present = {} if volume.layers is None else volume.layers.rows
    indices = [i for i, name in HEYEX_LAYER_IDS.items() if name in present]
    block = np.full((n, max(indices, default=-1) + 1, width), NO_BOUNDARY, "<f4")
    for i in indices:
        rows = np.asarray(present[HEYEX_LAYER_IDS[i]], dtype=np.float32)
        block[:, i] = np.where(np.isfinite(rows), rows, NO_BOUNDARY)
    return block


def _file_header(volume: Volume, bscan_header_size: int) -> bytes:
    m, (h, w) = volume.meta, volume.bscan_shape
    slo_h, slo_w = volume.localizer.shape if volume.localizer is not None else (0, 0)
    slo_sx, slo_sy = m.localizer_spacing_mm or (0.0, 0.0)
    acquired = m.acquired_at or (datetime.combine(m.visit_date, datetime.min.time()) if m.visit_date else None)
    header = HEADER_STRUCT.pack(
        b"HSF-OCT-103", w, volume.n_bscans, h, m.spacing.lateral_mm, m.spacing.between_bscans_mm,
        m.spacing.axial_mm, slo_w, slo_h, slo_sx, slo_sy, 30, 0.0,
        m.eye.encode() if m.eye in ("OD", "OS") else b"", _filetime(acquired),
        _PATTERN_CODES[m.scan_pattern], bscan_header_size, _ascii(m.series_uid, 16, "series id"), b"", 0,
        _ascii(m.patient_id, 21, "patient id"), _ole(m.birth_date), 0, b"", _ole(m.visit_date), 0, 0, 0, 0, b"",
    )
    return header.ljust(FILE_HEADER_SIZE, b"\0")


def _bscan_header(volume: Volume, index: int, lines: np.ndarray) -> bytes:
    """The fixed 256 bytes, then the B-scan's layer lines (``lines``: float32 ``(count, W)``)."""
    if volume.meta.positions:
        pos = volume.meta.positions[index]
        (sx, sy), (ex, ey) = pos.start_mm, pos.end_mm
    else:
        sx = sy = ex = ey = 0.0
    size = BSCAN_HEADER_FIXED + lines.nbytes
    raw = BSCAN_STRUCT.pack(b"HSF-BS-103", size, sx, sy, ex, ey, len(lines), BSCAN_HEADER_FIXED, 0.0, 0)
    return raw.ljust(BSCAN_HEADER_FIXED, b"\0") + lines.tobytes()


def write_vol(volume: Volume, path: Path) -> Path:
    """Write ``volume`` to ``path`` as a HEYEX `.vol` file, with its layer lines when it has any, and
    return the path."""
    path = Path(path)
    linear = linear_from_display(volume.bscans).astype("<f4", copy=False)
    lines = layer_block(volume)
    parts = [_file_header(volume, BSCAN_HEADER_FIXED + lines[0].nbytes)]
    if volume.localizer is not None:
        parts.append(np.clip(np.rint(volume.localizer), 0, 255).astype(np.uint8).tobytes())
    for i in range(volume.n_bscans):
        parts.append(_bscan_header(volume, i, lines[i]))
        parts.append(linear[i].tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(parts))
    return path
