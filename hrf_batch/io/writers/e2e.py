"""Write Volumes as one HEYEX `.e2e` file, for synthetic studies and reader tests.

An `.e2e` is a chain of directory chunks; each chunk lists entries (patient, study, series, slice,
type) that point at data containers stored right after it. We write the smallest set of entries that
independent E2E readers need to return the OCT series: patient, device, laterality, modality strings,
exam time, a localizer per series and, per B-scan, its metadata, its layers and the pixels. Pixels are
stored as HEYEX's unsigned 16-bit float (6-bit exponent, bit-reversed 10-bit mantissa) of linear
reflectivity, so reading the file back through the display curve returns the same grey levels.
A Volume's layer lines become one layer record per boundary and B-scan, under HEYEX's layer id
(boundaries without one, ``RPE``, are not written); without layers each B-scan gets the one empty
ILM record that readers expect.

The format keeps no lateral or between-B-scan spacing: readers derive both from the B-scan positions,
which are stored in degrees. When a Volume has no positions we lay out a raster that matches its
spacing, so the spacing survives a round trip.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np

from hrf_batch.errors import HrfBatchError, VolumeError
from hrf_batch.io.readers.heyex_e2e import (
    BIRTHDATE_JD_OFFSET,
    BSCAN_IMAGE,
    DEFAULT_DEVICE,
    FILETIME_EPOCH,
    LOCALIZER_FIELD_DEG,
    LOCALIZER_IMAGE,
    MM_PER_DEGREE,
    T_BSCANMETA,
    T_DEVICE,
    T_ENFACE_MODALITY,
    T_EXAM_TIME,
    T_EXAMINED_STRUCTURE,
    T_IMAGE,
    T_LATERALITY,
    T_LAYER,
    T_OCT_MODALITY,
    T_PATIENT,
    T_PREAMBLE,
    T_SCAN_PATTERN,
)
from hrf_batch.io.readers.heyex_vol import HEYEX_LAYER_IDS
from hrf_batch.io.volume import BScanPosition, Volume, linear_from_display

ENTRIES_PER_CHUNK = 512  # what HEYEX itself puts in one directory chunk
_VERSION = 100
_NO_ID = -1
_MAGIC_FILE, _MAGIC_MAIN, _MAGIC_DIR, _MAGIC_DATA = b"CMDb", b"MDbMDir", b"MDbDir", b"MDbData"
_HEAD = struct.Struct("<12sI10H")  # file version block, 36 bytes
_DIR = struct.Struct("<12sI10H4I")  # main directory and chunk headers, 52 bytes
_ENTRY = struct.Struct("<4I4iHHII")  # one directory entry, 44 bytes
_CONTAINER = struct.Struct("<12s5I4iHHII")  # header in front of each data container, 60 bytes
_BSCANMETA = struct.Struct("<3I4fI3fI2fI4I2fIQIf")  # first 104 bytes of the 428-byte B-scan metadata
_BSCANMETA_SIZE = 428
_PATTERN_CODES = {"line": 1, "circle": 2, "volume": 3, "radial": 5, "unknown": 0}
_PATTERN_TEXT = {
    "line": "OCT B-Scan", "circle": "OCT Circle Scan", "volume": "OCT ART Volume",
    "radial": "OCT Star Scan", "unknown": "OCT",
}
_EYE_CODES = {"OD": b"R", "OS": b"L", "unknown": b"\0"}
_NO_LAYER = np.float32(np.finfo(np.float32).max)  # HEYEX's "no boundary here"
_LAYER_IDS = {name: index for index, name in HEYEX_LAYER_IDS.items()}
_PLACEHOLDER_LOCALIZER = (64, 64, 128)  # height, width, grey level


@dataclass(frozen=True)
class _Entry:
    """One directory entry with its data: ids say which patient/study/series/slice it belongs to."""

    ids: tuple[int, int, int, int]
    kind: int
    payload: bytes
    ind: int = 0


def _bit_reverse_table() -> np.ndarray:
    values = np.arange(1024, dtype=np.uint16)
    out = np.zeros(1024, dtype=np.uint16)
    for bit in range(10):
        out |= ((values >> bit) & 1) << (9 - bit)
    return out


_REVERSE10 = _bit_reverse_table()


def e2e_code_from_linear(linear: np.ndarray) -> np.ndarray:
    """Encode linear reflectivity as the E2E unsigned 16-bit float (nearest mantissa, little-endian).

    value = (1 + m / 1024) * 2 ** (e - 63), with e in the top 6 bits and m bit-reversed in the low 10.
    """
    x = np.asarray(linear, dtype=np.float64)
    positive = x > 0  # also False for NaN
    frac, exp2 = np.frexp(np.where(positive, x, 1.0))  # x = frac * 2**exp2 with frac in [0.5, 1)
    biased = exp2.astype(np.int64) - 1 + 63
    mantissa = np.rint((2.0 * frac - 1.0) * 1024.0).astype(np.int64)
    carry = mantissa == 1024
    mantissa[carry] = 0
    biased[carry] += 1
    too_small, too_large = ~positive | (biased < 0), biased > 63
    biased = np.where(too_small, 0, np.minimum(biased, 63))
    mantissa = np.where(too_small, 0, np.where(too_large, 1023, mantissa))
    return ((biased.astype(np.uint16) << 10) | _REVERSE10[mantissa]).astype("<u2")


def _filetime(value: datetime | None) -> int:
    """Windows FILETIME (100 ns ticks since 1601); aware datetimes keep their wall-clock time."""
    if value is None:
        return 0
    delta = value.replace(tzinfo=None) - FILETIME_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10_000_000 + delta.microseconds * 10


def _birthdate(value: date | None) -> int:
    """Julian day number, shifted and times 64, as HEYEX keeps the date of birth."""
    return 0 if value is None else (value.toordinal() + 1_721_425 + BIRTHDATE_JD_OFFSET) * 64


def _latin1(value: str, size: int, what: str) -> bytes:
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise VolumeError(f"{what} {value!r} cannot be stored in an .e2e file (Latin-1 text only)") from exc
    if len(raw) >= size:
        raise VolumeError(f"{what} {value!r} does not fit an .e2e patient record ({size - 1} characters at most)")
    return raw.ljust(size, b"\0")


def _strings(*texts: str) -> bytes:
    """The (count, size, UTF-16 strings) record HEYEX uses for names of devices and modalities."""
    return struct.pack("<II", len(texts), 256) + b"".join(
        t.encode("utf-16-le")[:254].ljust(256, b"\0") for t in texts
    )


def _patient_record(volume: Volume) -> bytes:
    m = volume.meta
    if "^" in m.patient_name:
        surname, _, first = m.patient_name.partition("^")
    else:
        first, _, surname = m.patient_name.strip().rpartition(" ")
    return (
        _latin1(first.strip(), 31, "first name") + _latin1(surname.strip(), 51, "surname") + bytes(15)
        + struct.pack("<I", _birthdate(m.birth_date)) + b"\0"
        + _latin1(m.patient_id, 25, "patient id") + bytes(4)
    )


def _positions(volume: Volume) -> tuple[BScanPosition, ...]:
    """The volume's B-scan positions, or a centred raster (or circle) that matches its spacing."""
    m, (n, width) = volume.meta, (volume.n_bscans, volume.bscan_shape[1])
    if m.positions:
        return m.positions
    centre = LOCALIZER_FIELD_DEG * MM_PER_DEGREE / 2.0
    length, step = m.spacing.lateral_mm * width, m.spacing.between_bscans_mm
    if m.scan_pattern == "circle":
        radius = length / (2.0 * math.pi)
        return tuple(BScanPosition((centre + radius, centre), (centre, centre)) for _ in range(n))
    out = []
    for i in range(n):
        y = centre + (n - 1) / 2.0 * step - i * step  # HEYEX scans volumes from bottom to top
        out.append(BScanPosition((centre - length / 2.0, y), (centre + length / 2.0, y)))
    return tuple(out)


def _image(kind: int, pixels: bytes, height: int, width: int) -> bytes:
    return struct.pack("<5I", len(pixels), kind, height * width, height, width) + pixels


def _localizer(volume: Volume) -> bytes:
    if volume.localizer is None:
        h, w, grey = _PLACEHOLDER_LOCALIZER
        return _image(LOCALIZER_IMAGE, np.full((h, w), grey, np.uint8).tobytes(), h, w)
    loc = np.clip(np.rint(volume.localizer), 0, 255).astype(np.uint8)
    return _image(LOCALIZER_IMAGE, loc.tobytes(), *loc.shape)


def _bscan_meta(volume: Volume, index: int, position: BScanPosition) -> bytes:
    m, (height, width) = volume.meta, volume.bscan_shape
    sx, sy = (c / MM_PER_DEGREE for c in position.start_mm)  # the file keeps degrees
    ex, ey = (c / MM_PER_DEGREE for c in position.end_mm)
    head = _BSCANMETA.pack(
        0, height, width, sx, sy, ex, ey, 0, 0.0, m.spacing.axial_mm, 0.0, 0, 0.0, 0.0, 0,
        width, volume.n_bscans, index, _PATTERN_CODES[m.scan_pattern], (sx + ex) / 2, (sy + ey) / 2, 0,
        _filetime(m.acquired_at), 1, 0.0,
    )
    return head.ljust(_BSCANMETA_SIZE, b"\0")


def _layer_record(layer_id: int, rows: np.ndarray) -> bytes:
    """One layer record: ids, width, a zero "edited by hand" flag, then the rows (float32 max where unknown)."""
    values = np.where(np.isfinite(rows), rows, _NO_LAYER).astype("<f4")
    return struct.pack("<5I", 0, layer_id, 0, len(values), 0) + values.tobytes()


def _layers(volume: Volume, index: int) -> list[bytes]:
    """The layer records of B-scan ``index``: one per boundary HEYEX has an id for, or, for a volume
    without layers, one empty ILM record (readers expect at least one per B-scan)."""
    layers = volume.layers
    names = [name for name in layers.names if name in _LAYER_IDS] if layers is not None else []
    if not names:
        return [_layer_record(_LAYER_IDS["ILM"], np.full(volume.bscan_shape[1], np.nan, np.float32))]
    return [_layer_record(_LAYER_IDS[name], np.asarray(layers.rows[name][index], np.float32)) for name in names]


def _series_entries(volume: Volume, ids: tuple[int, int, int]) -> list[_Entry]:
    """Series-level records, then per B-scan: metadata, its layers, the pixels."""
    m, (height, width) = volume.meta, volume.bscan_shape
    series = (*ids, _NO_ID)
    eye = _EYE_CODES[m.eye]
    exam = m.acquired_at or (datetime.combine(m.visit_date, datetime.min.time()) if m.visit_date else None)
    entries = [
        _Entry(series, T_LATERALITY, bytes(14) + eye + bytes(12)),
        _Entry(series, T_PREAMBLE, bytes(4) + eye + bytes(91)),
        _Entry(series, T_EXAMINED_STRUCTURE, _strings("Retina")),
        _Entry(series, T_SCAN_PATTERN, _strings(_PATTERN_TEXT[m.scan_pattern], "")),
        _Entry(series, T_ENFACE_MODALITY, _strings("Infra-Red", "IR")),
        _Entry(series, T_OCT_MODALITY, _strings("OCT", "OCT")),
        _Entry(series, T_EXAM_TIME, bytes(16) + struct.pack("<Q", _filetime(exam))),
        _Entry(series, T_IMAGE, _localizer(volume)),
    ]
    codes = e2e_code_from_linear(linear_from_display(volume.bscans))
    positions = _positions(volume)
    for i in range(volume.n_bscans):
        slice_ids = (*ids, 2 if volume.n_bscans == 1 else 2 * i)  # HEYEX numbers a lone B-scan 2
        entries += [
            _Entry(slice_ids, T_BSCANMETA, _bscan_meta(volume, i, positions[i])),
            *(_Entry(slice_ids, T_LAYER, record) for record in _layers(volume, i)),
            _Entry(slice_ids, T_IMAGE, _image(BSCAN_IMAGE, codes[i].tobytes(), height, width), ind=1),
        ]
    return entries


def _all_entries(volumes: Sequence[Volume]) -> list[_Entry]:
    """Patients by patient id, studies by visit day, one series per Volume in the given order."""
    patients: dict[str, int] = {}
    studies: dict[tuple[int, date | None], int] = {}
    entries: list[_Entry] = []
    for series_id, volume in enumerate(volumes, start=1):
        m = volume.meta
        if m.patient_id not in patients:
            patients[m.patient_id] = len(patients) + 1
            entries.append(_Entry((patients[m.patient_id], _NO_ID, _NO_ID, _NO_ID), T_PATIENT, _patient_record(volume)))
        patient = patients[m.patient_id]
        day = m.visit_date or (m.acquired_at.date() if m.acquired_at else None)
        if (patient, day) not in studies:
            studies[(patient, day)] = study = len(studies) + 1
            device = _strings(m.device or DEFAULT_DEVICE, "", "")
            entries.append(_Entry((patient, study, _NO_ID, _NO_ID), T_DEVICE, device))
        entries += _series_entries(volume, (patient, studies[(patient, day)], series_id))
    return entries


def _chunk(entries: Sequence[_Entry], at: int, prev: int) -> bytes:
    """One directory chunk at file offset ``at``: header, entry list, then the data containers."""
    out = bytearray(_DIR.pack(_MAGIC_DIR, _VERSION, *[0xFFFF] * 10, len(entries), at, prev, 0))
    start = at + _DIR.size + _ENTRY.size * len(entries)
    data = bytearray()
    for i, e in enumerate(entries):
        entry_pos = at + _DIR.size + _ENTRY.size * i
        out += _ENTRY.pack(entry_pos, start, len(e.payload), 0, *e.ids, e.ind, 0, e.kind, 0)
        data += _CONTAINER.pack(_MAGIC_DATA, 0, entry_pos, start, len(e.payload), 0, *e.ids, e.ind, 0, e.kind, 0)
        data += e.payload
        start += _CONTAINER.size + len(e.payload)
    return bytes(out + data)


def write_e2e(volumes: Sequence[Volume], path: Path, *, entries_per_chunk: int = ENTRIES_PER_CHUNK) -> Path:
    """Write every Volume as its own OCT series in one `.e2e` file at ``path`` and return the path.

    Chunks follow each other back to back; each points at the one before (the first at 0) and the
    file header points at the last, which is how readers walk the directory.
    """
    path = Path(path)
    if not volumes:
        raise VolumeError("write_e2e needs at least one volume")
    if entries_per_chunk < 1:
        raise VolumeError(f"entries_per_chunk must be positive, got {entries_per_chunk}")
    entries = _all_entries(volumes)
    body, prev = bytearray(), 0
    offset = _HEAD.size + _DIR.size
    for first in range(0, len(entries), entries_per_chunk):
        chunk = _chunk(entries[first:first + entries_per_chunk], offset + len(body), prev)
        prev = offset + len(body)
        body += chunk
    head = _HEAD.pack(_MAGIC_FILE, _VERSION, *[0xFFFF] * 9, 0)
    main = _DIR.pack(_MAGIC_MAIN, _VERSION, *[0xFFFF] * 10, ENTRIES_PER_CHUNK, prev, 0, 0)
    try:
        path.write_bytes(head + main + bytes(body))
    except OSError as exc:
        raise HrfBatchError(f"cannot write {path}: {exc.strerror}", "check the folder exists and is writable") from exc
    return path
