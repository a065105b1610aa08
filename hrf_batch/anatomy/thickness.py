"""Retinal thickness map: ILM to Bruch's membrane per A-scan, in micrometres.

The map is what clinicians read a macular volume by (ETDRS subfield means), and its thinnest point
near the scan centre is the foveal pit, so the fovea is found on it too.
"""

from __future__ import annotations

import math

import numpy as np

from hrf_batch.io.volume import LayerLines


def thickness_map(layers: LayerLines | None, axial_mm: float) -> np.ndarray | None:
    """Float32 ``(n_bscans, width)``: BM row minus ILM row times the axial spacing, in micrometres.

    NaN where either line is unknown, and where BM lies above the ILM (crossed lines are a failed
    segmentation, not a thickness). None when the volume has no ILM or no BM line at all.
    """
    try:
        axial = float(axial_mm)
    except (TypeError, ValueError):
        axial = math.nan
    if not (math.isfinite(axial) and axial > 0):
        raise ValueError(f"axial spacing must be a positive number of mm per pixel, got {axial_mm!r}; "
                         "check the volume's spacing metadata")
    if layers is None:
        return None
    ilm, bm = layers.get("ILM"), layers.get("BM")
    if ilm is None or bm is None:
        return None
    rows = np.asarray(bm, dtype=np.float64) - np.asarray(ilm, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        rows[~(rows >= 0.0)] = np.nan  # NaN stays NaN; a negative difference becomes NaN
    return (rows * (axial * 1000.0)).astype(np.float32)
