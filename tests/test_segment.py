"""Segmenters: the weight-free fallback on synthetic foci, SAM 2's checkpoint handling, and the real
SAM 2 path on CPU with a random-initialised Hiera-T saved and loaded like an official checkpoint."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from hrf_batch.errors import HrfBatchError
from hrf_batch.segment import (
    CHECKPOINT_ENV,
    REGION_NAME,
    RegionGrowingSegmenter,
    Segmenter,
    SegmenterSetupError,
    make_segmenter,
    sam2_status,
)
from hrf_batch.segment.prompts import crop, make_prompt
from hrf_batch.synthetic.generator_a import synth_bscan

TINY_FILE = "sam2.1_hiera_tiny.pt"


@pytest.fixture(autouse=True)
def _no_user_checkpoints(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the default checkpoint folder at an empty temp dir, whatever the developer has installed."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def _centre(mask: np.ndarray) -> tuple[int, int]:
    """The focus pixel nearest to its centroid (a focus may be non-convex)."""
    rr, cc = np.nonzero(mask)
    i = int(np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2))
    return int(rr[i]), int(cc[i])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _assert_inside_window(mask: np.ndarray, image_shape: tuple[int, int], window: tuple[int, int, int, int]) -> None:
    assert mask.dtype == bool and mask.shape == image_shape
    r0, c0, r1, c1 = window
    outside = mask.copy()
    outside[r0:r1, c0:c1] = False
    assert not outside.any()


# --------------------------------------------------------------------------- fallback


@pytest.fixture(scope="module")
def synthetic_scans() -> list:
    rng = np.random.default_rng(2025)
    return [synth_bscan(rng, height=496, width=512, n_hrf=7) for _ in range(8)]


def test_region_growing_reaches_good_dice_at_true_centres(synthetic_scans: list) -> None:
    seg = RegionGrowingSegmenter()
    images, prompts, truths = [], [], []
    for scan in synthetic_scans:
        for k in range(1, scan.n_hrf + 1):
            truth = scan.hrf_labels == k
            images.append(scan.image)
            prompts.append(make_prompt(_centre(truth), scan.image.shape))
            truths.append(truth)
    assert len(truths) >= 50
    start = time.perf_counter()
    masks = seg.segment(images, prompts)
    per_prompt = (time.perf_counter() - start) / len(masks)
    dice = np.array([_dice(m, t) for m, t in zip(masks, truths)])
    for mask, prompt in zip(masks, prompts):
        _assert_inside_window(mask, (496, 512), prompt.window)
    assert dice.mean() >= 0.85, f"mean Dice {dice.mean():.3f} over {len(dice)} foci"
    assert (dice > 0.5).mean() >= 0.9
    assert per_prompt < 0.05  # milliseconds in practice; generous for a loaded CI machine


def test_region_growing_rejects_bright_layers(synthetic_scans: list) -> None:
    """Prompted on the RPE (or the bright inner layers) away from foci: no focus, or a tiny one."""
    seg = RegionGrowingSegmenter()
    sizes = []
    for scan in synthetic_scans:
        far = ndi.binary_dilation(scan.hrf_mask, iterations=40).any(axis=0)
        cols = [c for c in range(60, 452, 49) if not far[c]]
        for c in cols:
            for row in (scan.layers["RPE"][c] + 2, scan.layers["EZ"][c] + 1,
                        (scan.layers["GCL"][c] + scan.layers["IPL"][c]) / 2):
                prompt = make_prompt((int(row), c), scan.image.shape)
                sizes.append(int(seg.segment([scan.image], [prompt])[0].sum()))
    sizes_arr = np.array(sizes)
    assert len(sizes_arr) >= 30
    assert sizes_arr.max() <= 20, sorted(sizes)[-5:]
    assert (sizes_arr == 0).mean() >= 0.9


def test_region_growing_returns_empty_without_contrast_and_names_itself() -> None:
    seg = make_segmenter("region")
    assert isinstance(seg, RegionGrowingSegmenter) and isinstance(seg, Segmenter)
    assert seg.name == REGION_NAME == "region-growing" and seg.checkpoint_sha256 is None
    flat = np.full((120, 160), 100.0, np.float32)
    prompt = make_prompt((60, 80), flat.shape)
    assert not seg.segment([flat], [prompt])[0].any()
    spot = flat.copy()
    spot[58:63, 78:83] = 230.0  # a 5x5 focus on a flat background: found exactly
    mask = seg.segment([spot], [prompt])[0]
    np.testing.assert_array_equal(mask, spot > 150)
    with pytest.raises(ValueError, match="one prompt per image"):
        seg.segment([spot, spot], [prompt])


# --------------------------------------------------------------------------- checkpoints and factory


def test_missing_checkpoint_names_file_and_location(_no_user_checkpoints: Path) -> None:
    with pytest.raises(SegmenterSetupError) as info:
        make_segmenter("sam2", sam2_size="tiny")
    msg = str(info.value)
    assert isinstance(info.value, HrfBatchError)
    assert TINY_FILE in msg and "092824/sam2.1_hiera_tiny.pt" in msg
    assert str(_no_user_checkpoints / "hrf-batch" / "sam2" / TINY_FILE) in msg
    assert CHECKPOINT_ENV in msg
    with pytest.raises(SegmenterSetupError, match="sam2.1_hiera_large.pt"):
        make_segmenter("sam2", sam2_checkpoint="/nonexistent/dir/model.pt", sam2_size="large")


def test_unknown_kind_and_size_are_refused() -> None:
    with pytest.raises(SegmenterSetupError, match="auto, sam2, region"):
        make_segmenter("unet")
    with pytest.raises(SegmenterSetupError, match="tiny, small, base_plus, large"):
        sam2_status(None, "huge")


def test_auto_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hrf_batch.segment"):
        seg = make_segmenter("auto", sam2_size="small")
    assert isinstance(seg, RegionGrowingSegmenter)
    assert "sam2.1_hiera_small.pt" in caplog.text and "region-growing" in caplog.text


def test_status_not_ready_then_ready(tmp_path: Path) -> None:
    status = sam2_status(tmp_path, "base_plus")
    assert status["ready"] is False
    assert status["expected_file"] == "sam2.1_hiera_base_plus.pt"
    assert status["path"] == str(tmp_path / "sam2.1_hiera_base_plus.pt")
    assert status["name"] == "sam2.1-hiera-base-plus"
    assert "sam2.1_hiera_base_plus.pt" in status["message"]
    junk = tmp_path / "sam2.1_hiera_base_plus.pt"
    junk.write_text("<html>not found</html>")  # a failed download
    assert sam2_status(tmp_path, "base_plus")["ready"] is False
    import torch

    torch.save({"model": {}}, junk)
    status = sam2_status(tmp_path, "base_plus")
    assert status["ready"] is True and "ready" in status["message"]
    assert sam2_status(junk, "base_plus")["ready"] is True  # a file path works as well as its folder


def test_loader_refuses_files_that_are_not_sam2_checkpoints(tmp_path: Path) -> None:
    import torch

    from hrf_batch.segment.sam import load_sam2

    no_model = tmp_path / "a.pt"
    torch.save({"state_dict": {}}, no_model)
    with pytest.raises(SegmenterSetupError, match="no 'model' weights"):
        load_sam2(no_model, "tiny")
    wrong = tmp_path / "b.pt"
    torch.save({"model": {"not.a.weight": torch.zeros(3)}}, wrong)
    with pytest.raises(SegmenterSetupError, match="does not fit sam2.1-hiera-tiny") as info:
        load_sam2(wrong, "tiny")
    assert "sam2.1_hiera_tiny.pt" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    broken = tmp_path / "c.pt"
    broken.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(SegmenterSetupError, match="cannot be read") as info:
        load_sam2(broken, "tiny")
    assert info.value.__cause__ is not None


# --------------------------------------------------------------------------- SAM 2 input handling


def test_crop_is_upsampled_bicubic_and_mask_maps_back_exactly() -> None:
    from hrf_batch.segment.sam import downsample_mask, sam_box, upsample_crop

    img = np.full((200, 300), 40.0, np.float32)
    img[100:104, 150:154] = 220.0
    prompt = make_prompt((101, 151), img.shape, box_px=4, crop_px=64)
    up = upsample_crop(crop(img, prompt), 1024)
    assert up.shape == (1024, 1024, 3) and up.dtype == np.uint8
    assert (up[..., 0] == up[..., 2]).all()
    r0, c0 = prompt.window[:2]
    s = 1024 / 64
    bright = up[..., 0] > 130
    rows, cols = np.nonzero(bright)  # the 4x4 spot lands at its scaled place
    assert abs(rows.mean() - (102 - r0) * s) < 1 and abs(cols.mean() - (152 - c0) * s) < 1
    box = sam_box(prompt, 1024)  # x0, y0, x1, y1 around the peak pixel's centre
    np.testing.assert_allclose(box, [(149.5 - c0) * s, (99.5 - r0) * s, (153.5 - c0) * s, (103.5 - r0) * s])
    big = np.zeros((1024, 1024), bool)
    big[int((100 - r0) * s):int((104 - r0) * s), int((150 - c0) * s):int((154 - c0) * s)] = True
    small = downsample_mask(big, prompt.crop_shape)
    expected = np.zeros(prompt.crop_shape, bool)
    expected[100 - r0:104 - r0, 150 - c0:154 - c0] = True
    np.testing.assert_array_equal(small, expected)


def test_predictor_leaves_a_1024_input_unresized() -> None:
    """Our upsampling is the one that counts: SAM 2's transform only normalises a 1024 input."""
    import torch
    from sam2.utils.transforms import SAM2Transforms

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    out = SAM2Transforms(resolution=1024, mask_threshold=0.0)(img)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expected = (torch.from_numpy(img).permute(2, 0, 1).float() / 255.0 - mean) / std
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- SAM 2 on CPU, random weights


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised Hiera-T saved exactly like the official files: ``{"model": state_dict}``."""
    import torch
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu")
    folder = tmp_path_factory.mktemp("sam2")
    torch.save({"model": model.state_dict()}, folder / TINY_FILE)
    return folder


@pytest.fixture(scope="module")
def sam_segmenter(sam_checkpoint: Path) -> Segmenter:
    """Built through the factory ("auto" with a configured folder) and the real loader."""
    return make_segmenter("auto", sam2_checkpoint=sam_checkpoint, sam2_size="tiny", device="cpu")


@pytest.fixture(scope="module")
def sam_run(sam_segmenter: Segmenter) -> dict:
    """Two crops encoded together, and the second one again on its own (3 encodings, ~5 s each)."""
    rng = np.random.default_rng(7)
    images = [synth_bscan(rng, height=248, width=256, n_hrf=3).image for _ in range(2)]
    prompts = [make_prompt((120, 100), images[0].shape, crop_px=75),
               make_prompt((3, 254), images[1].shape, crop_px=60)]  # top-right corner: shifted crop
    sam_segmenter.batch_size = 2
    batched = sam_segmenter.segment(images, prompts)
    sam_segmenter.batch_size = 1
    single = sam_segmenter.segment(images[1:], prompts[1:])
    return {"images": images, "prompts": prompts, "batched": batched, "single": single}


def test_sam2_loads_through_the_real_loader(sam_segmenter: Segmenter, sam_checkpoint: Path) -> None:
    from hrf_batch.segment.sam import Sam2Segmenter

    assert isinstance(sam_segmenter, Sam2Segmenter) and isinstance(sam_segmenter, Segmenter)
    assert sam_segmenter.name == "sam2.1-hiera-tiny"
    expected = hashlib.sha256((sam_checkpoint / TINY_FILE).read_bytes()).hexdigest()
    assert sam_segmenter.checkpoint_sha256 == expected
    assert sam_segmenter.input_size == 1024
    assert sam2_status(sam_checkpoint, "tiny")["ready"] is True


@pytest.mark.slow  # three Hiera-T encodings on a CPU
def test_sam2_masks_lie_in_the_crop_window(sam_run: dict) -> None:
    assert len(sam_run["batched"]) == 2
    for image, prompt, mask in zip(sam_run["images"], sam_run["prompts"], sam_run["batched"]):
        _assert_inside_window(mask, image.shape, prompt.window)
    assert sam_run["prompts"][1].window == (0, 196, 60, 256)


@pytest.mark.slow  # three Hiera-T encodings on a CPU
def test_sam2_batched_equals_one_at_a_time(sam_run: dict) -> None:
    assert len(sam_run["single"]) == 1
    np.testing.assert_array_equal(sam_run["batched"][1], sam_run["single"][0])


def test_loader_names_a_file_that_is_not_a_pytorch_file(tmp_path: Path) -> None:
    from hrf_batch.segment.sam import load_sam2

    path = tmp_path / "note.pt"
    path.write_bytes(b"hi\n")  # unpickling this ends in a bare KeyError
    with pytest.raises(SegmenterSetupError, match="not a PyTorch file") as info:
        load_sam2(path, "tiny")
    assert "hrf-batch models fetch sam2 --size tiny" in info.value.hint
