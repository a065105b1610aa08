"""Where a pixel of a B-scan lies on the localizer (fundus image), in millimetres.

Shared by the anatomy stage (ETDRS subfields, thickness maps) and the store (lesion positions), so
both place a point at the same spot.
"""

from __future__ import annotations

from hrf_batch.io.volume import VolumeMeta


def localizer_mm(meta: VolumeMeta, index: int, col: float, width: int) -> tuple[float, float] | None:
    """Where column ``col`` of B-scan ``index`` lies on the localizer (mm), or None when unknown.

    Start and end are the first and last A-scan, so column c sits at c / (width - 1) of the way.
    Circle scans store the centre as end point, so a straight line would be wrong: None for them.
    """
    if meta.scan_pattern == "circle" or index >= len(meta.positions):
        return None
    pos = meta.positions[index]
    t = col / (width - 1) if width > 1 else 0.0
    return (
        pos.start_mm[0] + t * (pos.end_mm[0] - pos.start_mm[0]),
        pos.start_mm[1] + t * (pos.end_mm[1] - pos.start_mm[1]),
    )
