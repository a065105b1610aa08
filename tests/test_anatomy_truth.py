"""Synthetic anatomy ground truth: true layer rows and foveal centre from both generators, written
beside a study (mirrored for left eyes) and read back by load_anatomy_truth."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from hrf_batch.errors import LabelError
from hrf_batch.io.ground_truth import (
    FOVEA_KEY,
    TRUTH_DIR,
    SyntheticVolume,
    load_anatomy_truth,
    load_ground_truth,
)
from hrf_batch.io.readers import read_volumes
from hrf_batch.io.volume import LAYER_NAMES
from hrf_batch.synthetic import generator_a, generator_b
from hrf_batch.synthetic.study import StudySpec, synthetic_volume_truth, write_synthetic_study

ORDER = ("ILM", "INL", "ELM", "EZ", "BM")
UM_PER_ROW = 3.87


def _truth_a(seed: int, n: int = 25, height: int = 160, width: int = 256) -> tuple[SyntheticVolume, float, float]:
    """A generator-A volume, its lateral spacing and B-scan spacing in mm (the generator's own geometry)."""
    vol = generator_a.synth_volume_truth(np.random.default_rng(seed), n_bscans=n, height=height, width=width)
    lateral = max(0.01182, 3.0 / width)  # narrow images get a coarser spacing so the fovea fits
    return vol, lateral, width * lateral / (n - 1)


def _truth_b(seed: int, n: int = 13, height: int = 256, width: int = 256) -> tuple[generator_b.VolumeTruth, float, float]:
    vol = generator_b.synth_volume_truth(np.random.default_rng(seed), n, height, width)
    return vol, generator_b.FIELD_MM / width, generator_b.SLOW_FIELD_MM / (n - 1)


def _distance_mm(
    vol: SyntheticVolume | generator_b.VolumeTruth, thickness: np.ndarray, lateral: float, between: float
) -> float:
    """How far (mm, en face) the thinnest point of ``thickness`` (n, W) lies from the true fovea."""
    b, c = np.unravel_index(np.argmin(thickness), thickness.shape)
    return float(np.hypot((b - vol.fovea_bscan) * between, (c - vol.fovea_col) * lateral))


def _check_layers(layers: dict[str, np.ndarray], shape: tuple[int, int]) -> None:
    for name in ORDER:
        rows = layers[name]
        assert rows.dtype == np.float32 and rows.shape == shape and np.isfinite(rows).all()
    for upper, lower in zip(ORDER, ORDER[1:]):
        assert (layers[upper] < layers[lower]).all(), f"{upper} must lie above {lower} everywhere"


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_generator_a_truth_layers_ordered_and_fovea_at_the_pit(seed: int) -> None:
    vol, lateral, between = _truth_a(seed)
    n, _, width = vol.images.shape
    assert set(vol.layers) == set(LAYER_NAMES)
    _check_layers(vol.layers, (n, width))
    assert 0 <= vol.fovea_bscan <= n - 1 and 0 <= vol.fovea_col <= width - 1
    retina = vol.layers["BM"] - vol.layers["ILM"]
    inner = vol.layers["INL"] - vol.layers["ILM"]
    # the inner layers vanish at the foveal centre; the whole retina is thinnest within a few pixels
    # of it (the thicker foveal ONL makes its minimum flat: a few micrometres over ~0.15 mm)
    assert _distance_mm(vol, inner, lateral, between) < 0.08
    assert _distance_mm(vol, retina, lateral, between) < 0.2
    at_fovea = retina[round(vol.fovea_bscan), round(vol.fovea_col)]
    assert (at_fovea - retina.min()) * UM_PER_ROW < 6.0


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_generator_b_truth_layers_ordered_and_fovea_at_the_pit(seed: int) -> None:
    vol, lateral, between = _truth_b(seed)
    n, _, width = vol.images.shape
    _check_layers(vol.layers, (n, width))
    assert 0 <= vol.fovea_bscan <= n - 1 and 0 <= vol.fovea_col <= width - 1
    inner = vol.layers["INL"] - vol.layers["ILM"]
    retina = vol.layers["BM"] - vol.layers["ILM"]
    assert _distance_mm(vol, inner, lateral, between) < 0.16
    # drusen and PEDs near the fovea lift the outer retina, so the whole retina may be thinnest a little off
    assert _distance_mm(vol, retina, lateral, between) < 0.35


@pytest.mark.parametrize("generator", ["a", "b"])
def test_truth_rows_lie_on_the_rendered_bands(generator: str) -> None:
    """The truth is the anatomy the image was drawn from: the band above BM (RPE) is bright, the ONL dark."""
    vol = _truth_a(2, n=3)[0] if generator == "a" else _truth_b(2, n=3)[0]
    cols = np.arange(vol.images.shape[2])
    for img, bm, elm, opl in zip(vol.images, vol.layers["BM"], vol.layers["ELM"], vol.layers["OPL"], strict=True):
        rpe_band = img[np.rint(bm).astype(int) - 3, cols]
        onl = img[np.rint((opl + elm) / 2).astype(int), cols]
        assert np.median(rpe_band) > np.median(onl) + 40


@pytest.mark.parametrize(
    "draw",
    [lambda rng: generator_a.synth_volume(rng, n_bscans=3, height=96, width=128),
     lambda rng: generator_b.synth_volume(rng, 2, 256, 256)],
    ids=["a", "b"],
)
def test_synth_volume_is_the_truth_volume_without_the_anatomy(draw) -> None:
    """Same seed, same random draws: every existing study keeps its images and labels."""
    images, labels = draw(np.random.default_rng(11))
    if images.shape[0] == 3:
        truth = generator_a.synth_volume_truth(np.random.default_rng(11), n_bscans=3, height=96, width=128)
    else:
        truth = generator_b.synth_volume_truth(np.random.default_rng(11), 2, 256, 256)
    np.testing.assert_array_equal(images, truth.images)
    np.testing.assert_array_equal(labels, truth.labels)


def test_left_eye_truth_is_mirrored_like_its_images() -> None:
    spec = StudySpec(patients=1, visits=1, bscans=3, width=128, height=96)
    when = datetime(2024, 2, 3, 9)
    od_vol, od = synthetic_volume_truth(np.random.default_rng(5), spec, "P1", when.date(), "OD", 0.5, when)
    os_vol, os_ = synthetic_volume_truth(np.random.default_rng(5), spec, "P1", when.date(), "OS", 0.5, when)
    np.testing.assert_array_equal(os_vol.bscans, od_vol.bscans[:, :, ::-1])
    for name in LAYER_NAMES:
        np.testing.assert_array_equal(os_.layers[name], od.layers[name][:, ::-1])
    assert os_.fovea_bscan == od.fovea_bscan and os_.fovea_col == pytest.approx(127 - od.fovea_col)
    assert od_vol.layers is None and os_vol.layers is None  # the truth never rides on the scan


def _ilm_edge_error(image: np.ndarray, ilm: np.ndarray) -> float:
    """Median distance (rows) from ``ilm`` to the image's strongest dark-to-bright edge within 12 rows of it."""
    smooth = ndi.gaussian_filter(image, 1.0)
    grad = np.zeros_like(smooth)
    grad[1:-1] = smooth[2:] - smooth[:-2]
    errors = []
    for col, row in enumerate(ilm):
        lo, hi = max(1, round(row) - 12), min(image.shape[0] - 1, round(row) + 13)
        errors.append(abs(lo + int(np.argmax(grad[lo:hi, col])) - row))
    return float(np.median(errors))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("anatomy_study")
    write_synthetic_study(out, StudySpec(patients=1, visits=1, bscans=5, width=128, height=96, seed=3))
    return out


def test_study_truth_matches_the_written_scans_of_both_eyes(study: Path) -> None:
    truth = load_anatomy_truth(study)
    masks = load_ground_truth(study)
    assert set(truth) == set(masks) and {key[2] for key in truth} == {"OD", "OS"}
    by_eye = {}
    for path in sorted((study / "P001").rglob("*.vol")):
        (vol,) = read_volumes(path)
        by_eye[vol.meta.eye] = vol
    for (patient, visit, eye), t in truth.items():
        vol = by_eye[eye]
        assert vol.layers is None, "study files must carry no device lines"
        n, _, width = vol.bscans.shape
        assert t.layers.source == "ground-truth" and t.layers.names == LAYER_NAMES
        _check_layers(t.layers.rows, (n, width))
        assert 0 <= t.fovea_bscan <= n - 1 and 0 <= t.fovea_col <= width - 1
        # the truth lies on this eye's image; un-mirrored, a left eye's ILM would miss its edge
        pairs = list(zip(vol.bscans, t.layers.get("ILM"), strict=True))
        error = np.mean([_ilm_edge_error(img, ilm) for img, ilm in pairs])
        flipped = np.mean([_ilm_edge_error(img, ilm[::-1]) for img, ilm in pairs])
        assert error < 0.5 and flipped > error + 0.5, (eye, error, flipped)


def test_missing_or_old_truth_says_to_write_the_study_again(study: Path, tmp_path: Path) -> None:
    with pytest.raises(LabelError, match="has no ground_truth/manifest.csv") as info:
        load_anatomy_truth(tmp_path)
    assert "hrf-batch synth" in info.value.hint
    old = tmp_path / "old"
    (old / TRUTH_DIR).mkdir(parents=True)
    for f in (study / TRUTH_DIR).iterdir():
        if f.suffix == ".npz":
            with np.load(f) as data:  # what an older version wrote: the HRF masks alone
                np.savez_compressed(old / TRUTH_DIR / f.name, labels=data["labels"])
        else:
            (old / TRUTH_DIR / f.name).write_bytes(f.read_bytes())
    with pytest.raises(LabelError, match="no layer lines or fovea") as info:
        load_anatomy_truth(old)
    assert "write the study again with `hrf-batch synth`" in info.value.hint
    assert load_ground_truth(old).keys() == load_anatomy_truth(study).keys()  # the masks still serve


def test_truth_file_layout(study: Path) -> None:
    files = sorted((study / TRUTH_DIR).glob("*.npz"))
    assert len(files) == 2
    with np.load(files[0]) as data:
        assert data[FOVEA_KEY].shape == (2,)
        n = data["labels"].shape[0]
        for name in LAYER_NAMES:
            assert data[f"layers_{name}"].dtype == np.float32 and data[f"layers_{name}"].shape == (n, 128)
