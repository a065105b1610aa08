"""The anatomy of a run in and out of its rows: layer lines, fovea, mean thickness, per-subfield thickness.

Checked and encoded before the write transaction (like the B-scans in :mod:`write`), so a bad result
never touches the database; read back with the layer lines decoded only when asked for, because a
volume's lines are the largest thing stored with a run after its masks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hrf_batch.io.discover import display_text
from hrf_batch.io.volume import LAYER_NAMES
from hrf_batch.results import FOVEA_METHODS, SUBFIELDS, VolumeAnatomy
from hrf_batch.store import codec
from hrf_batch.store.errors import StoreError
from hrf_batch.store.records import StoredAnatomy, StoredFovea
from hrf_batch.store.schema import LESION_SUBFIELDS, LESION_ZONES, RunAnatomyRow, RunEtdrsThicknessRow

_BUG_HINT = "this is a bug in the pipeline output; please report it with the file that caused it"


def anatomy_fields(anatomy: VolumeAnatomy, width: int, where: str) -> dict[str, Any]:
    """RunAnatomyRow fields plus 'etdrs': {subfield: µm}; StoreError for anything the tables would refuse."""
    fields: dict[str, Any] = {"layer_source": None, "layer_names": [], "estimated_layer_names": [], "layers_npz": None}
    if anatomy.layers is not None:
        names = anatomy.layers.names
        for name in names:
            shape = np.shape(anatomy.layers.rows[name])
            if len(shape) != 2 or shape[1] != width or shape[0] < 1:
                raise StoreError(f"{where}: layer {name} has shape {shape}, not (n_bscans, {width})", _BUG_HINT)
        fields |= {
            "layer_source": anatomy.layers.source, "layer_names": list(names),
            "estimated_layer_names": [n for n in names if n in anatomy.layers.estimated],
            "layers_npz": codec.encode_layers({n: anatomy.layers.rows[n] for n in names}) if names else None,
        }
    fields |= _fovea_fields(anatomy, where)
    fields["fovea_note"] = display_text(anatomy.fovea_note or "")
    fields["mean_thickness_um"] = mean_thickness(anatomy.thickness_um)
    etdrs = {}
    for subfield, value in anatomy.etdrs_thickness_um.items():
        if subfield not in SUBFIELDS or not math.isfinite(float(value)):
            raise StoreError(f"{where}: ETDRS thickness {subfield!r} = {value!r} is not a finite value of a subfield "
                             f"in {SUBFIELDS}", _BUG_HINT)
        etdrs[subfield] = float(value)
    fields["etdrs"] = etdrs
    return fields


def _fovea_fields(anatomy: VolumeAnatomy, where: str) -> dict[str, Any]:
    fovea = anatomy.fovea
    if fovea is None:
        return dict.fromkeys(("fovea_bscan", "fovea_col", "fovea_x_mm", "fovea_y_mm", "fovea_method"))
    values = [fovea.bscan, fovea.col] + [v for v in (fovea.x_mm, fovea.y_mm) if v is not None]
    if fovea.method not in FOVEA_METHODS or not all(math.isfinite(float(v)) for v in values):
        raise StoreError(f"{where}: fovea {fovea} has a method outside {FOVEA_METHODS} or a value that is not finite",
                         _BUG_HINT)
    return {
        "fovea_bscan": float(fovea.bscan), "fovea_col": float(fovea.col),
        "fovea_x_mm": None if fovea.x_mm is None else float(fovea.x_mm),
        "fovea_y_mm": None if fovea.y_mm is None else float(fovea.y_mm),
        "fovea_method": fovea.method,
    }


def mean_thickness(thickness_um: np.ndarray | None) -> float | None:
    """Mean over every A-scan whose thickness is known; None when there is none."""
    if thickness_um is None:
        return None
    arr = np.asarray(thickness_um, dtype=np.float64)
    known = arr[np.isfinite(arr)]
    return float(known.mean()) if known.size else None


def check_lesion_place(zone: str, subfield: str, where: str) -> None:
    """Refuse a zone or subfield the lesions table's CHECK constraints would refuse, before any write."""
    if zone not in LESION_ZONES or subfield not in LESION_SUBFIELDS:
        raise StoreError(f"{where}: zone {zone!r} or ETDRS subfield {subfield!r} is not one of {LESION_ZONES} and "
                         f"{LESION_SUBFIELDS}", _BUG_HINT)


def anatomy_row(fields: dict[str, Any]) -> RunAnatomyRow:
    """The run_anatomy row for :func:`anatomy_fields`' output (the subfield rows go with :func:`thickness_rows`)."""
    return RunAnatomyRow(**{k: v for k, v in fields.items() if k != "etdrs"})


def thickness_rows(fields: dict[str, Any]) -> list[RunEtdrsThicknessRow]:
    """One run_etdrs_thickness row per subfield the scan covers."""
    return [RunEtdrsThicknessRow(subfield=s, mean_thickness_um=v) for s, v in fields["etdrs"].items()]


def stored_anatomy(row: RunAnatomyRow, thickness: list[RunEtdrsThicknessRow], layers: bool) -> StoredAnatomy:
    """A run_anatomy row as StoredAnatomy; the layer lines are decoded only when ``layers``."""
    decoded = None
    if layers and row.layers_npz is not None:
        decoded = codec.decode_layers(row.layers_npz)
    elif layers and row.layer_source is not None:
        decoded = {}
    fovea = None
    if row.fovea_method is not None:
        fovea = StoredFovea(row.fovea_bscan, row.fovea_col, row.fovea_x_mm, row.fovea_y_mm, row.fovea_method)
    by_subfield = {t.subfield: t.mean_thickness_um for t in thickness}
    return StoredAnatomy(
        layer_source=row.layer_source,
        layer_names=tuple(n for n in LAYER_NAMES if n in row.layer_names),
        estimated_layer_names=tuple(n for n in LAYER_NAMES if n in (row.estimated_layer_names or ())),
        layers=decoded, fovea=fovea, fovea_note=row.fovea_note, mean_thickness_um=row.mean_thickness_um,
        etdrs_thickness_um={s: by_subfield[s] for s in SUBFIELDS if s in by_subfield},
    )
