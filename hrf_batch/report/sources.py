"""B-scan pixels and the localizer for a report, re-read from the analysed source file.

The store keeps masks and relevance maps but not the images, so the gallery and the en-face map
read the source again. The pixels are used only when the file's sha256 is still the one analysed:
an edited or replaced export would put the stored outlines on the wrong image. A file name that is not
UTF-8 is stored in its display form; :func:`~hrf_batch.io.discover.path_from_display` finds the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrf_batch.errors import HrfBatchError
from hrf_batch.io.analysed import Mismatch, find_analysed
from hrf_batch.io.discover import discover, path_from_display, read_sources
from hrf_batch.io.readers import read_source
from hrf_batch.io.volume import Volume
from hrf_batch.store import StoredVolume

log = logging.getLogger(__name__)

MISSING = "source file changed or missing"


@dataclass(frozen=True, eq=False)
class SourcePixels:
    """A volume's B-scans and localizer, or why they could not be used (``problem``)."""

    bscans: np.ndarray | None  # (n, H, W) float32 on the 0..255 display scale
    localizer: np.ndarray | None
    localizer_spacing_mm: tuple[float, float] | None  # (x, y) mm per localizer pixel
    problem: str | None = None

    @classmethod
    def unavailable(cls, why: str) -> SourcePixels:
        return cls(None, None, None, f"{MISSING}: {why}")


class SourceReader:
    """Reads sources for a report, keeping the last file so both eyes of one .e2e are read once."""

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._volumes: list[Volume] = []

    def pixels(self, volume: StoredVolume) -> SourcePixels:
        """The pixels of ``volume`` if its source is still there and unchanged, else the reason why not."""
        path = path_from_display(volume.source_path)
        if not volume.source_path or not path.exists():
            return SourcePixels.unavailable(f"{volume.source_format} source no longer at its stored path")
        try:
            candidates = self._read(path, volume.source_format)
        except (HrfBatchError, OSError) as exc:
            log.info("cannot re-read %s for the report: %s", path, exc)
            return SourcePixels.unavailable(f"the file can no longer be read ({type(exc).__name__})")
        found = find_analysed(candidates, volume.series_uid, volume.source_sha256, volume.n_bscans, volume.bscan_shape)
        if isinstance(found, Mismatch):
            return SourcePixels.unavailable(found.value)
        return SourcePixels(found.bscans, found.localizer, found.meta.localizer_spacing_mm)

    def _read(self, path: Path, fmt: str) -> list[Volume]:
        key = (str(path), fmt)
        if key != self._key:
            self._key, self._volumes = None, []  # free the previous file before reading the next
            self._volumes = _read_any(path, fmt)
            self._key = key
        return self._volumes


def _read_any(path: Path, fmt: str) -> list[Volume]:
    """A file through its format's reader; a folder (a single-frame DICOM series) by discovery."""
    if path.is_dir():
        return [item for item in read_sources(discover(path).sources) if isinstance(item, Volume)]
    return read_source(fmt, [path])
