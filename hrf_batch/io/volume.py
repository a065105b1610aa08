"""The one type every reader returns and every later stage consumes.

Pixel scale: every B-scan is float32 on the 8-bit *display* scale 0..255 that HEYEX and DICOM
exports use. HEYEX `.vol` and `.e2e` files store linear reflectivity; readers map it through
HEYEX's display curve ``t = (ln(x + 2.44e-4) + 8.3) / 8.285`` (clipped to 0..1, times 255), so one
model serves every format. B-scans keep the order in which the file stores them; index 0 is the
first B-scan of the file, and ``positions[i]`` says where B-scan ``i`` lies on the localizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import unicodedata
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from hrf_batch.errors import ReadError, VolumeError

log = logging.getLogger(__name__)

EYES = ("OD", "OS", "unknown")
SCAN_PATTERNS = ("volume", "line", "circle", "radial", "unknown")
FORMATS = ("heyex-vol", "heyex-e2e", "heyex-xml", "dicom-oct", "topcon-fds")

# What a file may declare before anything is allocated or decoded. Damaged headers claim sizes such as
# 65535 x 65535 x 100000 DICOM frames or 12000 x 12000 TIFFs, which would exhaust memory long before any
# other check runs. The clinical exports we know of stay below 1600 pixels per B-scan side and 1024
# B-scans per volume, and localizers below about 4100 pixels per side; the limits leave about twice that
# room for research devices. There is no lower limit beyond "not empty": small B-scans cannot exhaust
# memory, and the real minimised Topcon fixture has B-scans of 3 x 2 pixels.
MAX_BSCAN_SIDE = 4096
MAX_BSCANS = 2048
MAX_LOCALIZER_SIDE = 8192
# Bytes of one volume as the readers return it (float32 B-scans plus the localizer): 4 GiB is e.g. 1024
# B-scans of 1024 x 1024 pixels, while a 49 x 496 x 1024 Spectralis volume takes under 100 MiB. A header
# that needs more is refused before reading, so one bad file cannot take the memory the study needs.
MAX_VOLUME_BYTES = 4 * 2**30
# Any examination or birth date outside this range is a damaged field, while device clocks that were
# reset (1970, 2000) stay inside it and are kept.
EARLIEST_DATE = date(1900, 1, 1)
LATEST_DATE = date(2099, 12, 31)
# Patient ids as stored: at most 64 characters (the DICOM LO limit), so every backend and every export
# takes them; an id that had to be cut or cleaned keeps a hash of the original, so two never merge.
PATIENT_ID_MAX = 64
PATIENT_ID_HASH_HEX = 10
UNKNOWN_PATIENT_PREFIX = "unknown-"
# control and format characters, lone surrogates (undecodable bytes) and line/paragraph separators:
# NUL cannot be stored in PostgreSQL, and the others break one-line output or hide characters
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_DAMAGED_HINT = "the file is damaged: export the scan again from the device software, or remove it from the study folder"


@dataclass(frozen=True)
class Spacing:
    """Pixel spacing in millimetres; ``between_bscans_mm`` is 0 for a single B-scan."""

    lateral_mm: float
    axial_mm: float
    between_bscans_mm: float = 0.0


@dataclass(frozen=True)
class BScanPosition:
    """Start and end of one B-scan on the localizer, as (x, y) in mm from its top-left corner.

    For circle scans, ``end_mm`` is the circle's centre, as in the HEYEX convention.
    """

    start_mm: tuple[float, float]
    end_mm: tuple[float, float]


@dataclass(frozen=True)
class VolumeMeta:
    """Typed metadata of one OCT volume (one series of B-scans)."""

    source_path: str
    source_sha256: str
    source_format: str
    series_uid: str
    patient_id: str
    eye: str
    visit_date: date | None
    acquired_at: datetime | None
    device: str
    scan_pattern: str
    spacing: Spacing
    positions: tuple[BScanPosition, ...] = ()
    localizer_spacing_mm: tuple[float, float] | None = None  # (x, y) mm per localizer pixel
    birth_date: date | None = None
    patient_name: str = ""

    def __post_init__(self) -> None:
        if self.eye not in EYES:
            raise VolumeError(f"eye must be one of {EYES}, got {self.eye!r}")
        if self.scan_pattern not in SCAN_PATTERNS:
            raise VolumeError(f"scan_pattern must be one of {SCAN_PATTERNS}, got {self.scan_pattern!r}")
        if self.source_format not in FORMATS:
            raise VolumeError(f"source_format must be one of {FORMATS}, got {self.source_format!r}")


#: Retinal layer boundaries by name, top to bottom. Each is a row (pixels from the top of the B-scan)
#: per A-scan. Every name but ILM, ELM, EZ and BM is the *outer* edge of that layer, so ``INL`` is the
#: INL/OPL boundary (inner/outer retina) and ``OPL`` the OPL/ONL boundary; ``ELM`` is the external
#: limiting membrane, ``EZ`` the inner edge of the ellipsoid zone, ``RPE`` the inner edge of the RPE
#: band and ``BM`` Bruch's membrane. The same keys are used by the synthetic generators.
LAYER_NAMES = ("ILM", "RNFL", "GCL", "IPL", "INL", "OPL", "ELM", "EZ", "RPE", "BM")
#: Where a volume's layer lines came from: the device's own segmentation stored in the export, our
#: estimate from the pixels, or the synthetic generator's truth.
LAYER_SOURCES = ("device", "estimated", "ground-truth")


@dataclass(frozen=True, eq=False)
class LayerLines:
    """Layer boundaries of a whole volume: ``rows[name]`` is float32 ``(n_bscans, width)``, the row of
    that boundary in each A-scan, NaN where it is unknown (outside the device's segmented range, or
    where an estimate was not confident)."""

    rows: dict[str, np.ndarray]
    source: str
    # names of a "device" set that the estimate added because the export lacked them (gaps in the
    # device's own ILM and BM are filled by the estimate too, without being listed here)
    estimated: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.source not in LAYER_SOURCES:
            raise VolumeError(f"layer source must be one of {LAYER_SOURCES}, got {self.source!r}")
        if not set(self.estimated) <= set(self.rows):
            raise VolumeError(f"estimated layer names {sorted(set(self.estimated) - set(self.rows))} have no rows")
        unknown = sorted(set(self.rows) - set(LAYER_NAMES))
        if unknown:
            raise VolumeError(f"unknown layer boundaries {unknown}; known are {LAYER_NAMES}")
        shapes = {np.shape(v) for v in self.rows.values()}
        if len(shapes) > 1 or any(len(s) != 2 for s in shapes):
            raise VolumeError(f"layer boundaries must all be (n_bscans, width) arrays, got shapes {sorted(shapes)}")

    def get(self, name: str) -> np.ndarray | None:
        """The boundary's rows, or None when this volume does not have it."""
        return self.rows.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        """The boundaries present, top to bottom."""
        return tuple(n for n in LAYER_NAMES if n in self.rows)


@dataclass(frozen=True, eq=False)
class Volume:
    """B-scans ``(n, H, W)`` float32 on the 0..255 display scale, metadata, optional localizer, and
    the layer lines the export carried (``None`` when it carried none)."""

    bscans: np.ndarray
    meta: VolumeMeta
    localizer: np.ndarray | None = field(default=None)
    layers: LayerLines | None = field(default=None)

    def __post_init__(self) -> None:
        b = self.bscans
        if not isinstance(b, np.ndarray) or b.ndim != 3 or b.dtype != np.float32:
            raise VolumeError(
                "bscans must be a float32 array of shape (n, H, W), got "
                f"{getattr(b, 'dtype', type(b))} {getattr(b, 'shape', '')}"
            )
        if b.shape[0] == 0:
            raise VolumeError(f"{self.meta.source_path}: volume has no B-scans")
        n_pos = len(self.meta.positions)
        if n_pos not in (0, b.shape[0]):
            raise VolumeError(f"{n_pos} B-scan positions for {b.shape[0]} B-scans in {self.meta.source_path}")
        if self.localizer is not None and (self.localizer.ndim != 2 or self.localizer.dtype != np.float32):
            raise VolumeError("localizer must be a float32 2-D array")
        if self.layers is not None:
            for name, rows in self.layers.rows.items():
                if np.shape(rows) != (b.shape[0], b.shape[2]):
                    raise VolumeError(f"layer {name} has shape {np.shape(rows)}, expected (n_bscans, width) "
                                      f"{(b.shape[0], b.shape[2])} in {self.meta.source_path}")

    @property
    def n_bscans(self) -> int:
        return int(self.bscans.shape[0])

    @property
    def bscan_shape(self) -> tuple[int, int]:
        return int(self.bscans.shape[1]), int(self.bscans.shape[2])


def display_from_linear(raw: np.ndarray, *, empty_from: float = 3.0e38) -> np.ndarray:
    """Map linear reflectivity (HEYEX `.vol`/`.e2e`) to the 0..255 display scale, float32.

    Values at or above ``empty_from`` mark pixels without data (HEYEX `.vol` writes float32 max,
    `.e2e` about 2) and become 0; other values above 1 saturate at 255, as HEYEX shows them.
    """
    raw = np.asarray(raw, dtype=np.float32)
    empty = ~np.isfinite(raw) | (raw >= empty_from)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        t = (np.log(np.clip(raw, 0.0, 1.0) + np.float32(2.44e-4)) + np.float32(8.3)) / np.float32(8.285)
    out = np.clip(t, 0.0, 1.0) * np.float32(255.0)
    out[empty] = 0.0
    return out.astype(np.float32, copy=False)


def linear_from_display(display: np.ndarray) -> np.ndarray:
    """Inverse of :func:`display_from_linear` for writers: 0..255 display scale to linear reflectivity."""
    t = np.clip(np.asarray(display, dtype=np.float64), 0.0, 255.0) / 255.0
    return np.maximum(np.exp(t * 8.285 - 8.3) - 2.44e-4, 0.0).astype(np.float32)


def count_non_finite(values: np.ndarray) -> int:
    """How many values are NaN or infinite: one cheap pass when there are none, the usual case."""
    if np.isfinite(np.sum(values, dtype=np.float64)):
        return 0
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def check_declared_size(
    path: Path | str, n_bscans: int, height: int, width: int, *, localizer_pixels: int = 0, hint: str = _DAMAGED_HINT
) -> None:
    """Refuse sizes no real OCT volume has, from the header alone, before any pixel is allocated or decoded.

    A damaged header must end as one error record, not as a MemoryError or a machine that swaps while
    the rest of the study waits.
    """
    shape = f"{n_bscans} B-scans of {height}x{width} pixels"
    if n_bscans < 1 or height < 1 or width < 1:
        raise ReadError(path, f"header declares {shape}: there is no image to read", hint)
    if n_bscans > MAX_BSCANS:
        raise ReadError(path, f"header declares {shape}; no OCT volume has more than {MAX_BSCANS} B-scans", hint)
    if max(height, width) > MAX_BSCAN_SIDE:
        raise ReadError(path, f"header declares {shape}; no OCT B-scan has more than {MAX_BSCAN_SIDE} pixels a side", hint)
    needed = 4 * (n_bscans * height * width + localizer_pixels)
    if needed > MAX_VOLUME_BYTES:
        raise ReadError(
            path, f"header declares {shape}, {_gib(needed)} once read, above the {_gib(MAX_VOLUME_BYTES)} limit per volume", hint
        )


def check_localizer_size(path: Path | str, height: int, width: int, *, hint: str = _DAMAGED_HINT) -> None:
    """Refuse a localizer size no device writes, before the image is allocated or decoded."""
    if height < 1 or width < 1 or max(height, width) > MAX_LOCALIZER_SIDE:
        raise ReadError(
            path, f"localizer image declares {height}x{width} pixels; a real one has 1 to {MAX_LOCALIZER_SIDE} a side", hint
        )


def _in_date_range(value: date | datetime) -> bool:
    day = value.date() if isinstance(value, datetime) else value
    return EARLIEST_DATE <= day <= LATEST_DATE


def validate_volume(volume: Volume) -> Volume:
    """The check every reader's result passes: refuse numbers that no later stage can use.

    A damaged file must fail here, with its reason, and not later as NaN scores, a database constraint
    error or an HRF count of 0 over empty pixels. An impossible birth date is the one exception: the
    analysis never needs it, so it is dropped with a warning that does not repeat it (it identifies the
    patient). The patient id leaves here normalised (:func:`normalise_patient_id`), so `info`, `scan`,
    ingest and reports all see the id that is stored. Returns the volume, or a corrected copy.
    """
    meta = volume.meta
    path = meta.source_path
    series = f"series {meta.series_uid}: " if meta.source_format in ("heyex-e2e", "heyex-xml") else ""
    (height, width), loc = volume.bscan_shape, volume.localizer
    check_declared_size(path, volume.n_bscans, height, width, localizer_pixels=0 if loc is None else int(loc.size))
    if loc is not None:
        check_localizer_size(path, *loc.shape)
    spacing = meta.spacing
    for name, value, may_be_zero in (
        ("lateral pixel spacing", spacing.lateral_mm, False),
        ("axial pixel spacing", spacing.axial_mm, False),
        ("distance between B-scans", spacing.between_bscans_mm, True),
    ):
        value = float(value)
        if not math.isfinite(value) or value < 0 or (value == 0 and not may_be_zero):
            raise ReadError(
                path, f"{series}{name} is {value!r} mm; it must be a finite number above zero",
                "sizes in mm cannot be computed: the header is damaged or the scan was exported without its "
                "scale; export it again from the device software",
            )
    for i, pos in enumerate(meta.positions):
        if not all(math.isfinite(float(c)) for c in (*pos.start_mm, *pos.end_mm)):
            raise ReadError(path, f"{series}position of B-scan {i} on the localizer is not a finite number", _DAMAGED_HINT)
    if meta.localizer_spacing_mm is not None and not all(math.isfinite(float(c)) for c in meta.localizer_spacing_mm):
        problem = f"{series}localizer pixel spacing {meta.localizer_spacing_mm} is not a finite number"
        raise ReadError(path, problem, _DAMAGED_HINT)
    for what, pixels in (("B-scan", volume.bscans), ("localizer", loc)):
        bad = 0 if pixels is None else count_non_finite(pixels)
        if bad:
            raise ReadError(
                path, f"{series}{bad} of {pixels.size} {what} pixels are NaN or infinite",
                "the pixel data (or its rescale values) is damaged and HRF counts over it would be wrong: "
                "export the scan again from the device software, or remove it from the study folder",
            )
    for name, value in (("visit date", meta.visit_date), ("acquisition time", meta.acquired_at)):
        if value is not None and not _in_date_range(value):
            raise ReadError(
                path, f"{series}{name} {value.isoformat()} lies outside {EARLIEST_DATE.year}-{LATEST_DATE.year}",
                "the date field of the header is damaged, so the scan cannot be placed on the patient's "
                "timeline: export it again from the device software",
            )
    if meta.birth_date is not None and not _in_date_range(meta.birth_date):
        log.warning("%s: %sbirth date outside %d-%d left out (damaged field)", path, series, EARLIEST_DATE.year, LATEST_DATE.year)
        volume = dataclasses.replace(volume, meta=dataclasses.replace(meta, birth_date=None))
    return with_normalised_patient_id(volume)


def _strip_padding(text: str) -> str:
    """Without surrounding whitespace and NULs: DICOM pads with spaces, C-string header fields with NUL."""
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or text[start] == "\0"):
        start += 1
    while end > start and (text[end - 1].isspace() or text[end - 1] == "\0"):
        end -= 1
    return text[start:end]


def normalise_patient_id(raw: str, source_sha256: str) -> str:
    """The one rule that turns a file's patient id into the id hrf-batch stores and shows.

    Surrounding whitespace and NUL padding go, and the id is put in Unicode NFC so ids that look the
    same are the same. An id with control characters (replaced by '_') or longer than
    :data:`PATIENT_ID_MAX` characters (cut) gets ``-`` and the first hex digits of the sha256 of the
    original id appended, so two different ids never become one patient. A missing id becomes
    ``unknown-<first 12 hex of the source file's sha256>``: one pseudonym per file, never one shared
    patient of every file without an id. Applying it twice changes nothing, so the store can apply it
    again to whatever a library caller hands over.
    """
    text = _strip_padding(unicodedata.normalize("NFC", raw))
    if not text:
        if not source_sha256:
            raise VolumeError("a volume without a patient id needs its source file's sha256 to name it")
        return f"{UNKNOWN_PATIENT_PREFIX}{source_sha256[:12]}"
    clean = "".join("_" if unicodedata.category(c) in _UNPRINTABLE else c for c in text)
    if clean == text and len(clean) <= PATIENT_ID_MAX:
        return clean
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:PATIENT_ID_HASH_HEX]
    return f"{clean[:PATIENT_ID_MAX - PATIENT_ID_HASH_HEX - 1]}-{digest}"


def with_normalised_patient_id(volume: Volume) -> Volume:
    """The volume with its patient id through :func:`normalise_patient_id`, saying in the log when that
    changed more than padding. The warning names the file but never the id: ids identify patients."""
    meta = volume.meta
    stored = normalise_patient_id(meta.patient_id, meta.source_sha256)
    if stored == meta.patient_id:
        return volume
    series = f"series {meta.series_uid}: " if meta.source_format in ("heyex-e2e", "heyex-xml") else ""
    if stored.startswith(UNKNOWN_PATIENT_PREFIX) and not _strip_padding(meta.patient_id):
        log.warning("%s: %sthe file names no patient; stored as patient %s (from the file's sha256)",
                    meta.source_path, series, stored)
    elif stored != _strip_padding(unicodedata.normalize("NFC", meta.patient_id)):
        log.warning("%s: %sthe patient id has control characters or more than %d characters; stored shortened "
                    "and cleaned, with a hash of the original that keeps it apart from every other id",
                    meta.source_path, series, PATIENT_ID_MAX)
    return dataclasses.replace(volume, meta=dataclasses.replace(meta, patient_id=stored))


def meta_to_dict(meta: VolumeMeta, *, show_identifiers: bool = True) -> dict[str, Any]:
    """JSON-ready dict of the metadata (dates as ISO strings); identifiers dropped on request."""
    out = dataclasses.asdict(meta)
    for key in ("visit_date", "acquired_at", "birth_date"):
        value = getattr(meta, key)
        out[key] = value.isoformat() if value is not None else None
    out["positions"] = [
        {"start_mm": list(p.start_mm), "end_mm": list(p.end_mm)} for p in meta.positions
    ]
    if not show_identifiers:
        out.pop("birth_date")
        out.pop("patient_name")
    return out


def volume_summary(volume: Volume, *, show_identifiers: bool = True) -> dict[str, Any]:
    """What `hrf-batch info` prints: shape, scale, metadata."""
    b = volume.bscans
    return {
        "n_bscans": volume.n_bscans,
        "bscan_height": volume.bscan_shape[0],
        "bscan_width": volume.bscan_shape[1],
        "intensity_min": float(b.min()),
        "intensity_max": float(b.max()),
        "localizer_shape": list(volume.localizer.shape) if volume.localizer is not None else None,
        "layer_lines": None if volume.layers is None else {"source": volume.layers.source, "names": list(volume.layers.names)},
        **meta_to_dict(volume.meta, show_identifiers=show_identifiers),
    }
