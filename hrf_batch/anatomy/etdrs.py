"""The ETDRS grid around the foveal centre: which subfield a point lies in, subfield areas, and the
mean retinal thickness per subfield.

The grid is the clinical standard for reporting where in the macula something is: a central disc of
1 mm diameter (C0), an inner ring to 3 mm (S1 N1 I1 T1) and an outer ring to 6 mm (S2 N2 I2 T2),
the rings split into quadrants by the diagonals. Positions are taken on the localizer (x to the right,
y down), never from B-scan indices: exports store B-scan 0 inferior or superior as they like.

Borders: a point exactly on a circle belongs to the inner subfield (C0 at 0.5 mm, the inner ring at
1.5 mm, the outer ring at 3.0 mm); a point exactly on a diagonal belongs to the superior or inferior
subfield; the foveal centre itself is C0.
"""

from __future__ import annotations

import math

import numpy as np

from hrf_batch.io.geometry import localizer_mm
from hrf_batch.io.volume import EYES, VolumeMeta
from hrf_batch.results import ETDRS_RADII_MM, SUBFIELD_OUTSIDE, SUBFIELD_UNKNOWN, SUBFIELDS, Fovea


def _nasal_sign(eye: str) -> float:
    """+1 when nasal is +x on the localizer (right eye), -1 for a left eye, 0 when the eye is unknown."""
    if eye not in EYES:
        raise ValueError(f"eye must be one of {EYES}, got {eye!r}")
    return {"OD": 1.0, "OS": -1.0}.get(eye, 0.0)


def subfield_grid(x_mm: np.ndarray, y_mm: np.ndarray, fovea_x_mm: float, fovea_y_mm: float, eye: str) -> np.ndarray:
    """Subfield names (str array, the broadcast shape of ``x_mm`` and ``y_mm``) of localizer points.

    NaN positions are ``SUBFIELD_UNKNOWN``; with an unknown eye, nasal and temporal cannot be told
    apart, so ring points are ``SUBFIELD_UNKNOWN`` while C0 and outside are still named.
    """
    sign = _nasal_sign(eye)
    dx = np.asarray(x_mm, dtype=np.float64) - fovea_x_mm
    dy = np.asarray(y_mm, dtype=np.float64) - fovea_y_mm
    dx, dy = np.broadcast_arrays(dx, dy)
    r = np.hypot(dx, dy)
    nasal, superior = dx * sign, -dy  # superior = smaller localizer y
    vertical = np.abs(superior) >= np.abs(nasal)  # diagonals go to the superior / inferior subfield
    quadrant = np.where(vertical, np.where(superior > 0, "S", "I"), np.where(nasal > 0, "N", "T"))
    c0, inner, outer = ETDRS_RADII_MM
    out = np.full(r.shape, SUBFIELD_UNKNOWN, dtype=object)
    ring1 = (r > c0) & (r <= inner)
    ring2 = (r > inner) & (r <= outer)
    if sign != 0.0:
        out[ring1] = np.char.add(quadrant[ring1].astype(str), "1")
        out[ring2] = np.char.add(quadrant[ring2].astype(str), "2")
    out[r <= c0] = "C0"
    out[r > outer] = SUBFIELD_OUTSIDE
    return out


def subfield_of(x_mm: float, y_mm: float, fovea_x_mm: float, fovea_y_mm: float, eye: str) -> str:
    """The ETDRS subfield of one localizer point (mm) around the foveal centre, ``SUBFIELD_OUTSIDE``
    beyond 3 mm, or ``SUBFIELD_UNKNOWN`` (ring points of an eye that is not known)."""
    return str(subfield_grid(np.array([x_mm]), np.array([y_mm]), fovea_x_mm, fovea_y_mm, eye)[0])


def lesion_subfield(meta: VolumeMeta, fovea: Fovea | None, bscan_index: int, col: float, width: int) -> str:
    """The subfield of a lesion at column ``col`` of B-scan ``bscan_index``; ``SUBFIELD_UNKNOWN``
    without a fovea or without the B-scan's position on the localizer."""
    if fovea is None or fovea.x_mm is None or fovea.y_mm is None:
        return SUBFIELD_UNKNOWN
    pos = localizer_mm(meta, bscan_index, col, width)
    if pos is None:
        return SUBFIELD_UNKNOWN
    return subfield_of(pos[0], pos[1], fovea.x_mm, fovea.y_mm, meta.eye)


def subfield_areas_mm2() -> dict[str, float]:
    """Area of each subfield in mm², to turn counts into densities: the disc, then a quarter of each ring."""
    c0, inner, outer = ETDRS_RADII_MM
    ring1 = math.pi * (inner**2 - c0**2) / 4
    ring2 = math.pi * (outer**2 - inner**2) / 4
    return {name: math.pi * c0**2 if name == "C0" else ring1 if name.endswith("1") else ring2 for name in SUBFIELDS}


def ascan_positions_mm(meta: VolumeMeta, n_bscans: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Localizer x and y (mm) of every A-scan, float64 ``(n_bscans, width)``; NaN for B-scans
    without a position (and everywhere for circle scans)."""
    x = np.full((n_bscans, width), np.nan)
    y = np.full((n_bscans, width), np.nan)
    for i in range(min(n_bscans, len(meta.positions))):
        first, last = localizer_mm(meta, i, 0.0, width), localizer_mm(meta, i, float(width - 1), width)
        if first is None or last is None:
            continue
        x[i] = np.linspace(first[0], last[0], width)
        y[i] = np.linspace(first[1], last[1], width)
    return x, y


def etdrs_thickness(thickness_um: np.ndarray | None, meta: VolumeMeta, fovea: Fovea | None,
                    width: int) -> dict[str, float]:
    """Mean retinal thickness (um) of the known A-scans in each subfield, in ``SUBFIELDS`` order;
    subfields the scan does not reach (or where no thickness is known) are left out."""
    if thickness_um is None or fovea is None or fovea.x_mm is None or fovea.y_mm is None:
        return {}
    t = np.asarray(thickness_um, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] != width:
        raise ValueError(f"thickness map must be (n_bscans, {width}), got shape {t.shape}")
    x, y = ascan_positions_mm(meta, t.shape[0], width)
    names = subfield_grid(x, y, fovea.x_mm, fovea.y_mm, meta.eye)
    known = np.isfinite(t)
    out: dict[str, float] = {}
    for name in SUBFIELDS:
        sel = known & (names == name)
        if sel.any():
            out[name] = float(t[sel].mean())
    return out
