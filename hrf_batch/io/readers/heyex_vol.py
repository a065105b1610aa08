"""HEYEX `.vol` ("raw data export") reader for every scan pattern: volume, line, circle, radial.

The layout is the published HEYEX VOL one: a 2048-byte file header, the SLO localizer as uint8,
then per B-scan a header of ``bscan_hdr_size`` bytes followed by float32 linear reflectivity.
Reading it directly (rather than through eyepy's importer, which refuses circle scans) keeps
every pattern on one path and reads a 49×496×1024 volume in a fraction of a second.

Damaged files: the header is checked against the file size and the limits in
:mod:`hrf_batch.io.volume` before the B-scans are read, so a header that declares more than the file
holds, or more than any device writes, is refused without allocating what it declares. A file with
fewer B-scan bytes than its header declares is refused, never read in part. An impossible visit date
or exam time refuses the file (the header is damaged and the scan could not be placed on the patient's
timeline); an impossible birth date is dropped with a warning that does not repeat it. NaN or infinite
pixels refuse the file; they are checked before the display curve, which would show them as black.

Layer lines: each B-scan header declares how many segmentation lines the device stored and where they
start; each line is ``size_x`` float32 rows in pixels, float32 max where the device has no boundary.
The lines become ``Volume.layers`` (source "device") under the names of :data:`HEYEX_LAYER_IDS`. A
damaged layer block (a count or offset that does not fit the B-scan header) does not refuse the file:
the pixels are intact and the pipeline can estimate the lines itself, so the layers are dropped with a
warning that says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import struct
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from hrf_batch.errors import ReadError
from hrf_batch.io.readers.raw import file_size, read_bytes, read_bytes_at, source_sha256
from hrf_batch.io.volume import (
    LAYER_NAMES,
    BScanPosition,
    LayerLines,
    Spacing,
    Volume,
    VolumeMeta,
    check_declared_size,
    check_localizer_size,
    count_non_finite,
    display_from_linear,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

FILE_HEADER_SIZE = 2048
BSCAN_HEADER_FIXED = 256
MAGICS = (b"HSF-OCT-", b"ep-v")
HEADER_STRUCT = struct.Struct("<12s3i3d2i2di d4sQ2i16s16si24sdi24sd4i34s")
BSCAN_STRUCT = struct.Struct("<12si4d2ifI")
_PATTERNS = {1: "line", 2: "circle", 3: "volume", 4: "volume", 5: "radial"}
OLE_EPOCH = date(1899, 12, 30)
FILETIME_EPOCH = datetime(1601, 1, 1)
_OLE_MIN_DAYS = (date.min - OLE_EPOCH).days
_OLE_MAX_DAYS = (date.max - OLE_EPOCH).days
_FILETIME_MAX = (datetime.max - FILETIME_EPOCH) // timedelta(microseconds=1) * 10
_HINT = "re-export the scan from HEYEX as a raw .vol file, or remove it from the study folder"

#: HEYEX segmentation line index (its position in a `.vol` B-scan header, and the layer id of an `.e2e`
#: layer record) -> our boundary name. Only lines whose meaning matches ours are taken: ``RNFL``, ``GCL``,
#: ``IPL``, ``INL`` and ``OPL`` are the outer edge of that layer in HEYEX as here, and ``PR1`` (14, the
#: inner photoreceptor line) is the inner edge of the ellipsoid zone. ``PR2`` (15) and HEYEX's ``RPE``
#: (16) are boundaries our names do not define, and 7 and 9-13 are not retinal boundaries; they are skipped.
HEYEX_LAYER_IDS = {0: "ILM", 1: "BM", 2: "RNFL", 3: "GCL", 4: "IPL", 5: "INL", 6: "OPL", 8: "ELM", 14: "EZ"}
#: HEYEX's "no boundary in this A-scan" (float32 max); anything from here up is unknown.
NO_BOUNDARY = float(np.finfo(np.float32).max)
_NO_BOUNDARY_FROM = 1.0e38
_SEG_COUNT, _SEG_OFFSET = 6, 7  # fields of BSCAN_STRUCT: number of lines and their byte offset


@dataclass(frozen=True)
class VolHeader:
    """The fields of the 2048-byte file header that hrf-batch uses."""

    version: str
    size_x: int
    n_bscans: int
    size_y: int
    scale_x: float
    distance: float
    scale_y: float
    size_x_slo: int
    size_y_slo: int
    scale_x_slo: float
    scale_y_slo: float
    scan_position: str
    exam_time: datetime | None
    scan_pattern: int
    bscan_hdr_size: int
    scan_id: str
    patient_id: str
    dob: date | None
    visit_date: date | None

    @property
    def expected_size(self) -> int:
        slo = self.size_x_slo * self.size_y_slo
        return FILE_HEADER_SIZE + slo + self.n_bscans * (self.bscan_hdr_size + 4 * self.size_x * self.size_y)


def is_vol(head: bytes) -> bool:
    """Cheap content check used by format sniffing."""
    return head.startswith(MAGICS)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace").strip()


def ole_to_date(value: float) -> date | None:
    """HEYEX stores dates as OLE automation days since 1899-12-30; 0 means 'not set'.

    Raises ValueError for a value that is no date at all (NaN, or beyond the calendar), so the caller
    decides whether the field may be dropped or the file is refused.
    """
    if value == 0:
        return None
    if not np.isfinite(value) or not _OLE_MIN_DAYS <= value <= _OLE_MAX_DAYS:
        raise ValueError("not a calendar date")
    return OLE_EPOCH + timedelta(days=int(value))


def filetime_to_datetime(value: int) -> datetime | None:
    """Windows FILETIME (100 ns ticks since 1601-01-01); 0 means 'not set'. ValueError beyond year 9999."""
    if value == 0:
        return None
    if not 0 < value <= _FILETIME_MAX:
        raise ValueError("not a calendar time")
    return FILETIME_EPOCH + timedelta(microseconds=value // 10)


def _required_time(path: Path, what: str, parse: Callable[[], T]) -> T:
    """A visit date or exam time: an impossible value means the header is damaged, so the file is refused."""
    try:
        return parse()
    except ValueError as exc:
        raise ReadError(path, f"the {what} in the header is not a valid date (the header is damaged)", _HINT) from exc


def _optional_birth_date(path: Path, raw: float) -> date | None:
    """The birth date is never needed for the analysis: an impossible one is dropped with a warning that
    does not repeat it (it identifies the patient)."""
    try:
        return ole_to_date(raw)
    except ValueError:
        log.warning("%s: the birth date in the header is not a valid date; it is left out", path)
        return None


def parse_header(path: Path, raw: bytes, file_size: int | None = None) -> VolHeader:
    """Parse and sanity-check the file header from its first bytes; raise ReadError with the problem otherwise.

    ``raw`` needs the 2048 header bytes only; ``file_size`` (default ``len(raw)``) is what the declared
    sizes are checked against, so a damaged header is refused before the B-scans are read.
    """
    size = len(raw) if file_size is None else file_size
    if len(raw) < FILE_HEADER_SIZE:
        raise ReadError(path, f"file is truncated: {len(raw)} bytes, a HEYEX .vol header alone has {FILE_HEADER_SIZE}", _HINT)
    if not is_vol(raw):
        raise ReadError(path, "not a HEYEX .vol file (no 'HSF-OCT-' signature)", _HINT)
    f = HEADER_STRUCT.unpack_from(raw, 0)
    hdr = VolHeader(
        version=_text(f[0]), size_x=f[1], n_bscans=f[2], size_y=f[3], scale_x=f[4], distance=f[5],
        scale_y=f[6], size_x_slo=f[7], size_y_slo=f[8], scale_x_slo=f[9], scale_y_slo=f[10],
        scan_position=_text(f[13]),
        exam_time=_required_time(path, "exam time", lambda: filetime_to_datetime(f[14])),
        scan_pattern=f[15], bscan_hdr_size=f[16], scan_id=_text(f[17]), patient_id=_text(f[20]),
        dob=_optional_birth_date(path, f[21]),
        visit_date=_required_time(path, "visit date", lambda: ole_to_date(f[24])),
    )
    if hdr.n_bscans <= 0 or hdr.size_x <= 0 or hdr.size_y <= 0:
        raise ReadError(path, f"header declares {hdr.n_bscans} B-scans of {hdr.size_y}x{hdr.size_x} pixels", _HINT)
    if hdr.size_x_slo < 0 or hdr.size_y_slo < 0:
        raise ReadError(path, f"inconsistent header (localizer {hdr.size_y_slo}x{hdr.size_x_slo})", _HINT)
    slo = hdr.size_x_slo * hdr.size_y_slo
    if slo:
        check_localizer_size(path, hdr.size_y_slo, hdr.size_x_slo, hint=_HINT)
    check_declared_size(path, hdr.n_bscans, hdr.size_y, hdr.size_x, localizer_pixels=slo, hint=_HINT)
    least = FILE_HEADER_SIZE + slo + hdr.n_bscans * (BSCAN_HEADER_FIXED + 4 * hdr.size_x * hdr.size_y)
    if size < least:
        raise ReadError(
            path, f"file is truncated or its header damaged: the header declares at least {least} bytes, "
            f"the file has {size}", _HINT,
        )
    return hdr


def _with_bscan_header_size(path: Path, hdr: VolHeader, file_size: int) -> VolHeader:
    """Trust the first B-scan's own header size: some third-party writers leave the file-header
    copy at its 61440 default while writing shorter B-scan headers."""
    at = FILE_HEADER_SIZE + hdr.size_x_slo * hdr.size_y_slo + 12
    if file_size < at + 4:
        return hdr
    (own,) = struct.unpack_from("<i", read_bytes_at(path, at, 4))
    if own >= BSCAN_HEADER_FIXED and own != hdr.bscan_hdr_size:
        return dataclasses.replace(hdr, bscan_hdr_size=own)
    return hdr


def _eye(scan_position: str) -> str:
    return scan_position if scan_position in ("OD", "OS") else "unknown"


def _pattern(hdr: VolHeader) -> str:
    # Pattern 0 ("unknown") is what third-party writers leave; the B-scan count then tells.
    if hdr.scan_pattern in _PATTERNS:
        return _PATTERNS[hdr.scan_pattern]
    return "volume" if hdr.n_bscans > 1 else "line"


def _bscan_headers(raw: bytes, hdr: VolHeader) -> list[BScanPosition]:
    stride = hdr.bscan_hdr_size + 4 * hdr.size_x * hdr.size_y
    base = FILE_HEADER_SIZE + hdr.size_x_slo * hdr.size_y_slo
    positions = []
    for i in range(hdr.n_bscans):
        f = BSCAN_STRUCT.unpack_from(raw, base + i * stride)
        positions.append(BScanPosition(start_mm=(f[2], f[3]), end_mm=(f[4], f[5])))
    return positions


def device_rows(values: np.ndarray, height: int) -> np.ndarray:
    """A device's boundary rows as float32, NaN where it marks "no boundary" or gives no row of the image.

    HEYEX writes float32 max (3e38 in XML) where a line is unknown; a value that is not finite or lies
    outside 0..height is no row of this B-scan either, so it cannot place a lesion in a layer.
    """
    rows = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        unknown = ~np.isfinite(rows) | (rows >= _NO_BOUNDARY_FROM) | (rows < 0) | (rows > height)
    return np.where(unknown, np.nan, rows).astype(np.float32)


def device_layer_lines(rows: dict[str, np.ndarray]) -> LayerLines | None:
    """Device lines by name, top to bottom, without those that have no known row; None when none has one."""
    kept = {name: rows[name] for name in LAYER_NAMES if name in rows and np.isfinite(rows[name]).any()}
    return LayerLines(rows=kept, source="device") if kept else None


def _layers(path: Path, raw: bytes, hdr: VolHeader) -> LayerLines | None:
    """The segmentation lines each B-scan header carries (module docstring); None when there are none."""
    stride = hdr.bscan_hdr_size + 4 * hdr.size_x * hdr.size_y
    base = FILE_HEADER_SIZE + hdr.size_x_slo * hdr.size_y_slo
    line_bytes = 4 * hdr.size_x
    rows: dict[str, np.ndarray] = {}
    for i in range(hdr.n_bscans):
        f = BSCAN_STRUCT.unpack_from(raw, base + i * stride)
        count, offset = f[_SEG_COUNT], f[_SEG_OFFSET]
        if count == 0:
            continue
        if count < 0 or offset < BSCAN_STRUCT.size or offset + count * line_bytes > hdr.bscan_hdr_size:
            log.warning(
                "%s: B-scan %d declares %d layer lines at byte %d, which do not fit its %d-byte header (the layer "
                "block is damaged); the device's layer lines are left out and will be estimated", path, i, count,
                offset, hdr.bscan_hdr_size,
            )
            return None
        start = base + i * stride + offset
        lines = np.frombuffer(raw, "<f4", count * hdr.size_x, start).reshape(count, hdr.size_x)
        for index, name in HEYEX_LAYER_IDS.items():
            if index < count:
                rows.setdefault(name, np.full((hdr.n_bscans, hdr.size_x), np.nan, np.float32))[i] = device_rows(
                    lines[index], hdr.size_y
                )
    return device_layer_lines(rows)


def _pixels(path: Path, raw: bytes, hdr: VolHeader) -> np.ndarray:
    slo = hdr.size_x_slo * hdr.size_y_slo
    record = np.dtype([("hdr", f"V{hdr.bscan_hdr_size}"), ("data", "<f4", (hdr.size_y, hdr.size_x))])
    records = np.frombuffer(raw, dtype=record, count=hdr.n_bscans, offset=FILE_HEADER_SIZE + slo)
    # Checked before the display curve, which shows non-finite values as black "no data" pixels: a
    # volume of NaNs would otherwise read as an empty scan with 0 HRF.
    bad = count_non_finite(records["data"])
    if bad:
        raise ReadError(
            path, f"{bad} of {records['data'].size} B-scan pixels are NaN or infinite (the pixel data is damaged)", _HINT
        )
    return display_from_linear(records["data"])


def read_vol(path: Path) -> list[Volume]:
    """Read one HEYEX `.vol` file into one Volume on the 0..255 display scale, with the device's layer
    lines when the file carries them.

    The header is read and checked against the file size first, so a damaged header never makes the
    reader allocate what it declares; only then are the bytes it describes read.
    """
    path = Path(path)
    size = file_size(path)
    hdr = parse_header(path, read_bytes(path, FILE_HEADER_SIZE), size)
    hdr = _with_bscan_header_size(path, hdr, size)
    if hdr.bscan_hdr_size < BSCAN_HEADER_FIXED:
        raise ReadError(path, f"inconsistent header (B-scan header of {hdr.bscan_hdr_size} bytes)", _HINT)
    if size < hdr.expected_size:
        raise ReadError(path, f"file is truncated: {size} of {hdr.expected_size} bytes present", _HINT)
    raw = read_bytes(path, hdr.expected_size)
    if len(raw) < hdr.expected_size:
        raise ReadError(path, f"file is truncated: {len(raw)} of {hdr.expected_size} bytes present", _HINT)
    localizer = None
    if hdr.size_x_slo and hdr.size_y_slo:
        slo = np.frombuffer(raw, np.uint8, hdr.size_x_slo * hdr.size_y_slo, FILE_HEADER_SIZE)
        localizer = slo.reshape(hdr.size_y_slo, hdr.size_x_slo).astype(np.float32)
    # The hash covers the whole file; when the header describes all of it, the bytes are in memory already.
    sha = hashlib.sha256(raw).hexdigest() if size == len(raw) else source_sha256([path])
    meta = VolumeMeta(
        source_path=str(path), source_sha256=sha, source_format="heyex-vol",
        series_uid=hdr.scan_id or sha[:16], patient_id=hdr.patient_id, eye=_eye(hdr.scan_position),
        visit_date=hdr.visit_date or (hdr.exam_time.date() if hdr.exam_time else None),
        acquired_at=hdr.exam_time, device=f"Heidelberg Engineering Spectralis (HEYEX VOL {hdr.version})",
        scan_pattern=_pattern(hdr),
        spacing=Spacing(hdr.scale_x, hdr.scale_y, hdr.distance if hdr.n_bscans > 1 else 0.0),
        positions=tuple(_bscan_headers(raw, hdr)),
        localizer_spacing_mm=(hdr.scale_x_slo, hdr.scale_y_slo) if localizer is not None else None,
        birth_date=hdr.dob,
    )
    return [Volume(bscans=_pixels(path, raw, hdr), meta=meta, localizer=localizer, layers=_layers(path, raw, hdr))]
