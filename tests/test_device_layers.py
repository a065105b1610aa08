"""Device layer lines: read from the real Spectralis files, damaged layer blocks, writer → reader round trips."""

from __future__ import annotations

import logging
import re
import shutil
import struct
from pathlib import Path

import eyepy
import numpy as np
import pytest
from eyepy.io.he.vol_reader import HeVolReader

from hrf_batch.io.readers import read_volume
from hrf_batch.io.readers.heyex_vol import BSCAN_STRUCT, FILE_HEADER_SIZE, device_rows, parse_header

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
