"""Topcon `.fds` reader (3D OCT-1000 / -2000 exports, e.g. the UK Biobank OCT files).

Layout (little endian), reverse engineered by the community and checked against the real fixture:
a 15-byte header ``b"FOCT" b"FDS" u32 major u32 minor``, then named chunks
``u8 name_len, name ("@..."), u32 size, data[size]`` up to a zero name length or the end of the file.

Pixels come from ``@IMG_SCAN_03``: ``u8 scan_mode, u32 width, u32 height, u32 bits_per_pixel,
u32 n_slices, u8 format, u32 size`` followed by ``size`` bytes of uint16. ``width`` is the number
of A-scans per B-scan, ``height`` the number of depth samples and ``n_slices`` the number of
B-scans; the samples run fastest along ``width``, then ``height``, then slice, so the data is a
C-order ``(n_slices, height, width)`` array: B-scan rows are depth and columns are A-scans. Rows
keep the stored order, row 0 taken as the vitreous side (the fixture's 3 depth rows cannot confirm
it; check on a full-size file). B-scans keep the file's order. The fundus photo (``@IMG_OBS``,
raw 24-bit BGR, stored row order) becomes a BT.601 grey localizer.

Pixel scale: the uint16 samples are mapped linearly from the full 16-bit range to the 0..255
display scale (``value * 255 / 65535``; only 16-bit samples are accepted). A fixed map, rather
than a per-volume stretch, treats every file alike and can be inverted exactly, so intensities stay
comparable across a study; the contrast is whatever the device wrote (the fixture spans
10819..18857, i.e. 42.1..73.4).

Spacing follows ``@PARAM_SCAN_04`` (or ``_02``, whose layout no file here confirms): scan width and height in mm and the axial
resolution in µm. Lateral spacing is width_mm / A-scans and the B-scan distance is
height_mm / B-scans (the sample-size convention HEYEX also uses), only for raster volumes.
The minimised test fixture keeps 6x6 mm over a 2x4 grid of A-scans x B-scans, so its 3 mm / 1.5 mm
follow the header, not the anatomy.

Damaged files: the chunk list is walked with seeks, each chunk checked to lie inside the file, and the
``@IMG_SCAN_03`` header is checked (sizes consistent, within the limits of :mod:`hrf_batch.io.volume`)
before its pixels are read, so a damaged header is refused without reading or allocating what it
declares. Only the chunks used below are read. An impossible acquisition date refuses the file; an
impossible birth date is left out with a warning that does not repeat it.

Not read: per-B-scan positions. The file has none; ``@EFFECTIVE_SCAN_RANGE`` gives the scan's
bounding box on the full-size fundus, but neither the B-scan order along it nor the fundus pixel
size is recorded, so ``positions`` stays empty and ``localizer_spacing_mm`` is None.
"""

from __future__ import annotations

import logging
import struct
from datetime import date, datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hrf_batch.errors import ReadError
from hrf_batch.io.readers.raw import file_size, source_sha256
from hrf_batch.io.volume import Spacing, Volume, VolumeMeta, check_declared_size, check_localizer_size

log = logging.getLogger(__name__)

MAGIC = b"FOCTFDS"
FILE_HEADER = struct.Struct("<4s3sII")
SCAN_HEADER = struct.Struct("<BIIIIBI")  # @IMG_SCAN_03
IMAGE_HEADER = struct.Struct("<IIIIBI")  # @IMG_OBS
SCAN_CHUNK = "@IMG_SCAN_03"
# Offset of the three f64 (width mm, height mm, axial µm) in each scan-parameter chunk.
PARAM_SCAN_OFFSETS = {"@PARAM_SCAN_04": 12, "@PARAM_SCAN_02": 21}
# Offsets of (laterality byte, six u16 date-time fields) in each capture chunk.
CAPTURE_OFFSETS = {"@CAPTURE_INFO_02": (0, 106), "@CAPTURE_INFO": (0, 1)}
HW_CHUNKS = ("@HW_INFO_03", "@HW_INFO_02", "@HW_INFO_01")
PATTERNS = {2: "volume", 3: "radial"}
EYES = {0: "OD", 1: "OS"}
RAW_MAX = 2**16 - 1
PATIENT_CHUNK = "@PATIENT_INFO_02"
FUNDUS_CHUNK = "@IMG_OBS"
# The chunks this reader uses; others (thumbnails, segmentations, ...) are never read.
USED_CHUNKS = (*PARAM_SCAN_OFFSETS, *CAPTURE_OFFSETS, PATIENT_CHUNK, *HW_CHUNKS, FUNDUS_CHUNK)
_HINT = "the file is damaged or not a Topcon .fds export: export it again from the Topcon software or remove it"


def is_fds(head: bytes) -> bool:
    """Cheap content check used by format sniffing: ``FOCT`` followed by ``FDS``."""
    return head.startswith(MAGIC)


def _text(raw: bytes | memoryview) -> str:
    """Topcon strings are fixed-width, NUL-padded ISO 8859-1."""
    return bytes(raw).split(b"\0", 1)[0].decode("latin-1").strip()


def _need(path: Path, chunks: dict[str, memoryview], name: str, size: int) -> memoryview:
    """The chunk's data, after checking it holds at least ``size`` bytes."""
    data = chunks[name]
    if len(data) < size:
        problem = f"sizes inconsistent: chunk {name} has {len(data)} bytes, needs at least {size}"
        raise ReadError(path, problem, _HINT)
    return data


def _index(path: Path, fh: BinaryIO, size: int) -> dict[str, tuple[int, int]]:
    """Walk the chunk list with seeks: name -> (data offset, length). Every chunk must lie wholly inside
    the file; the first occurrence of a name wins. Nothing but names and sizes is read."""
    if size == 0:
        raise ReadError(path, "file is empty (0 bytes)", _HINT)
    head = fh.read(FILE_HEADER.size)
    if len(head) < FILE_HEADER.size:
        problem = f"file is truncated: {len(head)} bytes, the .fds header alone has {FILE_HEADER.size}"
        raise ReadError(path, problem, _HINT)
    if not is_fds(head):
        raise ReadError(path, "not a Topcon .fds file (no 'FOCTFDS' signature)", _HINT)
    index: dict[str, tuple[int, int]] = {}
    pos = FILE_HEADER.size
    while pos < size:
        fh.seek(pos)
        first = fh.read(1)
        if not first or first[0] == 0:
            break
        name_len = first[0]
        rest = fh.read(name_len + 4)
        if len(rest) < name_len + 4:
            raise ReadError(path, f"file is truncated inside the chunk header at byte {pos}", _HINT)
        name_bytes = rest[:name_len]
        if not (name_bytes.startswith(b"@") and all(0x21 <= b <= 0x7E for b in name_bytes)):
            raise ReadError(path, f"malformed chunk name at byte {pos}: {name_bytes[:16]!r}", _HINT)
        name = name_bytes.decode("ascii")
        (length,) = struct.unpack_from("<I", rest, name_len)
        start = pos + 1 + name_len + 4
        if start + length > size:
            raise ReadError(
                path, f"file is truncated: chunk {name} declares {length} bytes, {size - start} remain", _HINT
            )
        index.setdefault(name, (start, length))
        pos = start + length
    return index


def _read_chunk(path: Path, fh: BinaryIO, at: int, length: int) -> memoryview:
    fh.seek(at)
    data = fh.read(length)
    if len(data) < length:  # the file shrank since it was indexed
        raise ReadError(path, f"file is truncated: {len(data)} of {length} bytes at byte {at}", _HINT)
    return memoryview(data)


def _scan(path: Path, fh: BinaryIO, index: dict[str, tuple[int, int]]) -> tuple[int, np.ndarray]:
    """Scan mode and the raw uint16 B-scans ``(n, depth, A-scans)`` from ``@IMG_SCAN_03``; the header
    is checked before the pixels are read."""
    if SCAN_CHUNK not in index:
        found = sorted(n for n in index if n.startswith("@IMG_SCAN")) or ["none"]
        raise ReadError(
            path, f"missing {SCAN_CHUNK} chunk (OCT pixels); image-scan chunks found: {', '.join(found)}", _HINT
        )
    at, length = index[SCAN_CHUNK]
    if length < SCAN_HEADER.size:
        problem = f"sizes inconsistent: chunk {SCAN_CHUNK} has {length} bytes, needs at least {SCAN_HEADER.size}"
        raise ReadError(path, problem, _HINT)
    mode, width, height, bits, n, _fmt, size = SCAN_HEADER.unpack(_read_chunk(path, fh, at, SCAN_HEADER.size))
    if min(width, height, n) == 0:
        raise ReadError(path, f"sizes inconsistent: {SCAN_CHUNK} declares {n} B-scans of {height}x{width}", _HINT)
    if bits != 16:
        raise ReadError(path, f"unsupported OCT bit depth {bits} in {SCAN_CHUNK} (only 16-bit is known)", _HINT)
    expected = width * height * n * 2
    if size != expected:
        raise ReadError(
            path, f"sizes inconsistent: {SCAN_CHUNK} declares {size} bytes for {n}x{height}x{width} 16-bit pixels "
            f"({expected} bytes)", _HINT,
        )
    if length < SCAN_HEADER.size + size:
        problem = f"sizes inconsistent: chunk {SCAN_CHUNK} has {length} bytes, needs at least {SCAN_HEADER.size + size}"
        raise ReadError(path, problem, _HINT)
    check_declared_size(path, n, height, width, hint=_HINT)
    data = _read_chunk(path, fh, at + SCAN_HEADER.size, size)
    pixels = np.frombuffer(data, dtype="<u2", count=width * height * n)
    return mode, pixels.reshape(n, height, width)


def _pattern(mode: int, n: int) -> str:
    """Scan mode 2 is a raster volume, 3 radial; other modes (cross, 5- or 7-line) have no raster order."""
    return "line" if n == 1 else PATTERNS.get(mode, "unknown")


def _spacing(path: Path, chunks: dict[str, memoryview], shape: tuple[int, int, int], pattern: str) -> Spacing:
    """Spacing in mm from the scan-parameter chunk (see the module docstring for the convention)."""
    name = next((n for n in PARAM_SCAN_OFFSETS if n in chunks), None)
    if name is None:
        problem = "missing @PARAM_SCAN_04/@PARAM_SCAN_02 chunk (scan size), so the pixel spacing is unknown"
        raise ReadError(path, problem, _HINT)
    at = PARAM_SCAN_OFFSETS[name]
    width_mm, height_mm, axial_um = struct.unpack_from("<3d", _need(path, chunks, name, at + 24), at)
    if not (np.isfinite([width_mm, height_mm, axial_um]).all() and width_mm > 0 and axial_um > 0 and height_mm >= 0):
        raise ReadError(
            path, f"implausible scan size in {name}: {width_mm} x {height_mm} mm, {axial_um} µm axial", _HINT
        )
    n, _depth, n_ascans = shape
    between = height_mm / n if pattern == "volume" else 0.0
    return Spacing(lateral_mm=width_mm / n_ascans, axial_mm=axial_um / 1000.0, between_bscans_mm=between)


def _datetime(path: Path, fields: tuple[int, ...], what: str) -> datetime | None:
    """(year, month, day, hour, minute, second); all zero means 'not recorded'."""
    if not any(fields):
        return None
    try:
        return datetime(*fields)
    except ValueError as exc:
        raise ReadError(path, f"invalid {what} {fields} in the file", _HINT) from exc


def _capture(path: Path, chunks: dict[str, memoryview]) -> tuple[str, datetime | None]:
    """Eye (laterality 0 = right, 1 = left) and acquisition time."""
    name = next((n for n in CAPTURE_OFFSETS if n in chunks), None)
    if name is None:
        return "unknown", None
    eye_at, date_at = CAPTURE_OFFSETS[name]
    data = _need(path, chunks, name, date_at + 12)
    fields = struct.unpack_from("<6H", data, date_at)
    return EYES.get(data[eye_at], "unknown"), _datetime(path, fields, "acquisition date")


def _patient(path: Path, chunks: dict[str, memoryview]) -> tuple[str, str, date | None]:
    """Patient id, name ("given surname") and birth date from ``@PATIENT_INFO_02``. An impossible birth
    date is left out with a warning that does not repeat it (it identifies the patient)."""
    name = PATIENT_CHUNK
    if name not in chunks:
        return "", "", None
    data = _need(path, chunks, name, 111)
    full_name = " ".join(part for part in (_text(data[32:64]), _text(data[64:96])) if part)
    year, month, day = struct.unpack_from("<3H", data, 105)
    born = None
    if year or month or day:
        try:
            born = date(year, month, day)
        except ValueError:
            log.warning("%s: the patient's birth date is not a valid date; it is left out", path)
    return _text(data[:32]), full_name, born


def _device(chunks: dict[str, memoryview]) -> str:
    """The maker plus the model name from the hardware-info chunk, when there is one."""
    name = next((n for n in HW_CHUNKS if n in chunks and len(chunks[n]) >= 16), None)
    model = _text(chunks[name][:16]) if name else ""
    return f"Topcon {model}" if model else "Topcon"


def _fundus(path: Path, chunks: dict[str, memoryview]) -> np.ndarray | None:
    """The fundus photo from ``@IMG_OBS`` as float32 grey 0..255 (BT.601 luma of the BGR pixels)."""
    name = FUNDUS_CHUNK
    if name not in chunks:
        return None
    data = _need(path, chunks, name, IMAGE_HEADER.size)
    width, height, bits, _slices, _fmt, size = IMAGE_HEADER.unpack_from(data, 0)
    _need(path, chunks, name, IMAGE_HEADER.size + size)
    if width * height:
        try:
            check_localizer_size(path, height, width, hint=_HINT)
        except ReadError as exc:  # the OCT scan is still usable without its fundus photo
            log.warning("fundus image not used as a localizer: %s", exc)
            return None
    channels = {24: 3, 8: 1}.get(bits)
    if channels is None or size != width * height * channels or width * height == 0:
        log.warning("%s: fundus image in %s not decoded (%d-bit, %dx%d, %d bytes); no localizer",
                    path, name, bits, width, height, size)
        return None
    pixels = np.frombuffer(data, np.uint8, size, IMAGE_HEADER.size).reshape(height, width, channels)
    if channels == 1:
        return pixels[:, :, 0].astype(np.float32)
    luma_bgr = np.array([0.114, 0.587, 0.299], dtype=np.float32)
    return (pixels.astype(np.float32) @ luma_bgr).astype(np.float32)


def read_fds(path: Path) -> list[Volume]:
    """Read one Topcon `.fds` file into one Volume (its OCT scan) on the 0..255 display scale."""
    path = Path(path)
    size = file_size(path)
    try:
        with open(path, "rb") as fh:
            index = _index(path, fh, size)
            mode, pixels = _scan(path, fh, index)
            chunks = {name: _read_chunk(path, fh, *index[name]) for name in USED_CHUNKS if name in index}
    except OSError as exc:
        raise ReadError.unreadable(path, exc) from exc
    pattern = _pattern(mode, pixels.shape[0])
    eye, acquired = _capture(path, chunks)
    patient_id, patient_name, born = _patient(path, chunks)
    sha = source_sha256([path])
    meta = VolumeMeta(
        source_path=str(path), source_sha256=sha, source_format="topcon-fds", series_uid=sha[:16],
        patient_id=patient_id, eye=eye, visit_date=acquired.date() if acquired else None, acquired_at=acquired,
        device=_device(chunks), scan_pattern=pattern, spacing=_spacing(path, chunks, pixels.shape, pattern),
        birth_date=born, patient_name=patient_name,
    )
    bscans = pixels.astype(np.float32) * np.float32(255.0 / RAW_MAX)
    return [Volume(bscans=bscans, meta=meta, localizer=_fundus(path, chunks))]
