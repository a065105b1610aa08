"""One bad file never stops a study: hostile inputs fail as one clean ReadError (one error record in
discovery), and sizes a header declares are refused before anything of that size is allocated.

Every bad file is made here, in tmp_path, from a good one written by the project's own writers and
then patched (header bytes, DICOM attributes, TIFF headers); the large ones are sparse files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, RLELossless

from hrf_batch.errors import ReadError
from hrf_batch.io.discover import FileIssue
from hrf_batch.io.readers import read_volume, read_volumes
from hrf_batch.io.readers.dicom_oct import LOG_LINE_LIMIT
from hrf_batch.io.readers.heyex_e2e import BSCAN_IMAGE
from hrf_batch.io.readers.heyex_vol import FILE_HEADER_SIZE, HEADER_STRUCT
from hrf_batch.io.study import iter_study, scan_study
from hrf_batch.io.volume import Volume
from hrf_batch.io.writers.dicom import write_dicom_oct
from hrf_batch.io.writers.e2e import write_e2e
from hrf_batch.io.writers.heyex_xml import write_heyex_xml
from hrf_batch.io.writers.vol import write_vol

from conftest import PROJECT_ROOT, make_test_volume

# Indices of HEADER_STRUCT fields (the HEYEX .vol file header) patched below.
SIZE_X, N_BSCANS, SIZE_Y, SCALE_X, DISTANCE, SCALE_Y, EXAM_TIME, DOB, VISIT = 1, 2, 3, 4, 5, 6, 14, 21, 24
H, W = 40, 64
# Exception class names a user must never see as the reason a file was not read.
PYTHON_NAMES = re.compile(r"OverflowError|MemoryError|FileNotFoundError|DecompressionBomb|Traceback|ValueError")


def _vol_offset(index: int) -> int:
    """Byte offset of field ``index`` of the .vol file header, from the reader's own struct format."""
    offset = field = 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", HEADER_STRUCT.format.lstrip("<").replace(" ", "")):
        n = int(count or 1)
        sizes = [n] if code == "s" else [struct.calcsize("<" + code)] * n
        for size in sizes:
            if field == index:
                return offset
            offset += size
            field += 1
    raise IndexError(index)


def _patch(path: Path, offset: int, fmt: str, value: float | int) -> Path:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(fmt, value))
    return path


def _vol(folder: Path, name: str = "good.vol", n: int = 3) -> Path:
    return write_vol(make_test_volume(n, H, W), folder / name)


def _vol_with(folder: Path, name: str, field: int, fmt: str, value: float | int) -> Path:
    return _patch(_vol(folder, name), _vol_offset(field), fmt, value)


def _nan_first_bscan_vol(folder: Path, name: str) -> Path:
    """A good .vol whose first B-scan is all NaN (after the header, the 80x80 localizer, its own header)."""
    path = _vol(folder, name)
    with open(path, "r+b") as fh:
        fh.seek(FILE_HEADER_SIZE + 80 * 80 + 256)
        fh.write(np.full(H * W, np.nan, "<f4").tobytes())
    return path


def _sparse_vol(folder: Path, name: str, n: int, size_x: int, size_y: int) -> Path:
    """A .vol whose header declares ``n`` B-scans of ``size_x`` x ``size_y``, grown to a 3 GiB sparse file."""
    path = _vol_with(folder, name, N_BSCANS, "<i", n)
    _patch(path, _vol_offset(SIZE_X), "<i", size_x)
    _patch(path, _vol_offset(SIZE_Y), "<i", size_y)
    with open(path, "r+b") as fh:
        fh.truncate(3 * 2**30)  # sparse: costs no disk
    return path


def _read_error(path: Path, *fragments: str) -> str:
    """The one-line message of the ReadError reading ``path`` raises; it names the file and ``fragments``."""
    with pytest.raises(ReadError) as info:
        read_volumes(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message, message
    assert " — " in message, f"no hint on what to do: {message}"
    assert not PYTHON_NAMES.search(message), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _tiff_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny uncompressed 8-bit TIFF whose header declares ``width`` x ``height`` pixels (a bomb's header)."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 4, height), (279, 4, width * height)]
    data_at = 8 + 2 + 12 * len(tags) + 4
    tags[5] = (273, 4, data_at)
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(64))
    return path


def _xml(folder: Path, n: int = 3) -> Path:
    return write_heyex_xml(make_test_volume(n, H, W, fmt="heyex-xml"), folder, stem="x")


def _edit_xml(xml: Path, tag: str, text: str) -> Path:
    content = xml.read_text(encoding="utf-8")
    patched, count = re.subn(rf"<{tag}>[^<]*</{tag}>", f"<{tag}>{text}</{tag}>", content, count=1)
    assert count == 1, tag
    xml.write_text(patched, encoding="utf-8")
    return xml


def _xml_with_overflowing_hour(folder: Path) -> Path:
    """An XML export whose every <Hour> is a number no clock has."""
    xml = _xml(folder)
    xml.write_text(re.sub(r"<Hour>[^<]*</Hour>", "<Hour>99999999999999999999</Hour>", xml.read_text()))
    return xml


def _xml_without_localizer(folder: Path) -> Path:
    """An XML export whose localizer TIFF is missing."""
    xml = _xml(folder)
    (xml.parent / "x_NIR.tif").unlink()
    return xml


def _dicom(folder: Path, edit: Callable[[Dataset], None]) -> Path:
    """A multi-frame OCT DICOM written by the project's writer, edited, saved again; its localizer lies beside it."""
    oct_path = write_dicom_oct(make_test_volume(2, H, W, fmt="dicom-oct"), folder)[0]
    ds = dcmread(oct_path)
    edit(ds)
    ds.save_as(oct_path)
    return oct_path


def _compressed_claim(syntax: str, frames: int, rows: int, cols: int) -> Callable[[Dataset], None]:
    """Edit: compressed pixel data whose header claims ``frames`` x ``rows`` x ``cols`` (only one tiny fragment)."""

    def edit(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
        ds.PixelData = encapsulate([bytes(64)])
        ds["PixelData"].VR = "OB"

    return edit


def _set(**values: object) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        for key, value in values.items():
            setattr(ds, key, value)

    return edit


def _shared_measures(**values: object) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        for key, value in values.items():
            setattr(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0], key, value)

    return edit


def _e2e_missing_one_bscan(folder: Path) -> Path:
    """A 3-B-scan .e2e where one bit of the last B-scan image's type is flipped, so eyepy finds 2."""
    path = write_e2e([make_test_volume(3, H, W, fmt="heyex-e2e")], folder / "flipped.e2e")
    data = bytearray(path.read_bytes())
    marker = struct.pack("<5I", H * W * 2, BSCAN_IMAGE, H * W, H, W)
    found = [m.start() for m in re.finditer(re.escape(marker), bytes(data))]
    assert len(found) == 3
    data[found[-1] + 4] ^= 0x02
    path.write_bytes(bytes(data))
    return path


# --- HEYEX .vol -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "fmt", "value", "fragment"),
    [
        (VISIT, "<d", 1e300, "visit date"),
        (VISIT, "<d", math.nan, "visit date"),
        (VISIT, "<d", 1.0, "visit date 1899-12-31"),  # a real day, but no OCT visit: outside 1900-2099
        (EXAM_TIME, "<Q", 2**64 - 1, "exam time"),
    ],
    ids=["visit-huge", "visit-nan", "visit-1899", "exam-time-huge"],
)
def test_vol_impossible_visit_dates_refuse_the_file(tmp_path: Path, field: int, fmt: str, value: float, fragment: str) -> None:
    _read_error(_vol_with(tmp_path, "bad_date.vol", field, fmt, value), fragment, "export")


@pytest.mark.parametrize("value", [1e300, -1e9, math.inf, 1.0], ids=["huge", "before-calendar", "inf", "1899"])
def test_vol_impossible_birth_date_is_dropped_without_identifiers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, value: float
) -> None:
    path = _vol_with(tmp_path, "bad_dob.vol", DOB, "<d", value)
    with caplog.at_level(logging.WARNING):
        volume = read_volume(path)
    assert volume.meta.birth_date is None and volume.n_bscans == 3
    warnings = [r.getMessage().replace(str(path), "") for r in caplog.records if "birth date" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    for identifier in ("P012", "Jane", "Roe", "1950", "1899", "1e+300", "inf", "-1"):
        assert identifier not in warnings[0]
    assert "P012" not in caplog.text and "Roe" not in caplog.text


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [(SCALE_X, math.nan, "lateral pixel spacing is nan"), (SCALE_Y, 0.0, "axial pixel spacing is 0.0"),
     (DISTANCE, math.inf, "distance between B-scans is inf"), (SCALE_X, -0.01, "lateral pixel spacing")],
    ids=["lateral-nan", "axial-zero", "between-inf", "lateral-negative"],
)
def test_vol_unusable_spacing_is_refused(tmp_path: Path, field: int, value: float, fragment: str) -> None:
    _read_error(_vol_with(tmp_path, "bad_spacing.vol", field, "<d", value), fragment, "scale")


@pytest.mark.parametrize("fill", ["all-nan", "one-inf"])
def test_vol_non_finite_pixels_are_refused_not_shown_as_black(tmp_path: Path, fill: str) -> None:
    path = _vol(tmp_path, "nan.vol")
    data = bytearray(path.read_bytes())
    first_pixel = FILE_HEADER_SIZE + 80 * 80 + 256  # header, 80x80 localizer, first B-scan header
    if fill == "all-nan":
        for b in range(3):
            at = first_pixel + b * (256 + 4 * H * W)
            data[at : at + 4 * H * W] = np.full(H * W, np.nan, "<f4").tobytes()
    else:
        data[first_pixel + 4 * 17 : first_pixel + 4 * 18] = np.array([np.inf], "<f4").tobytes()
    path.write_bytes(bytes(data))
    expected = f"{3 * H * W} of {3 * H * W}" if fill == "all-nan" else f"1 of {3 * H * W}"
    _read_error(path, expected, "NaN or infinite")


def test_vol_header_declaring_more_than_the_file_holds(tmp_path: Path) -> None:
    path = _vol_with(tmp_path, "more.vol", N_BSCANS, "<i", 300)
    _read_error(path, "header declares at least", f"the file has {path.stat().st_size}")


# --- HEYEX XML ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "text", "fragment"),
    [("Hour", "99999999999999999999", "acquisition time"), ("Hour", "25", "acquisition time 25:"),
     ("Second", "nan", "acquisition time"), ("Year", "99999999999999999999", "not a valid date")],
    ids=["hour-overflow", "hour-25", "second-nan", "year-overflow"],
)
def test_xml_impossible_times_are_refused(tmp_path: Path, tag: str, text: str, fragment: str) -> None:
    xml = _xml(tmp_path)
    content = xml.read_text(encoding="utf-8")
    if tag == "Year":  # the first <Year> is the birth date's; the series' exam date is the one read
        head, sep, tail = content.partition("<ExamDate>")
        content = head + sep + re.sub(r"<Year>[^<]*</Year>", f"<Year>{text}</Year>", tail, count=1)
    else:  # every image's time, the localizer's too
        content = re.sub(rf"<{tag}>[^<]*</{tag}>", f"<{tag}>{text}</{tag}>", content)
    xml.write_text(content, encoding="utf-8")
    _read_error(xml, fragment)


def test_xml_impossible_birth_date_is_dropped_without_identifiers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    xml = _edit_xml(_xml(tmp_path), "Month", "13")  # the first <Month> is the birth date's
    with caplog.at_level(logging.WARNING):
        volume = read_volume(xml)
    assert volume.meta.birth_date is None and "birth date" in caplog.text
    for identifier in ("P012", "Jane", "Roe", "1950"):
        assert identifier not in caplog.text


def test_xml_missing_localizer_tiff_is_named(tmp_path: Path) -> None:
    xml = _xml(tmp_path)
    (tmp_path / "x_NIR.tif").unlink()
    _read_error(xml, "image file x_NIR.tif named in the XML is missing")


@pytest.mark.parametrize(
    ("side", "fragment"),
    [(20000, "too many pixels"), (12000, "too many pixels"), (5000, "more than 4096 pixels a side")],
    ids=["pillow-bomb-error", "pillow-bomb-warning", "above-our-limit"],
)
def test_xml_tiff_declaring_a_huge_image_is_refused_before_decoding(tmp_path: Path, side: int, fragment: str) -> None:
    xml = _xml(tmp_path)
    _tiff_declaring(tmp_path / "x_B2.tif", side, side)
    _read_error(xml, fragment)


# --- DICOM -------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize(
    ("edit", "fragment"),
    [(_set(RescaleSlope="NaN"), "RescaleSlope nan"), (_set(RescaleSlope="0"), "RescaleSlope 0.0"),
     (_set(RescaleIntercept="-inf"), "RescaleIntercept -inf"),
     (_shared_measures(PixelSpacing=["NaN", "0.01"]), "invalid PixelSpacing"),
     (_shared_measures(SliceThickness="inf"), "distance between B-scans is inf")],
    ids=["slope-nan", "slope-zero", "intercept-inf", "spacing-nan", "thickness-inf"],
)
def test_dicom_unusable_numbers_are_refused(tmp_path: Path, edit: Callable[[Dataset], None], fragment: str) -> None:
    _read_error(_dicom(tmp_path, edit), fragment)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # the writer's own warning about the test's junk
def test_dicom_log_lines_stay_short_and_never_quote_the_birth_date(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    junk = bytes(b for b in (i * 37 % 251 + 1 for i in range(40000)) if b != 0x5C)[:31500]  # binary, no "\\"
    birth = b"Q7" * (len(junk) // 2)  # printable, so any rendering of it would show

    def edit(ds: Dataset) -> None:
        ds.StudyDate = "X" * len(junk)
        ds.PatientBirthDate = "Y" * len(junk)

    path = _dicom(tmp_path, edit)
    path.write_bytes(path.read_bytes().replace(b"X" * len(junk), junk).replace(b"Y" * len(junk), birth))
    with caplog.at_level(logging.DEBUG):
        volume = read_volume(path)
        logging.getLogger("pydicom").warning("Invalid value for VR UI: %r", junk)
        logging.getLogger("pydicom.pixels.decoders.base").warning("frame: %s", junk.decode("latin-1"))
    assert volume.meta.birth_date is None
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.endswith("ignoring unreadable PatientBirthDate") for m in messages), messages
    assert max(len(m) for m in messages) <= LOG_LINE_LIMIT + 200  # our own lines: a path plus a capped value
    assert all(len(r.getMessage()) <= LOG_LINE_LIMIT for r in caplog.records if r.name.startswith("pydicom"))
    assert all("\n" not in m and m.isprintable() for m in messages), [m for m in messages if not m.isprintable()]
    assert "Q7Q7" not in caplog.text


# --- HEYEX .e2e --------------------------------------------------------------------------------------


def test_e2e_with_a_lost_bscan_is_refused_not_read_in_part(tmp_path: Path) -> None:
    _read_error(_e2e_missing_one_bscan(tmp_path), "declares 3 B-scans but only 2 can be read", "not read in part")


# --- budgets: refused before allocation ------------------------------------------------------------

_READ_UNDER_LIMIT = r"""
import json, resource, sys
from pathlib import Path
import numpy, pydicom, PIL.Image
PIL.Image.init()
from hrf_batch.errors import ReadError
from hrf_batch.io.readers import read_volumes
import hrf_batch.io.readers.dicom_oct, hrf_batch.io.readers.heyex_vol, hrf_batch.io.readers.heyex_xml

def vm_size() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))

limit = vm_size() + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out = {}
try:
    bytearray(2**30)
    out["control"] = "allocated 1 GiB"
except MemoryError:
    out["control"] = "MemoryError"
for name, path in zip(sys.argv[2::2], sys.argv[3::2]):
    try:
        read_volumes(Path(path))
        out[name] = "read"
    except ReadError as exc:
        out[name] = "ReadError: " + str(exc)
    except MemoryError:
        out[name] = "MemoryError"
print(json.dumps(out))
"""
HEADROOM = 128 * 2**20


def _budget_cases(folder: Path) -> dict[str, tuple[Path, str]]:
    """Bad files whose headers declare far more than they hold, with the fragment their error must carry."""
    cases: dict[str, tuple[Path, str]] = {}
    for name, n, side, fragment in [("vol-more-than-file", 1700, 1024, "the file has 3221225472"),
                                    ("vol-over-budget", 2048, 1024, "limit per volume")]:
        cases[name] = (_sparse_vol(folder, f"{name}.vol", n, side, 496 if n == 1700 else 1024), fragment)
    for syntax, label in ((RLELossless, "rle"), (JPEGBaseline8Bit, "jpeg")):
        for frames, side, fragment in [(100000, 65535, "100000 B-scans of 65535x65535"),
                                       (2000, 1024, "limit per volume")]:
            name = f"dicom-{label}-{frames}"
            cases[name] = (_dicom(folder / name, _compressed_claim(syntax, frames, side, side)), fragment)
    xml = _xml(folder / "xml-12000", n=3)
    for i in (1, 2, 3):
        _tiff_declaring(xml.parent / f"x_B{i}.tif", 12000, 12000)
    cases["xml-three-12000-tiffs"] = (xml, "too many pixels")
    many = write_heyex_xml(make_test_volume(70, 8, 8, fmt="heyex-xml"), folder / "xml-budget", stem="x")
    for i in range(1, 71):
        _tiff_declaring(many.parent / f"x_B{i}.tif", 4096, 4096)
    cases["xml-over-budget"] = (many, "limit per volume")
    return cases


@pytest.fixture(scope="module")
def under_limit(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, tuple[Path, str]], dict[str, str]]:
    """Every budget case read in one subprocess whose address space is capped near what it uses."""
    cases = _budget_cases(tmp_path_factory.mktemp("budget"))
    args = [arg for name, (path, _) in cases.items() for arg in (name, str(path))]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _READ_UNDER_LIMIT, str(HEADROOM), *args],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return cases, json.loads(done.stdout.strip().splitlines()[-1])


def test_memory_limit_of_the_budget_check_is_real(under_limit: tuple[dict, dict[str, str]]) -> None:
    """The capped subprocess cannot allocate 1 GiB, so a reader that allocated what a header declares fails there."""
    assert under_limit[1]["control"] == "MemoryError"


@pytest.mark.parametrize(
    "name",
    ["vol-more-than-file", "vol-over-budget", "dicom-rle-100000", "dicom-rle-2000", "dicom-jpeg-100000",
     "dicom-jpeg-2000", "xml-three-12000-tiffs", "xml-over-budget"],
)
def test_declared_sizes_are_refused_before_allocation(under_limit: tuple[dict, dict[str, str]], name: str) -> None:
    cases, outcomes = under_limit
    path, fragment = cases[name]
    outcome = outcomes[name]
    assert outcome.startswith("ReadError: "), outcome
    assert path.name in outcome and fragment in outcome and "\n" not in outcome, outcome
    assert not PYTHON_NAMES.search(outcome), outcome


# --- discovery: one error record per bad file, the good volume still read --------------------------


def test_study_with_bad_files_next_to_a_good_one(tmp_path: Path) -> None:
    study = tmp_path / "study"
    good = _vol(study, "good.vol")
    bad = [
        _vol_with(study, "date_overflow.vol", VISIT, "<d", 1e300),
        _vol_with(study, "nan_spacing.vol", SCALE_X, "<d", math.nan),
        _e2e_missing_one_bscan(study),
    ]
    bad += [_nan_first_bscan_vol(study, "nan_pixels.vol"), _sparse_vol(study, "sparse.vol", 2048, 1024, 1024)]
    bad += [_xml_with_overflowing_hour(study / "xml_hour"), _xml_without_localizer(study / "xml_missing"),
            _dicom(study / "dicom_rle", _compressed_claim(RLELossless, 100000, 65535, 65535))]

    items = list(iter_study(study))
    volumes = [v for v in items if isinstance(v, Volume)]
    errors = [i for i in items if isinstance(i, FileIssue) and i.kind == "error"]
    assert [v.meta.source_path for v in volumes] == [str(good)]
    assert sorted(str(e.path) for e in errors) == sorted(str(p) for p in bad)
    for issue in errors:
        assert "\n" not in issue.reason and " — " in issue.reason and not PYTHON_NAMES.search(issue.reason), issue.reason
    listing = scan_study(study)
    assert listing["n_volumes"] == 1 and listing["n_errors"] == len(bad)


def test_a_reader_bug_is_one_readable_error_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a reader still fail unexpectedly, the record says which reader and what, not only a class name."""
    import hrf_batch.io.readers.heyex_vol as heyex_vol

    def broken(path: Path) -> list[Volume]:
        raise KeyError("scale_x")

    _vol(tmp_path, "good.vol")
    monkeypatch.setattr(heyex_vol, "read_vol", broken)
    (issue,) = [i for i in iter_study(tmp_path) if isinstance(i, FileIssue)]
    assert issue.kind == "error" and "heyex-vol reader failed on this file ('scale_x')" in issue.reason
