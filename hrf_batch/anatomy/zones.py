"""Layer zones and the retina band: where a pixel lies between the layer lines of its A-scan.

Zones (:data:`hrf_batch.results.ZONES`): above the ILM; inner retina (ILM to the INL/OPL boundary);
outer retina (INL/OPL to the ELM); ELM to Bruch's membrane; below BM. The retina band is ILM..BM, where
HRF can be: the pipeline prompts and keeps lesions only inside it.
"""

from __future__ import annotations

import numpy as np

from hrf_batch.io.volume import LayerLines
from hrf_batch.results import ZONE_UNKNOWN

# inside ILM..BM: (boundary that ends the zone, the zone above it), top to bottom; below ELM is ELM-BM
_INSIDE = (("INL", "inner-retina"), ("ELM", "outer-retina"))


def _row_at(layers: LayerLines, name: str, bscan: int, col: float) -> float:
    """The boundary's row at a (fractional) column: the nearest A-scan's, NaN when unknown there."""
    rows = layers.get(name)
    if rows is None:
        return float("nan")
    c = int(np.clip(round(col), 0, rows.shape[1] - 1))
    return float(rows[bscan, c])


def zone_of(layers: LayerLines | None, bscan: int, row: float, col: float) -> str:
    """The layer zone of the pixel (row, col) of B-scan ``bscan``; "unknown" without the lines it needs."""
    if layers is None:
        return ZONE_UNKNOWN
    ilm, bm = _row_at(layers, "ILM", bscan, col), _row_at(layers, "BM", bscan, col)
    if np.isnan(ilm) or np.isnan(bm):
        return ZONE_UNKNOWN
    if row < ilm:
        return "above-ilm"
    if row > bm:
        return "below-bm"
    for name, zone in _INSIDE:
        boundary = _row_at(layers, name, bscan, col)
        if np.isnan(boundary):
            return ZONE_UNKNOWN
        if row <= boundary:
            return zone
    return "elm-bm"


def retina_band(layers: LayerLines | None, bscan: int, shape: tuple[int, int], margin_px: float = 0.0) -> np.ndarray | None:
    """Bool (H, W): pixels between ILM and BM (widened by ``margin_px``) of B-scan ``bscan``.

    A column where either line is unknown is left whole (True): without the lines there is no
    evidence to exclude anything. None when the volume has no ILM or no BM at all.
    """
    if layers is None or layers.get("ILM") is None or layers.get("BM") is None:
        return None
    ilm = layers.rows["ILM"][bscan].astype(np.float64)
    bm = layers.rows["BM"][bscan].astype(np.float64)
    rows = np.arange(shape[0], dtype=np.float64)[:, None]
    unknown = np.isnan(ilm) | np.isnan(bm)
    with np.errstate(invalid="ignore"):
        inside = (rows >= ilm[None, :] - margin_px) & (rows <= bm[None, :] + margin_px)
    return inside | unknown[None, :]
