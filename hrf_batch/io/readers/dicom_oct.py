"""Read DICOM Ophthalmic Tomography (OPT) instances into Volumes, and peek at DICOM headers cheaply.

Conventions (shared with ``hrf_batch.io.writers.dicom``):

- Pixels end up on the 0..255 display scale: 8-bit data is kept as is. Stored values are first
  passed through RescaleSlope/RescaleIntercept when present; then, for BitsStored > 8, multiplied
  by ``255 / (2**BitsStored - 1)`` so the full stored range maps onto 0..255 (devices that export
  16-bit OCT use the whole range for display). MONOCHROME1 is inverted. The result is clipped.
- Spacing: Pixel Measures ``PixelSpacing = [row (axial) mm, column (lateral) mm]`` and
  ``SliceThickness`` = distance between B-scans, per-frame group first, then shared group, then
  the top-level attributes.
- Positions: Reference Coordinates (0022,0032) are (row, column) pairs on the referenced
  localizer, 0\\0 being the top-left corner of its top-left pixel; the first pair is the B-scan
  start and the last pair its end. They become (x, y) mm via the localizer's PixelSpacing
  ``[row mm, col mm]``: ``x = col * col_mm``, ``y = row * row_mm``.
- Order: a multi-frame instance keeps its stored frame order; single-frame instances of one
  series are ordered by InstanceNumber (then In-Stack Position Number), never by file name.

Damaged files: Rows x Columns x NumberOfFrames (and the sample size) are checked against the limits
in :mod:`hrf_batch.io.volume` before PixelData is decoded, because pydicom allocates the whole decoded
array first, so a compressed file whose header claims 65535 x 65535 x 100000 fails as one ReadError
and not as a MemoryError. Uncompressed or not, a series is read whole or refused. A RescaleSlope or
RescaleIntercept that is NaN, infinite or (for the slope) zero refuses the file; a localizer with
such values or an absurd size is left out with a warning, as any broken localizer is. Dates: a DA/DT
value pydicom cannot parse is ignored with a warning (the birth date's value is never logged); a
parsed visit date outside 1900-2099 is refused by the check every reader's result passes. pydicom's
own log records are cut to one line of at most ``LOG_LINE_LIMIT`` characters: its validation
warnings quote whole element values, so one binary value in a text element used to make a
31,500-character log line.
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import (
    UID,
    OphthalmicPhotography8BitImageStorage,
    OphthalmicPhotography16BitImageStorage,
    OphthalmicTomographyImageStorage,
)
from pydicom.valuerep import DA, DT

from hrf_batch.errors import NotOctError, ReadError, one_line
from hrf_batch.io.readers.raw import source_sha256
from hrf_batch.io.volume import (
    MAX_VOLUME_BYTES,
    BScanPosition,
    Spacing,
    Volume,
    VolumeMeta,
    check_declared_size,
    check_localizer_size,
)

log = logging.getLogger(__name__)
LOG_LINE_LIMIT = 300


class _OneShortLine(logging.Filter):
    """Cuts a pydicom log record to one printable line of at most LOG_LINE_LIMIT characters (see the
    module docstring for why)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: logging reports it itself when it formats it
            return True
        if len(text) > LOG_LINE_LIMIT or not text.isprintable():
            record.msg = _printable(text, LOG_LINE_LIMIT)
            record.args = None
        return True


def _cap_pydicom_logging() -> None:
    """Install the filter on pydicom's logger and its children (a filter on a logger does not apply to
    records of its children); idempotent, and re-run per file for children created later."""
    names = ["pydicom", *(n for n in logging.root.manager.loggerDict if n.startswith("pydicom."))]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneShortLine) for f in logger.filters):
            logger.addFilter(_OneShortLine())


_cap_pydicom_logging()

OPT_SOP_CLASS = str(OphthalmicTomographyImageStorage)
LOCALIZER_SOP_CLASSES = frozenset({str(OphthalmicPhotography8BitImageStorage), str(OphthalmicPhotography16BitImageStorage)})

# What pydicom raises on damaged or unexpected content; mapped to ReadError so no traceback escapes.
_PARSE_ERRORS = (
    InvalidDicomError, BytesLengthException, OSError, EOFError, ValueError, TypeError, KeyError, IndexError,
    AttributeError, RuntimeError, OverflowError, struct.error,
)
_HINT_DAMAGED = "the file is damaged or truncated; export the series again from the device"
_EYES = {"R": "OD", "L": "OS"}
_IDENTIFYING_KEYWORDS = frozenset({"PatientBirthDate"})


@dataclass(frozen=True)
class DicomPeek:
    """What study discovery needs to know about a DICOM file without decoding its pixels."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    n_frames: int
    is_oct: bool
    is_localizer: bool


@dataclass
class _Instance:
    path: Path
    ds: Dataset
    n_frames: int


def peek_dicom(path: Path) -> DicomPeek | None:
    """Header facts of ``path`` (pixels not read); None if it is not DICOM at all.

    A file with the DICOM magic whose header cannot be parsed raises ReadError rather than
    returning None, so discovery reports a broken export instead of silently skipping it.
    """
    path = Path(path)
    has_magic = _has_dicm_magic(path)
    try:
        ds = _parse(path, stop_before_pixels=True)
        sop_class = _text(ds, "SOPClassUID") or _text(ds.file_meta, "MediaStorageSOPClassUID")
        if not sop_class:
            raise ReadError(path, "DICOM header has no SOP Class UID", _HINT_DAMAGED)
        return DicomPeek(
            sop_class_uid=sop_class,
            sop_instance_uid=_text(ds, "SOPInstanceUID") or _text(ds.file_meta, "MediaStorageSOPInstanceUID"),
            series_uid=_text(ds, "SeriesInstanceUID"),
            study_uid=_text(ds, "StudyInstanceUID"),
            n_frames=_declared_frames(ds),
            is_oct=sop_class == OPT_SOP_CLASS,
            is_localizer=sop_class in LOCALIZER_SOP_CLASSES,
        )
    except _PARSE_ERRORS as exc:
        if not has_magic:
            return None
        raise ReadError(path, f"DICOM header cannot be parsed ({_short(exc)})", _HINT_DAMAGED) from exc


def read_dicom_oct(paths: Sequence[Path]) -> list[Volume]:
    """Volumes from one multi-frame OPT file, or from the single-frame OPT instances of a series.

    Each multi-frame instance is one Volume; single-frame instances are stacked per series.
    Ophthalmic Photography files among ``paths`` are used as localizers, not as B-scans.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReadError("(no files)", "no DICOM files were given", "pass one OCT file or the files of one series")
    instances: list[_Instance] = []
    localizers: dict[str, Path] = {}
    for path in paths:
        ds = _read_dataset(path)
        sop_class = _require_sop_class(ds, path)
        if sop_class == OPT_SOP_CLASS:
            n_frames = _frame_count(ds, path)
            _check_decoded_size(ds, path, n_frames)
            instances.append(_Instance(path, ds, n_frames))
        elif sop_class in LOCALIZER_SOP_CLASSES:
            localizers[_text(ds, "SOPInstanceUID")] = path
        else:
            raise NotOctError(
                path,
                f"holds {_sop_name(sop_class)}, not an OCT image",
                f"only Ophthalmic Tomography Image Storage ({OPT_SOP_CLASS}) files can be analysed",
            )
    if not instances:
        raise NotOctError(
            paths[0], "holds only ophthalmic photographs (localizers), no OCT image",
            "pass the Ophthalmic Tomography file(s) of the study",
        )
    return [_build_volume(group, localizers) for group in _group_instances(instances)]


@dataclass(frozen=True)
class FrameRef:
    """Where one B-scan of a DICOM source lives: a SEG of that B-scan references this instance and frame."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int  # 1-based, within the instance
    series_uid: str


def frame_references(paths: Sequence[Path]) -> list[list[FrameRef]]:
    """Per volume that :func:`read_dicom_oct` would return for ``paths`` (same grouping, same B-scan
    order), the instance and frame of each B-scan; headers only, pixels are not decoded."""
    instances = []
    for path in (Path(p) for p in paths):
        ds = _read_dataset(path, stop_before_pixels=True)
        if _require_sop_class(ds, path) == OPT_SOP_CLASS:
            instances.append(_Instance(path, ds, max(_declared_frames(ds), 1)))
    return [
        [FrameRef(inst.path, OPT_SOP_CLASS, _text(inst.ds, "SOPInstanceUID"), k + 1, _text(inst.ds, "SeriesInstanceUID"))
         for inst in group for k in range(inst.n_frames)]
        for group in _group_instances(instances)
    ]


def _has_dicm_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise ReadError(path, f"cannot open the file ({_short(exc)})", "check the path and its permissions") from exc
    return len(head) == 132 and head[128:] == b"DICM"


def _read_dataset(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Parse ``path`` as DICOM (preamble and magic required), mapping every failure to ReadError."""
    try:
        return _parse(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise ReadError(
            path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)",
            "check that the file is a DICOM export and not empty or truncated",
        ) from exc
    except OSError as exc:
        raise ReadError(path, f"cannot open the file ({_short(exc)})", "check the path and its permissions") from exc
    except _PARSE_ERRORS as exc:
        raise ReadError(path, f"DICOM header cannot be parsed ({_short(exc)})", _HINT_DAMAGED) from exc


def _parse(path: Path, *, stop_before_pixels: bool) -> Dataset:
    """dcmread without ``force`` plus full conversion; pydicom's many per-element warnings about
    non-conformant values become one log line per file instead of a flood on the console."""
    _cap_pydicom_logging()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _materialised(dcmread(path, stop_before_pixels=stop_before_pixels, force=False), path)
    if caught:
        log.warning("%s: %d DICOM conformance warning(s), first: %s", path, len(caught), _short(caught[0].message))
    return ds


def _materialised(ds: Dataset, path: Path) -> Dataset:
    """Convert every element now, dropping the damaged ones with a warning.

    pydicom converts elements lazily, so damage would otherwise surface as a raw pydicom error
    on some later access. Dropping instead of failing keeps a file usable when only an element
    we do not need (often a private one) is malformed; missing essentials are reported later.
    """
    dropped = _drop_unreadable(ds.file_meta) + _drop_unreadable(ds)
    if dropped:
        log.warning("%s: ignoring %d damaged header element(s): %s", path, len(dropped), "; ".join(dropped[:3]))
    return ds


def _drop_unreadable(ds: Dataset) -> list[str]:
    dropped: list[str] = []
    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value:
                    dropped.extend(_drop_unreadable(item))
        except _PARSE_ERRORS as exc:
            dropped.append(f"{tag} ({_short(exc)})")
            del ds[tag]
    return dropped


def _require_sop_class(ds: Dataset, path: Path) -> str:
    try:
        sop_class = _text(ds, "SOPClassUID") or _text(ds.file_meta, "MediaStorageSOPClassUID")
    except _PARSE_ERRORS as exc:
        raise ReadError(path, f"DICOM header cannot be parsed ({_short(exc)})", _HINT_DAMAGED) from exc
    if not sop_class:
        raise ReadError(path, "DICOM header has no SOP Class UID", _HINT_DAMAGED)
    return sop_class


def _frame_count(ds: Dataset, path: Path) -> int:
    """Frames in an OPT instance; zero frames or missing pixel data is an error, not an empty volume."""
    try:
        n_frames = _declared_frames(ds)
        has_pixels = "PixelData" in ds
    except _PARSE_ERRORS as exc:
        raise ReadError(path, f"DICOM header cannot be parsed ({_short(exc)})", _HINT_DAMAGED) from exc
    if n_frames < 1 or not has_pixels:
        what = "no pixel data" if not has_pixels else f"NumberOfFrames={n_frames}"
        raise ReadError(path, f"OCT instance holds no B-scans ({what})", _HINT_DAMAGED)
    return n_frames


def _check_decoded_size(ds: Dataset, path: Path, n_frames: int) -> None:
    """Refuse, before PixelData is touched, what decoding would allocate (see the module docstring).

    Without Rows or Columns there is nothing to check: the decoder then fails with its own cause.
    """
    try:
        rows, cols = _int_or(ds.get("Rows"), 0) or 0, _int_or(ds.get("Columns"), 0) or 0
        samples = _int_or(ds.get("SamplesPerPixel"), 1) or 1
        bits = _int_or(ds.get("BitsAllocated"), 8) or 8
    except _PARSE_ERRORS as exc:
        raise ReadError(path, f"DICOM header cannot be parsed ({_short(exc)})", _HINT_DAMAGED) from exc
    if rows <= 0 or cols <= 0:
        return
    check_declared_size(path, n_frames, rows, cols, hint=_HINT_DAMAGED)
    decoded = n_frames * rows * cols * max(samples, 1) * max(-(-bits // 8), 1)
    if decoded > MAX_VOLUME_BYTES:
        raise ReadError(
            path, f"header declares {n_frames} frames of {rows}x{cols} pixels with {samples} sample(s) of {bits} bits, "
            f"{decoded / 2**30:.1f} GiB once decoded, above the {MAX_VOLUME_BYTES / 2**30:.1f} GiB limit per volume",
            _HINT_DAMAGED,
        )


def _declared_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    if value is None or str(value).strip() == "":
        return 1 if "Rows" in ds else 0
    return int(value)


def _group_instances(instances: list[_Instance]) -> list[list[_Instance]]:
    """One group per multi-frame instance, one per series of single-frame instances."""
    groups: list[list[_Instance]] = [[inst] for inst in instances if inst.n_frames > 1]
    by_series: dict[str, list[_Instance]] = {}
    for inst in instances:
        if inst.n_frames == 1:
            by_series.setdefault(_text(inst.ds, "SeriesInstanceUID"), []).append(inst)
    groups.extend(_ordered(members) for members in by_series.values())
    groups.sort(key=lambda g: (_text(g[0].ds, "SeriesInstanceUID"), _int_or(g[0].ds.get("InstanceNumber"), 0)))
    return groups


def _ordered(members: list[_Instance]) -> list[_Instance]:
    """Single-frame instances by InstanceNumber, else In-Stack Position Number; never by file name."""
    if len(members) == 1:
        return members
    for key in (lambda i: i.ds.get("InstanceNumber"), lambda i: _stack_position(i.ds)):
        values = [_int_or(key(m), None) for m in members]
        if None not in values and len(set(values)) == len(values):
            return [m for _, m in sorted(zip(values, members), key=lambda pair: pair[0])]
    raise ReadError(
        members[0].path.parent, f"cannot order the {len(members)} single-frame OCT instances of one series",
        "their InstanceNumber and In-Stack Position Number are missing or repeated; re-export the series",
    )


def _build_volume(group: list[_Instance], localizers: dict[str, Path]) -> Volume:
    """One Volume from an ordered group; header damage found on the way becomes a ReadError."""
    first = group[0]
    if len(group) > 1:  # single-frame instances: each passed the size check, their sum must too
        _check_decoded_size(first.ds, first.path.parent, sum(inst.n_frames for inst in group))
    try:
        stacks = [_pixels(inst) for inst in group]
        sizes = sorted({stack.shape[1:] for stack in stacks})
        if len(sizes) > 1:
            raise ReadError(
                first.path.parent, f"the OCT instances of series {_text(first.ds, 'SeriesInstanceUID')} "
                f"have B-scans of different sizes {sizes}", "pass the instances of one acquisition only",
            )
        bscans = np.concatenate(stacks, axis=0)
        frames = [(inst, k) for inst in group for k in range(inst.n_frames)]
        spacing = _spacing(first.ds, 0, first.path, n_bscans=len(frames))
        positions, localizer, localizer_spacing = _locate(frames, localizers)
        meta = _meta(group, spacing, positions, localizer_spacing, n_bscans=len(frames))
    except _PARSE_ERRORS as exc:
        raise ReadError(first.path, f"DICOM header cannot be parsed ({_short(exc)})", _HINT_DAMAGED) from exc
    return Volume(bscans=bscans, meta=meta, localizer=localizer)


def _pixels(inst: _Instance) -> np.ndarray:
    """Frames of one instance as float32 ``(n, H, W)`` on the 0..255 display scale."""
    problem = _rescale_problem(inst.ds)
    if problem:
        raise ReadError(inst.path, problem, _HINT_DAMAGED)
    try:
        raw = np.asarray(inst.ds.pixel_array)
    except _PARSE_ERRORS as exc:
        raise ReadError(
            inst.path, f"pixel data cannot be decoded ({_short(exc)})",
            "the file may be truncated or use a compression this installation cannot decode; "
            "re-export it uncompressed",
        ) from exc
    if raw.ndim == 2 and inst.n_frames == 1:
        raw = raw[np.newaxis]
    if raw.ndim != 3 or raw.shape[0] != inst.n_frames:
        raise ReadError(
            inst.path, f"pixel data has shape {raw.shape}, expected {inst.n_frames} grey-scale frame(s)",
            "only single-channel OCT exports are supported",
        )
    return _to_display(raw, inst.ds)


def _to_display(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values → rescaled values → 0..255 (see the module docstring for why this order)."""
    values = raw.astype(np.float64)
    slope, intercept = _rescale(ds)
    if slope != 1.0 or intercept != 0.0:
        values = values * slope + intercept
    bits = _int_or(ds.get("BitsStored"), None) or 8
    if bits > 8:
        values *= 255.0 / (2.0**bits - 1.0)
    if _text(ds, "PhotometricInterpretation") == "MONOCHROME1":
        values = 255.0 - values
    return np.clip(values, 0.0, 255.0).astype(np.float32)


def _rescale_problem(ds: Dataset) -> str:
    """Why the rescale values cannot be used, or "": NaN or infinity would turn every pixel into NaN, a
    slope of 0 every pixel into the same grey, and either would be scored as a real scan."""
    slope, intercept = _rescale(ds)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        return (
            f"RescaleSlope {slope!r} and RescaleIntercept {intercept!r} cannot map stored values to pixels "
            "(both must be finite numbers and the slope not 0)"
        )
    return ""


def _rescale(ds: Dataset) -> tuple[float, float]:
    """Top-level RescaleSlope/Intercept, else the shared Pixel Value Transformation group."""
    source: Any = ds
    if "RescaleSlope" not in ds:
        item = _first_item(_first_item(ds, "SharedFunctionalGroupsSequence"), "PixelValueTransformationSequence")
        source = item if item is not None else ds
    slope = source.get("RescaleSlope")
    intercept = source.get("RescaleIntercept")
    return (float(slope) if slope not in (None, "") else 1.0, float(intercept) if intercept not in (None, "") else 0.0)


def _spacing(ds: Dataset, frame: int, path: Path, *, n_bscans: int) -> Spacing:
    """Pixel Measures of ``frame``: per-frame group, then shared group, then top level."""
    candidates = [
        _first_item(_frame_group(ds, frame), "PixelMeasuresSequence"),
        _first_item(_first_item(ds, "SharedFunctionalGroupsSequence"), "PixelMeasuresSequence"),
        ds,
    ]
    for source in candidates:
        if source is not None and source.get("PixelSpacing"):
            pixel_spacing = [float(v) for v in source.PixelSpacing]
            if len(pixel_spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in pixel_spacing):
                raise ReadError(path, f"invalid PixelSpacing {pixel_spacing}", _HINT_DAMAGED)
            thickness = source.get("SliceThickness")
            between = float(thickness) if thickness not in (None, "") and n_bscans > 1 else 0.0
            return Spacing(lateral_mm=pixel_spacing[1], axial_mm=pixel_spacing[0], between_bscans_mm=between)
    raise ReadError(
        path, "no PixelSpacing in the Pixel Measures functional groups or the header",
        "sizes in mm cannot be computed; export the series with its pixel spacing",
    )


def _frame_group(ds: Dataset, frame: int) -> Dataset | None:
    groups = ds.get("PerFrameFunctionalGroupsSequence")
    if groups is None or frame >= len(groups):
        return None
    return groups[frame]


def _first_item(container: Dataset | None, keyword: str) -> Dataset | None:
    if container is None:
        return None
    seq = container.get(keyword)
    return seq[0] if seq else None


def _stack_position(ds: Dataset) -> Any:
    item = _first_item(_frame_group(ds, 0), "FrameContentSequence")
    return None if item is None else item.get("InStackPositionNumber")


def _frame_location(ds: Dataset, frame: int) -> tuple[str, list[float]] | None:
    """(referenced localizer UID, reference coordinates) of one frame, or None when absent."""
    item = _first_item(_frame_group(ds, frame), "OphthalmicFrameLocationSequence")
    if item is None:
        item = _first_item(_first_item(ds, "SharedFunctionalGroupsSequence"), "OphthalmicFrameLocationSequence")
    if item is None or not item.get("ReferencedSOPInstanceUID") or item.get("ReferenceCoordinates") is None:
        return None
    coords = [float(v) for v in item.ReferenceCoordinates]
    if len(coords) < 4 or len(coords) % 2:
        return None
    return str(item.ReferencedSOPInstanceUID), coords


def _locate(
    frames: list[tuple[_Instance, int]], localizers: dict[str, Path]
) -> tuple[tuple[BScanPosition, ...], np.ndarray | None, tuple[float, float] | None]:
    """B-scan positions in mm, the localizer image and its spacing, when the localizer is found."""
    locations = [_frame_location(inst.ds, k) for inst, k in frames]
    if any(loc is None for loc in locations):
        return (), None, None
    uids = {loc[0] for loc in locations if loc is not None}
    first_path = frames[0][0].path
    if len(uids) != 1:
        log.warning("%s: B-scans reference %d different localizers; positions left out", first_path, len(uids))
        return (), None, None
    uid = uids.pop()
    oct_paths = {inst.path.resolve() for inst, _ in frames}
    path = localizers.get(uid) or _find_localizer(uid, {inst.path.parent for inst, _ in frames}, oct_paths)
    if path is None:
        return (), None, None
    image, spacing = _read_localizer(path)
    if image is None:
        return (), None, None
    if spacing is None:
        log.warning("%s: localizer has no PixelSpacing; B-scan positions left out", path)
        return (), image, None
    row_mm, col_mm = spacing
    positions = tuple(
        BScanPosition(start_mm=(c[1] * col_mm, c[0] * row_mm), end_mm=(c[-1] * col_mm, c[-2] * row_mm))
        for c in (loc[1] for loc in locations if loc is not None)
    )
    return positions, image, (col_mm, row_mm)


def _find_localizer(uid: str, folders: set[Path], skip: set[Path]) -> Path | None:
    """The DICOM file in ``folders`` whose SOPInstanceUID is ``uid``, read header-only."""
    for folder in sorted(folders):
        try:
            candidates = sorted(p for p in folder.iterdir() if p.is_file())
        except OSError as exc:
            log.warning("%s: cannot list the folder to look for the localizer (%s)", folder, _short(exc))
            continue
        for candidate in candidates:
            if candidate.resolve() in skip:
                continue
            try:
                peek = peek_dicom(candidate)
            except ReadError as exc:
                log.warning("skipping unreadable file while looking for the localizer: %s", exc)
                continue
            if peek is not None and peek.sop_instance_uid == uid:
                return candidate
    return None


def _read_localizer(path: Path) -> tuple[np.ndarray | None, tuple[float, float] | None]:
    """Grey localizer image (0..255) and PixelSpacing [row mm, col mm]; a broken localizer is skipped."""
    try:
        ds = _read_dataset(path)
        _check_localizer_header(ds, path)
        raw = np.asarray(ds.pixel_array)
        spacing_value = ds.get("PixelSpacing")
        spacing = (float(spacing_value[0]), float(spacing_value[1])) if spacing_value else None
    except ReadError as exc:
        log.warning("localizer not used: %s", exc)
        return None, None
    except _PARSE_ERRORS as exc:
        log.warning("%s: localizer not used, its pixels cannot be decoded (%s)", path, _short(exc))
        return None, None
    if spacing is not None and not all(math.isfinite(v) and v > 0 for v in spacing):
        log.warning("%s: localizer PixelSpacing %s is not usable; B-scan positions left out", path, spacing)
        spacing = None
    samples = _int_or(ds.get("SamplesPerPixel"), 1)
    if samples == 3:
        raw = raw @ np.array([0.299, 0.587, 0.114])
    if raw.ndim == 3:
        raw = raw[0]
    return _to_display(raw, ds), spacing


def _check_localizer_header(ds: Dataset, path: Path) -> None:
    """Size and rescale values of a localizer, checked before its pixels are decoded."""
    rows, cols = _int_or(ds.get("Rows"), 0) or 0, _int_or(ds.get("Columns"), 0) or 0
    if rows > 0 and cols > 0:
        check_localizer_size(path, rows, cols, hint=_HINT_DAMAGED)
        frames = max(_int_or(ds.get("NumberOfFrames"), 1) or 1, 1)
        samples = max(_int_or(ds.get("SamplesPerPixel"), 1) or 1, 1)
        bits = max(_int_or(ds.get("BitsAllocated"), 8) or 8, 1)
        if frames * rows * cols * samples * -(-bits // 8) > MAX_VOLUME_BYTES:
            problem = f"localizer declares {frames} frames of {rows}x{cols} pixels, too large to decode"
            raise ReadError(path, problem, _HINT_DAMAGED)
    problem = _rescale_problem(ds)
    if problem:
        raise ReadError(path, problem, _HINT_DAMAGED)


def _meta(
    group: list[_Instance],
    spacing: Spacing,
    positions: tuple[BScanPosition, ...],
    localizer_spacing: tuple[float, float] | None,
    *,
    n_bscans: int,
) -> VolumeMeta:
    ds = group[0].ds
    paths = [inst.path for inst in group]
    acquired_at = _datetime(ds, "AcquisitionDateTime")
    visit = _date(ds, "StudyDate") or (acquired_at.date() if acquired_at else None)
    laterality = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
    device = " ".join(part for part in (_text(ds, "Manufacturer"), _text(ds, "ManufacturerModelName")) if part)
    return VolumeMeta(
        source_path=str(paths[0] if len(paths) == 1 else _common_folder(paths)),
        source_sha256=source_sha256(paths),
        source_format="dicom-oct",
        series_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        eye=_EYES.get(laterality.upper(), "unknown"),
        visit_date=visit,
        acquired_at=acquired_at,
        device=device,
        scan_pattern="line" if n_bscans == 1 else "volume",
        spacing=spacing,
        positions=positions,
        localizer_spacing_mm=localizer_spacing,
        birth_date=_date(ds, "PatientBirthDate"),
        patient_name=_text(ds, "PatientName"),
    )


def _common_folder(paths: list[Path]) -> Path:
    parents = {p.parent for p in paths}
    return parents.pop() if len(parents) == 1 else paths[0]


def _parsed(ds: Dataset, keyword: str, parse: Callable[[str], Any]) -> Any:
    """A DA/DT element parsed by pydicom, or None when absent or unreadable (with a warning: a bad
    date must not cost the whole volume)."""
    text = _text(ds, keyword)
    if not text:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        if keyword in _IDENTIFYING_KEYWORDS:  # neither the value nor pydicom's message (which quotes it)
            log.warning("ignoring unreadable %s", keyword)
        else:
            log.warning("ignoring unreadable %s %r (%s)", keyword, _printable(text), _short(exc))
        return None


def _date(ds: Dataset, keyword: str) -> date | None:
    value = _parsed(ds, keyword, DA)
    return date(value.year, value.month, value.day) if value is not None else None


def _datetime(ds: Dataset, keyword: str) -> datetime | None:
    v = _parsed(ds, keyword, DT)
    if v is None:
        return None
    return datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, tzinfo=v.tzinfo)


def _text(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _int_or(value: Any, default: int | None) -> int | None:
    if value is None or str(value).strip() == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _sop_name(sop_class: str) -> str:
    if not _looks_like_uid(sop_class):
        return f"an invalid SOP Class UID {_printable(sop_class)!r}"
    name = UID(sop_class).name
    return f"{name} ({sop_class})" if name != sop_class else f"SOP class {sop_class}"


def _printable(text: str, limit: int = 80) -> str:
    """Header text safe for a one-line message (damaged files can hold control characters)."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return cleaned if len(text) <= limit else cleaned[: limit - 3] + "..."


def _looks_like_uid(value: str) -> bool:
    return bool(value) and len(value) <= 64 and all(ch.isdigit() or ch == "." for ch in value)


def _short(exc: BaseException) -> str:
    """ReadError messages and log lines stay on one printable line (pydicom's messages can quote binary values)."""
    return _printable(one_line(exc, 160), 160)
