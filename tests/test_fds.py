"""Topcon `.fds` reader against the real minimised fixture (values from PROVENANCE.md) and damaged copies."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest

from hrf_batch.errors import ReadError
from hrf_batch.io.readers.topcon_fds import is_fds, read_fds

FIXTURE_SHA256 = "a3bc980e7ff265e2227397e1c406e85f0e997784c979dcc7457f8f5a20cd30e2"
SCALE = 255.0 / 65535.0


@pytest.fixture(scope="module")
def fds_path(fixtures_dir: Path) -> Path:
    return fixtures_dir / "rse-panimg" / "fds_minimized.fds"


@pytest.fixture(scope="module")
def fds_bytes(fds_path: Path) -> bytes:
    return fds_path.read_bytes()


def _u32(raw: bytes, at: int) -> int:
    return int.from_bytes(raw[at : at + 4], "little")


def _chunk_data_offset(raw: bytes, name: bytes) -> int:
    """Independent of the reader: locate a chunk by its name bytes; data starts after the u32 size."""
    at = raw.find(bytes([len(name)]) + name)
    assert at > 0, f"{name!r} not in fixture"
    return at + 1 + len(name) + 4


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _assert_one_line_error(path: Path, *fragments: str) -> ReadError:
    with pytest.raises(ReadError) as info:
        read_fds(path)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    for fragment in fragments:
        assert fragment in message
    return info.value


def test_magic_check(fds_bytes: bytes) -> None:
    assert is_fds(fds_bytes[:16])
    assert not is_fds(b"FOCTFDA" + fds_bytes[7:16])
    assert not is_fds(b"")


def test_fixture_shape_and_pixel_scale(fds_path: Path) -> None:
    volumes = read_fds(fds_path)
    assert len(volumes) == 1
    b = volumes[0].bscans
    assert b.dtype == np.float32 and b.shape == (4, 3, 2)  # (B-scans, depth, A-scans)
    assert float(b.min()) == pytest.approx(10819 * SCALE, rel=1e-6)
    assert float(b.max()) == pytest.approx(18857 * SCALE, rel=1e-6)


def test_pixels_match_an_independent_byte_parse(fds_path: Path, fds_bytes: bytes) -> None:
    data = _chunk_data_offset(fds_bytes, b"@IMG_SCAN_03")
    width, height, bits, n = (_u32(fds_bytes, data + 1 + 4 * k) for k in range(4))
    assert (width, height, bits, n) == (2, 3, 16, 4)
    pixels = data + 22
    b = read_fds(fds_path)[0].bscans
    for s in range(n):
        for row in range(height):
            for col in range(width):
                at = pixels + 2 * (col + width * (row + height * s))
                raw = int.from_bytes(fds_bytes[at : at + 2], "little")
                assert b[s, row, col] == pytest.approx(raw * SCALE, rel=1e-6)
    # Two samples read off a hex dump of the file: first sample f1 47, last sample 43 2a.
    assert b[0, 0, 0] == pytest.approx(0x47F1 * SCALE, rel=1e-6)
    assert b[3, 2, 1] == pytest.approx(0x2A43 * SCALE, rel=1e-6)


def test_fixture_metadata(fds_path: Path) -> None:
    volume = read_fds(fds_path)[0]
    m = volume.meta
    assert m.patient_id == "1"
    assert m.eye == "OS"
    assert m.acquired_at == datetime(2010, 7, 9, 9, 23, 36)
    assert m.visit_date == date(2010, 7, 9)
    assert m.device == "Topcon 3DOCT-1000MK2"
    assert m.scan_pattern == "volume"
    assert m.source_format == "topcon-fds"
    assert m.source_sha256 == FIXTURE_SHA256
    assert m.series_uid == FIXTURE_SHA256[:16]
    # 6 mm over 2 A-scans, 6 mm over 4 B-scans, 3.5 µm axial.
    assert m.spacing.lateral_mm == pytest.approx(3.0)
    assert m.spacing.between_bscans_mm == pytest.approx(1.5)
    assert m.spacing.axial_mm == pytest.approx(0.0035)
    assert m.positions == ()
    assert m.localizer_spacing_mm is None
    assert m.birth_date is None


def test_fundus_becomes_a_grey_localizer(fds_path: Path) -> None:
    localizer = read_fds(fds_path)[0].localizer
    assert localizer is not None
    assert localizer.dtype == np.float32 and localizer.shape == (3, 2)
    assert not localizer.any()


def test_fundus_is_read_as_bgr(tmp_path: Path, fds_bytes: bytes) -> None:
    pixels = _chunk_data_offset(fds_bytes, b"@IMG_OBS") + 21
    red = bytes([0, 0, 255]) * 6  # stored blue, green, red
    path = _write(tmp_path, "red_fundus.fds", fds_bytes[:pixels] + red + fds_bytes[pixels + 18 :])
    localizer = read_fds(path)[0].localizer
    assert localizer is not None
    np.testing.assert_allclose(localizer, np.full((3, 2), 0.299 * 255), rtol=1e-5)


def test_empty_file(fixtures_dir: Path) -> None:
    _assert_one_line_error(fixtures_dir / "rse-panimg" / "corrupt.fds", "empty")


@pytest.mark.parametrize(
    ("cut", "fragment"),
    [
        (5, "truncated"),  # inside the file header
        (15, "missing @IMG_SCAN_03"),  # header only, no chunks
        (40, "truncated"),  # inside @HW_INFO_03
        (930, "truncated"),  # inside the OCT pixels
        (1040, "truncated"),  # inside @PARAM_SCAN_04
        (137000, "truncated"),  # inside @THUMBNAIL
    ],
)
def test_truncated_copies(tmp_path: Path, fds_bytes: bytes, cut: int, fragment: str) -> None:
    path = _write(tmp_path, f"truncated_at_{cut}.fds", fds_bytes[:cut])
    _assert_one_line_error(path, fragment)


def test_cut_at_a_chunk_boundary_still_reads(tmp_path: Path, fds_bytes: bytes) -> None:
    """The format has no chunk count, so a file cut after a whole chunk is a valid shorter file."""
    end_of_param_scan = _chunk_data_offset(fds_bytes, b"@PARAM_SCAN_04") + 61
    path = _write(tmp_path, "cut_after_param_scan.fds", fds_bytes[:end_of_param_scan])
    volume = read_fds(path)[0]
    assert volume.bscans.shape == (4, 3, 2)
    assert volume.localizer is None


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_random_bytes_after_the_magic(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    body = rng.integers(0, 256, size=int(rng.integers(0, 4000)), dtype=np.uint8).tobytes()
    path = _write(tmp_path, f"random_{seed}.fds", b"FOCTFDS" + body)
    _assert_one_line_error(path)


def test_missing_scan_chunk(tmp_path: Path, fds_bytes: bytes) -> None:
    path = _write(tmp_path, "no_scan.fds", fds_bytes.replace(b"@IMG_SCAN_03", b"@IMG_SCAN_99"))
    _assert_one_line_error(path, "missing @IMG_SCAN_03", "@IMG_SCAN_99")


def test_missing_scan_size_chunk(tmp_path: Path, fds_bytes: bytes) -> None:
    path = _write(tmp_path, "no_param.fds", fds_bytes.replace(b"@PARAM_SCAN_04", b"@PARAM_SCAN_99"))
    _assert_one_line_error(path, "@PARAM_SCAN_04")


@pytest.mark.parametrize(("field", "value"), [(1, 3), (13, 5), (18, 4096)])  # width, n_slices, size
def test_inconsistent_scan_sizes(tmp_path: Path, fds_bytes: bytes, field: int, value: int) -> None:
    at = _chunk_data_offset(fds_bytes, b"@IMG_SCAN_03") + field
    patched = fds_bytes[:at] + value.to_bytes(4, "little") + fds_bytes[at + 4 :]
    path = _write(tmp_path, f"bad_size_{field}.fds", patched)
    _assert_one_line_error(path, "sizes inconsistent")


def test_invalid_acquisition_date_keeps_its_cause(tmp_path: Path, fds_bytes: bytes) -> None:
    month = _chunk_data_offset(fds_bytes, b"@CAPTURE_INFO_02") + 106 + 2
    patched = fds_bytes[:month] + (13).to_bytes(2, "little") + fds_bytes[month + 2 :]
    err = _assert_one_line_error(_write(tmp_path, "bad_date.fds", patched), "acquisition date")
    assert isinstance(err.__cause__, ValueError)


@pytest.mark.parametrize("seed", [10, 11, 12, 13, 14])
def test_random_scan_header(tmp_path: Path, fds_bytes: bytes, seed: int) -> None:
    """A well-formed chunk list around a garbled @IMG_SCAN_03 header still fails with ReadError."""
    at = _chunk_data_offset(fds_bytes, b"@IMG_SCAN_03")
    garbage = np.random.default_rng(seed).integers(0, 256, size=22, dtype=np.uint8).tobytes()
    path = _write(tmp_path, f"random_scan_header_{seed}.fds", fds_bytes[:at] + garbage + fds_bytes[at + 22 :])
    _assert_one_line_error(path)
