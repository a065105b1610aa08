"""``hrf-batch export --nifti``: per stored volume (latest done run), ``image.nii.gz`` (the B-scans, uint8 on
the 0..255 display scale), ``hrf_label.nii.gz`` (uint8, 1 = HRF) and ``provenance.json``.

Axis order of both volumes: i = lateral (the B-scan's columns, left to right as stored), j = axial (its
rows, top to bottom: depth), k = B-scan (the slow axis, in file order). The affine is diagonal with the
voxel sizes in mm: lateral spacing, axial spacing and the distance between B-scans, so viewers show
true proportions and volumes in mm³ come out right. A single B-scan has no distance between B-scans;
its k voxel size is then the lateral spacing, and the sidecar says so (``slow_axis_mm_nominal``).
The qform and sform codes are 2 (aligned anatomical): the axes are the scan's own, not scanner ones.
The sidecar carries the provenance of the masks: model id, segmenter, its checkpoint, the parameters,
the code version, the run and the source file's sha256 (its path only with ``include_identifiers``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from hrf_batch.export.sources import read_stored_source
from hrf_batch.export.volumes import ExportSummary, export_each, stored_masks, volume_folder
from hrf_batch.store import Store, StoredVolume

log = logging.getLogger(__name__)

IMAGE_NAME = "image.nii.gz"
LABEL_NAME = "hrf_label.nii.gz"
SIDECAR_NAME = "provenance.json"
AXES = ("lateral (B-scan columns)", "axial (B-scan rows, depth)", "B-scan (slow axis, file order)")
_ALIGNED = 2  # NIfTI xform code "aligned anatomical"


def export_nifti(store: Store, out_dir: Path, *, patient: str | None = None,
                 include_identifiers: bool = False) -> ExportSummary:
    """Image, label and sidecar of every stored volume, or of one patient's; a volume whose source is
    gone or changed is left out with its reason in ``skipped``."""
    return export_each(store, patient,
                       lambda stored: export_volume_nifti(stored, Path(out_dir), include_identifiers=include_identifiers))


def voxel_sizes_mm(stored: StoredVolume) -> tuple[float, float, float]:
    """(lateral, axial, slow-axis) mm per voxel; see the module docstring for a single B-scan."""
    spacing = stored.spacing
    slow = spacing.between_bscans_mm if spacing.between_bscans_mm > 0 else spacing.lateral_mm
    return float(spacing.lateral_mm), float(spacing.axial_mm), float(slow)


def to_nifti_axes(stack: np.ndarray) -> np.ndarray:
    """``(n_bscans, rows, cols)`` as stored to the NIfTI order ``(cols, rows, n_bscans)``."""
    return np.ascontiguousarray(np.transpose(stack, (2, 1, 0)))


def from_nifti_axes(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_nifti_axes`."""
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))


def export_volume_nifti(stored: StoredVolume, out_dir: Path, *, include_identifiers: bool = False) -> tuple[Path, list[Path]]:
    """The three files of one stored volume in its folder under ``out_dir``: (folder, files written)."""
    volume = read_stored_source(stored).volume
    folder = volume_folder(out_dir, stored)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*voxel_sizes_mm(stored), 1.0])
    image = np.clip(np.rint(volume.bscans), 0, 255).astype(np.uint8)
    label = stored_masks(stored).astype(np.uint8)
    written = []
    for name, data, intent in ((IMAGE_NAME, image, "OCT B-scans"), (LABEL_NAME, label, "HRF label")):
        nifti = nib.Nifti1Image(to_nifti_axes(data), affine)
        nifti.header.set_xyzt_units("mm")
        nifti.set_qform(affine, code=_ALIGNED)
        nifti.set_sform(affine, code=_ALIGNED)
        nifti.header["descrip"] = intent.encode()
        path = folder / name
        nib.save(nifti, path)
        written.append(path)
    sidecar = folder / SIDECAR_NAME
    sidecar.write_text(json.dumps(provenance(stored, include_identifiers=include_identifiers), indent=2) + "\n",
                       encoding="utf-8")
    written.append(sidecar)
    return folder, written


def provenance(stored: StoredVolume, *, include_identifiers: bool = False) -> dict[str, Any]:
    """The sidecar: where the masks came from and how to read the volumes."""
    run = stored.run
    lateral, axial, slow = voxel_sizes_mm(stored)
    out: dict[str, Any] = {
        "patient_id": stored.patient_id,
        "visit_date": stored.visit_date.isoformat() if stored.visit_date else None,
        "eye": stored.eye,
        "series_uid": stored.series_uid,
        "source_format": stored.source_format,
        "source_sha256": stored.source_sha256,
        "device": stored.device,
        "scan_pattern": stored.scan_pattern,
        "files": {"image": IMAGE_NAME, "label": LABEL_NAME},
        "axes": list(AXES),
        "voxel_size_mm": [lateral, axial, slow],
        "slow_axis_mm_nominal": stored.spacing.between_bscans_mm <= 0,
        "label_values": {"0": "background", "1": "hyperreflective focus"},
        "hrf_count": sum(b.hrf_count for b in stored.bscans),
        "run": {
            "run_id": run.run_id,
            "model_id": run.model_id,
            "segmenter": run.segmenter,
            "segmenter_checkpoint_sha256": run.segmenter_checkpoint_sha256,
            "parameters": run.parameters,
            "params_hash": run.params_hash,
            "code_version": run.code_version,
            "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        },
    }
    if include_identifiers:
        out["source_path"] = stored.source_path
    return out
