"""Which of the volumes read again from a stored source is the one that was analysed, unchanged.

The database keeps masks, not pixels, so reports, exports and label files read the source file again.
Its stored outlines belong on those pixels only while the file still holds the analysed series with the
analysed content (sha256) and B-scan geometry; each caller words what differs for its own user.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from hrf_batch.io.discover import display_text
from hrf_batch.io.volume import Volume


class Mismatch(enum.Enum):
    """Why none of the volumes read again is the analysed one."""

    SERIES = "the file no longer holds the analysed series"
    CONTENT = "the file's content differs from the analysed file (sha256)"
    GEOMETRY = "the B-scans differ in number or size from the analysed ones"


def find_analysed(found: Sequence[Volume], series_uid: str, sha256: str, n_bscans: int,
                  bscan_shape: Sequence[int]) -> Volume | Mismatch:
    """The volume of ``found`` with the stored (display-form) series uid, if its content and geometry are
    the analysed ones; else what differs."""
    for volume in found:
        if display_text(volume.meta.series_uid) != series_uid:
            continue
        if volume.meta.source_sha256 != sha256:
            return Mismatch.CONTENT
        if volume.n_bscans != n_bscans or volume.bscan_shape != tuple(bscan_shape):
            return Mismatch.GEOMETRY
        return volume
    return Mismatch.SERIES
