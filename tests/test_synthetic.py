"""Synthetic B-scans: shapes, exact HRF ground truth, anatomy, and closeness to a real Spectralis scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from hrf_batch.synthetic.fundus import synth_localizer
from hrf_batch.synthetic.generator_a import SyntheticBScan, synth_bscan, synth_volume

LAYER_ORDER = ("ILM", "RNFL", "GCL", "IPL", "INL", "OPL", "ELM", "EZ", "RPE", "BM", "CSI")


@pytest.fixture(scope="module")
def hrf_scans() -> list[SyntheticBScan]:
    """Enough B-scans for about 150 foci."""
    return [synth_bscan(np.random.default_rng(1000 + i), n_hrf=6) for i in range(25)]


def _foci(scans: list[SyntheticBScan]):
    for scan in scans:
        for k in range(1, scan.n_hrf + 1):
            yield scan, scan.hrf_labels == k


@pytest.mark.parametrize("shape", [(64, 96), (496, 512), (496, 768), (496, 1024), (200, 300)])
def test_shapes_dtypes_range_and_layer_order(shape: tuple[int, int]) -> None:
    scan = synth_bscan(np.random.default_rng(3), height=shape[0], width=shape[1], n_hrf=2)
    assert scan.image.shape == shape and scan.image.dtype == np.float32
    assert scan.hrf_labels.shape == shape and scan.hrf_labels.dtype == np.int32
    assert np.isfinite(scan.image).all()
    assert 0.0 <= scan.image.min() and scan.image.max() <= 255.0
    assert scan.image.max() > 150.0  # the bright bands are there
    assert scan.n_hrf == 2 and scan.hrf_mask.sum() == (scan.hrf_labels > 0).sum()
    assert set(np.unique(scan.hrf_labels)) == {0, 1, 2}
    assert tuple(scan.layers) == LAYER_ORDER
    stacked = np.stack([scan.layers[k] for k in LAYER_ORDER])
    assert stacked.shape == (len(LAYER_ORDER), shape[1]) and stacked.dtype == np.float32
    assert (np.diff(stacked, axis=0) >= -1e-3).all(), "boundaries must be ordered top to bottom"
    assert stacked[0].min() >= 0.0 and stacked[LAYER_ORDER.index("BM")].max() < shape[0]


def test_same_seed_same_scan_and_different_seed_differs() -> None:
    a = synth_bscan(np.random.default_rng(7), height=128, width=160)
    b = synth_bscan(np.random.default_rng(7), height=128, width=160)
    c = synth_bscan(np.random.default_rng(8), height=128, width=160)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.hrf_labels, b.hrf_labels)
    assert not np.array_equal(a.image, c.image)


def test_random_hrf_count_is_sometimes_zero() -> None:
    counts = [synth_bscan(np.random.default_rng(i), height=96, width=128).n_hrf for i in range(40)]
    assert 0 in counts and max(counts) >= 2
    assert 0.15 <= counts.count(0) / len(counts) <= 0.7


def test_zero_hrf_means_empty_labels() -> None:
    scan = synth_bscan(np.random.default_rng(2), n_hrf=0)
    assert scan.n_hrf == 0 and not scan.hrf_mask.any()


def test_hrf_sizes_follow_the_paper(hrf_scans: list[SyntheticBScan]) -> None:
    areas = np.array([mask.sum() for _, mask in _foci(hrf_scans)])
    assert len(areas) == 6 * len(hrf_scans)
    assert 10 <= np.median(areas) <= 30
    assert areas.min() >= 5 and areas.max() <= 150
    assert areas.max() > 2 * np.median(areas)  # a spread of sizes, not one size


def test_each_label_is_one_connected_focus(hrf_scans: list[SyntheticBScan]) -> None:
    for scan, mask in _foci(hrf_scans):
        _, n_parts = ndi.label(mask)
        assert n_parts == 1
        others = scan.hrf_mask & ~mask
        assert not (ndi.binary_dilation(mask) & others).any(), "foci must not touch each other"


def test_hrfs_mostly_between_inl_and_onl(hrf_scans: list[SyntheticBScan]) -> None:
    inside, inside_retina = [], []
    for scan, mask in _foci(hrf_scans):
        ys, xs = np.nonzero(mask)
        col, row = int(round(xs.mean())), ys.mean()
        inside.append(scan.layers["IPL"][col] <= row <= scan.layers["ELM"][col])
        inside_retina.append(
            (ys >= scan.layers["ILM"][xs]).all() and (ys <= scan.layers["RPE"][xs]).all()
        )
    assert np.mean(inside) >= 0.7
    assert all(inside_retina)


def test_hrf_pixels_brighter_than_surroundings(hrf_scans: list[SyntheticBScan]) -> None:
    contrast = []
    for scan, mask in _foci(hrf_scans):
        ring = ndi.binary_dilation(mask, iterations=3) & ~ndi.binary_dilation(mask) & ~scan.hrf_mask
        contrast.append(scan.image[mask].mean() - scan.image[ring].mean())
        assert scan.image[mask].mean() > 150.0  # about as bright as the RPE
    assert np.mean(np.array(contrast) > 30.0) >= 0.95


def test_hrf_free_scan_has_no_bright_spot_in_the_onl() -> None:
    """Foci are the only RPE-bright things inside the ONL, so a label-free scan stays dark there."""
    scan = synth_bscan(np.random.default_rng(11), n_hrf=0)
    rows = np.arange(scan.image.shape[0])[:, None]
    onl = (rows > scan.layers["OPL"] + 3) & (rows < scan.layers["ELM"] - 3)
    smooth = ndi.uniform_filter(scan.image, 3)
    assert np.percentile(smooth[onl], 99.9) < 150.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_foveal_pit(seed: int) -> None:
    scan = synth_bscan(np.random.default_rng(seed), fovea_x=256, n_hrf=0)
    thick = scan.layers["BM"] - scan.layers["ILM"]
    assert thick[256] < 0.8 * min(thick[20], thick[490])
    assert abs(int(np.argmin(thick)) - 256) <= 10
    inner = scan.layers["INL"] - scan.layers["ILM"]  # RNFL..INL vanish at the foveal centre
    assert inner[256] < 0.1 * min(inner[20], inner[490])
    flat = synth_bscan(np.random.default_rng(seed), fovea_x=256, n_hrf=0, pit_depth=0.0)
    flat_thick = flat.layers["BM"] - flat.layers["ILM"]
    assert flat_thick[256] > 0.9 * min(flat_thick[20], flat_thick[490])


def test_rnfl_thicker_nasally() -> None:
    ratios = []
    for seed in range(5):
        scan = synth_bscan(np.random.default_rng(seed), fovea_x=256, n_hrf=0)
        rnfl = scan.layers["RNFL"] - scan.layers["ILM"]
        ratios.append(rnfl[470] / rnfl[42])  # right eye: nasal is to the right
    assert np.median(ratios) > 1.3


def test_volume_shapes_and_labels() -> None:
    n = 12
    images, labels = synth_volume(np.random.default_rng(5), n_bscans=n, height=96, width=128,
                                  hrf_prevalence=0.5, max_hrf=4)
    assert images.shape == labels.shape == (n, 96, 128)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert 0.0 <= images.min() and images.max() <= 255.0
    for lab in labels:  # ids 1..k within each B-scan, k <= max_hrf
        ids = np.unique(lab)
        np.testing.assert_array_equal(ids, np.arange(ids.max() + 1))
        assert ids.max() <= 4
    assert 1 <= sum(lab.max() > 0 for lab in labels) <= n - 1
    none, _ = synth_volume(np.random.default_rng(5), n_bscans=3, height=96, width=128, hrf_prevalence=0.0)
    assert none.shape == (3, 96, 128)


@pytest.mark.parametrize("seed", [5, 6])
def test_volume_is_continuous_with_the_pit_in_the_middle(seed: int) -> None:
    n = 25
    images, _ = synth_volume(np.random.default_rng(seed), n_bscans=n, height=160, width=192,
                             hrf_prevalence=0.0)
    # boundaries read off the images: ILM = first bright row, RPE = brightest row of each column
    smooth = ndi.uniform_filter(images, (1, 3, 9))
    ilm = np.argmax(smooth > 70.0, axis=1).astype(float)[:, 20:-20]
    rpe = np.argmax(smooth, axis=1).astype(float)[:, 20:-20]
    step = np.abs(np.diff(ilm, axis=0))
    assert step.mean() < 2.0 and np.median(step) <= 1.0
    thinnest = np.percentile(rpe - ilm, 5, axis=1)
    assert abs(int(np.argmin(thinnest)) - n // 2) <= 2
    assert thinnest[n // 2 - 1 : n // 2 + 2].min() < 0.8 * min(thinnest[0], thinnest[-1])


def test_bad_arguments_raise() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        synth_bscan(rng, height=8, width=8)
    with pytest.raises(ValueError):
        synth_bscan(rng, n_hrf=-1)
    with pytest.raises(ValueError):
        synth_volume(rng, n_bscans=0)


def _vessel_fraction(img: np.ndarray) -> float:
    """Share of pixels in thin dark structures (black top-hat), i.e. vessels."""
    return float((ndi.grey_closing(img, size=(11, 11)) - img > 30.0).mean())


def test_localizer_looks_like_the_real_infrared_fundus(fixtures_dir: Path) -> None:
    import eyepy

    ev = eyepy.import_heyex_vol(fixtures_dir / "spectralis-raw-data" / "Willis_B_716_0.vol")
    real = np.asarray(ev.localizer.data, dtype=np.float32)
    img = synth_localizer(np.random.default_rng(4), size=768)
    np.testing.assert_array_equal(img, synth_localizer(np.random.default_rng(4), size=768))
    assert img.shape == (768, 768) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 255.0
    assert abs(np.median(img) - np.median(real)) <= 25.0  # grey fundus (real: 154)
    assert 0.5 <= _vessel_fraction(img) / _vessel_fraction(real) <= 2.0  # real: 0.09
    centre, right_edge = img[300:468, 300:468], img[300:468, 700:]
    assert right_edge.min() < np.median(centre) - 60.0  # right eye: dark disc at the nasal edge
    small = synth_localizer(np.random.default_rng(4), size=96)
    assert small.shape == (96, 96) and _vessel_fraction(small) > 0.01


# ----------------------------------------------------------------------------- real data


def _region_stats(img: np.ndarray, ilm: np.ndarray, bm: np.ndarray) -> dict[str, float]:
    rows = np.arange(img.shape[0])[:, None]
    ok = np.isfinite(ilm) & np.isfinite(bm)
    ilm, bm = np.where(ok, ilm, 0), np.where(ok, bm, 0)
    vitreous = (rows < ilm - 8) & ok
    retina = (rows >= ilm) & (rows <= bm) & ok
    deep = (rows > bm + 150) & ok
    return {
        "image_median": float(np.median(img)),
        "vitreous_median": float(np.median(img[vitreous])),
        "retina_median": float(np.median(img[retina])),
        "retina_p5": float(np.percentile(img[retina], 5)),
        "bright_p99": float(np.percentile(img[retina], 99)),
        "deep_median": float(np.median(img[deep])),
    }


@pytest.fixture(scope="module")
def real_stats(fixtures_dir: Path) -> dict[str, float]:
    import eyepy

    ev = eyepy.import_heyex_vol(fixtures_dir / "spectralis-raw-data" / "Willis_B_716_0.vol")
    img = np.asarray(ev.data[0], dtype=np.float32)
    ilm = np.asarray(ev.layers["ILM"].data[0], dtype=np.float32)
    bm = np.asarray(ev.layers["BM"].data[0], dtype=np.float32)
    stats = _region_stats(img, ilm, bm)
    # what the real scan is (guards the comparison itself): dark background, bright bands
    assert stats["image_median"] < 15 and stats["deep_median"] < 3 and stats["bright_p99"] > 230
    return stats


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_intensity_statistics_like_real_spectralis(real_stats: dict[str, float], seed: int) -> None:
    scan = synth_bscan(np.random.default_rng(seed), width=768)
    syn = _region_stats(scan.image, scan.layers["ILM"], scan.layers["BM"])
    assert syn["image_median"] <= 25.0  # mostly dark background, like real (5)
    assert abs(syn["vitreous_median"] - real_stats["vitreous_median"]) <= 12.0  # real: 10
    assert syn["deep_median"] <= 5.0  # real: 0
    assert abs(syn["retina_median"] - real_stats["retina_median"]) <= 25.0  # real: 125
    assert abs(syn["retina_p5"] - real_stats["retina_p5"]) <= 25.0  # real: 64 (ONL)
    assert real_stats["bright_p99"] - 30.0 <= syn["bright_p99"] <= 255.0  # real: 247 (EZ/RPE)


def test_speckle_grain_like_real(fixtures_dir: Path) -> None:
    """Neighbouring-pixel correlation of the retina's fine texture: real Spectralis ~0.7 both ways."""
    import eyepy

    def corr(img: np.ndarray, ilm: np.ndarray, bm: np.ndarray) -> tuple[float, float]:
        res = img - ndi.gaussian_filter(img, (1.5, 6.0))
        rows = np.arange(img.shape[0])[:, None]
        ok = np.isfinite(ilm) & np.isfinite(bm)
        m = (rows > np.where(ok, ilm, 0) + 5) & (rows < np.where(ok, bm, 0) - 20) & ok
        r = np.where(m, res, 0.0)
        energy = (r * r).sum()
        return float((r[:, 1:] * r[:, :-1]).sum() / energy), float((r[1:] * r[:-1]).sum() / energy)

    ev = eyepy.import_heyex_vol(fixtures_dir / "spectralis-raw-data" / "Willis_B_716_0.vol")
    real = corr(np.asarray(ev.data[0], np.float32), ev.layers["ILM"].data[0].astype(np.float32),
                ev.layers["BM"].data[0].astype(np.float32))
    scan = synth_bscan(np.random.default_rng(0), width=768, n_hrf=0)
    syn = corr(scan.image, scan.layers["ILM"], scan.layers["BM"])
    assert abs(syn[0] - real[0]) < 0.15 and abs(syn[1] - real[1]) < 0.15
