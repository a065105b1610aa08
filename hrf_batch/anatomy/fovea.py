"""The foveal centre of a macular volume, found as the foveal pit of its retinal thickness map.

The ETDRS grid is centred on the fovea, not on the scan: fixation is never perfect, so the pit can
lie half a millimetre or more from the scan centre. The pit is the thinnest retina near the centre
of the scan; its position is refined to a fraction of a B-scan by the centroid of the pit's lower
half, because B-scans of a macular volume lie 0.1-0.25 mm apart, about the pit's radius.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from hrf_batch.io.geometry import localizer_mm
from hrf_batch.io.volume import VolumeMeta
from hrf_batch.results import Fovea

MIN_BSCANS = 5  # fewer B-scans do not sample the pit and its rim in the slow direction
SMOOTH_MM = 0.1  # Gaussian sigma of the map smoothing: removes segmentation jitter, keeps the pit (radius ~0.5 mm)
SEARCH_FRACTION = 2 / 3  # the pit is looked for in the central part of the scan, where fixation puts it
RIM_MM = (1.0, 1.6)  # the ring around the pit whose median thickness the pit depth is measured from
MIN_PIT_DEPTH_UM = 30.0  # a healthy pit is 80-150 um deep; shallower dips are noise, flat maps or edema
MIN_KNOWN = 0.5  # least fraction of the central map with a known thickness
MIN_RIM_SAMPLES = 20  # least number of known A-scans on the rim
PIT_RADIUS_MM = 1.0  # the pit's lower half is searched for no further than this from its thinnest point


def fovea_mm(meta: VolumeMeta, bscan: float, col: float, width: int) -> tuple[float, float] | None:
    """Localizer position (mm) of column ``col`` at a fractional B-scan index.

    The fovea lies between two B-scans more often than on one, so the position is interpolated
    between the neighbouring B-scans' own positions (never assuming their order on the localizer).
    None for circle scans, volumes without positions, or an index outside the volume.
    """
    n = len(meta.positions)
    if meta.scan_pattern == "circle" or n == 0 or not math.isfinite(bscan) or not 0.0 <= bscan <= n - 1:
        return None
    i0 = min(int(math.floor(bscan)), n - 1)
    i1 = min(i0 + 1, n - 1)
    frac = bscan - i0
    a = localizer_mm(meta, i0, col, width)
    b = localizer_mm(meta, i1, col, width)
    if a is None or b is None:
        return None
    return (a[0] + frac * (b[0] - a[0]), a[1] + frac * (b[1] - a[1]))


def _pattern_note(meta: VolumeMeta) -> str | None:
    """Why this scan pattern cannot have a fovea found on it, or None for a raster volume."""
    notes = {
        "line": "line scan: no fovea (one B-scan)",
        "circle": "circle scan: no fovea (a peripapillary circle does not cover the macula)",
        "radial": "radial scan: no fovea (no raster thickness map to find the pit on)",
        "unknown": "unknown scan pattern: no fovea (the B-scans' layout on the fundus is not known)",
    }
    return notes.get(meta.scan_pattern)


def _spacing_mm(meta: VolumeMeta, n: int) -> tuple[float, float] | None:
    """(between B-scans, lateral) in mm; the B-scan spacing comes from the positions when the
    metadata gives none. None when either is unknown."""
    lateral = meta.spacing.lateral_mm
    between = meta.spacing.between_bscans_mm
    if not between > 0 and len(meta.positions) >= 2 and n >= 2:
        first, last = meta.positions[0], meta.positions[-1]
        mid = [((p.start_mm[0] + p.end_mm[0]) / 2, (p.start_mm[1] + p.end_mm[1]) / 2) for p in (first, last)]
        between = math.hypot(mid[1][0] - mid[0][0], mid[1][1] - mid[0][1]) / (len(meta.positions) - 1)
    if not (math.isfinite(lateral) and lateral > 0 and math.isfinite(between) and between > 0):
        return None
    return between, lateral


def smooth_map(thickness: np.ndarray, sigma_px: tuple[float, float]) -> np.ndarray:
    """Gaussian smoothing that ignores unknown A-scans (normalised convolution); NaN where too
    little known thickness lies nearby."""
    known = np.isfinite(thickness)
    filled = np.where(known, thickness, 0.0)
    num = ndi.gaussian_filter(filled, sigma_px, mode="nearest")
    den = ndi.gaussian_filter(known.astype(np.float64), sigma_px, mode="nearest")
    out = np.full(thickness.shape, np.nan)
    ok = den > 0.2
    out[ok] = num[ok] / den[ok]
    return out


def _central(size: int) -> slice:
    """The central ``SEARCH_FRACTION`` of ``size`` indices (at least one)."""
    margin = int(round(size * (1.0 - SEARCH_FRACTION) / 2))
    return slice(margin, max(size - margin, margin + 1))


def find_fovea(thickness_um: np.ndarray | None, meta: VolumeMeta, width: int) -> tuple[Fovea | None, str]:
    """The foveal centre on the thickness map of a raster volume, and a note saying how it was
    found or why there is none.

    The thinnest point of the smoothed map in the central two thirds of the scan must lie at least
    ``MIN_PIT_DEPTH_UM`` below the median of the ring 1.0-1.6 mm around it; the centre is then the
    centroid of the pit's lower half, each A-scan weighted by how far it lies below half depth.
    """
    note = _pattern_note(meta)
    if note is not None:
        return None, note
    if thickness_um is None:
        return None, "no fovea: no ILM and BM lines to measure the retinal thickness on"
    t = np.asarray(thickness_um, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] != width:
        raise ValueError(f"thickness map must be (n_bscans, {width}), got shape {t.shape}")
    n = t.shape[0]
    if n < MIN_BSCANS:
        return None, f"volume of {n} B-scans: too few for a thickness map (need at least {MIN_BSCANS}); no fovea"
    spacing = _spacing_mm(meta, n)
    if spacing is None:
        return None, "no fovea: the volume gives no lateral or B-scan spacing, so the pit cannot be measured in mm"
    dy, dx = spacing
    rows, cols = _central(n), _central(width)
    known = float(np.isfinite(t[rows, cols]).mean())
    if known < MIN_KNOWN:
        return None, f"no foveal pit found: only {known:.0%} of the central thickness map is known"
    s = smooth_map(t, (SMOOTH_MM / dy, SMOOTH_MM / dx))
    centre = s[rows, cols]
    if not np.isfinite(centre).any():
        return None, "no foveal pit found: the central thickness map is unknown"
    ci, cj = np.unravel_index(int(np.nanargmin(centre)), centre.shape)
    i, j = ci + rows.start, cj + cols.start
    thinnest = float(s[i, j])
    r = np.hypot(((np.arange(n) - i) * dy)[:, None], ((np.arange(width) - j) * dx)[None, :])
    rim = s[(r >= RIM_MM[0]) & (r <= RIM_MM[1])]
    rim = rim[np.isfinite(rim)]
    if rim.size < MIN_RIM_SAMPLES:
        return None, (f"no foveal pit found: only {rim.size} A-scans of known thickness lie "
                      f"{RIM_MM[0]}-{RIM_MM[1]} mm around the thinnest point")
    depth = float(np.median(rim)) - thinnest
    if depth < MIN_PIT_DEPTH_UM:
        return None, (f"no foveal pit found: the thinnest point near the scan centre lies only {depth:.0f} µm below "
                      f"the ring {RIM_MM[0]}-{RIM_MM[1]} mm around it (a pit is at least {MIN_PIT_DEPTH_UM:.0f} µm deep)")
    level = thinnest + 0.5 * depth
    with np.errstate(invalid="ignore"):
        below = (s < level) & (r <= PIT_RADIUS_MM)
    labels, _ = ndi.label(below)
    pit = labels == labels[i, j]
    weight = np.where(pit, level - s, 0.0)
    total = float(weight.sum())
    yy, xx = np.nonzero(pit)
    bscan = float((weight[yy, xx] * yy).sum() / total)
    col = float((weight[yy, xx] * xx).sum() / total)
    pos = fovea_mm(meta, bscan, col, width)
    fovea = Fovea(bscan=bscan, col=col, x_mm=None if pos is None else pos[0], y_mm=None if pos is None else pos[1],
                  method="thickness-map")
    return fovea, (f"thickness map: pit {depth:.0f} µm deep (thinnest {thinnest:.0f} µm) at B-scan {bscan:.2f}, "
                   f"column {col:.1f}")
