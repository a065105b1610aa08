"""Generator C (held out for evaluation): its contract, its labels and its hard negatives."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from hrf_batch.io.volume import LAYER_NAMES
from hrf_batch.synthetic import generator_c as gc

H, W = 256, 384


@pytest.fixture(scope="module")
def volume():
    return gc.synth_volume_truth(np.random.default_rng(11), n_bscans=7, height=H, width=W, hrf_prevalence=0.8)


@pytest.fixture(scope="module")
def scans() -> list[gc.SyntheticBScanC]:
    """Single B-scans of many fresh eyes, asked for several HRFs each."""
    return [gc.synth_bscan(np.random.default_rng(s), height=H, width=W, n_hrf=8) for s in range(12)]


def test_same_seed_same_volume_other_seed_other_volume() -> None:
    a = gc.synth_volume_truth(np.random.default_rng(3), 2, H, W, 0.5)
    b = gc.synth_volume_truth(np.random.default_rng(3), 2, H, W, 0.5)
    c = gc.synth_volume_truth(np.random.default_rng(4), 2, H, W, 0.5)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert all(np.array_equal(a.layers[k], b.layers[k]) for k in LAYER_NAMES)
    assert (a.fovea_bscan, a.fovea_col) == (b.fovea_bscan, b.fovea_col)
    assert not np.array_equal(a.images, c.images)


def test_contract_shapes_dtypes_and_range(volume) -> None:
    assert volume.images.shape == (7, H, W) and volume.images.dtype == np.float32
    assert volume.labels.shape == (7, H, W) and volume.labels.dtype == np.int32
    assert np.isfinite(volume.images).all()
    assert volume.images.min() >= 0 and volume.images.max() <= 255
    assert volume.images.max() > 200  # the RPE band is bright on the display scale
    assert set(volume.layers) == set(LAYER_NAMES)
    for rows in volume.layers.values():
        assert rows.shape == (7, W) and rows.dtype == np.float32 and np.isfinite(rows).all()
    images, labels = gc.synth_volume(np.random.default_rng(11), 7, H, W, 0.8)
    assert np.array_equal(images, volume.images) and np.array_equal(labels, volume.labels)


def test_label_ids_have_no_gaps_and_one_piece_each(volume, scans) -> None:
    label_maps = list(volume.labels) + [s.labels for s in scans]
    assert sum(int(lab.max()) for lab in label_maps) > 20
    for lab in label_maps:
        ids = np.unique(lab[lab > 0])
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))
        for i in ids:
            _, pieces = ndimage.label(lab == i, structure=np.ones((3, 3)))
            assert pieces == 1
        # foci do not touch: 8-connected components of the whole mask match the ids one to one
        _, blobs = ndimage.label(lab > 0, structure=np.ones((3, 3)))
        assert blobs == len(ids)


@pytest.mark.parametrize("width", [512, 1536])
def test_hrf_areas_within_bounds(width: int) -> None:
    lo, hi = gc.hrf_area_bounds(width)
    areas = []
    for seed in range(3):
        scan = gc.synth_bscan(np.random.default_rng(seed), height=H, width=width, n_hrf=10)
        lab = scan.labels
        areas += list(np.bincount(lab.ravel())[1:])
    assert len(areas) >= 15
    assert min(areas) >= lo and max(areas) <= hi
    assert 5 * width / 512 <= np.median(areas) <= 60 * width / 512


def test_area_bounds_scale_with_pixel_area() -> None:
    assert gc.hrf_area_bounds(512) == (5, 150)
    assert gc.hrf_area_bounds(1536) == (15, 450)
    assert gc.hrf_area_bounds(256) == (3, 75)


def test_hrf_pixels_lie_between_ilm_and_rpe(volume, scans) -> None:
    pairs = [(volume.labels[i], {k: v[i] for k, v in volume.layers.items()}) for i in range(len(volume.labels))]
    pairs += [(s.labels, s.layers) for s in scans]
    checked = 0
    for lab, layers in pairs:
        rr, cc = np.nonzero(lab)
        assert (rr > layers["ILM"][cc]).all() and (rr < layers["RPE"][cc]).all()
        checked += len(rr)
    assert checked > 200


def test_layers_in_order_and_in_frame(volume, scans) -> None:
    stacks = [np.stack([volume.layers[k] for k in LAYER_NAMES])]
    stacks += [np.stack([s.layers[k] for k in LAYER_NAMES])[:, None, :] for s in scans]
    for st in stacks:
        assert (np.diff(st, axis=0) > 0).all()
        assert st.min() > 0 and st.max() < H - 1


def test_fovea_near_middle_with_thin_inner_retina(volume) -> None:
    n = volume.images.shape[0]
    assert abs(volume.fovea_bscan - (n - 1) / 2) <= 0.3 / (gc.SLOW_FIELD_MM / (n - 1)) + 1e-6
    assert abs(volume.fovea_col - (W - 1) / 2) <= 0.4 / (gc.FIELD_MM / W) + 1
    i, c = int(round(volume.fovea_bscan)), int(round(volume.fovea_col))
    inner = volume.layers["OPL"][i] - volume.layers["ILM"][i]   # ILM to the OPL/ONL boundary
    away = int(1.2 / (gc.FIELD_MM / W))                             # 1.2 mm from the centre
    assert inner[c] < 0.4 * min(inner[c - away], inner[c + away])
    total = volume.layers["BM"][i] - volume.layers["ILM"][i]
    assert total[c] < total[c - away] and total[c] < total[c + away]  # a foveal depression


def test_hard_negatives_present_and_never_labelled(scans) -> None:
    kinds = set()
    for s in scans:
        assert s.hard_negatives.shape == (H, W) and s.hard_negatives.dtype == np.uint8
        assert not ((s.labels > 0) & (s.hard_negatives > 0)).any()
        kinds |= set(np.unique(s.hard_negatives).tolist()) - {0}
    assert kinds <= set(gc.NEGATIVE_KINDS)
    assert {1, 2} <= kinds and len(kinds) >= 4  # vessels, floaters and more


def test_exudates_are_larger_than_any_hrf() -> None:
    lo, hi = gc.hrf_area_bounds(W)
    seen = 0
    for seed in range(40):
        s = gc.synth_bscan(np.random.default_rng(seed), height=H, width=W, n_hrf=0)
        ex, n = ndimage.label(s.hard_negatives == 3, structure=np.ones((3, 3)))
        if n:
            seen += 1
            assert np.bincount(ex.ravel())[1:].sum() > hi
        assert s.labels.max() == 0
    assert seen >= 1


def test_hrfs_brighter_than_their_surround(scans) -> None:
    contrasts = []
    for s in scans:
        for i in range(1, int(s.labels.max()) + 1):
            focus = s.labels == i
            ring = ndimage.binary_dilation(focus, iterations=4) & ~ndimage.binary_dilation(s.labels > 0, iterations=1)
            contrasts.append(float(s.image[focus].mean() - s.image[ring].mean()))
    assert len(contrasts) > 30
    assert np.mean(contrasts) > 15 and np.mean(np.array(contrasts) > 0) > 0.85


def test_prevalence_zero_and_one() -> None:
    none = gc.synth_volume_truth(np.random.default_rng(5), 4, H, W, hrf_prevalence=0.0)
    assert none.labels.max() == 0
    every = gc.synth_volume_truth(np.random.default_rng(5), 4, H, W, hrf_prevalence=1.0)
    assert all(lab.max() >= 1 for lab in every.labels)


def test_single_bscan_volume() -> None:
    v = gc.synth_volume_truth(np.random.default_rng(2), 1, H, W)
    assert v.images.shape == (1, H, W) and v.fovea_bscan == 0.0


@pytest.mark.parametrize("height, width", [(100, 512), (496, 64), (4000, 512), (496, 10000)])
def test_check_size_rejects_sizes_it_cannot_lay_out(height: int, width: int) -> None:
    with pytest.raises(ValueError, match="generator c needs"):
        gc.check_size(height, width)
    with pytest.raises(ValueError):
        gc.synth_volume_truth(np.random.default_rng(0), 1, height, width)


@pytest.mark.parametrize("height, width", [(256, 256), (1024, 1536), (496, 512)])
def test_check_size_accepts_supported_sizes(height: int, width: int) -> None:
    gc.check_size(height, width)


@pytest.mark.parametrize("kwargs", [{"n_bscans": 0}, {"n_bscans": 2, "hrf_prevalence": 1.5},
                                    {"n_bscans": 2, "hrf_prevalence": -0.1},
                                    {"n_bscans": 2, "hrf_prevalence": math.nan}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        gc.synth_volume_truth(np.random.default_rng(0), height=H, width=W, **kwargs)


def test_registered_in_study_spec() -> None:
    from hrf_batch.synthetic.study import GENERATORS, StudySpec

    assert "c" in GENERATORS
    with pytest.raises(ValueError, match="generator c needs"):
        StudySpec(generator="c", height=128, width=384)


def test_cli_synth_generator_c_writes_a_readable_study(tmp_path: Path) -> None:
    from hrf_batch.cli import main
    from hrf_batch.io.ground_truth import load_anatomy_truth, load_ground_truth
    from hrf_batch.io.readers import read_volumes

    out = tmp_path / "study"
    result = CliRunner().invoke(main, ["synth", str(out), "--patients", "1", "--visits", "1", "--bscans", "3",
                                       "--width", "384", "--height", "256", "--generator", "c", "--seed", "5"])
    assert result.exit_code == 0, result.output
    files = sorted(out.rglob("*.vol"))
    assert files
    for f in files:
        for vol in read_volumes(f):
            assert vol.bscans.shape == (3, 256, 384)
            assert vol.bscans.max() > 100
    masks = load_ground_truth(out)
    assert len(masks) == 2 and all(m.shape == (3, 256, 384) for m in masks.values())
    anatomy = load_anatomy_truth(out)
    assert all(set(a.layers.rows) == set(LAYER_NAMES) for a in anatomy.values())
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "x"), "--generator", "c", "--height", "128"])
    assert bad.exit_code != 0 and "generator c needs" in bad.output
