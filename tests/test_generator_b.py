"""Generator B: contract shared with generator A, clinical HRF rules, decoys, anatomy, study writer and CLI."""

from __future__ import annotations

import ast
import csv
import json
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage as ndi

from hrf_batch.cli import main
from hrf_batch.io.discover import discover, read_sources
from hrf_batch.io.readers import read_volumes
from hrf_batch.io.volume import Volume
from hrf_batch.synthetic import generator_b as gb
from hrf_batch.synthetic.study import FORMAT_CYCLE, StudySpec, synthetic_volume, write_format

KIND = {name: code for code, name in gb.DECOY_KINDS.items()}


@pytest.fixture(scope="module")
def volumes() -> list[list[gb.SyntheticBScan]]:
    """Six small volumes with many HRFs: enough eyes to meet every kind of decoy."""
    return [gb.synth_volume_bscans(np.random.default_rng(40 + s), 9, height=256, width=384, hrf_prevalence=0.8)
            for s in range(6)]


@pytest.fixture(scope="module")
def heavy() -> dict[int, list[gb.SyntheticBScan]]:
    """B-scans asked for 12 HRFs each, at the narrowest and the widest Spectralis width."""
    return {w: [gb.synth_bscan(np.random.default_rng(w + i), height=320, width=w, n_hrf=12) for i in range(6)]
            for w in (512, 1536)}


def _scans(volumes: list[list[gb.SyntheticBScan]]) -> list[gb.SyntheticBScan]:
    return [s for vol in volumes for s in vol]


def test_same_seed_same_volume_other_seed_differs() -> None:
    a = gb.synth_volume(np.random.default_rng(3), 3, height=256, width=256)
    b = gb.synth_volume(np.random.default_rng(3), 3, height=256, width=256)
    c = gb.synth_volume(np.random.default_rng(4), 3, height=256, width=256)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_contract_shapes_dtypes_and_display_range() -> None:
    images, labels = gb.synth_volume(np.random.default_rng(1), 4, hrf_prevalence=1.0)
    assert images.shape == labels.shape == (4, 496, 512)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 255.0
    for lab in labels:  # ids 1..k without gaps, one per HRF
        ids = np.unique(lab[lab > 0])
        assert ids.tolist() == list(range(1, len(ids) + 1))


def test_band_brightness_follows_a_spectralis_scan(volumes: list[list[gb.SyntheticBScan]]) -> None:
    """Vitreous dark; RNFL > INL > ONL; OPL > ONL; RPE among the brightest; choroid darker than the RPE."""
    for s in _scans(volumes)[::4]:
        img, ly = s.image, s.layers
        y = np.arange(img.shape[0])[:, None]

        def band(top: str, bottom: str, inset: float = 1.0) -> float:
            m = (y >= ly[top][None] + inset) & (y <= ly[bottom][None] - inset) & (s.hrf_labels == 0) & (s.hard_negatives == 0)
            return float(np.median(img[m]))

        vitreous = float(np.median(img[y < ly["ILM"][None] - 8]))
        rnfl, inl, opl, onl = band("ILM", "RNFL", 0.5), band("IPL", "INL"), band("INL", "OPL", 0.5), band("OPL", "ELM")
        rpe = band("IZ", "BM", 0.0)
        choroid = float(np.median(img[(y > ly["BM"][None] + 8) & (y < ly["CSI"][None])]))
        assert vitreous < 40 and rnfl > inl > onl and opl > onl
        assert rpe > max(inl, opl) + 30 and rpe > choroid + 30 and rpe > 150


def test_speckle_is_correlated_not_white(volumes: list[list[gb.SyntheticBScan]]) -> None:
    s = volumes[0][4]
    r0, r1 = int(s.layers["OPL"].max()) + 2, int(s.layers["ELM"].min()) - 2
    onl = s.image[r0:r1, 40:-40].astype(np.float64) if r1 > r0 + 3 else s.image[100:110].astype(np.float64)
    res = onl - ndi.uniform_filter(onl, (3, 15))
    corr = np.corrcoef(res[:, 1:].ravel(), res[:, :-1].ravel())[0, 1]
    assert corr > 0.3, "neighbouring A-scans share speckle grain"


@pytest.mark.parametrize("width", [512, 1536])
def test_hrf_areas_follow_the_clinical_range_scaled_by_spacing(heavy: dict[int, list[gb.SyntheticBScan]], width: int) -> None:
    lo, hi = gb.hrf_area_bounds(width)
    areas = []
    for s in heavy[width]:
        assert s.image.shape == (320, width)
        for k in range(1, s.n_hrf + 1):
            mask = s.hrf_labels == k
            assert ndi.label(mask)[1] == 1, "each HRF is one 4-connected focus"
            areas.append(int(mask.sum()))
    assert len(areas) >= 30 and lo <= min(areas) and max(areas) <= hi
    assert gb.hrf_area_bounds(512) == (5, 150) and gb.hrf_area_bounds(1536) == (15, 450)
    assert max(areas) > 2.5 * np.median(areas), "a spread of sizes, not one size"


def test_hrf_pixels_lie_between_ilm_and_rpe(volumes: list[list[gb.SyntheticBScan]],
                                            heavy: dict[int, list[gb.SyntheticBScan]]) -> None:
    scans = _scans(volumes) + heavy[512] + heavy[1536]
    assert sum(s.n_hrf for s in scans) > 100
    for s in scans:
        ys, xs = np.nonzero(s.hrf_labels)
        assert (ys >= s.layers["ILM"][xs]).all() and (ys <= s.layers["RPE"][xs]).all()


def test_hrfs_are_bright_foci_some_only_slightly(heavy: dict[int, list[gb.SyntheticBScan]]) -> None:
    """Most HRFs are as bright as the RPE; a minority are barely brighter than their surround."""
    gains, rel_rpe = [], []
    for s in heavy[512] + heavy[1536]:
        y = np.arange(s.image.shape[0])[:, None]
        rpe = float(np.median(s.image[(y >= s.layers["RPE"][None]) & (y < s.layers["BM"][None])]))
        for k in range(1, s.n_hrf + 1):
            mask = s.hrf_labels == k
            ring = ndi.binary_dilation(mask, iterations=4) & ~ndi.binary_dilation(mask, iterations=1) & (s.hrf_labels == 0)
            peak = float(np.percentile(s.image[mask], 75))
            gains.append(peak - float(np.median(s.image[ring])))
            rel_rpe.append(peak / rpe)
    gains, rel_rpe = np.array(gains), np.array(rel_rpe)
    assert np.mean(gains > 0) > 0.9
    assert np.median(rel_rpe) > 0.8
    assert np.mean(gains < 45) > 0.05, "some hard positives"


def test_decoys_never_overlap_hrfs(volumes: list[list[gb.SyntheticBScan]],
                                   heavy: dict[int, list[gb.SyntheticBScan]]) -> None:
    for s in _scans(volumes) + heavy[512] + heavy[1536]:
        assert not ((s.hard_negatives > 0) & (s.hrf_labels > 0)).any()
        assert s.hard_negatives.dtype == np.uint8 and set(np.unique(s.hard_negatives)) <= {0, *gb.DECOY_KINDS}


def test_every_kind_of_decoy_occurs_where_it_belongs(volumes: list[list[gb.SyntheticBScan]]) -> None:
    seen = set()
    for s in _scans(volumes):
        y = np.arange(s.image.shape[0])[:, None]
        hn, ly = s.hard_negatives, s.layers
        seen |= set(np.unique(hn[hn > 0]).tolist())
        assert ((hn == KIND["floater"]) <= (y < ly["ILM"][None])).all(), "floaters above the ILM"
        assert ((hn == KIND["vessel"]) <= ((y >= ly["ILM"][None] - 1) & (y <= ly["OPL"][None] + 2))).all()
        assert ((hn == KIND["drusen"]) <= (y >= ly["RPE"][None] - 1)).all()
        assert ((hn == KIND["choroid"]) <= (y > ly["BM"][None])).all()
        lab, n = ndi.label(hn == KIND["exudate"])
        if n:  # confluent, larger than any HRF
            assert np.bincount(lab.ravel())[1:].min() > gb.hrf_area_bounds(s.image.shape[1])[1]
    assert seen == set(gb.DECOY_KINDS), f"missing: {set(gb.DECOY_KINDS) - seen}"


def test_hrf_prevalence_and_heavy_bscans(volumes: list[list[gb.SyntheticBScan]]) -> None:
    counts = np.array([s.n_hrf for s in _scans(volumes)])
    assert 0.6 <= np.mean(counts > 0) <= 0.95  # asked for 0.8
    assert (counts > 6).any() and counts.max() <= 20
    _, none = gb.synth_volume(np.random.default_rng(2), 4, height=256, width=256, hrf_prevalence=0.0)
    assert not none.any()


def test_one_eye_per_volume_with_the_fovea_in_the_middle(volumes: list[list[gb.SyntheticBScan]]) -> None:
    for vol in volumes:
        bm = np.stack([s.layers["BM"] for s in vol])
        level = bm.mean(axis=1, keepdims=True)
        assert np.abs(np.diff(bm - level, axis=0)).max() < 6, "neighbouring B-scans show the same eye shape"
        assert np.abs(np.diff(level[:, 0], n=2)).max() < 10, "the retina moves smoothly along the slow axis"
        thick = np.stack([s.layers["INL"] - s.layers["ILM"] for s in vol])  # inner retina: gone in the pit
        thinnest = np.unravel_index(np.argmin(thick[:, 20:-20]), thick[:, 20:-20].shape)[0]
        assert 2 <= thinnest <= 6, "the foveal pit is near the middle B-scan"
        for s in vol:
            stacked = np.stack([s.layers[k] for k in gb.LAYER_KEYS])
            assert (np.diff(stacked, axis=0) >= -1e-3).all() and stacked[0].min() > 0


def test_sizes_outside_the_layout_are_refused() -> None:
    with pytest.raises(ValueError, match="width 256..1536"):
        gb.synth_bscan(np.random.default_rng(0), height=496, width=128)
    with pytest.raises(ValueError, match="height 256..1024"):
        gb.synth_volume(np.random.default_rng(0), 2, height=2000, width=512)
    with pytest.raises(ValueError, match="unknown synthetic generator 'z'"):
        StudySpec(generator="z")
    with pytest.raises(ValueError, match="generator b needs"):
        StudySpec(generator="b", width=96, height=64)


def test_module_does_not_import_generator_a() -> None:
    tree = ast.parse(Path(gb.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert names and not [n for n in names if "generator_a" in n or n.startswith("hrf_batch")]


def _read_back(fmt: str, sources: list[Path]) -> list[Volume]:
    if fmt == "dicom-oct":
        return [v for s in sources for v in read_sources(discover(s).sources) if isinstance(v, Volume)]
    return read_volumes(sources[0]) if fmt == "heyex-e2e" else [read_volumes(s)[0] for s in sources]


@pytest.mark.parametrize("fmt", FORMAT_CYCLE)
def test_every_format_carries_the_widest_bscans(tmp_path: Path, fmt: str) -> None:
    spec = StudySpec(bscans=2, height=256, generator="b", widths=(1536,))
    rng = np.random.default_rng(8)
    written = [synthetic_volume(rng, spec, "P001", date(2024, 1, 2), eye, 0.5, datetime(2024, 1, 2, 9), 1536)[0]
               for eye in ("OD", "OS")]
    back = sorted(_read_back(fmt, write_format(fmt, written, tmp_path, "P001_2024-01-02")), key=lambda v: v.meta.eye)
    for w, r in zip(written, back, strict=True):
        assert r.bscans.shape == (2, 256, 1536)
        assert np.abs(r.bscans - w.bscans).max() <= 1.0
        assert r.meta.spacing.lateral_mm == pytest.approx(6.0 / 1536, rel=1e-3)


def test_synth_command_with_generator_b_and_widths(tmp_path: Path) -> None:
    out = tmp_path / "study"
    runner = CliRunner()
    result = runner.invoke(main, ["synth", str(out), "--generator", "b", "--patients", "2", "--visits", "1", "--bscans", "3",
                                  "--height", "256", "--widths", "256,384", "--seed", "2"])
    assert result.exit_code == 0, result.output
    with open(out / "ground_truth" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2 * 3
    widths = {}
    for r in rows:  # the manifest's counts and areas are those of the label files
        labels = np.load(out / r["mask_file"])["labels"]
        widths[(r["patient_id"], r["visit_date"], r["eye"])] = labels.shape[2]
        lab = labels[int(r["bscan_index"])]
        assert int(r["hrf_count"]) == len(np.unique(lab[lab > 0]))
        assert int(r["hrf_area_px"]) == int((lab > 0).sum())
    scanned = runner.invoke(main, ["scan", str(out), "--json"])
    assert scanned.exit_code == 0, scanned.output
    report = json.loads(scanned.output)
    assert report["n_volumes"] == 4 and report["n_errors"] == 0
    read = {(v["patient_id"], v["visit_date"], v["eye"]): vol["bscan_width"] for v in report["visits"] for vol in v["volumes"]}
    assert read == widths and set(widths.values()) <= {256, 384}


@pytest.mark.parametrize("args, message", [
    (["--widths", "512,abc"], "'abc' is not a whole number"),
    (["--widths", "512,9000"], "outside 32..2048"),
    (["--generator", "b", "--width", "64", "--height", "48"], "generator b needs height 256..1024"),
    (["--generator", "z"], "'z' is not one of"),
])
def test_synth_command_refuses_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "s"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "s").exists()
