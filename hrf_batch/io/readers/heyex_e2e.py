"""HEYEX `.e2e` reader: every OCT series in the file becomes its own Volume.

An `.e2e` export usually holds one patient's examinations of both eyes, often several scans each,
so this reader returns a list. eyepy indexes the file and decodes the pixels; we read the few fields
it interprets in ways we do not want straight from the stored bytes:

- times are Windows FILETIMEs returned exactly as stored (eyepy shifts them by an hour for display);
- laterality is the ASCII code 'R'/'L' of the laterality record, mapped to OD/OS;
- B-scan positions are stored in degrees of the 30° localizer field; we convert them with the
  HEYEX "medium eye" factor of 0.2896 mm per degree, and derive the lateral and between-B-scan
  spacing from them because the file stores neither.

Before eyepy sees the file we walk its directory chain, so an empty, foreign, truncated or damaged
file fails with one clear line instead of a parser traceback.

Partial series are refused, never read in part: when a series declares N B-scans (the count in its
B-scan records) or holds B-scan records, but fewer than that many B-scans have both their metadata
and their image, the whole file fails with an error that names the series and both counts. An HRF
count over 2 of 3 B-scans would look like a real, lower burden. Damaged series in a file are not
dropped in favour of the good ones either, for the same reason: nothing is left out silently.

Dates: an impossible birth date is left out with a warning that does not repeat it. Exam and
acquisition times outside 1900-2099 are left out with a warning (the fields' layout is reverse
engineered, so a real file is not refused over them), except a B-scan time beyond the calendar,
on which eyepy's parser fails: that refuses the file.

Layer lines: each B-scan may hold layer records (id, width, then ``width`` float32 rows at the end of
the record); the ids are HEYEX's line indices, so they map onto our names as in the `.vol` reader, and
the lines become ``Volume.layers`` (source "device"). A record too short for what it declares, or of
another width than its B-scan, does not refuse the file (the pixels are intact and the pipeline can
estimate the lines): the series' layers are dropped with a warning that says so.
"""

from __future__ import annotations

import logging
import math
import struct
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hrf_batch.errors import ReadError, one_line
from hrf_batch.io.readers.heyex_vol import HEYEX_LAYER_IDS, device_layer_lines, device_rows
from hrf_batch.io.readers.raw import source_sha256
from hrf_batch.io.volume import (
    EARLIEST_DATE,
    LATEST_DATE,
    BScanPosition,
    LayerLines,
    Spacing,
    Volume,
    VolumeMeta,
    display_from_linear,
)

log = logging.getLogger(__name__)

MM_PER_DEGREE = 0.2896  # HEYEX "medium" eye length: 289.6 µm of retina per degree of scan angle
LOCALIZER_FIELD_DEG = 30.0  # the localizer field HEYEX assumes when it places B-scans on it
BSCAN_IMAGE = 35652097  # image record holding one B-scan (16-bit float pixels)
LOCALIZER_IMAGE = 33620481  # image record holding an 8-bit localizer (IR fundus)
FILETIME_EPOCH = datetime(1601, 1, 1)
BIRTHDATE_JD_OFFSET = 14_558_805  # date of birth = (Julian day + this) * 64
T_PREAMBLE, T_PATIENT, T_LATERALITY = 3, 9, 11
T_DEVICE, T_EXAMINED_STRUCTURE, T_SCAN_PATTERN, T_ENFACE_MODALITY, T_OCT_MODALITY = 9001, 9005, 9006, 9007, 9008
T_BSCANMETA, T_EXAM_TIME, T_LAYER, T_IMAGE = 10004, 10005, 10019, 1073741824

DEFAULT_DEVICE = "Heidelberg Spectralis"
_PATTERNS = {1: "line", 2: "circle", 3: "volume", 4: "volume", 5: "radial"}
_EYES = {ord("R"): "OD", ord("L"): "OS"}
_HEADER_SIZE = 36 + 52  # version block + main directory
LAYER_RECORD = struct.Struct("<4I")  # unknown, layer id, unknown, width; the rows end the record
_DIR_SIZE, _ENTRY_SIZE, _CONTAINER_SIZE = 52, 44, 60
_EARLIEST = datetime.combine(EARLIEST_DATE, datetime.min.time())
_LATEST = datetime.combine(LATEST_DATE, datetime.max.time())
_FILETIME_LIMIT = (datetime.max - FILETIME_EPOCH) // timedelta(microseconds=1) * 10
_HINT = "re-export the examination from HEYEX as .e2e, or remove the file from the study folder"


def is_e2e(head: bytes) -> bool:
    """True when the first bytes carry the HEYEX E2E signature."""
    return head.startswith(b"CMDb")


def _fail(path: Path, problem: str) -> ReadError:
    return ReadError(path, problem, _HINT)


def _check_directory(path: Path) -> None:
    """Walk the directory chain and make sure every entry's data lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(_HEADER_SIZE)
            if size == 0:
                raise _fail(path, "file is empty (0 bytes)")
            if not is_e2e(head):
                raise _fail(path, "not a HEYEX E2E file (no CMDb signature at the start)")
            if len(head) < _HEADER_SIZE:
                raise _fail(path, f"file is too short for an E2E header ({size} bytes): it is truncated")
            position, seen = struct.unpack_from("<I", head, 76)[0], set()
            while position:
                if position in seen:
                    raise _fail(path, f"the directory chain loops back to byte {position}: the file is damaged")
                seen.add(position)
                position = _check_chunk(path, fh, position, size)
    except OSError as exc:
        raise ReadError.unreadable(path, exc) from exc


def _check_chunk(path: Path, fh: BinaryIO, position: int, size: int) -> int:
    """Validate one directory chunk; return the position of the previous one (0 at the first)."""
    truncated = f"the file is truncated or damaged ({size} bytes)"
    if position + _DIR_SIZE > size:
        raise _fail(path, f"a directory at byte {position} lies past the end of the file: {truncated}")
    fh.seek(position)
    header = fh.read(_DIR_SIZE)
    if not header.startswith(b"MDbDir"):
        raise _fail(path, f"no directory at byte {position} where the chain points: the file is damaged")
    count, _current, previous = struct.unpack_from("<3I", header, 36)
    if position + _DIR_SIZE + count * _ENTRY_SIZE > size:
        raise _fail(path, f"the directory at byte {position} runs past the end of the file: {truncated}")
    entries = np.frombuffer(fh.read(count * _ENTRY_SIZE), dtype="<u4").reshape(count, 11)
    starts, lengths = entries[:, 1].astype(np.int64), entries[:, 2].astype(np.int64)
    ends = np.where(starts > 0, starts + _CONTAINER_SIZE + lengths, 0)
    outside = np.flatnonzero(ends > size)
    if outside.size:
        raise _fail(path, f"data at byte {int(starts[outside[0]])} runs past the end of the file: {truncated}")
    return int(previous)


def _from_filetime(path: Path, ticks: int, what: str) -> datetime | None:
    """A stored FILETIME as a naive datetime, exactly as stored; 0 means unknown. A value outside
    1900-2099 is left out with a warning (see the module docstring)."""
    if ticks == 0:
        return None
    when = FILETIME_EPOCH + timedelta(microseconds=ticks // 10) if 0 < ticks < _FILETIME_LIMIT else None
    if when is None or not _EARLIEST <= when <= _LATEST:
        log.warning(
            "%s: the %s is not a date between %d and %d; it is left out", path, what, EARLIEST_DATE.year, LATEST_DATE.year
        )
        return None
    return when


def _birth_date(path: Path, raw: int) -> date | None:
    """HEYEX keeps (Julian day + 14558805) * 64; a few exports hold YYYYMMDD instead. An impossible
    value is left out with a warning that does not repeat it (it identifies the patient)."""
    if raw == 0:
        return None
    found: date | None = None
    if 10_000_000 <= raw <= 99_999_999:
        try:
            found = date(raw // 10_000, raw // 100 % 100, raw % 100)
        except ValueError:
            found = None
    else:
        ordinal = raw // 64 - BIRTHDATE_JD_OFFSET - 1_721_425
        found = date.fromordinal(ordinal) if 1 <= ordinal <= date.max.toordinal() else None
    if found is None:
        log.warning("%s: the patient's birth date is not a valid date; it is left out", path)
    return found


def _first(structure: Any, kind: int) -> Any:
    """First folder of a type in an eyepy structure (patient/study/series/slice), or None."""
    folders = structure.folders.get(kind, []) if structure is not None else []
    return folders[0] if folders else None


def _images(structure: Any, image_type: int) -> list[Any]:
    return [f for f in structure.folders.get(T_IMAGE, []) if f.data.type == image_type]


def _eye(series: Any) -> str:
    for kind, offset in ((T_LATERALITY, 14), (T_PREAMBLE, 4)):
        folder = _first(series, kind)
        raw = folder.get_bytes() if folder is not None else b""
        if len(raw) > offset and raw[offset] in _EYES:
            return _EYES[raw[offset]]
    return "unknown"


def _patient(path: Path, series: Any) -> tuple[str, str, date | None]:
    """Patient id, name ("first last") and date of birth from the patient record."""
    folder = _first(series.patient, T_PATIENT)
    if folder is None:
        return "", "", None
    record = folder.data
    name = " ".join(part.strip() for part in (record.firstname, record.surname) if part.strip())
    return record.patient_id.strip(), name, _birth_date(path, record.birthdate)


def _device(series: Any) -> str:
    folder = _first(series.study, T_DEVICE)
    texts = [t.strip() for t in folder.data.text] if folder is not None else []
    return texts[0] if texts and texts[0] else DEFAULT_DEVICE


def _times(path: Path, series: Any, first_slice: Any) -> tuple[datetime | None, date | None]:
    """Acquisition time of the first B-scan, and the series' examination day."""
    meta = _first(first_slice, T_BSCANMETA).get_bytes()
    acquired = None
    if len(meta) >= 96:
        acquired = _from_filetime(path, struct.unpack_from("<Q", meta, 88)[0], "B-scan acquisition time")
    exam_folder = _first(series, T_EXAM_TIME)
    exam_raw = exam_folder.get_bytes() if exam_folder is not None else b""
    exam = _from_filetime(path, struct.unpack_from("<Q", exam_raw, 16)[0], "exam time") if len(exam_raw) >= 24 else None
    visit = exam.date() if exam else (acquired.date() if acquired else None)
    return acquired, visit


def _localizer(series: Any, slices: list[Any]) -> np.ndarray | None:
    """The series localizer; a lone B-scan may carry its own in the slice instead."""
    for structure in (series, slices[0]):
        found = _images(structure, LOCALIZER_IMAGE)
        if found:
            return np.asarray(found[0].data.data, dtype=np.float32)
    return None


def _geometry(metas: list[Any], pattern: str) -> tuple[tuple[BScanPosition, ...], Spacing]:
    """Positions in mm and the spacing they imply (the file stores no lateral spacing)."""
    positions = tuple(
        BScanPosition(
            (float(m["start_x"]) * MM_PER_DEGREE, float(m["start_y"]) * MM_PER_DEGREE),
            (float(m["end_x"]) * MM_PER_DEGREE, float(m["end_y"]) * MM_PER_DEGREE),
        )
        for m in metas
    )
    first = positions[0]
    length = math.dist(first.start_mm, first.end_mm)
    if pattern == "circle":
        length *= 2.0 * math.pi  # for circles the end point is the centre
    filled = int(metas[0]["imgSizeWidth"]) or int(metas[0]["size_x"])
    between = 0.0
    if len(positions) > 1 and pattern == "volume":
        mids = np.array([[(p.start_mm[k] + p.end_mm[k]) / 2 for k in (0, 1)] for p in positions])
        between = float(np.linalg.norm(np.diff(mids, axis=0), axis=1).mean())
    return positions, Spacing(length / filled, float(metas[0]["scale_y"]), between)


def _oct_slices(series: Any) -> list[Any]:
    """Slices that hold B-scan metadata and a B-scan image, in stored order (slice id)."""
    return [
        sl for _, sl in sorted(series.slices.items())
        if sl.folders.get(T_BSCANMETA) and _images(sl, BSCAN_IMAGE)
    ]


def _series_name(series: Any) -> str:
    ids = (series.patient.id if series.patient is not None else 0, series.study.id if series.study else 0, series.id)
    return "-".join(str(i) for i in ids)


def _check_complete(path: Path, series: Any, slices: list[Any]) -> None:
    """Refuse a series with fewer readable B-scans than it declares or holds records for (module docstring)."""
    started = sum(1 for sl in series.slices.values() if sl.folders.get(T_BSCANMETA) or _images(sl, BSCAN_IMAGE))
    try:
        declared = max((int(sl.get_meta()["n_bscans"]) for sl in slices), default=0)
    except OverflowError as exc:  # eyepy's B-scan time parser: a FILETIME beyond year 9999
        problem = f"series {_series_name(series)}: a B-scan acquisition time is beyond the calendar: the file is damaged"
        raise _fail(path, problem) from exc
    expected = max(started, declared)
    if len(slices) < expected:
        raise _fail(
            path, f"series {_series_name(series)} declares {expected} B-scans but only {len(slices)} can be read "
            "(metadata or image records are damaged or missing); the series is not read in part",
        )


def _layers(path: Path, series: Any, slices: list[Any], shape: tuple[int, int, int]) -> LayerLines | None:
    """The device's layer lines of a series (module docstring); None when it carries none."""
    n, height, width = shape
    rows: dict[str, np.ndarray] = {}
    for i, sl in enumerate(slices):
        for folder in sl.folders.get(T_LAYER, []):
            raw = folder.get_bytes()
            layer_id, declared = LAYER_RECORD.unpack_from(raw)[1::2] if len(raw) >= LAYER_RECORD.size else (0, -1)
            if declared != width or len(raw) < LAYER_RECORD.size + 4 * width:
                log.warning(
                    "%s: series %s: a layer record of B-scan %d (%d bytes, %d values declared) does not fit the "
                    "%d-pixel-wide B-scan (the record is damaged); the device's layer lines are left out and will "
                    "be estimated", path, _series_name(series), i, len(raw), declared, width,
                )
                return None
            name = HEYEX_LAYER_IDS.get(layer_id)
            if name is not None:
                values = np.frombuffer(raw, "<f4", width, len(raw) - 4 * width)
                rows.setdefault(name, np.full((n, width), np.nan, np.float32))[i] = device_rows(values, height)
    return device_layer_lines(rows)


def _series_volume(path: Path, digest: str, series: Any, slices: list[Any]) -> Volume:
    metas = [sl.get_meta() for sl in slices]
    bscans = np.stack([display_from_linear(sl.get_bscan()) for sl in slices]).astype(np.float32, copy=False)
    pattern = _PATTERNS.get(int(metas[0]["scan_pattern"])) or ("volume" if len(slices) > 1 else "line")
    positions, spacing = _geometry(metas, pattern)
    localizer = _localizer(series, slices)
    patient_id, name, birth = _patient(path, series)
    acquired, visit = _times(path, series, slices[0])
    loc_spacing = None
    if localizer is not None:
        field_mm = LOCALIZER_FIELD_DEG * MM_PER_DEGREE
        loc_spacing = (field_mm / localizer.shape[1], field_mm / localizer.shape[0])
    meta = VolumeMeta(
        source_path=str(path), source_sha256=digest, source_format="heyex-e2e",
        series_uid=_series_name(series), patient_id=patient_id, eye=_eye(series),
        visit_date=visit, acquired_at=acquired, device=_device(series), scan_pattern=pattern,
        spacing=spacing, positions=positions, localizer_spacing_mm=loc_spacing,
        birth_date=birth, patient_name=name,
    )
    return Volume(bscans=bscans, meta=meta, localizer=localizer, layers=_layers(path, series, slices, bscans.shape))


def read_e2e(path: Path) -> list[Volume]:
    """Every OCT series of a HEYEX `.e2e` file as its own Volume, in the file's series order."""
    from eyepy.io.he.e2e_reader import HeE2eReader  # heavy import (builds a 64k lookup table)

    path = Path(path)
    _check_directory(path)
    digest = source_sha256([path])
    try:
        with HeE2eReader(path) as reader:
            found = [(s, _oct_slices(s)) for s in reader.series]
            if not any(slices for _, slices in found):
                raise _fail(path, f"no OCT series with B-scans in the file ({len(found)} series found)")
            for series, slices in found:
                _check_complete(path, series, slices)
            return [_series_volume(path, digest, s, slices) for s, slices in found if slices]
    except ReadError:
        raise
    # eyepy and its construct parser raise many unrelated types on damaged content; all mean "unreadable"
    except Exception as exc:
        raise _fail(path, f"cannot parse the E2E content ({one_line(exc)})") from exc
