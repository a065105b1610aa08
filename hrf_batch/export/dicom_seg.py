"""One DICOM Segmentation (highdicom) per volume: the stored HRF masks as segment 1, one frame per
B-scan with HRF, each frame referencing the source instance (and frame) it outlines.

The segment's coded concepts. SNOMED CT has no concept for a hyperreflective focus, and none of the
candidate findings (deposit, exudate, calcification) is what an HRF is known to be, so the segment says
only what the pipeline claims: a lesion. Category SCT 49755003 "Morphologically Abnormal Structure",
type SCT 52988006 "Lesion", anatomic region SCT 5665001 "Retina"; the label "Hyperreflective focus"
carries the specific meaning. Segmentation type BINARY. The algorithm identification names the
segmenter, the hrf-batch code version and, as parameters, the classifier's model id (weights sha256)
and the segmenter checkpoint, so a reader of the file knows which run made it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from hrf_batch.export.errors import ExportError
from hrf_batch.store import StoredVolume

SEGMENT_LABEL = "Hyperreflective focus"
SEGMENT_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
SEGMENT_TYPE = codes.SCT.Lesion
SEGMENT_REGION = codes.SCT.Retina
SEG_SERIES_NUMBER = 3  # after the OPT series (1) and its localizer (2)
MANUFACTURER = "hrf-batch"


@dataclass(frozen=True)
class SourceFrame:
    """The source frame one B-scan's mask belongs to (``frame_number`` 1-based within its instance)."""

    sop_instance_uid: str
    frame_number: int


def segmentation_uids(stored: StoredVolume) -> tuple[str, str]:
    """(series, instance) UID of the SEG: from the source sha256 and series, and the run's inputs, so a
    re-export of the same run gives the same UIDs and a new run's SEG never collides with an old one."""
    run = stored.run
    seed = [stored.source_sha256, stored.series_uid, run.model_id, run.segmenter,
            run.segmenter_checkpoint_sha256 or "", run.params_hash, run.code_version]
    return str(generate_uid(entropy_srcs=["seg-series", *seed])), str(generate_uid(entropy_srcs=["seg-instance", *seed]))


def build_segmentation(
    stored: StoredVolume, masks: np.ndarray, source_images: Sequence[Dataset], *, patient_id: str,
    include_identifiers: bool,
) -> hd.seg.Segmentation:
    """The SEG of ``masks`` (bool ``(n_bscans, H, W)``, B-scans in the volume's order) over
    ``source_images``: one multi-frame instance, or one single-frame instance per B-scan in order.

    A volume without HRF still gets a SEG (a SEG needs at least one frame): highdicom then keeps every
    B-scan as an empty frame, which says "looked at, nothing found" rather than leaving no trace.
    """
    pixels = np.asarray(masks, dtype=np.uint8)
    sources = list(source_images)
    if len(sources) != 1 and len(sources) != pixels.shape[0]:
        raise ExportError(f"{stored.source_path}: {len(sources)} source instances for {pixels.shape[0]} B-scans",
                          "export the series again from the device, ingest it, and export once more")
    series_uid, instance_uid = segmentation_uids(stored)
    common = dict(
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(stored)],
        series_instance_uid=series_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=stored.run.code_version[:64],
        device_serial_number="unknown",
        content_label="HRF",
        content_description="Hyperreflective foci found by hrf-batch",
        series_description="HRF segmentation (hrf-batch)",
    )
    with warnings.catch_warnings():  # highdicom checks the source's patient name form; it is the source's, not ours
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name", category=UserWarning)
        if len(sources) == 1:
            seg = hd.seg.Segmentation(source_images=sources, pixel_array=pixels, omit_empty_frames=bool(pixels.any()),
                                      **common)
        else:
            seg = _over_single_frame_series(stored, pixels, sources, common)
    seg.PatientID = patient_id
    if not include_identifiers:
        seg.PatientName = ""
        seg.PatientBirthDate = ""
    return seg


def _segment(stored: StoredVolume) -> hd.seg.SegmentDescription:
    run = stored.run
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"hrf-batch {run.segmenter}"[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=run.code_version[:64],
        parameters={"model_id": run.model_id, "segmenter_checkpoint_sha256": run.segmenter_checkpoint_sha256 or "none",
                    "params_hash": run.params_hash},
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=SEGMENT_CATEGORY,
        segmented_property_type=SEGMENT_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[SEGMENT_REGION],
    )


def _over_single_frame_series(
    stored: StoredVolume, pixels: np.ndarray, sources: list[Dataset], common: dict[str, Any]
) -> hd.seg.Segmentation:
    """A SEG over a series of single-frame OPT instances.

    highdicom builds a SEG from one multi-frame source only (OPT is a multi-frame IOD even with one
    frame), so the frames are placed by the sources' own plane positions and each SEG frame is then
    given the reference to the instance of its B-scan."""
    geometry = [_plane(ds) for ds in sources]  # needed here: highdicom places the frames by position
    placed = [g for g in geometry if g is not None]
    hint = "export the series as one multi-frame instance from the device"
    if len(placed) != len(sources) or len({orientation for _, orientation, _ in placed}) != 1:
        raise ExportError(f"{stored.source_path}: the single-frame OCT instances lack plane positions, pixel spacing or "
                          "a common plane orientation, so the SEG frames cannot be placed on them", hint)
    by_position = {_position_key(position): i for i, (position, _, _) in enumerate(placed)}
    if len(by_position) != len(sources):
        raise ExportError(f"{stored.source_path}: several single-frame OCT instances share one plane position, so the "
                          "SEG frames cannot be told apart", hint)
    _, orientation, measures = placed[0]
    seg = hd.seg.Segmentation(
        source_images=sources[:1], further_source_images=sources[1:], pixel_array=pixels,
        plane_positions=[hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, position) for position, _, _ in placed],
        plane_orientation=hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, orientation),
        pixel_measures=hd.PixelMeasuresSequence(measures.PixelSpacing, measures.get("SliceThickness")),
        omit_empty_frames=bool(pixels.any()),
        **common,
    )
    for group in seg.PerFrameFunctionalGroupsSequence:  # highdicom orders the frames by position, not by B-scan
        position = tuple(float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient)
        group.DerivationImageSequence = _derivation(sources[by_position[_position_key(position)]])
    return seg


def _position_key(position: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in position)


def _plane(ds: Dataset) -> tuple[tuple[float, ...], tuple[float, ...], Dataset] | None:
    """(Image Position, Image Orientation, Pixel Measures item) of a single-frame OPT instance, each from its
    per-frame group or else the shared one; None when one of them is missing."""
    try:
        groups = [ds.PerFrameFunctionalGroupsSequence[0], ds.SharedFunctionalGroupsSequence[0]]
        found = {}
        for keyword in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"):
            found[keyword] = next(group[keyword].value[0] for group in groups if keyword in group)
        position = tuple(float(v) for v in found["PlanePositionSequence"].ImagePositionPatient)
        orientation = tuple(float(v) for v in found["PlaneOrientationSequence"].ImageOrientationPatient)
        measures = found["PixelMeasuresSequence"]
        if "PixelSpacing" not in measures:
            return None
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, StopIteration):
        return None
    return position, orientation, measures


def _derivation(source: Dataset) -> PydicomSequence:
    """Derivation Image Sequence of one SEG frame: "segmentation of frame 1 of ``source``"."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.ReferencedFrameNumber = 1
    reference.SpatialLocationsPreserved = "YES"
    reference.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")]
    derivation = Dataset()
    derivation.SourceImageSequence = [reference]
    derivation.DerivationCodeSequence = [hd.sr.CodedConcept("113076", "DCM", "Segmentation")]
    return PydicomSequence([derivation])


def write_segmentation(seg: hd.seg.Segmentation, out_dir: Path) -> Path:
    """Save ``seg`` as ``SEG_<instance uid>.dcm`` in ``out_dir``."""
    path = Path(out_dir) / f"SEG_{seg.SOPInstanceUID}.dcm"
    seg.save_as(path)
    return path


def read_segmentation_masks(path: Path, frames: Sequence[SourceFrame], shape: tuple[int, int]) -> np.ndarray:
    """The masks of a written SEG back as bool ``(len(frames), H, W)`` in B-scan order, through highdicom's
    look-up by source instance and frame; a B-scan the SEG has no frame for comes back empty."""
    seg = hd.seg.segread(path)
    out = np.zeros((len(frames), *shape), dtype=bool)
    referenced = {
        (str(src.ReferencedSOPInstanceUID), int(src.get("ReferencedFrameNumber") or 1))
        for group in seg.PerFrameFunctionalGroupsSequence
        for derivation in group.get("DerivationImageSequence", [])
        for src in derivation.SourceImageSequence
    }
    for i, frame in enumerate(frames):
        if (frame.sop_instance_uid, frame.frame_number) in referenced:
            pixels = seg.get_pixels_by_source_frame(frame.sop_instance_uid, source_frame_numbers=[frame.frame_number],
                                                    segment_numbers=[1])
            out[i] = pixels[0, :, :, 0] > 0
    return out
