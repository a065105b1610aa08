"""Write a Volume as a DICOM Ophthalmic Tomography (OPT) series, plus small test-support DICOM files.

Why a writer at all: the DICOM reader needs realistic inputs in tests (multi-frame and
single-frame series, a localizer with frame locations), and later tooling can export volumes
that other viewers open. Conventions, mirrored by ``hrf_batch.io.readers.dicom_oct``:

- B-scan pixels are rounded to 8-bit MONOCHROME2, uncompressed Explicit VR Little Endian.
- Pixel Measures: ``PixelSpacing = [axial_mm, lateral_mm]`` (row spacing, column spacing) and
  ``SliceThickness`` = the distance between B-scans.
- ``meta.localizer_spacing_mm`` is (x mm, y mm) per pixel; the localizer's PixelSpacing is written
  in DICOM order (row spacing, column spacing) = (y, x).
- Reference Coordinates (0022,0032) are (row, column) pairs in the localizer's continuous pixel
  space, where 0\\0 is the top-left corner of the top-left pixel: ``row = y_mm / row_spacing``,
  ``col = x_mm / col_spacing``. Start pair first, end pair second.
- UIDs are derived deterministically from the volume's identity, so writing the same volume
  twice gives the same UIDs (study UID from patient + visit date, so both eyes share a study).
  ``uid_seed`` (an export passes the source sha256 and series) makes every other UID derive from
  that seed alone, so a re-export of the same source names the same objects wherever the file lies.
- Patient geometry (Plane Position/Orientation, required by the OPT IOD): the Frame of Reference is
  the localizer's plane, x to the right and y down in mm as in ``BScanPosition``, z into the eye.
  B-scan ``i`` starts at ``(x0, y0, 0)`` and its rows run from start to end; its columns run along
  +z (depth). Circle scans and volumes without positions get a plain stack instead: B-scan ``i``
  at ``(0, i * between_bscans_mm, 0)`` with rows along +x.
- The pixels are a converted copy (HEYEX's display curve, rounded to 8 bits), hence Image Type
  DERIVED\\PRIMARY. Attributes the file formats do not carry (eye axial length, refraction,
  intraocular pressure...) are written empty where DICOM allows it (Type 2). Type 1 values with no
  source use the honest generic value: the device type code "Optical Coherence Tomography Scanner"
  (localizer: "Scanning Laser Ophthalmoscope"), detector type "CCD" (the line camera of spectral-domain
  OCT), and "unknown" for a missing manufacturer, model or serial number.
"""

from __future__ import annotations

import logging
import re
from datetime import date, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    OphthalmicPhotography8BitImageStorage,
    OphthalmicTomographyImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from hrf_batch import __version__
from hrf_batch.io.volume import BScanPosition, Volume

log = logging.getLogger(__name__)

OPT_SOP_CLASS = str(OphthalmicTomographyImageStorage)
OP8_SOP_CLASS = str(OphthalmicPhotography8BitImageStorage)
CT_SOP_CLASS = str(CTImageStorage)
IN_STACK_POSITION_TAG = 0x00209057
FRAME_CONTENT_SEQUENCE_TAG = 0x00209111
FRAME_TIME_TAG = 0x00181063

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_LATERALITY = {"OD": "R", "OS": "L"}
_UNKNOWN = "unknown"
# (value, scheme, meaning) of the SNOMED CT concepts the ophthalmic IODs require
_EYE = ("81745001", "SCT", "Eye")
_OCT_SCANNER = ("392012008", "SCT", "Optical Coherence Tomography Scanner")
_SLO = ("392001008", "SCT", "Scanning Laser Ophthalmoscope")


def write_dicom_oct(
    volume: Volume, out_dir: Path, *, multiframe: bool = True, uid_seed: str | None = None
) -> list[Path]:
    """Write ``volume`` into ``out_dir`` as one OPT series (and its localizer as an OP instance).

    Returns the OCT file(s) in instance order, followed by the localizer file if one was written.
    ``multiframe=False`` writes one single-frame instance per B-scan, as some devices export.
    B-scan positions are written only with a localizer and its spacing: DICOM can express them
    solely as pixel coordinates on a referenced image. ``uid_seed``: see the module docstring.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    uids = _uids(volume, multiframe, uid_seed)
    written: list[Path] = []
    localizer_path: Path | None = None
    locator: _Locator | None = None
    if volume.localizer is not None:
        localizer_path = out_dir / f"OP_{uids['localizer']}.dcm"
        _localizer_dataset(volume, volume.localizer, uids).save_as(localizer_path, enforce_file_format=True)
        locator = _Locator.for_volume(volume, uids["localizer"])
    if multiframe:
        groups = [list(range(volume.n_bscans))]
    else:
        groups = [[i] for i in range(volume.n_bscans)]
    for number, frames in enumerate(groups, start=1):
        sop_uid = uids["instance"] if multiframe else _derived_uid(uids["series"], f"instance-{number}")
        ds = _oct_dataset(volume, uids, sop_uid, number, frames, locator)
        path = out_dir / f"OPT_{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    if localizer_path is not None:
        written.append(localizer_path)
    return written


def write_ct_dicom(path: Path) -> Path:
    """Write a tiny CT Image Storage instance: a valid DICOM file that is not an OCT (negative tests)."""
    path = Path(path)
    ds = _base_dataset(CT_SOP_CLASS, generate_uid(entropy_srcs=["ct", str(path.name)]))
    ds.Modality = "CT"
    ds.PatientID = "CT-TEST"
    ds.PatientName = "Test^CT"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["ct-study", str(path.name)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["ct-series", str(path.name)])
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    pixels = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 100).astype(np.uint16)
    _set_pixels(ds, pixels, bits=16)
    ds.RescaleIntercept = DSfloat(-1024, auto_format=True)
    ds.RescaleSlope = DSfloat(1, auto_format=True)
    ds.PixelSpacing = [DSfloat(0.5, auto_format=True)] * 2
    ds.SliceThickness = DSfloat(1.0, auto_format=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_empty_oct_dicom(path: Path) -> Path:
    """Write an OPT instance with NumberOfFrames=0 and no pixel data (a Volume cannot hold 0 B-scans)."""
    path = Path(path)
    ds = _base_dataset(OPT_SOP_CLASS, generate_uid(entropy_srcs=["empty-opt", str(path.name)]))
    ds.Modality = "OPT"
    ds.PatientID = "EMPTY-TEST"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["empty-study", str(path.name)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["empty-series", str(path.name)])
    ds.InstanceNumber = 1
    ds.NumberOfFrames = 0
    ds.Rows = 64
    ds.Columns = 96
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.save_as(path, enforce_file_format=True)
    return path


class _Locator:
    """Converts B-scan positions in mm to (row, col) pairs on the localizer that will be referenced."""

    def __init__(self, sop_uid: str, row_mm: float, col_mm: float, positions: tuple[BScanPosition, ...]):
        self.sop_uid = sop_uid
        self.row_mm = row_mm
        self.col_mm = col_mm
        self.positions = positions

    @classmethod
    def for_volume(cls, volume: Volume, localizer_uid: str) -> _Locator | None:
        meta = volume.meta
        if not meta.positions:
            return None
        if meta.localizer_spacing_mm is None:
            log.warning("%s: localizer has no pixel spacing; B-scan positions are not written", meta.source_path)
            return None
        col_mm, row_mm = (float(v) for v in meta.localizer_spacing_mm)
        return cls(localizer_uid, row_mm, col_mm, meta.positions)

    def coordinates(self, index: int) -> list[float]:
        """[start_row, start_col, end_row, end_col] of B-scan ``index``."""
        pos = self.positions[index]
        (x0, y0), (x1, y1) = pos.start_mm, pos.end_mm
        return [y0 / self.row_mm, x0 / self.col_mm, y1 / self.row_mm, x1 / self.col_mm]


def _uids(volume: Volume, multiframe: bool, uid_seed: str | None = None) -> dict[str, str]:
    """Deterministic UIDs so that a rewrite of the same volume names the same objects."""
    meta = volume.meta
    visit = meta.visit_date.isoformat() if meta.visit_date else ""
    identity = [meta.source_sha256, meta.series_uid, meta.source_path, meta.patient_id, meta.eye, visit]
    if uid_seed is not None:
        identity = ["export", uid_seed]
        series = str(generate_uid(entropy_srcs=["series", *identity]))
    elif _is_valid_uid(meta.series_uid):
        series = meta.series_uid
    else:
        series = str(generate_uid(entropy_srcs=["series", *identity]))
    mode = "multiframe" if multiframe else "singleframe"
    return {
        "study": str(generate_uid(entropy_srcs=["study", meta.patient_id, visit])),
        "series": series,
        "frame_of_reference": str(generate_uid(entropy_srcs=["frame-of-reference", *identity])),
        "instance": _derived_uid(series, f"{mode}-instance"),
        "localizer": _derived_uid(series, "localizer"),
        "localizer_series": _derived_uid(series, "localizer-series"),
        "synchronization": _derived_uid(series, "synchronization"),
    }


def _derived_uid(base: str, role: str) -> str:
    return str(generate_uid(entropy_srcs=[base, role]))


def _is_valid_uid(value: str) -> bool:
    return len(value) <= 64 and bool(_UID_RE.match(value))


def _base_dataset(sop_class: str, sop_uid: str) -> Dataset:
    """Dataset with file meta and the SOP Common attributes every instance needs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, *, bits: int) -> None:
    """Uncompressed MONOCHROME2 pixel data; ``pixels`` is (rows, cols) or (frames, rows, cols)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _da(value: date) -> str:
    return value.strftime("%Y%m%d")


def _dt(value: datetime) -> str:
    text = value.strftime("%Y%m%d%H%M%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text + value.strftime("%z")


def _patient_study(ds: Dataset, volume: Volume, uids: dict[str, str]) -> None:
    """Patient, study, equipment, laterality and date attributes shared by OPT and OP instances."""
    meta = volume.meta
    ds.PatientName = meta.patient_name
    ds.PatientID = meta.patient_id
    ds.PatientBirthDate = _da(meta.birth_date) if meta.birth_date else ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = uids["study"]
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = _da(meta.visit_date) if meta.visit_date else ""
    ds.StudyTime = meta.acquired_at.strftime("%H%M%S") if meta.acquired_at else ""
    content = meta.acquired_at.date() if meta.acquired_at else meta.visit_date
    if content is not None:
        ds.ContentDate = _da(content)
        ds.ContentTime = meta.acquired_at.strftime("%H%M%S") if meta.acquired_at else "000000"
    if meta.acquired_at is not None:
        ds.AcquisitionDateTime = _dt(meta.acquired_at)
    elif meta.visit_date is not None:  # DT with day precision: the day is known, the time is not
        ds.AcquisitionDateTime = _da(meta.visit_date)
    manufacturer, _, model = meta.device.partition(" ")
    ds.Manufacturer = manufacturer or _UNKNOWN
    ds.ManufacturerModelName = model or _UNKNOWN
    ds.DeviceSerialNumber = _UNKNOWN
    ds.SoftwareVersions = f"hrf-batch {__version__}"
    ds.ImageLaterality = _LATERALITY.get(meta.eye, "U")
    ds.AnatomicRegionSequence = _codes(_EYE)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Ophthalmic Acquisition Parameters: not in any source format, so empty (Type 2)
    ds.RefractiveStateSequence = Sequence([])
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = None
    ds.HorizontalFieldOfView = None
    ds.LightPathFilterTypeStackCodeSequence = Sequence([])


def _codes(*concepts: tuple[str, str, str]) -> Sequence:
    """A code sequence of (value, scheme, meaning) concepts."""
    items = []
    for value, scheme, meaning in concepts:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = scheme
        item.CodeMeaning = meaning
        items.append(item)
    return Sequence(items)


def _oct_dataset(
    volume: Volume, uids: dict[str, str], sop_uid: str, number: int, frames: list[int], locator: _Locator | None
) -> Dataset:
    """One OPT instance holding ``frames`` (B-scan indices) of the volume."""
    meta = volume.meta
    ds = _base_dataset(OPT_SOP_CLASS, sop_uid)
    _patient_study(ds, volume, uids)
    ds.Modality = "OPT"
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.AcquisitionNumber = 1
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationLUTShape = "IDENTITY"
    ds.ContentQualification = "PRODUCT"
    ds.FrameOfReferenceUID = uids["frame_of_reference"]
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionContextSequence = Sequence([])
    ds.AxialLengthOfTheEye = None
    ds.AcquisitionDeviceTypeCodeSequence = _codes(_OCT_SCANNER)
    ds.DetectorType = "CCD"
    # The OPT Image module fixes these to 0, 1, 1 (an OPT instance is never part of a concatenation)
    ds.ConcatenationFrameOffsetNumber = 0
    ds.InConcatenationNumber = 1
    ds.InConcatenationTotalNumber = 1
    ds.NumberOfFrames = len(frames)
    _set_pixels(ds, _to_uint8(volume.bscans[frames]), bits=8)
    measures = Dataset()
    measures.PixelSpacing = [
        DSfloat(meta.spacing.axial_mm, auto_format=True),
        DSfloat(meta.spacing.lateral_mm, auto_format=True),
    ]
    measures.SliceThickness = DSfloat(meta.spacing.between_bscans_mm, auto_format=True)
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = _codes(_EYE)
    anatomy.FrameLaterality = ds.ImageLaterality
    shared.FrameAnatomySequence = Sequence([anatomy])
    planes = _planes(volume)
    orientations = {orientation for _, orientation in planes}
    if len(orientations) == 1:
        shared.PlaneOrientationSequence = _orientation(orientations.pop())
        per_frame_orientation = False
    else:
        per_frame_orientation = True
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    groups = []
    for i in frames:
        group = _frame_group(i, locator)
        position, orientation = planes[i]
        plane = Dataset()
        plane.ImagePositionPatient = [DSfloat(v, auto_format=True) for v in position]
        group.PlanePositionSequence = Sequence([plane])
        if per_frame_orientation:
            group.PlaneOrientationSequence = _orientation(orientation)
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    dimension = Dataset()
    dimension.DimensionOrganizationUID = _derived_uid(uids["series"], "dimension-organization")
    dimension.DimensionIndexPointer = IN_STACK_POSITION_TAG
    dimension.FunctionalGroupPointer = FRAME_CONTENT_SEQUENCE_TAG
    organization = Dataset()
    organization.DimensionOrganizationUID = dimension.DimensionOrganizationUID
    ds.DimensionOrganizationSequence = Sequence([organization])
    ds.DimensionIndexSequence = Sequence([dimension])
    return ds


def _planes(volume: Volume) -> list[tuple[tuple[float, float, float], tuple[float, ...]]]:
    """(Image Position, Image Orientation) of every B-scan in the frame of reference the module
    docstring defines."""
    meta = volume.meta
    stack = [((0.0, i * meta.spacing.between_bscans_mm, 0.0), (1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
             for i in range(volume.n_bscans)]
    if not meta.positions or meta.scan_pattern == "circle":
        return stack
    planes = []
    for pos in meta.positions:
        (x0, y0), (x1, y1) = pos.start_mm, pos.end_mm
        length = float(np.hypot(x1 - x0, y1 - y0))
        if length <= 0:
            return stack
        row = (round((x1 - x0) / length, 8), round((y1 - y0) / length, 8), 0.0)
        planes.append(((float(x0), float(y0), 0.0), (*row, 0.0, 0.0, 1.0)))
    return planes


def _orientation(cosines: tuple[float, ...]) -> Sequence:
    item = Dataset()
    item.ImageOrientationPatient = [DSfloat(v, auto_format=True) for v in cosines]
    return Sequence([item])


def _frame_group(index: int, locator: _Locator | None) -> Dataset:
    """Per-frame functional group: stack position and, with a localizer, where the B-scan lies on it."""
    content = Dataset()
    content.StackID = "1"
    content.InStackPositionNumber = index + 1
    content.DimensionIndexValues = [index + 1]
    group = Dataset()
    group.FrameContentSequence = Sequence([content])
    if locator is not None:
        location = Dataset()
        location.ReferencedSOPClassUID = OP8_SOP_CLASS
        location.ReferencedSOPInstanceUID = locator.sop_uid
        location.ReferenceCoordinates = locator.coordinates(index)
        location.OphthalmicImageOrientation = "LINEAR"
        group.OphthalmicFrameLocationSequence = Sequence([location])
    return group


def _localizer_dataset(volume: Volume, localizer: np.ndarray, uids: dict[str, str]) -> Dataset:
    """The localizer as an Ophthalmic Photography 8 Bit instance in its own series of the same study."""
    ds = _base_dataset(OP8_SOP_CLASS, uids["localizer"])
    _patient_study(ds, volume, uids)
    ds.Modality = "OP"
    ds.SeriesInstanceUID = uids["localizer_series"]
    ds.SeriesNumber = 2
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationLUTShape = "IDENTITY"
    ds.PatientOrientation = ""
    ds.SynchronizationFrameOfReferenceUID = uids["synchronization"]
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    ds.PatientEyeMovementCommanded = None
    ds.AcquisitionDeviceTypeCodeSequence = _codes(_SLO)
    ds.IlluminationTypeCodeSequence = Sequence([])
    ds.ImagePathFilterTypeStackCodeSequence = Sequence([])
    ds.LensesCodeSequence = Sequence([])
    ds.DetectorType = None
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = FRAME_TIME_TAG
    ds.FrameTime = 0
    _set_pixels(ds, _to_uint8(localizer), bits=8)
    if volume.meta.localizer_spacing_mm is not None:
        x_mm, y_mm = volume.meta.localizer_spacing_mm
        ds.PixelSpacing = [DSfloat(float(v), auto_format=True) for v in (y_mm, x_mm)]
    return ds
