"""Prompt geometry: peak picking, box and crop placement, coordinate mapping and pasting."""

from __future__ import annotations

import numpy as np
import pytest

from hrf_batch.segment.prompts import Prompt, box_in_crop, crop, from_crop, make_prompt, paste, peak, to_crop


def test_peak_takes_largest_positive_and_skips_excluded() -> None:
    rel = np.zeros((20, 30))
    rel[5, 7] = 3.0
    rel[12, 20] = 2.0
    rel[1, 1] = np.nan
    assert peak(rel) == (5, 7)
    exclude = np.zeros_like(rel, dtype=bool)
    exclude[4:7, 6:9] = True
    assert peak(rel, exclude) == (12, 20)


def test_peak_refuses_maps_without_positive_relevance() -> None:
    rel = -np.ones((8, 8))
    with pytest.raises(ValueError, match="no positive relevance"):
        peak(rel)
    rel[3, 3] = 1.0
    with pytest.raises(ValueError, match="no positive relevance"):
        peak(rel, rel > 0)
    with pytest.raises(ValueError, match="shape"):
        peak(rel, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="2-D"):
        peak(np.ones(5))


def test_box_is_centred_on_peak_pixel() -> None:
    p = make_prompt((100, 200), (496, 512), box_px=4, crop_px=75)
    assert p.box == (98.5, 198.5, 102.5, 202.5)
    assert (p.box[0] + p.box[2]) / 2 == 100.5 and (p.box[1] + p.box[3]) / 2 == 200.5
    assert p.window == (100 - 37, 200 - 37, 100 + 38, 200 + 38)
    assert p.crop_shape == (75, 75)


@pytest.mark.parametrize(
    ("peak_rc", "window"),
    [
        ((2, 200), (0, 163, 75, 238)),       # top
        ((494, 200), (421, 163, 496, 238)),  # bottom
        ((250, 0), (213, 0, 288, 75)),       # left
        ((250, 511), (213, 437, 288, 512)),  # right
        ((0, 0), (0, 0, 75, 75)),            # corner
    ],
)
def test_crop_shifts_inside_at_every_border(peak_rc: tuple[int, int], window: tuple[int, int, int, int]) -> None:
    p = make_prompt(peak_rc, (496, 512), box_px=4, crop_px=75)
    assert p.window == window
    assert p.crop_shape == (75, 75)
    r0, c0, r1, c1 = p.box
    assert window[0] <= r0 < r1 <= window[2] and window[1] <= c0 < c1 <= window[3]
    # the peak pixel stays inside the box even where the box is clipped
    assert r0 <= peak_rc[0] < r1 and c0 <= peak_rc[1] < c1


def test_image_smaller_than_crop_gives_whole_axis() -> None:
    p = make_prompt((20, 30), (40, 64), crop_px=75)
    assert p.window == (0, 0, 40, 64)
    assert p.crop_shape == (40, 64)
    assert p.scale_to(1024) == (1024 / 40, 1024 / 64)


@pytest.mark.parametrize("crop_px", [49, 101, 0])
def test_crop_size_outside_method_range_is_refused(crop_px: int) -> None:
    with pytest.raises(ValueError, match="crop size must be 50..100"):
        make_prompt((10, 10), (100, 100), crop_px=crop_px)


def test_bad_box_and_peak_are_refused() -> None:
    with pytest.raises(ValueError, match="box size"):
        make_prompt((10, 10), (100, 100), box_px=0)
    with pytest.raises(ValueError, match="outside"):
        make_prompt((100, 10), (100, 100))


def test_boxes_inside_crops_for_random_peaks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = int(rng.integers(30, 600)), int(rng.integers(30, 1100))
        pk = (int(rng.integers(0, h)), int(rng.integers(0, w)))
        crop_px, box_px = int(rng.integers(50, 101)), int(rng.integers(1, 9))
        p = make_prompt(pk, (h, w), box_px=box_px, crop_px=crop_px)
        r0, c0, r1, c1 = p.window
        assert 0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w
        assert p.crop_shape == (min(h, crop_px), min(w, crop_px))
        assert r0 <= pk[0] < r1 and c0 <= pk[1] < c1
        br0, bc0, br1, bc1 = box_in_crop(p)
        assert 0 <= br0 < br1 <= p.crop_shape[0] and 0 <= bc0 < bc1 <= p.crop_shape[1]
        sbr0, sbc0, sbr1, sbc1 = box_in_crop(p, p.scale_to(1024))
        assert 0 <= sbr0 < sbr1 <= 1024 and 0 <= sbc0 < sbc1 <= 1024


def test_coordinate_round_trips() -> None:
    p = make_prompt((300, 40), (496, 512), crop_px=64)
    pts = np.random.default_rng(1).uniform(0, 496, size=(50, 2))
    for scale in (1.0, 1024 / 64, (3.0, 7.5)):
        back = from_crop(to_crop(pts, p, scale), p, scale)
        np.testing.assert_allclose(back, pts, atol=1e-9)
        assert from_crop(to_crop((300.5, 40.5), p, scale), p, scale) == pytest.approx((300.5, 40.5))


def test_to_crop_maps_window_and_peak_centre() -> None:
    p = make_prompt((300, 40), (496, 512), crop_px=64)
    r0, c0, r1, c1 = p.window
    assert to_crop((r0, c0), p) == (0.0, 0.0)
    assert to_crop((r1, c1), p, 1024 / 64) == (1024.0, 1024.0)  # crop edges go to input edges
    assert to_crop((300.5, 40.5), p) == (300.5 - r0, 40.5 - c0)
    assert from_crop((512.0, 512.0), p, 16.0) == ((r0 + r1) / 2, (c0 + c1) / 2)
    with pytest.raises(ValueError, match="positive"):
        to_crop((1.0, 1.0), p, 0.0)


def test_crop_returns_window_pixels() -> None:
    img = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)
    p = make_prompt((50, 60), img.shape, crop_px=50)
    np.testing.assert_array_equal(crop(img, p), img[25:75, 35:85])
    with pytest.raises(ValueError, match="smaller than"):
        crop(img[:60], p)


def test_paste_places_pixels_exactly() -> None:
    p = make_prompt((10, 500), (496, 512), crop_px=60)
    mc = np.zeros(p.crop_shape, bool)
    mc[0, 0] = mc[-1, -1] = mc[3, 7] = True
    full = paste(mc, p, (496, 512))
    r0, c0, r1, c1 = p.window
    assert full.dtype == bool and full.shape == (496, 512)
    assert set(zip(*np.nonzero(full))) == {(r0, c0), (r1 - 1, c1 - 1), (r0 + 3, c0 + 7)}
    np.testing.assert_array_equal(crop(full, p), mc)
    with pytest.raises(ValueError, match="resize the mask"):
        paste(np.zeros((5, 5), bool), p, (496, 512))
    with pytest.raises(ValueError, match="does not contain"):
        paste(mc, p, (40, 40))


def test_prompt_is_frozen() -> None:
    p = make_prompt((5, 5), (100, 100))
    assert isinstance(p, Prompt)
    with pytest.raises(AttributeError):
        p.window = (0, 0, 1, 1)  # type: ignore[misc]
