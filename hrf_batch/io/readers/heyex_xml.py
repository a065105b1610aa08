"""HEYEX XML export reader: one XML file describing the series plus one TIFF per image.

Each ``<Series>`` with OCT images becomes one Volume. Image files are found by the file name at
the end of ``ExamURL`` (HEYEX writes the exporting machine's UNC path there), next to the XML.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hrf_batch.errors import ReadError
from hrf_batch.io.hashing import sha256_of_files
from hrf_batch.io.volume import BScanPosition, Spacing, Volume, VolumeMeta

_HINT = "re-export the series from HEYEX (XML export with its image files) or remove it from the study folder"
_PATTERNS = {"volume": "volume", "line": "line", "circle": "circle", "radial": "radial", "star": "radial"}


def is_heyex_xml(head: bytes) -> bool:
    """Cheap content check: an XML document whose root is HEYEX's ``<HEDX>``."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return (text.startswith(b"<?xml") or text.startswith(b"<HEDX")) and b"<HEDX" in head


def _find_text(node: ET.Element, path: str, default: str = "") -> str:
    found = node.find(path)
    return found.text.strip() if found is not None and found.text else default


def _date(node: ET.Element | None) -> date | None:
    if node is None:
        return None
    year, month, day = (_find_text(node, f"Date/{k}") for k in ("Year", "Month", "Day"))
    if not (year and month and day):
        return None
    return date(int(year), int(month), int(day))


def _time(image: ET.Element) -> timedelta | None:
    node = image.find("AcquisitionTime/Time")
    if node is None:
        return None
    hour, minute, second = (_find_text(node, k, "0") for k in ("Hour", "Minute", "Second"))
    return timedelta(hours=int(hour), minutes=int(minute), seconds=float(second))


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


def _load_tiff(xml_path: Path, tif: Path) -> np.ndarray:
    try:
        with Image.open(tif) as img:
            return np.asarray(img.convert("L"), dtype=np.float32)
    except FileNotFoundError as exc:
        raise ReadError(xml_path, f"image file {tif.name} named in the XML is missing", _HINT) from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ReadError(xml_path, f"image file {tif.name} is not a readable TIFF ({exc})", _HINT) from exc


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


def _series_volume(xml_path: Path, patient: ET.Element, study: ET.Element, series: ET.Element) -> Volume | None:
    images = series.findall("Image")
    octs = [i for i in images if _find_text(i, "ImageType/Type").upper() == "OCT"]
    if not octs:
        return None
    octs.sort(key=lambda i: int(_find_text(i, "ImageNumber", "0")))
    locs = [i for i in images if _find_text(i, "ImageType/Type").upper() == "LOCALIZER"]
    files = [_image_file(xml_path, i) for i in octs + locs[:1]]
    bscans = [_load_tiff(xml_path, f) for f in files[: len(octs)]]
    if len({b.shape for b in bscans}) != 1:
        raise ReadError(xml_path, f"B-scan images differ in size: {sorted({b.shape for b in bscans})}", _HINT)
    ctx = [i.find("OphthalmicAcquisitionContext") for i in octs]
    positions = [BScanPosition(_coord(c.find("Start")), _coord(c.find("End"))) for c in ctx if c is not None]
    first = ctx[0] if ctx[0] is not None else ET.Element("none")
    visit = _date(series.find("ExamDate")) or _date(study.find("StudyDate"))
    when = _time(octs[0])
    loc_ctx = locs[0].find("OphthalmicAcquisitionContext") if locs else None
    lat = _find_text(series, "Laterality") or _find_text(octs[0], "Laterality")
    equipment = " ".join(
        t for t in (_find_text(series, "GeneralEquipment/Manufacturer"), _find_text(series, "GeneralEquipment/ManufacturerModelName")) if t
    )
    meta = VolumeMeta(
        source_path=str(xml_path), source_sha256=sha256_of_files([xml_path, *files]), source_format="heyex-xml",
        series_uid=_find_text(series, "SeriesUID") or _find_text(series, "ID"),
        patient_id=_find_text(patient, "PatientID") or _find_text(patient, "ID"),
        eye={"R": "OD", "L": "OS"}.get(lat.upper()[:1], "unknown"), visit_date=visit,
        acquired_at=datetime.combine(visit, datetime.min.time()) + when if visit and when is not None else None,
        device=equipment or "Heidelberg Engineering (HEYEX XML)",
        scan_pattern=_PATTERNS.get(_find_text(series, "Type").lower(), "volume" if len(octs) > 1 else "line"),
        spacing=Spacing(float(_find_text(first, "ScaleX", "0")), float(_find_text(first, "ScaleY", "0")), _between(positions)),
        positions=tuple(positions) if len(positions) == len(octs) else (),
        localizer_spacing_mm=(float(_find_text(loc_ctx, "ScaleX", "0")), float(_find_text(loc_ctx, "ScaleY", "0"))) if loc_ctx is not None else None,
        birth_date=_date(patient.find("Birthdate")),
        patient_name=" ".join(t for t in (_find_text(patient, "FirstNames"), _find_text(patient, "LastName")) if t),
    )
    localizer = _load_tiff(xml_path, files[-1]) if locs else None
    return Volume(bscans=np.stack(bscans).astype(np.float32), meta=meta, localizer=localizer)


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
                except ValueError as exc:
                    raise ReadError(path, f"unexpected value in series {_find_text(series, 'ID')}: {exc}", _HINT) from exc
                if volume is not None:
                    volumes.append(volume)
    if not volumes:
        raise ReadError(path, "HEYEX XML export holds no OCT B-scan images", _HINT)
    return volumes
