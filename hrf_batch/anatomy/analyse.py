"""One volume's anatomy in one call: what the pipeline runs before it looks for HRF."""

from __future__ import annotations

import logging

import numpy as np

from hrf_batch.anatomy.etdrs import etdrs_thickness
from hrf_batch.anatomy.fovea import find_fovea
from hrf_batch.anatomy.layers import complete_layers, estimate_layers
from hrf_batch.anatomy.thickness import thickness_map
from hrf_batch.io.volume import LayerLines, Volume
from hrf_batch.results import VolumeAnatomy

log = logging.getLogger(__name__)


def _usable(layers: LayerLines | None) -> LayerLines | None:
    """The lines, or None when not one A-scan has both an ILM and a BM (nothing to place lesions by)."""
    if layers is None or layers.get("ILM") is None or layers.get("BM") is None:
        return None
    if not np.any(np.isfinite(layers.rows["ILM"]) & np.isfinite(layers.rows["BM"])):
        return None
    return layers


def analyse(volume: Volume) -> VolumeAnatomy:
    """Layer lines (the export's own, completed by the estimate, else estimated), the retinal
    thickness map, the foveal centre and the mean thickness per ETDRS subfield of one volume."""
    spacing = volume.meta.spacing
    if volume.layers is not None:
        layers = _usable(complete_layers(volume.layers, volume.bscans, spacing))
    else:
        layers = _usable(estimate_layers(volume.bscans, spacing))
    if layers is None:
        log.warning("%s: no retinal layer lines could be found; lesions get no layer zone and no ETDRS subfield",
                    volume.meta.source_path)
        return VolumeAnatomy(layers=None, fovea=None, fovea_note="no layer lines: no fovea", thickness_um=None)
    width = volume.bscan_shape[1]
    thickness = thickness_map(layers, spacing.axial_mm)
    fovea, note = find_fovea(thickness, volume.meta, width)
    return VolumeAnatomy(layers=layers, fovea=fovea, fovea_note=note, thickness_um=thickness,
                         etdrs_thickness_um=etdrs_thickness(thickness, volume.meta, fovea, width))
