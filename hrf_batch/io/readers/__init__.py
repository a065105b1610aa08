"""`read_volumes(path)`: pick the reader by file content (magic bytes, DICOM SOP class), not by name.

Every reader's result passes :func:`~hrf_batch.io.volume.validate_volume` in :func:`read_source`, the one
dispatch that discovery, `hrf-batch info` and the reports share, so no reader can hand NaN pixels, a
spacing of 0 or an impossible date to the pipeline. Readers check header-declared sizes themselves,
before allocating, with :func:`~hrf_batch.io.volume.check_declared_size`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hrf_batch.errors import NotOctError, ReadError
from hrf_batch.io.readers.raw import read_bytes
from hrf_batch.io.volume import Volume, validate_volume

SUPPORTED = "HEYEX .vol, HEYEX .e2e, HEYEX XML export, DICOM OCT (Ophthalmic Tomography), Topcon .fds"
OCT_SUFFIXES = {".vol", ".e2e", ".sdb", ".xml", ".dcm", ".dicom", ".fds", ""}
_HEAD_BYTES = 4096


def read_head(path: Path, size: int = _HEAD_BYTES) -> bytes:
    """First bytes of a file, with a ReadError that names the file when it cannot be opened."""
    return read_bytes(path, size)


def sniff(head: bytes) -> str | None:
    """Format name for the first bytes of a file: a source format, 'dicom', or None."""
    from hrf_batch.io.readers.heyex_e2e import is_e2e
    from hrf_batch.io.readers.heyex_vol import is_vol
    from hrf_batch.io.readers.heyex_xml import is_heyex_xml
    from hrf_batch.io.readers.topcon_fds import is_fds

    if is_vol(head):
        return "heyex-vol"
    if is_e2e(head):
        return "heyex-e2e"
    if is_fds(head):
        return "topcon-fds"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if is_heyex_xml(head):
        return "heyex-xml"
    return None


def read_source(fmt: str, paths: Sequence[Path]) -> list[Volume]:
    """Read one discovered source (one file, or the single-frame DICOM files of one series), validated."""
    return [validate_volume(volume) for volume in _read_unchecked(fmt, [Path(p) for p in paths])]


def _read_unchecked(fmt: str, paths: list[Path]) -> list[Volume]:
    if fmt == "heyex-vol":
        from hrf_batch.io.readers.heyex_vol import read_vol

        return read_vol(paths[0])
    if fmt == "heyex-e2e":
        from hrf_batch.io.readers.heyex_e2e import read_e2e

        return read_e2e(paths[0])
    if fmt == "heyex-xml":
        from hrf_batch.io.readers.heyex_xml import read_heyex_xml

        return read_heyex_xml(paths[0])
    if fmt == "topcon-fds":
        from hrf_batch.io.readers.topcon_fds import read_fds

        return read_fds(paths[0])
    if fmt in ("dicom", "dicom-oct"):
        from hrf_batch.io.readers.dicom_oct import read_dicom_oct

        return read_dicom_oct(paths)
    raise ReadError(paths[0], f"unknown source format {fmt!r}", f"supported formats: {SUPPORTED}")


def read_volumes(path: Path) -> list[Volume]:
    """Every OCT volume in one file (an .e2e may hold several series)."""
    path = Path(path)
    if path.is_dir():
        raise ReadError(path, "is a folder, not a file", "pass one OCT file, or use `hrf-batch ingest` for a study folder")
    head = read_head(path)
    if not head:
        raise ReadError(path, "file is empty (0 bytes)", "re-export or re-copy the file")
    fmt = sniff(head)
    if fmt is None:
        raise NotOctError(path, "not a recognised OCT file (unknown content)", f"supported formats: {SUPPORTED}")
    return read_source(fmt, [path])


def read_volume(path: Path) -> Volume:
    """The single OCT volume in a file; files with several series need :func:`read_volumes`."""
    volumes = read_volumes(path)
    if len(volumes) != 1:
        raise ReadError(path, f"holds {len(volumes)} OCT series, expected one", "use read_volumes() to get all of them")
    return volumes[0]
