"""HEYEX XML export reader: one XML file describing the series plus one TIFF per image.

Each ``<Series>`` with OCT images becomes one Volume. Image files are found by the file name at
the end of ``ExamURL`` (HEYEX writes the exporting machine's UNC path there), next to the XML.

Damaged exports: every image the series names must exist (else the error names the missing file),
and every TIFF's size is read from its header, without decoding, and checked against the limits in
:mod:`hrf_batch.io.volume` before any image is decoded; Pillow's decompression-bomb guard stays on and
its error becomes a ReadError. A series is read whole or refused, never in part. An impossible exam
date (or study date, when it is the one used) or acquisition time refuses the file; an impossible
birth date is dropped with a warning that does not repeat it.

Layer lines: each OCT ``<Image>`` may carry ``<Segmentation>`` with one ``<SegLine>`` per device line
(``<Name>`` and an ``<Array>`` of one row per A-scan, 3e38 where unknown); the names map onto ours by
:data:`XML_LAYER_NAMES` and become ``Volume.layers`` (source "device"). A line whose array is not made
of numbers or has another length than the B-scan's width does not refuse the export (the images are
intact and the pipeline can estimate the lines): the series' layers are dropped with a warning.
"""

from __future__ import annotations

import logging
import math
import warnings
import xml.etree.ElementTree as ET
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hrf_batch.errors import ReadError, one_line
from hrf_batch.io.readers.heyex_vol import device_layer_lines, device_rows
from hrf_batch.io.readers.raw import source_sha256
from hrf_batch.io.volume import (
    MAX_BSCANS,
    BScanPosition,
    LayerLines,
    Spacing,
    Volume,
    VolumeMeta,
    check_declared_size,
    check_localizer_size,
)

log = logging.getLogger(__name__)

_HINT = "re-export the series from HEYEX (XML export with its image files) or remove it from the study folder"
_PATTERNS = {"volume": "volume", "line": "line", "circle": "circle", "radial": "radial", "star": "radial"}
#: HEYEX XML line names -> ours, for the lines whose meaning matches (as for the `.vol` line indices:
#: ``PR1`` is the inner edge of the ellipsoid zone; ``PR2`` and HEYEX's ``RPE`` have no counterpart).
XML_LAYER_NAMES = {
    "ILM": "ILM", "BM": "BM", "RNFL": "RNFL", "GCL": "GCL", "IPL": "IPL", "INL": "INL", "OPL": "OPL",
    "ELM": "ELM", "PR1": "EZ",
}


def is_heyex_xml(head: bytes) -> bool:
    """Cheap content check: an XML document whose root is HEYEX's ``<HEDX>``."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return (text.startswith(b"<?xml") or text.startswith(b"<HEDX")) and b"<HEDX" in head


def _find_text(node: ET.Element, path: str, default: str = "") -> str:
    found = node.find(path)
    return found.text.strip() if found is not None and found.text else default


def _date(node: ET.Element | None) -> date | None:
    """The ``Date/Year|Month|Day`` below ``node``; ValueError when it is not a calendar date."""
    if node is None:
        return None
    year, month, day = (_find_text(node, f"Date/{k}") for k in ("Year", "Month", "Day"))
    if not (year and month and day):
        return None
    try:
        return date(int(year), int(month), int(day))
    except OverflowError as exc:  # a huge number of digits: no date, like any other impossible value
        raise ValueError("not a calendar date") from exc


def _visit_date(xml_path: Path, node: ET.Element | None, what: str) -> date | None:
    """An exam or study date: an impossible one refuses the file, as the scan has no place on the timeline."""
    try:
        return _date(node)
    except ValueError as exc:
        raise ReadError(xml_path, f"the {what} is not a valid date", _HINT) from exc


def _birth_date(xml_path: Path, patient: ET.Element) -> date | None:
    """Never needed for the analysis: an impossible one is dropped with a warning that does not repeat
    it (it identifies the patient)."""
    try:
        return _date(patient.find("Birthdate"))
    except ValueError:
        log.warning("%s: the patient's birth date is not a valid date; it is left out", xml_path)
        return None


def _time(xml_path: Path, image: ET.Element) -> timedelta | None:
    """Acquisition time of day; an hour, minute or second outside the clock refuses the file."""
    node = image.find("AcquisitionTime/Time")
    if node is None:
        return None
    text = tuple(_find_text(node, k, "0") for k in ("Hour", "Minute", "Second"))
    try:
        hour, minute, second = int(text[0]), int(text[1]), float(text[2])
    except ValueError as exc:
        raise ReadError(xml_path, "the acquisition time is not made of numbers", _HINT) from exc
    if not (0 <= hour < 24 and 0 <= minute < 60 and math.isfinite(second) and 0 <= second < 61):
        raise ReadError(xml_path, f"the acquisition time {':'.join(text)} is not a time of day", _HINT)
    return timedelta(hours=hour, minutes=minute, seconds=second)


def _coord(node: ET.Element | None) -> tuple[float, float]:
    if node is None:
        return (0.0, 0.0)
    return (float(_find_text(node, "Coord/X", "0")), float(_find_text(node, "Coord/Y", "0")))


def _image_file(xml_path: Path, image: ET.Element) -> Path:
    url = _find_text(image, "ImageData/ExamURL")
    name = url.replace("\\", "/").rsplit("/", 1)[-1]
    if not name:
        raise ReadError(xml_path, f"image {_find_text(image, 'ID')} has no ExamURL", _HINT)
    return xml_path.parent / name


def _open_tiff(xml_path: Path, tif: Path) -> Image.Image:
    """Open an image lazily (header only). Pillow's decompression-bomb warning is raised as an error, so
    a huge declared image ends as one ReadError before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(tif)
    except FileNotFoundError as exc:
        raise ReadError(xml_path, f"image file {tif.name} named in the XML is missing", _HINT) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ReadError(xml_path, f"image file {tif.name} declares too many pixels ({one_line(exc, 120)})", _HINT) from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ReadError(xml_path, f"image file {tif.name} is not a readable TIFF ({one_line(exc, 120)})", _HINT) from exc


def _tiff_shape(xml_path: Path, tif: Path) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    with _open_tiff(xml_path, tif) as img:
        return img.height, img.width


def _load_tiff(xml_path: Path, tif: Path) -> np.ndarray:
    try:
        with _open_tiff(xml_path, tif) as img:
            return np.asarray(img.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ReadError(xml_path, f"image file {tif.name} cannot be decoded ({one_line(exc, 120)})", _HINT) from exc


def _check_images(xml_path: Path, bscan_files: list[Path], localizer: Path | None) -> None:
    """Every named image exists and has a size a device writes, all checked before any is decoded."""
    for tif in [*bscan_files, *([localizer] if localizer else [])]:
        if not tif.is_file():
            raise ReadError(xml_path, f"image file {tif.name} named in the XML is missing", _HINT)
    shapes = [_tiff_shape(xml_path, f) for f in bscan_files]
    loc_pixels = 0
    if localizer is not None:
        loc_h, loc_w = _tiff_shape(xml_path, localizer)
        check_localizer_size(xml_path, loc_h, loc_w, hint=_HINT)
        loc_pixels = loc_h * loc_w
    largest = max(shapes, key=lambda shape: shape[0] * shape[1])
    check_declared_size(xml_path, len(bscan_files), *largest, localizer_pixels=loc_pixels, hint=_HINT)
    if len(set(shapes)) != 1:
        raise ReadError(xml_path, f"B-scan images differ in size: {sorted(set(shapes))}", _HINT)


def referenced_files(xml_path: Path) -> list[Path]:
    """Every image file an XML export names; discovery uses it to claim those TIFFs."""
    root = _parse(xml_path)
    return [_image_file(xml_path, img) for img in root.iter("Image")]


def _parse(xml_path: Path) -> ET.Element:
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise ReadError(xml_path, f"malformed XML ({exc})", _HINT) from exc
    except OSError as exc:
        raise ReadError.unreadable(xml_path, exc) from exc
    if root.tag != "HEDX":
        raise ReadError(xml_path, f"XML root is <{root.tag}>, not a HEYEX export <HEDX>", _HINT)
    return root


def _between(positions: list[BScanPosition]) -> float:
    if len(positions) < 2:
        return 0.0
    starts = np.array([p.start_mm for p in positions])
    return float(np.mean(np.linalg.norm(np.diff(starts, axis=0), axis=1)))


def _layers(xml_path: Path, octs: list[ET.Element], shape: tuple[int, int, int]) -> LayerLines | None:
    """The device lines of the series' B-scans (module docstring); None when it carries none."""
    n, height, width = shape
    rows: dict[str, np.ndarray] = {}
    for i, image in enumerate(octs):
        for line in image.findall("Segmentation/SegLine"):
            name = XML_LAYER_NAMES.get(_find_text(line, "Name"))
            if name is None:
                continue
            try:
                values = np.array([float(v) for v in _find_text(line, "Array").split()], dtype=np.float64)
            except ValueError:
                values = None
            if values is None or values.size != width:
                log.warning(
                    "%s: the %s line of B-scan %d is not %d numbers (the segmentation is damaged); the device's "
                    "layer lines are left out and will be estimated", xml_path, _find_text(line, "Name"), i, width,
                )
                return None
            rows.setdefault(name, np.full((n, width), np.nan, np.float32))[i] = device_rows(values, height)
    return device_layer_lines(rows)


def _series_volume(xml_path: Path, patient: ET.Element, study: ET.Element, series: ET.Element) -> Volume | None:
    images = series.findall("Image")
    octs = [i for i in images if _find_text(i, "ImageType/Type").upper() == "OCT"]
    if not octs:
        return None
    if len(octs) > MAX_BSCANS:
        raise ReadError(xml_path, f"series names {len(octs)} B-scan images; no OCT volume has more than {MAX_BSCANS}", _HINT)
    octs.sort(key=lambda i: int(_find_text(i, "ImageNumber", "0")))
    locs = [i for i in images if _find_text(i, "ImageType/Type").upper() == "LOCALIZER"]
    files = [_image_file(xml_path, i) for i in octs + locs[:1]]
    _check_images(xml_path, files[: len(octs)], files[-1] if locs else None)
    bscans = [_load_tiff(xml_path, f) for f in files[: len(octs)]]
    ctx = [i.find("OphthalmicAcquisitionContext") for i in octs]
    positions = [BScanPosition(_coord(c.find("Start")), _coord(c.find("End"))) for c in ctx if c is not None]
    first = ctx[0] if ctx[0] is not None else ET.Element("none")
    visit = _visit_date(xml_path, series.find("ExamDate"), "exam date") or _visit_date(
        xml_path, study.find("StudyDate"), "study date"
    )
    when = _time(xml_path, octs[0])
    loc_ctx = locs[0].find("OphthalmicAcquisitionContext") if locs else None
    lat = _find_text(series, "Laterality") or _find_text(octs[0], "Laterality")
    equipment = " ".join(
        t for t in (_find_text(series, "GeneralEquipment/Manufacturer"), _find_text(series, "GeneralEquipment/ManufacturerModelName")) if t
    )
    meta = VolumeMeta(
        source_path=str(xml_path), source_sha256=source_sha256([xml_path, *files]), source_format="heyex-xml",
        series_uid=_find_text(series, "SeriesUID") or _find_text(series, "ID"),
        patient_id=_find_text(patient, "PatientID") or _find_text(patient, "ID"),
        eye={"R": "OD", "L": "OS"}.get(lat.upper()[:1], "unknown"), visit_date=visit,
        acquired_at=datetime.combine(visit, datetime.min.time()) + when if visit and when is not None else None,
        device=equipment or "Heidelberg Engineering (HEYEX XML)",
        scan_pattern=_PATTERNS.get(_find_text(series, "Type").lower(), "volume" if len(octs) > 1 else "line"),
        spacing=Spacing(float(_find_text(first, "ScaleX", "0")), float(_find_text(first, "ScaleY", "0")), _between(positions)),
        positions=tuple(positions) if len(positions) == len(octs) else (),
        localizer_spacing_mm=(float(_find_text(loc_ctx, "ScaleX", "0")), float(_find_text(loc_ctx, "ScaleY", "0"))) if loc_ctx is not None else None,
        birth_date=_birth_date(xml_path, patient),
        patient_name=" ".join(t for t in (_find_text(patient, "FirstNames"), _find_text(patient, "LastName")) if t),
    )
    localizer = _load_tiff(xml_path, files[-1]) if locs else None
    pixels = np.stack(bscans).astype(np.float32)
    return Volume(bscans=pixels, meta=meta, localizer=localizer, layers=_layers(xml_path, octs, pixels.shape))


def read_heyex_xml(path: Path) -> list[Volume]:
    """Read every OCT series of one HEYEX XML export into Volumes (0..255, as the TIFFs store)."""
    path = Path(path)
    root = _parse(path)
    volumes = []
    for patient in root.iter("Patient"):
        for study in patient.iter("Study"):
            for series in study.iter("Series"):
                try:
                    volume = _series_volume(path, patient, study, series)
                except (ValueError, OverflowError) as exc:
                    problem = f"unexpected value in series {_find_text(series, 'ID')}: {one_line(exc, 120)}"
                    raise ReadError(path, problem, _HINT) from exc
                if volume is not None:
                    volumes.append(volume)
    if not volumes:
        raise ReadError(path, "HEYEX XML export holds no OCT B-scan images", _HINT)
    return volumes
