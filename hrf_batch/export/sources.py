"""The analysed pixels of a stored volume, re-read from its source file for an export.

The database keeps masks, not images, so an export reads the source again through the project's own
readers. It does so only while the file's sha256 is the one analysed: stored masks written beside the
pixels of an edited or replaced export would outline the wrong image. A DICOM source also hands over
where each B-scan lives (instance and frame), which a DICOM Segmentation must reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hrf_batch.errors import HrfBatchError
from hrf_batch.export.errors import SourceUnavailable
from hrf_batch.io.analysed import Mismatch, find_analysed
from hrf_batch.io.discover import Source, discover, path_from_display
from hrf_batch.io.readers import read_source
from hrf_batch.io.readers.dicom_oct import FrameRef, frame_references
from hrf_batch.io.volume import Volume
from hrf_batch.store import StoredVolume


@dataclass(frozen=True, eq=False)
class SourceScan:
    """The volume as read again, and for DICOM sources the instance and frame of each B-scan."""

    volume: Volume
    frames: tuple[FrameRef, ...] = ()  # empty unless the source is DICOM OCT


def read_stored_source(stored: StoredVolume) -> SourceScan:
    """The source of ``stored`` read again and checked against what was analysed; else SourceUnavailable."""
    path = path_from_display(stored.source_path)
    hint = (f"restore the analysed file at {stored.source_path} (sha256 {stored.source_sha256[:12]}...), "
            "or ingest the current file again before exporting")
    if not stored.source_path or not path.exists():
        if not path.is_absolute():
            hint = (f"the path is stored as ingest was given it, relative to the folder ingest ran in ({Path.cwd()} is "
                    f"not it): run the export from that folder, or {hint}")
        raise SourceUnavailable(f"{stored.source_path}: the analysed {stored.source_format} source is no longer there", hint)
    sources = _sources(path, stored.source_format)
    for source in sources:
        try:
            volumes = read_source(source.format, source.paths)
        except HrfBatchError as exc:
            raise SourceUnavailable(f"{stored.source_path}: the source can no longer be read ({exc.problem})", hint) from exc
        found = find_analysed(volumes, stored.series_uid, stored.source_sha256, stored.n_bscans, stored.bscan_shape)
        if found is Mismatch.SERIES:
            continue  # perhaps in another source of the folder
        if found is Mismatch.CONTENT:
            raise SourceUnavailable(
                f"{stored.source_path}: the file changed since it was analysed (sha256 "
                f"{volumes[0].meta.source_sha256[:12]}... instead of {stored.source_sha256[:12]}...)", hint)
        if isinstance(found, Mismatch):
            raise SourceUnavailable(f"{stored.source_path}: {found.value}", hint)
        return SourceScan(found, _frames(source, found) if source.format == "dicom-oct" else ())
    raise SourceUnavailable(f"{stored.source_path}: the file no longer holds the analysed series {stored.series_uid}", hint)


def _sources(path: Path, fmt: str) -> list[Source]:
    """A file as one source of its format; a folder (a single-frame DICOM series) through discovery."""
    if path.is_dir():
        return [s for s in discover(path).sources if s.format == fmt]
    return [Source(fmt, (path,))]


def _frames(source: Source, volume: Volume) -> tuple[FrameRef, ...]:
    for group in frame_references(source.paths):
        if group and group[0].series_uid == volume.meta.series_uid and len(group) == volume.n_bscans:
            return tuple(group)
    raise SourceUnavailable(
        f"{source.path}: the DICOM instances of series {volume.meta.series_uid} cannot be matched to its B-scans",
        "export the series again from the device, ingest it, and export once more",
    )
