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
"""

from __future__ import annotations

import math
import struct
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hrf_batch.errors import ReadError, one_line
from hrf_batch.io.hashing import sha256_of_files
from hrf_batch.io.volume import (
    BScanPosition,
    Spacing,
    Volume,
    VolumeMeta,
    display_from_linear,
)

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
_DIR_SIZE, _ENTRY_SIZE, _CONTAINER_SIZE = 52, 44, 60
_MAX_TICKS = (datetime(9999, 12, 31) - FILETIME_EPOCH) // timedelta(microseconds=1) * 10
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


def _from_filetime(ticks: int) -> datetime | None:
    """A stored FILETIME as a naive datetime, exactly as stored; 0 or nonsense means unknown."""
    if ticks <= 0 or ticks > _MAX_TICKS:
        return None
    return FILETIME_EPOCH + timedelta(microseconds=ticks // 10)


def _birth_date(raw: int) -> date | None:
    """HEYEX keeps (Julian day + 14558805) * 64; a few exports hold YYYYMMDD instead."""
    if 10_000_000 <= raw <= 99_999_999:
        try:
            return date(raw // 10_000, raw // 100 % 100, raw % 100)
        except ValueError:
            return None
    ordinal = raw // 64 - BIRTHDATE_JD_OFFSET - 1_721_425
    return date.fromordinal(ordinal) if 1 <= ordinal <= date.max.toordinal() and raw else None


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


def _patient(series: Any) -> tuple[str, str, date | None]:
    """Patient id, name ("first last") and date of birth from the patient record."""
    folder = _first(series.patient, T_PATIENT)
    if folder is None:
        return "", "", None
    record = folder.data
    name = " ".join(part.strip() for part in (record.firstname, record.surname) if part.strip())
    return record.patient_id.strip(), name, _birth_date(record.birthdate)


def _device(series: Any) -> str:
    folder = _first(series.study, T_DEVICE)
    texts = [t.strip() for t in folder.data.text] if folder is not None else []
    return texts[0] if texts and texts[0] else DEFAULT_DEVICE


def _times(series: Any, first_slice: Any) -> tuple[datetime | None, date | None]:
    """Acquisition time of the first B-scan, and the series' examination day."""
    meta = _first(first_slice, T_BSCANMETA).get_bytes()
    acquired = _from_filetime(struct.unpack_from("<Q", meta, 88)[0]) if len(meta) >= 96 else None
    exam_folder = _first(series, T_EXAM_TIME)
    exam_raw = exam_folder.get_bytes() if exam_folder is not None else b""
    exam = _from_filetime(struct.unpack_from("<Q", exam_raw, 16)[0]) if len(exam_raw) >= 24 else None
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


def _series_volume(path: Path, digest: str, series: Any, slices: list[Any]) -> Volume:
    metas = [sl.get_meta() for sl in slices]
    bscans = np.stack([display_from_linear(sl.get_bscan()) for sl in slices]).astype(np.float32, copy=False)
    pattern = _PATTERNS.get(int(metas[0]["scan_pattern"])) or ("volume" if len(slices) > 1 else "line")
    positions, spacing = _geometry(metas, pattern)
    localizer = _localizer(series, slices)
    patient_id, name, birth = _patient(series)
    acquired, visit = _times(series, slices[0])
    ids = (series.patient.id if series.patient is not None else 0, series.study.id if series.study else 0, series.id)
    loc_spacing = None
    if localizer is not None:
        field_mm = LOCALIZER_FIELD_DEG * MM_PER_DEGREE
        loc_spacing = (field_mm / localizer.shape[1], field_mm / localizer.shape[0])
    meta = VolumeMeta(
        source_path=str(path), source_sha256=digest, source_format="heyex-e2e",
        series_uid="-".join(str(i) for i in ids), patient_id=patient_id, eye=_eye(series),
        visit_date=visit, acquired_at=acquired, device=_device(series), scan_pattern=pattern,
        spacing=spacing, positions=positions, localizer_spacing_mm=loc_spacing,
        birth_date=birth, patient_name=name,
    )
    return Volume(bscans=bscans, meta=meta, localizer=localizer)


def read_e2e(path: Path) -> list[Volume]:
    """Every OCT series of a HEYEX `.e2e` file as its own Volume, in the file's series order."""
    from eyepy.io.he.e2e_reader import HeE2eReader  # heavy import (builds a 64k lookup table)

    path = Path(path)
    _check_directory(path)
    digest = sha256_of_files([path])
    try:
        with HeE2eReader(path) as reader:
            found = [(s, _oct_slices(s)) for s in reader.series]
            volumes = [_series_volume(path, digest, s, slices) for s, slices in found if slices]
    # eyepy and its construct parser raise many unrelated types on damaged content; all mean "unreadable"
    except Exception as exc:
        raise _fail(path, f"cannot parse the E2E content ({type(exc).__name__}: {one_line(exc)})") from exc
    if not volumes:
        raise _fail(path, f"no OCT series with B-scans in the file ({len(found)} series found)")
    return volumes
