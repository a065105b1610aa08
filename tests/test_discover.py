"""Study discovery over a folder mixing good exports with a malformed corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from hrf_batch.errors import HrfBatchError
from hrf_batch.io.discover import FileIssue, discover, group_by_visit, read_sources
from hrf_batch.io.volume import Volume
from hrf_batch.io.writers.dicom import write_ct_dicom, write_dicom_oct, write_empty_oct_dicom
from hrf_batch.io.writers.e2e import write_e2e
from hrf_batch.io.writers.heyex_xml import write_heyex_xml
from hrf_batch.io.writers.vol import write_vol

from conftest import make_test_volume


def _good_files(root: Path) -> int:
    """Write one study's worth of good exports; return how many volumes they hold."""
    od, os_ = make_test_volume(3, eye="OD", seed=1), make_test_volume(2, eye="OS", seed=2)
    write_vol(od, root / "P012/2024-03-05/od.vol")
    write_e2e([od, os_], root / "P012/2024-03-05/both.e2e")
    write_heyex_xml(os_, root / "P012/2024-03-05/xml", stem="os")
    write_dicom_oct(od, root / "P012/dicom_multi", multiframe=True)
    write_dicom_oct(os_, root / "P012/dicom_single", multiframe=False)
    return 1 + 2 + 1 + 1 + 1


def _malformed_files(root: Path) -> dict[str, str]:
    """The malformed corpus: file name → the record kind discovery must give it."""
    bad = root / "bad"
    bad.mkdir(parents=True)
    good_vol = write_vol(make_test_volume(2, 20, 30), root / "tmp.vol").read_bytes()
    (root / "tmp.vol").unlink()
    (bad / "empty.vol").write_bytes(b"")
    for cut in (100, 2048, len(good_vol) // 2):
        (bad / f"cut{cut}.vol").write_bytes(good_vol[:cut])
    e2e = write_e2e([make_test_volume(2, 20, 30)], root / "tmp.e2e").read_bytes()
    (root / "tmp.e2e").unlink()
    (bad / "cut.e2e").write_bytes(e2e[: len(e2e) // 3])
    (bad / "notes.vol").write_text("this is not an OCT file but is named like one")
    (bad / "random.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    write_ct_dicom(bad / "ct.dcm")
    write_empty_oct_dicom(bad / "zero_frames.dcm")
    (bad / "readme.txt").write_text("study notes")
    dicom_oct = write_dicom_oct(make_test_volume(2, 20, 30), root / "tmpd")[0].read_bytes()
    shutil.rmtree(root / "tmpd")
    (bad / "cut_oct.dcm").write_bytes(dicom_oct[: len(dicom_oct) // 2])
    return {
        "empty.vol": "error", "cut100.vol": "error", "cut2048.vol": "error", f"cut{len(good_vol) // 2}.vol": "error",
        "cut.e2e": "error", "notes.vol": "error", "random.dcm": "error", "ct.dcm": "skipped",
        "zero_frames.dcm": "error", "readme.txt": "skipped", "cut_oct.dcm": "error",
    }


def test_discovery_returns_every_good_volume_and_one_record_per_bad_file(tmp_path: Path) -> None:
    n_good = _good_files(tmp_path)
    expected = _malformed_files(tmp_path)
    disc = discover(tmp_path)
    items = list(disc.issues) + list(read_sources(disc.sources))
    volumes = [i for i in items if isinstance(i, Volume)]
    issues = [i for i in items if isinstance(i, FileIssue)]
    assert len(volumes) == n_good
    bad_issues = {i.path.name: i for i in issues if i.path.parent.name == "bad"}
    assert {name: i.kind for name, i in bad_issues.items()} == expected
    counts = {}
    for issue in issues:
        counts[issue.path] = counts.get(issue.path, 0) + 1
        assert "\n" not in issue.reason and str(issue.path.name) in issue.reason
    assert all(c == 1 for c in counts.values())
    # nothing else was reported: only DICOM localizers besides the malformed corpus
    others = [i for i in issues if i.path.parent.name != "bad"]
    assert all(i.kind == "skipped" and "localizer" in i.reason for i in others)
    groups = group_by_visit(v.meta for v in volumes)
    assert {(k[0], k[2]) for k in groups} == {("P012", "OD"), ("P012", "OS")}
    assert sum(len(g) for g in groups.values()) == n_good


def test_single_frame_dicom_series_is_one_source(tmp_path: Path) -> None:
    write_dicom_oct(make_test_volume(4), tmp_path / "s", multiframe=False)
    disc = discover(tmp_path)
    assert [s.format for s in disc.sources] == ["dicom-oct"] and len(disc.sources[0].paths) == 4
    (vol,) = list(read_sources(disc.sources))
    assert vol.bscans.shape[0] == 4


def test_xml_images_are_claimed_and_stray_tiffs_skipped(tmp_path: Path) -> None:
    write_heyex_xml(make_test_volume(2), tmp_path, stem="a")
    shutil.copy(tmp_path / "a_B1.tif", tmp_path / "stray.tif")
    disc = discover(tmp_path)
    assert [s.path.name for s in disc.sources] == ["a.xml"]
    assert [(i.path.name, i.kind) for i in disc.issues] == [("stray.tif", "skipped")]


def test_extension_does_not_decide_the_format(tmp_path: Path) -> None:
    write_vol(make_test_volume(2), tmp_path / "scan.dcm")
    disc = discover(tmp_path)
    assert [s.format for s in disc.sources] == ["heyex-vol"]


def test_missing_study_folder(tmp_path: Path) -> None:
    with pytest.raises(HrfBatchError, match="does not exist"):
        discover(tmp_path / "nope")


def test_real_fixtures_folder(fixtures_dir: Path) -> None:
    disc = discover(fixtures_dir)
    items = list(disc.issues) + list(read_sources(disc.sources))
    volumes = {Path(i.meta.source_path).name: i for i in items if isinstance(i, Volume)}
    assert set(volumes) == {"Willis_B_716_0.vol", "Willis_B_716_2.vol", "valid.vol", "test_volume.vol", "test_dummy.xml", "fds_minimized.fds"}
    errors = {i.path.name for i in items if isinstance(i, FileIssue) and i.kind == "error"}
    assert errors == {"invalid.vol", "corrupt.fds", "e2e_minimized.E2E"}
