"""Device layer lines: read from the real Spectralis files, damaged layer blocks, writer → reader round trips."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import struct
from pathlib import Path

import eyepy
import numpy as np
import pytest
from eyepy.io.he.e2e_reader import HeE2eReader
from eyepy.io.he.vol_reader import HeVolReader

from hrf_batch.io.readers import read_volume, read_volumes
from hrf_batch.io.readers.heyex_vol import BSCAN_STRUCT, FILE_HEADER_SIZE, device_rows, parse_header
from hrf_batch.io.volume import LAYER_NAMES, LayerLines, Volume
from hrf_batch.io.writers.e2e import write_e2e
from hrf_batch.io.writers.heyex_xml import write_heyex_xml
from hrf_batch.io.writers.vol import write_vol

from conftest import make_test_volume

RAW = "spectralis-raw-data"
# Byte offset of the line count in a .vol B-scan header (after version, header size and four doubles).
SEG_COUNT_AT = struct.calcsize("<12si4d")


def _ordered(upper: np.ndarray, lower: np.ndarray, *, strict: bool = True) -> tuple[int, bool]:
    """Columns where both lines are known, and whether ``upper`` lies above ``lower`` on every one
    (or on it, to float rounding, when not ``strict``)."""
    both = np.isfinite(upper) & np.isfinite(lower)
    above = upper[both] < lower[both] if strict else upper[both] <= lower[both] + 0.01
    return int(both.sum()), bool(np.all(above))


# --- HEYEX .vol -------------------------------------------------------------------------------------


def test_vol_line_scan_device_lines(fixtures_dir: Path) -> None:
    """The macular line scan carries ILM and BM (its RNFL line holds no value, so it is left out)."""
    path = fixtures_dir / RAW / "Willis_B_716_0.vol"
    vol = read_volume(path)
    layers = vol.layers
    assert layers is not None and layers.source == "device" and layers.names == ("ILM", "BM")
    ilm, bm = layers.get("ILM")[0], layers.get("BM")[0]
    assert ilm.dtype == np.float32 and ilm.shape == (768,)
    n, above = _ordered(ilm, bm)
    assert n > 600 and above
    # the device's own numbers, read independently, at every column it segmented
    ref = HeVolReader(path).layers[:, 0]
    np.testing.assert_array_equal(ilm, np.where(np.isfinite(ref[0]), ref[0], np.nan))
    np.testing.assert_array_equal(bm, np.where(np.isfinite(ref[1]), ref[1], np.nan))
    # plausible macula: retina 0.2-0.5 mm thick, thinnest near the middle (the fovea) of the scan
    thickness_mm = (bm - ilm) * vol.meta.spacing.axial_mm
    assert 0.15 < np.nanmedian(thickness_mm) < 0.5
    assert 250 < int(np.nanargmin(thickness_mm)) < 500
    # BM lies on the bright RPE: brighter just above it than in the vitreous just above the ILM
    cols = np.flatnonzero(np.isfinite(ilm) & np.isfinite(bm))
    img = vol.bscans[0]
    assert img[np.rint(bm[cols]).astype(int) - 3, cols].mean() > 3 * img[np.rint(ilm[cols]).astype(int) - 5, cols].mean()


@pytest.mark.parametrize("name", ["Willis_B_716_2.vol", "valid.vol"])
def test_vol_circle_scans_carry_ilm_rnfl_bm_in_order(fixtures_dir: Path, name: str) -> None:
    """The RNFL line meets the ILM where the nerve fibre layer has no thickness (valid.vol), never above it."""
    vol = read_volume(fixtures_dir / RAW / name)
    layers = vol.layers
    assert layers is not None and layers.names == ("ILM", "RNFL", "BM")
    ilm, rnfl, bm = (layers.get(k)[0] for k in ("ILM", "RNFL", "BM"))
    for upper, lower, strict in ((ilm, rnfl, False), (rnfl, bm, True), (ilm, bm, True)):
        n, above = _ordered(upper, lower, strict=strict)
        assert n > 500 and above
    assert np.nanmedian(rnfl - ilm) > 2
    height = vol.bscan_shape[0]
    assert all(0 <= np.nanmin(r) and np.nanmax(r) < height for r in (ilm, rnfl, bm))


def test_vol_without_lines_has_no_layers(fixtures_dir: Path) -> None:
    assert read_volume(fixtures_dir / "eyepy/test_volume.vol").layers is None


def test_device_rows_unknown_values_become_nan() -> None:
    raw = np.array([np.finfo(np.float32).max, 3e38, np.nan, np.inf, -2.0, 12.5, 40.0, 40.5], np.float32)
    rows = device_rows(raw, height=40)
    np.testing.assert_array_equal(np.isnan(rows), [True, True, True, True, True, False, False, True])
    assert rows[5] == np.float32(12.5) and rows[6] == np.float32(40.0)


def _first_bscan_header(path: Path) -> int:
    hdr = parse_header(path, path.read_bytes()[:FILE_HEADER_SIZE], path.stat().st_size)
    return FILE_HEADER_SIZE + hdr.size_x_slo * hdr.size_y_slo


@pytest.mark.parametrize("count, offset", [(1000, 256), (-1, 256), (3, 55_000), (3, 8)])
def test_vol_damaged_layer_block_drops_the_lines_with_a_warning(
    fixtures_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, count: int, offset: int
) -> None:
    """A count or offset that does not fit the B-scan header: pixels are read, lines left out, and the log says so."""
    path = tmp_path / "damaged_layers.vol"
    shutil.copyfile(fixtures_dir / RAW / "Willis_B_716_2.vol", path)
    path.chmod(0o644)
    at = _first_bscan_header(path)
    assert BSCAN_STRUCT.unpack_from(path.read_bytes(), at)[0].startswith(b"HSF-BS")
    with open(path, "r+b") as fh:
        fh.seek(at + SEG_COUNT_AT)
        fh.write(struct.pack("<2i", count, offset))
    with caplog.at_level(logging.WARNING):
        vol = read_volume(path)
    assert vol.layers is None
    assert vol.bscans.shape == (1, 496, 768)
    assert "layer" in caplog.text and "damaged" in caplog.text and "estimated" in caplog.text


# --- HEYEX XML --------------------------------------------------------------------------------------


def _xml_copy(fixtures_dir: Path, tmp_path: Path) -> Path:
    src = fixtures_dir / "eyepy/heyex_xml"
    for f in src.iterdir():
        shutil.copyfile(f, tmp_path / f.name)
        (tmp_path / f.name).chmod(0o644)
    return tmp_path / "test_dummy.xml"


def test_xml_segmentation_lines_match_an_independent_reader(fixtures_dir: Path) -> None:
    """Every named line the export carries, equal to eyepy's reading; PR1 is our EZ, PR2 and RPE are skipped."""
    path = fixtures_dir / "eyepy/heyex_xml/test_dummy.xml"
    layers = read_volume(path).layers
    assert layers is not None and layers.source == "device"
    assert layers.names == ("ILM", "RNFL", "GCL", "IPL", "INL", "OPL", "ELM", "EZ", "BM")
    ref = eyepy.import_heyex_xml(path).layers
    for theirs, ours in (("ILM", "ILM"), ("RNFL", "RNFL"), ("OPL", "OPL"), ("PR1", "EZ"), ("BM", "BM")):
        np.testing.assert_array_equal(layers.get(ours), ref[theirs].data.astype(np.float32))
    assert np.isnan(layers.get("ILM")[0, :2]).all() and layers.get("ILM")[0, 2] == np.float32(9.6)


@pytest.mark.parametrize("array", ["9.6 abc 9.6", "9.6 9.6"], ids=["not-numbers", "too-short"])
def test_xml_damaged_segmentation_drops_the_lines_with_a_warning(
    fixtures_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, array: str
) -> None:
    xml = _xml_copy(fixtures_dir, tmp_path)
    content = xml.read_text(encoding="utf-8")
    xml.write_text(re.sub(r'(<Array n="50" type="real">)[^<]*', rf"\g<1>{array}", content, count=1), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        vol = read_volume(xml)
    assert vol.layers is None and vol.bscans.shape == (10, 40, 50)
    assert "ILM line of B-scan 0" in caplog.text and "damaged" in caplog.text


# --- writers: each format's own layout, read back equal ------------------------------------------------


def _with_layers(n: int = 3, height: int = 40, width: int = 64) -> Volume:
    """The test volume with smooth, ordered lines (NaN at the edges, as devices leave them) plus an RPE
    line, which no HEYEX format has a place for."""
    base = make_test_volume(n, height, width)
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)
    top = (4.0 + 3.0 * np.sin(6.0 * x)[None, :] + np.arange(n, dtype=np.float32)[:, None] * 0.37).astype(np.float32)
    offsets = {"ILM": 0.0, "RNFL": 2.5, "GCL": 5.125, "IPL": 8.0, "INL": 11.3, "OPL": 14.0, "ELM": 20.0, "EZ": 23.7,
               "RPE": 27.0, "BM": 30.1}
    rows = {name: (top + np.float32(off)).astype(np.float32) for name, off in offsets.items()}
    rows["ILM"][:, :3] = np.nan
    rows["EZ"][1, 40:] = np.nan
    return dataclasses.replace(base, layers=LayerLines(rows=rows, source="device"))


def _expected(volume: Volume) -> dict[str, np.ndarray]:
    return {name: rows for name, rows in volume.layers.rows.items() if name != "RPE"}


def _assert_layers_equal(read: Volume, written: Volume) -> None:
    assert read.layers is not None and read.layers.source == "device"
    expected = _expected(written)
    assert read.layers.names == tuple(n for n in LAYER_NAMES if n in expected)
    for name, rows in expected.items():
        np.testing.assert_array_equal(read.layers.get(name), rows, err_msg=name)


def test_vol_round_trip_keeps_the_lines(tmp_path: Path) -> None:
    vol = _with_layers()
    path = write_vol(vol, tmp_path / "layers.vol")
    read = read_volume(path)
    _assert_layers_equal(read, vol)
    np.testing.assert_allclose(read.bscans, vol.bscans, atol=0.01)
    # the layout HEYEX uses: an independent reader finds each line at HEYEX's index
    ref = HeVolReader(path).layers
    np.testing.assert_array_equal(ref[0], vol.layers.get("ILM"))
    np.testing.assert_array_equal(ref[1], vol.layers.get("BM"))
    np.testing.assert_array_equal(ref[14], vol.layers.get("EZ"))
    assert np.isnan(ref[7]).all() and ref.shape[0] == 15


def test_e2e_round_trip_keeps_the_lines_of_every_series(tmp_path: Path) -> None:
    od = _with_layers()
    os_ = dataclasses.replace(make_test_volume(2, 40, 64, eye="OS", seed=4), layers=None)
    path = write_e2e([od, os_], tmp_path / "layers.e2e")
    read = {v.meta.eye: v for v in read_volumes(path)}
    _assert_layers_equal(read["OD"], od)
    assert read["OS"].layers is None
    # an independent reader finds each line under HEYEX's layer id
    with HeE2eReader(path) as reader:
        ref = {len(s.slices): s.get_layers() for s in reader.series}[3]
    np.testing.assert_array_equal(ref[0].astype(np.float32), od.layers.get("ILM"))
    np.testing.assert_array_equal(ref[14].astype(np.float32), od.layers.get("EZ"))


def test_xml_round_trip_keeps_the_lines(tmp_path: Path) -> None:
    vol = _with_layers()
    path = write_heyex_xml(vol, tmp_path / "export", stem="x")
    read = read_volume(path)
    _assert_layers_equal(read, vol)
    ref = eyepy.import_heyex_xml(path).layers
    np.testing.assert_array_equal(ref["PR1"].data.astype(np.float32), vol.layers.get("EZ"))


@pytest.mark.parametrize("write", ["vol", "e2e", "xml"])
def test_without_layers_the_files_carry_none(tmp_path: Path, write: str) -> None:
    vol = make_test_volume(2, 40, 64)
    if write == "vol":
        path = write_vol(vol, tmp_path / "plain.vol")
        hdr = parse_header(path, path.read_bytes()[:FILE_HEADER_SIZE], path.stat().st_size)
        assert hdr.bscan_hdr_size == 256  # today's layout: no room taken for lines
    elif write == "e2e":
        path = write_e2e([vol], tmp_path / "plain.e2e")
    else:
        path = write_heyex_xml(vol, tmp_path / "plain", stem="x")
        assert "<Segmentation>" not in path.read_text(encoding="utf-8")
    assert read_volume(path).layers is None


@pytest.mark.parametrize("declared", [65, 10_000_000], ids=["other-width", "past-the-record"])
def test_e2e_damaged_layer_record_drops_the_lines_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, declared: int
) -> None:
    vol = _with_layers()
    path = write_e2e([vol], tmp_path / "damaged.e2e")
    data = bytearray(path.read_bytes())
    ez_record = struct.pack("<5I", 0, 14, 0, 64, 0) + vol.layers.get("EZ")[0, :4].tobytes()
    at = bytes(data).index(ez_record)
    struct.pack_into("<I", data, at + 12, declared)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        read = read_volume(path)
    assert read.layers is None and read.bscans.shape == (3, 40, 64)
    assert "layer record of B-scan 0" in caplog.text and "damaged" in caplog.text
