"""find_analysed: the volume read again is used only while its series, content and geometry are the analysed ones."""

from __future__ import annotations

import dataclasses

from hrf_batch.io.analysed import Mismatch, find_analysed

from conftest import make_test_volume


def _with(volume, **meta):
    return dataclasses.replace(volume, meta=dataclasses.replace(volume.meta, **meta))


def test_the_analysed_volume_is_found_among_others_and_each_difference_is_named() -> None:
    other = _with(make_test_volume(eye="OS"), series_uid="S2", source_sha256="abc")
    analysed = _with(make_test_volume(), source_sha256="abc")
    assert find_analysed([other, analysed], "S1", "abc", 3, (40, 64)) is analysed
    assert find_analysed([other], "S1", "abc", 3, (40, 64)) is Mismatch.SERIES
    assert find_analysed([other, analysed], "S1", "def", 3, (40, 64)) is Mismatch.CONTENT
    assert find_analysed([analysed], "S1", "abc", 4, (40, 64)) is Mismatch.GEOMETRY
    assert find_analysed([analysed], "S1", "abc", 3, (40, 65)) is Mismatch.GEOMETRY
