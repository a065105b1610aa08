"""DICOM OCT: writer ↔ reader round trips, error mapping for bad files, and the header peek."""

from __future__ import annotations

import dataclasses
import math
import shutil
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest

from hrf_batch.errors import NotOctError, ReadError
from hrf_batch.io.hashing import sha256_of_files
from hrf_batch.io.readers.dicom_oct import DicomPeek, peek_dicom, read_dicom_oct
from hrf_batch.io.volume import BScanPosition, Spacing, Volume, VolumeMeta
from hrf_batch.io.writers.dicom import (
    CT_SOP_CLASS,
    OP8_SOP_CLASS,
    OPT_SOP_CLASS,
    write_ct_dicom,
    write_dicom_oct,
    write_empty_oct_dicom,
)

N, H, W = 5, 64, 96
LOC_SHAPE = (80, 80)
LOC_SPACING = (0.09, 0.1)  # (x mm, y mm) = (col, row): deliberately not square, so a swap shows


def make_volume(
    *, n: int = N, eye: str = "OD", localizer: bool = True, seed: int = 0, acquired_tz: timezone | None = None
) -> Volume:
    """A small volume with slanted, per-B-scan-distinct positions and random display-scale pixels."""
    rng = np.random.default_rng(seed)
    positions = tuple(
        BScanPosition(start_mm=(1.0 + 0.1 * i, 2.0 + 0.3 * i), end_mm=(6.0 - 0.05 * i, 3.0 + 0.2 * i)) for i in range(n)
    )
    meta = VolumeMeta(
        source_path="synthetic.vol",
        source_sha256=f"{seed:064x}",
        source_format="heyex-vol",
        series_uid="not-a-dicom-uid",
        patient_id="PAT-0042",
        eye=eye,
        visit_date=date(2021, 3, 14),
        acquired_at=datetime(2021, 3, 14, 9, 26, 53, 589000, tzinfo=acquired_tz),
        device="Heidelberg Spectralis",
        scan_pattern="volume" if n > 1 else "line",
        spacing=Spacing(lateral_mm=0.011819, axial_mm=0.0038721, between_bscans_mm=0.12345 if n > 1 else 0.0),
        positions=positions if localizer else (),
        localizer_spacing_mm=LOC_SPACING if localizer else None,
        birth_date=date(1951, 10, 3),
        patient_name="Doe^Jane",
    )
    bscans = rng.uniform(0.0, 255.0, size=(n, H, W)).astype(np.float32)
    loc = rng.uniform(0.0, 255.0, size=LOC_SHAPE).astype(np.float32) if localizer else None
    return Volume(bscans=bscans, meta=meta, localizer=loc)


def oct_files(paths: list[Path]) -> list[Path]:
    return [p for p in paths if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == OPT_SOP_CLASS]


def assert_one_line_naming(exc: ReadError, path: Path) -> None:
    text = str(exc)
    assert len(text.splitlines()) == 1
    assert str(path) in text
    assert exc.hint


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("multiframe", [True, False])
def test_round_trip_preserves_pixels_geometry_and_metadata(tmp_path: Path, multiframe: bool) -> None:
    vol = make_volume()
    written = write_dicom_oct(vol, tmp_path, multiframe=multiframe)
    oct_paths = oct_files(written)
    assert len(oct_paths) == (1 if multiframe else N)
    if not multiframe:
        # file-name order reversed against instance order, then passed shuffled
        renamed = []
        for i, p in enumerate(oct_paths):
            renamed.append(p.rename(tmp_path / f"img_{N - i:02d}.dcm"))
        oct_paths = [renamed[k] for k in (3, 0, 4, 2, 1)]

    (got,) = read_dicom_oct(oct_paths)

    assert got.bscans.dtype == np.float32 and got.bscans.shape == (N, H, W)
    assert np.abs(got.bscans - vol.bscans).max() <= 1.0
    np.testing.assert_array_equal(got.bscans, np.rint(vol.bscans))  # order and rounding exact
    m = got.meta
    for key in ("lateral_mm", "axial_mm", "between_bscans_mm"):
        assert math.isclose(getattr(m.spacing, key), getattr(vol.meta.spacing, key), rel_tol=1e-4)
    assert m.eye == "OD"
    assert m.patient_id == "PAT-0042" and m.patient_name == "Doe^Jane"
    assert m.birth_date == date(1951, 10, 3)
    assert m.visit_date == date(2021, 3, 14)
    assert m.acquired_at == vol.meta.acquired_at
    assert m.device == "Heidelberg Spectralis"
    assert m.scan_pattern == "volume" and m.source_format == "dicom-oct"
    assert m.source_sha256 == sha256_of_files(oct_paths)
    assert m.series_uid == str(pydicom.dcmread(oct_paths[0], stop_before_pixels=True).SeriesInstanceUID)
    assert m.localizer_spacing_mm == pytest.approx(LOC_SPACING)
    tol = max(LOC_SPACING)  # one localizer pixel
    assert len(m.positions) == N
    for want, have in zip(vol.meta.positions, m.positions):
        assert have.start_mm == pytest.approx(want.start_mm, abs=tol)
        assert have.end_mm == pytest.approx(want.end_mm, abs=tol)
    assert got.localizer is not None
    np.testing.assert_array_equal(got.localizer, np.rint(vol.localizer))


def test_writer_uses_sop_classes_spacing_order_and_row_col_reference_coordinates(tmp_path: Path) -> None:
    vol = make_volume()
    written = write_dicom_oct(vol, tmp_path)
    ds = pydicom.dcmread(written[0])
    loc = pydicom.dcmread(written[-1])
    assert ds.SOPClassUID == OPT_SOP_CLASS and loc.SOPClassUID == OP8_SOP_CLASS
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
    assert int(ds.NumberOfFrames) == N and ds.ImageLaterality == "R" and loc.ImageLaterality == "R"
    assert "Laterality" not in ds  # General Series laterality is for unpaired parts; the eye is ImageLaterality
    assert ds.StudyInstanceUID == loc.StudyInstanceUID and "FrameOfReferenceUID" in ds
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == pytest.approx([0.0038721, 0.011819])
    assert float(measures.SliceThickness) == pytest.approx(0.12345)
    col_mm, row_mm = LOC_SPACING
    assert [float(v) for v in loc.PixelSpacing] == pytest.approx([row_mm, col_mm])
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        location = group.OphthalmicFrameLocationSequence[0]
        assert location.ReferencedSOPInstanceUID == loc.SOPInstanceUID
        (x0, y0), (x1, y1) = vol.meta.positions[i].start_mm, vol.meta.positions[i].end_mm
        assert list(location.ReferenceCoordinates) == pytest.approx([y0 / row_mm, x0 / col_mm, y1 / row_mm, x1 / col_mm])


def test_single_frame_series_shares_series_and_numbers_instances(tmp_path: Path) -> None:
    written = write_dicom_oct(make_volume(), tmp_path, multiframe=False)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in oct_files(written)]
    assert sorted(int(h.InstanceNumber) for h in headers) == list(range(1, N + 1))
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert all(int(h.NumberOfFrames) == 1 for h in headers)


def test_single_frame_order_falls_back_to_stack_position_then_fails(tmp_path: Path) -> None:
    vol = make_volume(localizer=False)
    paths = oct_files(write_dicom_oct(vol, tmp_path, multiframe=False))
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = 7  # repeated: useless for ordering
        ds.save_as(p)
    (got,) = read_dicom_oct(paths[::-1])
    np.testing.assert_array_equal(got.bscans, np.rint(vol.bscans))
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.PerFrameFunctionalGroupsSequence[0].FrameContentSequence
        ds.save_as(p)
    with pytest.raises(ReadError, match="cannot order"):
        read_dicom_oct(paths)


def test_mixed_inputs_give_one_volume_per_series(tmp_path: Path) -> None:
    right = make_volume(eye="OD", seed=1)
    left = make_volume(eye="OS", seed=2, n=3)
    paths = oct_files(write_dicom_oct(right, tmp_path, multiframe=False))
    paths += oct_files(write_dicom_oct(left, tmp_path, multiframe=True))
    volumes = read_dicom_oct(paths[::-1])
    assert sorted((v.meta.eye, v.n_bscans) for v in volumes) == [("OD", N), ("OS", 3)]
    by_eye = {v.meta.eye: v for v in volumes}
    np.testing.assert_array_equal(by_eye["OD"].bscans, np.rint(right.bscans))
    np.testing.assert_array_equal(by_eye["OS"].bscans, np.rint(left.bscans))
    assert len(by_eye["OS"].meta.positions) == 3  # each finds its own localizer in the shared folder


def test_line_scan_left_eye_without_localizer(tmp_path: Path) -> None:
    vol = make_volume(n=1, eye="OS", localizer=False, acquired_tz=timezone(timedelta(hours=2)))
    written = write_dicom_oct(vol, tmp_path)
    assert len(written) == 1
    (got,) = read_dicom_oct(written)
    assert got.meta.eye == "OS" and got.meta.scan_pattern == "line"
    assert got.meta.positions == () and got.localizer is None and got.meta.localizer_spacing_mm is None
    assert got.meta.spacing.between_bscans_mm == 0.0
    assert got.meta.acquired_at == vol.meta.acquired_at and got.meta.acquired_at.utcoffset() == timedelta(hours=2)


def test_unknown_eye_round_trips_as_unknown(tmp_path: Path) -> None:
    (got,) = read_dicom_oct(oct_files(write_dicom_oct(make_volume(eye="unknown"), tmp_path)))
    assert got.meta.eye == "unknown"


def test_missing_localizer_gives_no_positions(tmp_path: Path) -> None:
    written = write_dicom_oct(make_volume(), tmp_path / "study")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(str(written[-1]), elsewhere / written[-1].name)
    (got,) = read_dicom_oct(written[:1])
    assert got.meta.positions == () and got.localizer is None


def test_localizer_passed_among_paths_and_broken_neighbour_ignored(tmp_path: Path) -> None:
    written = write_dicom_oct(make_volume(), tmp_path)
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 3)
    (got_listed,) = read_dicom_oct(written)  # the OP file among the inputs is used, not rejected
    (got_found,) = read_dicom_oct(written[:1])  # the OP file is found in the folder despite the junk
    assert len(got_listed.meta.positions) == N and len(got_found.meta.positions) == N


def test_high_bit_depth_is_scaled_and_rescale_applied(tmp_path: Path) -> None:
    (path,) = oct_files(write_dicom_oct(make_volume(localizer=False), tmp_path))
    ds = pydicom.dcmread(path)
    stored = np.zeros((N, H, W), dtype=np.uint16)
    stored[:, 0, 0], stored[:, 0, 1], stored[:, 0, 2] = 4095, 2048, 100
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = stored.tobytes()
    ds.save_as(path)
    (got,) = read_dicom_oct([path])
    assert got.bscans[0, 0, :3] == pytest.approx([255.0, 2048 * 255 / 4095, 100 * 255 / 4095], abs=1e-3)

    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.full((N, H, W), 100, dtype=np.uint8).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "10"
    ds.save_as(path)
    (got,) = read_dicom_oct([path])
    assert np.all(got.bscans == 60.0)


# --- errors --------------------------------------------------------------------------------------


def test_ct_dicom_is_not_oct(tmp_path: Path) -> None:
    path = write_ct_dicom(tmp_path / "ct.dcm")
    with pytest.raises(NotOctError) as info:
        read_dicom_oct([path])
    assert "CT Image Storage" in str(info.value)
    assert_one_line_naming(info.value, path)


def test_localizer_alone_is_not_oct(tmp_path: Path) -> None:
    written = write_dicom_oct(make_volume(), tmp_path)
    with pytest.raises(NotOctError):
        read_dicom_oct(written[-1:])


def test_zero_frame_oct_is_a_read_error(tmp_path: Path) -> None:
    path = write_empty_oct_dicom(tmp_path / "empty_opt.dcm")
    assert pydicom.dcmread(path).SOPClassUID == OPT_SOP_CLASS
    with pytest.raises(ReadError) as info:
        read_dicom_oct([path])
    assert not isinstance(info.value, NotOctError)
    assert "no B-scans" in str(info.value)
    assert_one_line_naming(info.value, path)


@pytest.mark.parametrize(
    "content",
    [b"", b"\0" * 128 + b"DICM" + np.random.default_rng(7).bytes(2000), b"hello, not dicom\n" * 20],
    ids=["empty", "random-with-magic", "text"],
)
def test_garbage_files_raise_read_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.dcm"
    path.write_bytes(content)
    with pytest.raises(ReadError) as info:
        read_dicom_oct([path])
    assert_one_line_naming(info.value, path)


def test_truncated_files_raise_read_error(tmp_path: Path) -> None:
    (source,) = oct_files(write_dicom_oct(make_volume(localizer=False), tmp_path / "src"))
    data = source.read_bytes()
    pixel_start = len(data) - N * H * W
    offsets = [0, 64, 131, 140, 400, pixel_start // 2, pixel_start - 4, pixel_start + 100, len(data) - 1]
    for offset in offsets:
        path = tmp_path / f"cut_{offset}.dcm"
        path.write_bytes(data[:offset])
        with pytest.raises(ReadError) as info:
            read_dicom_oct([path])
        assert_one_line_naming(info.value, path)
        if offset > 140:
            assert info.value.__cause__ is not None or "no B-scans" in str(info.value) or "SOP Class" in str(info.value)


def test_corrupted_headers_never_leak_other_exceptions(tmp_path: Path) -> None:
    (source,) = oct_files(write_dicom_oct(make_volume(n=2, localizer=False), tmp_path / "src"))
    data = bytearray(source.read_bytes())
    header_end = len(data) - 2 * H * W
    rng = np.random.default_rng(3)
    outcomes = {"volume": 0, "error": 0}
    for k in range(40):
        damaged = bytearray(data)
        for pos in rng.integers(132, header_end, size=8):
            damaged[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"damaged_{k}.dcm"
        path.write_bytes(bytes(damaged))
        try:
            volumes = read_dicom_oct([path])
        except ReadError as exc:
            assert_one_line_naming(exc, path)
            outcomes["error"] += 1
        else:
            assert all(isinstance(v, Volume) for v in volumes)
            outcomes["volume"] += 1
    assert outcomes["error"] > 0


# --- peek ----------------------------------------------------------------------------------------


def test_peek_returns_none_for_non_dicom(tmp_path: Path) -> None:
    for name, content in {"empty": b"", "text": b"patient list\n" * 50, "noise": bytes(range(256)) * 4}.items():
        path = tmp_path / name
        path.write_bytes(content)
        assert peek_dicom(path) is None


def test_peek_fields_for_oct_localizer_and_ct(tmp_path: Path) -> None:
    written = write_dicom_oct(make_volume(), tmp_path / "mf")
    oct_peek, op_peek = peek_dicom(written[0]), peek_dicom(written[-1])
    ds = pydicom.dcmread(written[0], stop_before_pixels=True)
    assert oct_peek == DicomPeek(
        sop_class_uid=OPT_SOP_CLASS,
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        n_frames=N,
        is_oct=True,
        is_localizer=False,
    )
    assert op_peek is not None and op_peek.is_localizer and not op_peek.is_oct
    assert op_peek.sop_class_uid == OP8_SOP_CLASS and op_peek.n_frames == 1
    assert op_peek.study_uid == oct_peek.study_uid and op_peek.series_uid != oct_peek.series_uid

    singles = [peek_dicom(p) for p in oct_files(write_dicom_oct(make_volume(), tmp_path / "sf", multiframe=False))]
    assert all(p is not None and p.is_oct and p.n_frames == 1 for p in singles)
    assert len({p.series_uid for p in singles if p is not None}) == 1

    ct = peek_dicom(write_ct_dicom(tmp_path / "ct.dcm"))
    assert ct is not None and ct.sop_class_uid == CT_SOP_CLASS and not ct.is_oct and not ct.is_localizer

    empty = peek_dicom(write_empty_oct_dicom(tmp_path / "empty.dcm"))
    assert empty is not None and empty.is_oct and empty.n_frames == 0


def test_peek_raises_for_damaged_file_with_magic(tmp_path: Path) -> None:
    path = tmp_path / "damaged.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 3)
    with pytest.raises(ReadError) as info:
        peek_dicom(path)
    assert_one_line_naming(info.value, path)


def test_damaged_unneeded_element_is_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (path,) = oct_files(write_dicom_oct(make_volume(localizer=False), tmp_path))
    ds = pydicom.dcmread(path)
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "US", [513, 3])
    ds.save_as(path)
    raw = path.read_bytes()
    at = raw.find(b"\x09\x00\x01\x10US\x04\x00")
    assert at > 0
    path.write_bytes(raw[: at + 6] + b"\x03\x00" + raw[at + 8 : at + 11] + raw[at + 12 :])  # 3-byte US value
    with caplog.at_level("WARNING"):
        (got,) = read_dicom_oct([path])
    assert got.bscans.shape == (N, H, W)
    assert "(0009,1001)" in caplog.text


@pytest.mark.parametrize("multiframe", [True, False])
@pytest.mark.parametrize("localizer", [True, False])
def test_written_files_pass_dciodvfy(tmp_path: Path, multiframe: bool, localizer: bool) -> None:
    """OPT (and OP localizer) as written pass dicom3tools' IOD check; the one set-aside contradiction is
    explained in hrf_batch.export.dciodvfy."""
    from hrf_batch.export.dciodvfy import validate

    written = write_dicom_oct(make_volume(n=3, localizer=localizer), tmp_path, multiframe=multiframe)
    results = [validate(p) for p in written]
    assert {r.iod for r in results} == ({"OphthalmicTomographyImage", "OphthalmicPhotography8BitImage"} if localizer
                                        else {"OphthalmicTomographyImage"})
    for result in results:
        assert result.errors == (), f"{result.path.name}: {result.errors}"


def test_uid_seed_names_the_same_objects_wherever_the_source_lies(tmp_path: Path) -> None:
    vol = make_volume(n=2)
    moved = Volume(vol.bscans, dataclasses.replace(vol.meta, source_path="elsewhere/moved.vol"), vol.localizer)
    a = write_dicom_oct(vol, tmp_path / "a", uid_seed="sha/series")
    b = write_dicom_oct(moved, tmp_path / "b", uid_seed="sha/series")
    c = write_dicom_oct(vol, tmp_path / "c", uid_seed="other/series")
    assert [p.name for p in a] == [p.name for p in b] and not {p.name for p in a} & {p.name for p in c}
    series = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in a}
    assert len(series) == 2 and vol.meta.series_uid not in series
