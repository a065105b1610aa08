"""``hrf-batch export --dicom-seg``: per stored volume (latest done run), a DICOM Segmentation of its HRF,
and for sources that are not DICOM (HEYEX .vol/.e2e/XML, Topcon .fds) first the volume itself as a DICOM
Ophthalmic Tomography series for the SEG to reference.

Layout: ``OUT/<patient>/<visit>_<eye>_<id>/`` holds ``OPT_*.dcm`` and ``OP_*.dcm`` (the volume and its
localizer, non-DICOM sources only) and ``SEG_*.dcm``. A DICOM source is referenced where it lies, by its
SOP Instance UIDs (and frame numbers). Every UID derives from the source sha256 and series (the SEG's
also from the run's inputs), so exporting again rewrites the same objects. Names and birth dates are
written only with ``include_identifiers``; the patient id is always the stored one.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pydicom

from hrf_batch.export.dicom_seg import build_segmentation, write_segmentation
from hrf_batch.export.sources import SourceScan, read_stored_source
from hrf_batch.export.volumes import ExportSummary, export_each, stored_masks, volume_folder
from hrf_batch.io.volume import Volume
from hrf_batch.io.writers.dicom import OPT_SOP_CLASS, write_dicom_oct
from hrf_batch.store import Store, StoredVolume

log = logging.getLogger(__name__)


def export_dicom(store: Store, out_dir: Path, *, patient: str | None = None,
                 include_identifiers: bool = False) -> ExportSummary:
    """Write the SEG (and OPT where needed) of every stored volume, or of one patient's.

    A volume whose source is gone or changed is left out with its reason in ``skipped``; the others
    are still written.
    """
    return export_each(store, patient,
                       lambda stored: export_volume_dicom(stored, Path(out_dir), include_identifiers=include_identifiers))


def export_volume_dicom(stored: StoredVolume, out_dir: Path, *, include_identifiers: bool = False) -> tuple[Path, list[Path]]:
    """The DICOM files of one stored volume in its folder under ``out_dir``: (folder, files written)."""
    scan = read_stored_source(stored)
    folder = volume_folder(out_dir, stored)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if scan.frames:
        sources = _source_headers(scan)
    else:
        if stored.eye not in ("OD", "OS"):
            log.warning("%s: the source does not say which eye was scanned; the DICOM OCT gets Image Laterality "
                        "'U', which the OPT definition does not allow (dciodvfy reports it)", stored.source_path)
        written = write_dicom_oct(_for_export(scan.volume, stored, include_identifiers), folder, multiframe=True,
                                  uid_seed=export_seed(stored))
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in written if _is_opt(p)]
    seg = build_segmentation(stored, stored_masks(stored), sources, patient_id=stored.patient_id,
                             include_identifiers=include_identifiers)
    written.append(write_segmentation(seg, folder))
    return folder, written


def export_seed(stored: StoredVolume) -> str:
    """What the written OPT's UIDs derive from: the analysed file's sha256 and the series in it."""
    return f"{stored.source_sha256}/{stored.series_uid}"


def _for_export(volume: Volume, stored: StoredVolume, include_identifiers: bool) -> Volume:
    """The volume with the stored patient id, and without name and birth date unless they are asked for."""
    meta = dataclasses.replace(volume.meta, patient_id=stored.patient_id)
    if not include_identifiers:
        meta = dataclasses.replace(meta, patient_name="", birth_date=None)
    return dataclasses.replace(volume, meta=meta)


def _source_headers(scan: SourceScan) -> list[pydicom.Dataset]:
    """The source instances' headers in B-scan order: one multi-frame instance, or one per B-scan."""
    paths: list[Path] = []
    for frame in scan.frames:
        if frame.path not in paths:
            paths.append(frame.path)
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]


def _is_opt(path: Path) -> bool:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID) == OPT_SOP_CLASS
