"""Write a Volume as a HEYEX XML export (XML + one 8-bit TIFF per image) for synthetic studies.

A Volume's layer lines go into each B-scan's ``<Segmentation>`` as one ``<SegLine>`` per boundary, under
HEYEX's line name (boundaries without one, ``RPE``, are not written), each value in its shortest form
that reads back as the same float32, ``3e+038`` where unknown, as HEYEX writes it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import date, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from hrf_batch.io.readers.heyex_xml import XML_LAYER_NAMES
from hrf_batch.io.volume import Volume

_PATTERN_NAMES = {"volume": "Volume", "line": "Line", "circle": "Circle", "radial": "Radial", "unknown": "Volume"}
_XML_NAMES = {ours: theirs for theirs, ours in XML_LAYER_NAMES.items()}
_NO_BOUNDARY = "3e+038"


def _sub(parent: ET.Element, tag: str, text: object | None = None) -> ET.Element:
    node = ET.SubElement(parent, tag)
    if text is not None:
        node.text = str(text)
    return node


def _date(parent: ET.Element, tag: str, value: date | None) -> None:
    if value is None:
        return
    node = _sub(_sub(parent, tag), "Date")
    _sub(node, "Year", f"{value.year:04d}")
    _sub(node, "Month", f"{value.month:02d}")
    _sub(node, "Day", f"{value.day:02d}")


def _time(parent: ET.Element, value: datetime | None) -> None:
    if value is None:
        return
    node = _sub(_sub(parent, "AcquisitionTime"), "Time")
    _sub(node, "Hour", value.hour)
    _sub(node, "Minute", value.minute)
    _sub(node, "Second", f"{value.second + value.microsecond / 1e6:.3f}")


def _coord(parent: ET.Element, tag: str, xy: tuple[float, float]) -> None:
    node = _sub(_sub(parent, tag), "Coord")
    _sub(node, "X", repr(float(xy[0])))
    _sub(node, "Y", repr(float(xy[1])))


def _save_tiff(image: np.ndarray, path: Path) -> None:
    Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8)).save(path, format="TIFF")


def _image(series: ET.Element, number: int, kind: str, volume: Volume, file_name: str) -> tuple[ET.Element, ET.Element]:
    """A new ``<Image>`` of the series and its acquisition context, for the caller to fill."""
    node = _sub(series, "Image")
    _sub(node, "ID", number)
    _sub(node, "ImageNumber", number)
    _sub(node, "Laterality", {"OD": "R", "OS": "L"}.get(volume.meta.eye, ""))
    _time(node, volume.meta.acquired_at)
    _sub(_sub(node, "ImageType"), "Type", kind)
    ctx = _sub(node, "OphthalmicAcquisitionContext")
    data = _sub(node, "ImageData")
    _sub(data, "Extension", "TIF")
    _sub(data, "ExamURL", f"file:///\\\\export\\{file_name}")
    return node, ctx


def _row_text(value: np.float32) -> str:
    return np.format_float_positional(value, unique=True, trim="-") if np.isfinite(value) else _NO_BOUNDARY


def _segmentation(image: ET.Element, volume: Volume, index: int) -> None:
    """The B-scan's layer lines, when the volume has any HEYEX names."""
    layers = volume.layers
    names = [name for name in layers.names if name in _XML_NAMES] if layers is not None else []
    if not names:
        return
    node = _sub(image, "Segmentation")
    _sub(node, "NumSegmentations", len(names))
    for name in names:
        rows = np.asarray(layers.rows[name][index], dtype=np.float32)
        line = _sub(node, "SegLine")
        _sub(line, "Name", _XML_NAMES[name])
        _sub(line, "Enabled", "true")
        _sub(line, "Manual", "false")
        array = _sub(line, "Array", " ".join(_row_text(v) for v in rows))
        array.set("n", str(rows.size))
        array.set("type", "real")


def write_heyex_xml(volume: Volume, out_dir: Path, *, stem: str = "export") -> Path:
    """Write ``volume`` into ``out_dir`` as ``{stem}.xml`` plus TIFFs, with its layer lines when it has
    any; returns the XML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = volume.meta
    root = ET.Element("HEDX")
    body = _sub(root, "BODY")
    patient = _sub(body, "Patient")
    _sub(patient, "PatientID", m.patient_id)
    first, _, last = m.patient_name.partition(" ")
    _sub(patient, "LastName", last)
    _sub(patient, "FirstNames", first)
    _date(patient, "Birthdate", m.birth_date)
    study = _sub(patient, "Study")
    _date(study, "StudyDate", m.visit_date)
    series = _sub(study, "Series")
    _sub(series, "SeriesUID", m.series_uid)
    _sub(series, "Modality", "OCT")
    _sub(series, "Type", _PATTERN_NAMES[m.scan_pattern])
    _sub(series, "Laterality", {"OD": "R", "OS": "L"}.get(m.eye, ""))
    _date(series, "ExamDate", m.visit_date)
    maker, _, model = m.device.partition(" ")
    equipment = _sub(series, "GeneralEquipment")
    _sub(equipment, "Manufacturer", maker)
    _sub(equipment, "ManufacturerModelName", model)
    if volume.localizer is not None:
        _, ctx = _image(series, 0, "LOCALIZER", volume, f"{stem}_NIR.tif")
        sx, sy = m.localizer_spacing_mm or (0.0, 0.0)
        _sub(ctx, "Width", volume.localizer.shape[1])
        _sub(ctx, "Height", volume.localizer.shape[0])
        _sub(ctx, "ScaleX", repr(sx))
        _sub(ctx, "ScaleY", repr(sy))
        _save_tiff(volume.localizer, out_dir / f"{stem}_NIR.tif")
    for i in range(volume.n_bscans):
        image, ctx = _image(series, i + 1, "OCT", volume, f"{stem}_B{i + 1}.tif")
        _sub(ctx, "Width", volume.bscan_shape[1])
        _sub(ctx, "Height", volume.bscan_shape[0])
        _sub(ctx, "ScaleX", repr(m.spacing.lateral_mm))
        _sub(ctx, "ScaleY", repr(m.spacing.axial_mm))
        if m.positions:
            _coord(ctx, "Start", m.positions[i].start_mm)
            _coord(ctx, "End", m.positions[i].end_mm)
        _segmentation(image, volume, i)
        _save_tiff(volume.bscans[i], out_dir / f"{stem}_B{i + 1}.tif")
    xml_path = out_dir / f"{stem}.xml"
    ET.ElementTree(root).write(xml_path, encoding="utf-8", xml_declaration=True)
    return xml_path
