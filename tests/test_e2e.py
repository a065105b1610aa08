"""HEYEX `.e2e`: our writer's files read back by our reader and by two independent readers; bad files fail cleanly."""

from __future__ import annotations

import hashlib
import math
import struct
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest

from hrf_batch.errors import ReadError
from hrf_batch.io.readers.heyex_e2e import BSCAN_IMAGE, read_e2e
from hrf_batch.io.volume import BScanPosition, Spacing, Volume, VolumeMeta, display_from_linear, linear_from_display
from hrf_batch.io.writers.e2e import e2e_code_from_linear, write_e2e

H, W = 64, 96
LATERAL, AXIAL, BETWEEN = 0.0114, 0.0039, 0.12
ACQUIRED_OD = datetime(2024, 3, 14, 9, 26, 53, 589_000)
ACQUIRED_OS = datetime(2024, 3, 14, 9, 31, 2)
Written = tuple[list[Volume], Path, list[Volume]]  # volumes given to the writer, the file, what read_e2e returned


def _bscans(n: int, seed: int) -> np.ndarray:
    """Random speckle over a depth gradient, a little brighter with every B-scan."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(20, 200, H, dtype=np.float32)[:, None]
    out = [np.clip(depth + rng.normal(0, 25, (H, W)) + 10 * i, 0, 255) for i in range(n)]
    out[0][:4, :] = 0.0  # the darkest and brightest grey levels must survive too
    out[0][4:8, :] = 255.0
    return np.stack(out).astype(np.float32)


def _raster(n: int, x0: float = 1.5, y0: float = 6.0) -> tuple[BScanPosition, ...]:
    return tuple(BScanPosition((x0, y0 - i * BETWEEN), (x0 + LATERAL * W, y0 - i * BETWEEN)) for i in range(n))


def _volume(
    n: int, eye: str, acquired: datetime | None, *, seed: int, localizer: bool, positions: bool = True
) -> Volume:
    meta = VolumeMeta(
        source_path="synthetic", source_sha256="0" * 64, source_format="heyex-vol", series_uid=f"syn-{eye}",
        patient_id="HRF-0042", eye=eye, visit_date=date(2024, 3, 14), acquired_at=acquired,
        device="Heidelberg Spectralis", scan_pattern="volume" if n > 1 else "line",
        spacing=Spacing(LATERAL, AXIAL, BETWEEN if n > 1 else 0.0), positions=_raster(n) if positions else (),
        birth_date=date(1951, 10, 3), patient_name="Jane Roe",
    )
    loc = np.add.outer(np.arange(48.0), np.arange(72.0)).astype(np.float32) if localizer else None
    return Volume(bscans=_bscans(n, seed), meta=meta, localizer=loc)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """Both eyes of one patient: a 3-B-scan volume (OD) and a single line scan (OS), written and read once."""
    volumes = [
        _volume(3, "OD", ACQUIRED_OD, seed=1, localizer=True),
        _volume(1, "OS", ACQUIRED_OS, seed=2, localizer=False),
    ]
    path = write_e2e(volumes, tmp_path_factory.mktemp("e2e") / "both_eyes.e2e")
    return volumes, path, read_e2e(path)


def _walk_chunks(data: bytes) -> list[tuple[int, list[tuple[int, ...]]]]:
    """Directory chunks from the file header's pointer back to the first: (position, entries)."""
    chunks, position = [], struct.unpack_from("<I", data, 76)[0]
    while position:
        count, current, previous = struct.unpack_from("<3I", data, position + 36)
        assert current == position
        entries = [struct.unpack_from("<4I4iHHII", data, position + 52 + 44 * i) for i in range(count)]
        chunks.append((position, entries))
        position = previous
    return chunks[::-1]


def test_round_trip_pixels_and_order(written: Written) -> None:
    original, _, read = written
    assert len(read) == 2
    for before, after in zip(original, read):
        assert after.bscans.dtype == np.float32
        assert after.bscans.shape == before.bscans.shape
        assert float(np.abs(after.bscans - before.bscans).max()) <= 1.0
        for i, bscan in enumerate(after.bscans):  # stored order kept: B-scan i is closest to written B-scan i
            assert int(np.argmin([np.abs(bscan - b).mean() for b in before.bscans])) == i


def test_round_trip_metadata(written: Written) -> None:
    original, path, read = written
    for before, after in zip(original, read):
        m, b = after.meta, before.meta
        assert (m.eye, m.patient_id, m.patient_name, m.birth_date) == (b.eye, "HRF-0042", "Jane Roe", date(1951, 10, 3))
        assert m.acquired_at == b.acquired_at
        assert m.visit_date == date(2024, 3, 14)
        assert m.scan_pattern == b.scan_pattern
        assert (m.source_format, m.device, m.source_path) == ("heyex-e2e", "Heidelberg Spectralis", str(path))
        assert m.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        for got, want in zip(
            (m.spacing.lateral_mm, m.spacing.axial_mm, m.spacing.between_bscans_mm),
            (b.spacing.lateral_mm, b.spacing.axial_mm, b.spacing.between_bscans_mm),
        ):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-12)
        assert len(m.positions) == after.n_bscans == before.n_bscans
        for got, want in zip(m.positions, b.positions):
            np.testing.assert_allclose([*got.start_mm, *got.end_mm], [*want.start_mm, *want.end_mm], atol=1e-3)
    assert len({v.meta.series_uid for v in read}) == 2


def test_localizer_kept_or_grey_placeholder(written: Written) -> None:
    original, _, read = written
    assert read[0].localizer is not None and read[0].localizer.dtype == np.float32
    np.testing.assert_array_equal(read[0].localizer, np.rint(original[0].localizer))
    assert read[1].localizer is not None and read[1].localizer.shape == (64, 64)
    assert np.all(read[1].localizer == 128)
    assert read[0].meta.localizer_spacing_mm == pytest.approx((30 * 0.2896 / 72, 30 * 0.2896 / 48))


def test_directory_chain_layout(tmp_path: Path, written: Written) -> None:
    """Chunks back to back, the first pointing at 0, each entry's data inside its chunk; small chunks read the same."""
    original, _, read = written
    path = write_e2e(original, tmp_path / "small_chunks.e2e", entries_per_chunk=4)
    data = path.read_bytes()
    chunks = _walk_chunks(data)
    assert len(chunks) > 3 and chunks[0][0] == 36 + 52
    previous = 0
    for (position, entries), following in zip(chunks, [c[0] for c in chunks[1:]] + [len(data)]):
        assert struct.unpack_from("<I", data, position + 44)[0] == previous
        assert entries[0][1] == position + 52 + 44 * len(entries)
        assert entries[-1][1] + 60 + entries[-1][2] == following
        previous = position
    again = read_e2e(path)
    for first, second in zip(read, again):
        np.testing.assert_array_equal(first.bscans, second.bscans)
        assert first.meta.positions == second.meta.positions


def test_second_opinion_oct_converter(written: Written) -> None:
    from oct_converter.readers import E2E

    original, path, _ = written
    theirs = sorted(E2E(path).read_oct_volume(), key=lambda v: v.volume_id)
    assert [len(v.volume) for v in theirs] == [3, 1]
    assert [v.laterality for v in theirs] == ["R", "L"]
    assert {v.patient_id for v in theirs} == {"HRF-0042"}
    for ours, other in zip(original, theirs):
        stack = np.stack(other.volume).astype(np.float64)
        assert stack.shape == ours.bscans.shape
        r = np.corrcoef(stack.ravel(), ours.bscans.ravel().astype(np.float64))[0, 1]
        assert r > 0.999
        assert np.abs(stack * 255 - ours.bscans).max() <= 1.0  # its scale is ours divided by 255


def test_second_opinion_eyepy_importer(written: Written) -> None:
    import eyepy

    original, path, _ = written
    ev = eyepy.import_heyex_e2e(path)
    assert ev.shape == original[0].bscans.shape


def test_pixel_code_matches_reference_decoder() -> None:
    from eyepy.io.he.e2e_format import Bscan

    x = np.geomspace(1e-9, 1.99, 5000)
    decoded = Bscan.LUT[e2e_code_from_linear(x)].astype(np.float64)
    assert np.max(np.abs(decoded - x) / x) <= 2.0**-11
    assert Bscan.LUT[e2e_code_from_linear(np.array([1.0]))][0] == 1.0
    grey = np.arange(256, dtype=np.float32)
    back = display_from_linear(Bscan.LUT[e2e_code_from_linear(linear_from_display(grey))])
    assert np.abs(back - grey).max() < 0.1


def test_positions_from_spacing_and_date_without_time(tmp_path: Path) -> None:
    volume = _volume(4, "OS", None, seed=3, localizer=False, positions=False)
    (read,) = read_e2e(write_e2e([volume], tmp_path / "no_positions.e2e"))
    assert read.meta.acquired_at is None and read.meta.visit_date == date(2024, 3, 14)
    assert read.meta.spacing.lateral_mm == pytest.approx(LATERAL, rel=1e-4)
    assert read.meta.spacing.between_bscans_mm == pytest.approx(BETWEEN, rel=1e-4)
    ys = [p.start_mm[1] for p in read.meta.positions]
    assert np.allclose(np.diff(ys), -BETWEEN, atol=1e-4)
    first = read.meta.positions[0]
    assert math.isclose(first.end_mm[0] - first.start_mm[0], LATERAL * W, rel_tol=1e-4)


def _assert_clean_failure(path: Path) -> ReadError:
    with pytest.raises(ReadError) as info:
        read_e2e(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message
    return info.value


def test_broken_fixture_fails_cleanly(fixtures_dir: Path) -> None:
    err = _assert_clean_failure(fixtures_dir / "rse-panimg" / "e2e_minimized.E2E")
    assert "past the end of the file" in str(err)


def test_empty_and_foreign_files_fail_cleanly(tmp_path: Path) -> None:
    empty = tmp_path / "empty.e2e"
    empty.write_bytes(b"")
    assert "empty" in str(_assert_clean_failure(empty))
    foreign = tmp_path / "foreign.e2e"
    foreign.write_bytes(b"%PDF-1.7\n" * 20)
    assert "not a HEYEX E2E file" in str(_assert_clean_failure(foreign))


@pytest.mark.parametrize("fraction", [0.0005, 0.0013, 0.002, 0.01, 0.3, 0.5, 0.9, 0.99999])
def test_truncated_file_fails_cleanly(tmp_path: Path, written: Written, fraction: float) -> None:
    data = written[1].read_bytes()
    cut = tmp_path / f"cut_{fraction}.e2e"
    cut.write_bytes(data[: max(5, int(len(data) * fraction))])
    assert "truncated" in str(_assert_clean_failure(cut))


def test_damaged_record_fails_cleanly_with_cause(tmp_path: Path, written: Written) -> None:
    """A B-scan record claiming more pixels than it holds gets past the directory check and fails in parsing."""
    data = bytearray(written[1].read_bytes())
    for _, entries in _walk_chunks(bytes(data)):
        for entry in entries:
            if entry[10] == 1073741824 and struct.unpack_from("<I", data, entry[1] + 64)[0] == BSCAN_IMAGE:
                struct.pack_into("<I", data, entry[1] + 68, 10**8)  # n_values
    damaged = tmp_path / "damaged.e2e"
    damaged.write_bytes(bytes(data))
    err = _assert_clean_failure(damaged)
    assert "cannot parse" in str(err) and err.__cause__ is not None


def test_file_without_oct_series_fails_cleanly(tmp_path: Path, written: Written) -> None:
    data = bytearray(written[1].read_bytes())
    for _, entries in _walk_chunks(bytes(data)):
        for entry in entries:
            if entry[10] == 10004:  # drop every B-scan metadata record's type
                struct.pack_into("<I", data, entry[1] + 52, 10003)
                struct.pack_into("<I", data, entry[0] + 36, 10003)
    no_oct = tmp_path / "no_oct.e2e"
    no_oct.write_bytes(bytes(data))
    assert "no OCT series" in str(_assert_clean_failure(no_oct))
