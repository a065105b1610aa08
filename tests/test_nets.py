"""The network modules: CCT shapes and sizes, heads, conservative (LRP) mode, MIL patches and model."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from torchvision.models import alexnet

from hrf_batch.io.readers import read_volume
from hrf_batch.model.nets import (
    ALEXNET_WEIGHTS_FILE,
    CCT,
    POOLINGS,
    POS_EMBEDS,
    PRESETS,
    LrpAware,
    MilNet,
    PretrainedWeightsError,
    build_preset,
    conservative,
    count_parameters,
    get_task,
    patch_boxes,
    patch_grid,
    retina_band,
)
from hrf_batch.model.nets.cct import GELU, Attention, LayerNorm, sincos_2d
from hrf_batch.synthetic.generator_a import synth_bscan

TASK_NAMES = ("binary", "3class", "regression")
N_OUT = {"binary": 1, "3class": 3, "regression": 1}
REAL_VOLS = ("Willis_B_716_0.vol", "Willis_B_716_2.vol", "valid.vol")


def _tiny(task: str = "binary", **overrides) -> CCT:
    torch.manual_seed(0)
    return build_preset("cct-tiny", task=task, **overrides)


def _mil(task: str = "binary", **overrides) -> MilNet:
    torch.manual_seed(0)
    return build_preset("mil-alexnet", task=task, warn_random_init=False, **overrides)


def _synthetic_set(counts: list[int], height: int, width: int) -> torch.Tensor:
    rng = np.random.default_rng(7)
    images = np.stack([synth_bscan(rng, height=height, width=width, n_hrf=c).image for c in counts])
    return torch.from_numpy((images - images.mean()) / images.std()).float()[:, None]


# --------------------------------------------------------------------------- CCT


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
def test_cct_forward_shape_for_every_head_pooling_and_pos_embed(task, pooling, pos_embed):
    model = _tiny(task, pooling=pooling, pos_embed=pos_embed).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 64, 96))
    assert logits.shape == (2, N_OUT[task])
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("pos_embed", ["learned-2d", "sincos-2d", "sincos-2d-rel"])
def test_one_model_serves_496x512_and_496x1024_bscans(pos_embed):
    model = _tiny("3class", pos_embed=pos_embed).eval()
    assert model.token_grid(496, 512) == (31, 32)
    assert model.token_grid(496, 1024) == (31, 64)
    with torch.no_grad():
        for width in (512, 768, 1024):
            tokens = model.forward_tokens(torch.randn(1, 1, 496, width))
            assert tokens.shape == (1, 31 * model.token_grid(496, width)[1], 16)
            assert model(torch.randn(1, 1, 496, width)).shape == (1, 3)


def test_learned_pos_embed_lives_on_the_reference_grid_and_is_resampled():
    model = _tiny(pos_embed="learned-2d")
    assert tuple(model.pos_embed.weight.shape) == (1, 16, 31, 32)
    wide = model.pos_embed.embedding(31, 64, torch.device("cpu"), torch.float32)
    assert wide.shape == (1, 16, 31, 64)
    # bilinear resampling to twice the width keeps each column's mean value range
    assert wide.min() >= model.pos_embed.weight.min() - 1e-6
    assert wide.max() <= model.pos_embed.weight.max() + 1e-6
    assert "pos_embed.weight" not in _tiny(pos_embed="sincos-2d").state_dict()


def test_sincos_2d_is_bounded_and_tells_positions_apart():
    emb = sincos_2d(5, 7, 16)
    assert emb.shape == (1, 16, 5, 7)
    assert emb.abs().max() <= 1.0
    flat = emb[0].flatten(1).T  # (35 positions, 16)
    dists = torch.cdist(flat, flat) + torch.eye(35) * 10
    assert dists.min() > 0.1
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 18)


def test_presets_build_with_their_documented_sizes():
    sizes = {name: count_parameters(build_preset(name, warn_random_init=False) if PRESETS[name][0] == "mil"
                                    else build_preset(name)) for name in PRESETS}
    assert sizes["cct-tiny"] < 10_000
    assert 200_000 < sizes["cct-small"] < 2_000_000
    assert 3_000_000 < sizes["cct-7/7x2"] < 8_000_000
    small = build_preset("cct-small")
    assert small.arch_kwargs["pooling"] == "max" and small.arch_kwargs["batchnorm"] is True
    assert isinstance(small.tokenizer.layers[0][1], torch.nn.BatchNorm2d)


def test_arch_kwargs_rebuild_the_same_architecture():
    model = _tiny("regression", pooling="seq", pos_embed="learned-2d")
    again = CCT("regression", **model.arch_kwargs)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in again.state_dict().items()}


def test_bad_input_shape_and_options_are_refused_with_a_fix():
    model = _tiny()
    with pytest.raises(ValueError, match=r"x\[None, None\]"):
        model(torch.randn(64, 96))
    with pytest.raises(ValueError, match="choose one of"):
        _tiny(pooling="mean")
    with pytest.raises(ValueError, match="choose one of"):
        build_preset("cct-huge")
    with pytest.raises(ValueError, match="divisible"):
        _tiny(heads=3)


# --------------------------------------------------------------------------- heads


def test_targets_from_hrf_counts():
    counts = [0, 1, 2, 3, 15]
    assert get_task("binary").target(counts).tolist() == [0, 1, 1, 1, 1]
    assert get_task("3class").target(counts).tolist() == [0, 1, 2, 2, 2]
    assert get_task("regression").target(np.array(counts)).tolist() == [0, 1, 2, 3, 10]
    with pytest.raises(ValueError, match=">= 0"):
        get_task("binary").target([1, -1])
    with pytest.raises(ValueError, match="choose one of"):
        get_task("count")


def test_scores_are_presence_probabilities_in_0_1():
    z = torch.linspace(-8, 8, 9)[:, None]
    binary = get_task("binary").score(z)
    assert torch.allclose(binary, torch.sigmoid(z[:, 0]))
    reg = get_task("regression")
    count = reg.predict(z)
    assert torch.allclose(count, 10 * torch.sigmoid(z[:, 0]))
    assert torch.allclose(reg.score(z), 1 - torch.exp(-count))
    assert (reg.score(z).diff() > 0).all()  # strictly monotone: keeps the ranking for AUROC
    assert math.isclose(reg.count_at_score(0.5), math.log(2))
    logits3 = torch.randn(20, 3) * 3
    s3 = get_task("3class").score(logits3)
    assert torch.allclose(s3, 1 - torch.softmax(logits3, dim=1)[:, 0], atol=1e-6)
    for s in (binary, reg.score(z), s3):
        assert ((s >= 0) & (s <= 1)).all()


def test_three_class_explains_the_has_hrf_contrast():
    task = get_task("3class")
    logits = torch.randn(10, 3) * 2
    w = task.explain_weights(logits)
    assert torch.all(w[:, 0] == -1)
    assert torch.allclose(w[:, 1:].sum(dim=1), torch.ones(10))
    log_odds = torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]
    gap = log_odds - task.explain_logit(logits)
    assert (gap >= -1e-6).all() and (gap <= math.log(2) + 1e-6).all()
    # the weights are the gradient of the log-odds at these logits
    z = logits.clone().requires_grad_(True)
    (torch.logsumexp(z[:, 1:], dim=1) - z[:, 0]).sum().backward()
    assert torch.allclose(z.grad, w, atol=1e-6)
    assert torch.equal(get_task("binary").explain_weights(logits[:, :1]), torch.ones(10, 1))
    with pytest.raises(ValueError, match="same task"):
        task.score(logits[:, :1])


@pytest.mark.parametrize("task", TASK_NAMES)
def test_each_head_loss_falls_within_a_few_steps(task):
    counts = [0, 0, 0, 1, 2, 3, 0, 5]
    x = _synthetic_set(counts, 64, 128)
    model, head = _tiny(task).train(), get_task(task)
    targets = head.target(counts)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        optimiser.zero_grad()
        loss = head.loss(model(x), targets)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


# --------------------------------------------------------------------------- conservative mode


@pytest.mark.parametrize("pooling", POOLINGS)
def test_conservative_forward_keeps_values_but_changes_gradients(pooling):
    model = _tiny("3class", pooling=pooling, depth=2).eval()
    x = torch.randn(1, 1, 64, 96, requires_grad=True)
    y = model(x)
    (g_plain,) = torch.autograd.grad(y[:, 1].sum(), x)
    with conservative(model):
        assert all(m.lrp_mode for m in model.modules() if isinstance(m, LrpAware))
        y_lrp = model(x)
        (g_lrp,) = torch.autograd.grad(y_lrp[:, 1].sum(), x)
    assert not any(m.lrp_mode for m in model.modules() if isinstance(m, LrpAware))
    assert torch.allclose(y, y_lrp, atol=1e-5)
    assert not torch.allclose(g_plain, g_lrp, atol=1e-6)


def _euler_gap(module: torch.nn.Module, x: torch.Tensor, offset: torch.Tensor) -> float:
    """|x·∇(r·(f(x) - offset)) - r·(f(x) - offset)|: zero when f - offset is linear in x (conservative)."""
    x = x.clone().requires_grad_(True)
    r = torch.randn_like(module(x))
    out = (r * (module(x) - offset)).sum()
    (grad,) = torch.autograd.grad(out, x)
    gap = ((grad * x).sum() - out).abs() / out.abs().clamp(min=1e-3)
    return float(gap.detach())


def test_layernorm_attention_and_gelu_are_linear_in_lrp_mode():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 8)
    norm = LayerNorm(8)
    torch.nn.init.normal_(norm.bias)
    attn = Attention(8, heads=2).eval()
    gelu = GELU()
    # plain LayerNorm is scale-invariant, so x·∇ is 0, not the output: not conservative
    assert _euler_gap(norm, x, norm.bias) > 0.5
    for module, offset in ((norm, norm.bias), (attn, attn.proj.bias), (gelu, torch.zeros(()))):
        module.lrp_mode = True
        assert _euler_gap(module, x, offset) < 1e-4, type(module).__name__
    y = x.clone().requires_grad_(True)
    attn(y).sum().backward()
    assert attn.q.weight.grad is None and attn.k.weight.grad is None  # softmax is a constant
    assert attn.v.weight.grad is not None


def test_attention_fused_and_explicit_paths_agree_and_keep_weights():
    attn = Attention(16, heads=4).eval()
    x = torch.randn(2, 30, 16)
    fused = attn(x)
    attn.keep_weights = True
    explicit = attn(x)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert attn.last_weights.shape == (2, 4, 30, 30)
    assert torch.allclose(attn.last_weights.sum(-1), torch.ones(2, 4, 30), atol=1e-5)


# --------------------------------------------------------------------------- MIL: patches


@pytest.mark.parametrize("name", REAL_VOLS)
def test_retina_band_finds_the_retina_in_real_spectralis_bscans(fixtures_dir, name):
    image = read_volume(fixtures_dir / "spectralis-raw-data" / name).bscans[0]
    top, bottom = retina_band(image)
    height, width = image.shape
    assert top.shape == bottom.shape == (width,)
    assert (bottom >= top).all() and top.min() >= 0 and bottom.max() < height
    thickness = bottom - top
    assert 50 <= np.median(thickness) <= 250
    assert np.mean((thickness >= 40) & (thickness <= 300)) > 0.9
    brightest = np.argmax(ndi.gaussian_filter(image, 3), axis=0)
    inside = (brightest >= top) & (brightest <= bottom)
    assert inside.mean() > 0.9
    rows = np.arange(height)[:, None]
    band = (rows >= top) & (rows <= bottom)
    assert image[band].mean() > 2.5 * image[~band].mean()


def test_retina_band_covers_ilm_to_bm_of_a_synthetic_bscan():
    scan = synth_bscan(np.random.default_rng(3), height=496, width=512, n_hrf=0)
    top, bottom = retina_band(scan.image)
    ilm, bm = scan.layers["ILM"], scan.layers["BM"]
    assert np.mean(top <= ilm + 5) > 0.9
    assert np.mean(bottom >= bm - 5) > 0.9
    assert np.median(bottom - top) < 2.5 * np.median(bm - ilm)


def test_retina_band_of_a_blank_image_is_the_whole_height():
    top, bottom = retina_band(np.zeros((100, 80), np.float32))
    assert (top == 0).all() and (bottom == 99).all()


@pytest.mark.parametrize("width, n_windows", [(512, 8), (700, 11), (1024, 16)])
def test_patch_grid_lays_three_rows_of_64px_patches_over_the_band(width, n_windows):
    rng = np.random.default_rng(0)
    image = rng.random((496, width), dtype=np.float32)
    top = np.full(width, 150) + (np.arange(width) // 10)
    bottom = top + 100
    patches, boxes = patch_grid(image, (top, bottom), size=64, rows=3)
    assert patches.shape == (3 * n_windows, 64, 64) and boxes.shape == (3 * n_windows, 4)
    assert (boxes[:, 2] - boxes[:, 0] == 64).all() and (boxes[:, 3] - boxes[:, 1] == 64).all()
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 496 and boxes[:, 3].max() <= width
    assert boxes[n_windows - 1, 3] == width  # last window flush with the right edge
    for patch, (r0, c0, r1, c1) in zip(patches, boxes):
        assert np.array_equal(patch, image[r0:r1, c0:c1])
    grid = boxes.reshape(3, n_windows, 4)
    assert (grid[1:, :, 0] - grid[:-1, :, 0] == 64).all()  # stacked rows touch
    centres = (grid[1, :, 0] + grid[1, :, 2]) / 2
    band_centres = [(top[c0:c1].mean() + bottom[c0:c1].mean() + 1) / 2 for c0, c1 in grid[1, :, 1::2]]
    assert np.allclose(centres, band_centres, atol=1)


def test_patch_boxes_spread_over_a_tall_band_and_stay_inside():
    boxes = patch_boxes((np.zeros(128), np.full(128, 299)), 300, 128, size=64, rows=3)
    rows = boxes.reshape(3, 2, 4)[:, 0, 0]
    assert rows[0] == 0 and rows[-1] == 300 - 64 and rows[1] - rows[0] > 64
    with pytest.raises(ValueError, match="smaller than one 64x64 patch"):
        patch_boxes((np.zeros(40), np.ones(40)), 40, 40)


# --------------------------------------------------------------------------- MIL: model


@pytest.mark.parametrize("task", TASK_NAMES)
def test_mil_forward_shapes_and_kept_attention(task):
    model = _mil(task).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 128, 192))
    assert logits.shape == (2, N_OUT[task])
    assert model.last_attention.shape == (2, 9) and model.last_boxes.shape == (2, 9, 4)
    assert torch.allclose(model.last_attention.sum(dim=1), torch.ones(2), atol=1e-5)


def test_mil_conservative_forward_keeps_values():
    model = _mil("binary").eval()
    x = torch.randn(1, 1, 128, 192)
    with torch.no_grad():
        plain = model(x)
        with conservative(model):
            assert model.attention.lrp_mode
            lrp = model(x)
    assert torch.allclose(plain, lrp, atol=1e-5)


def test_mil_loss_falls_within_a_few_steps():
    counts = [0, 0, 0, 1, 2, 3, 0, 5]
    x = _synthetic_set(counts, 96, 128)
    model, head = _mil("binary", dropout=0.0).train(), get_task("binary")
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-4)
    losses = []
    for _ in range(20):
        optimiser.zero_grad()
        loss = head.loss(model(x), head.target(counts))
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


def test_mil_random_init_warns_with_the_weights_file_name(caplog):
    with caplog.at_level(logging.WARNING, logger="hrf_batch.model.nets.mil"):
        model = build_preset("mil-alexnet")
    assert model.feature_init == "random"
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(ALEXNET_WEIGHTS_FILE in m and "alexnet_weights" in m for m in messages), messages


def test_mil_loads_imagenet_alexnet_weights_from_a_local_file(tmp_path, caplog):
    torch.manual_seed(5)
    reference = alexnet(weights=None).state_dict()
    path = tmp_path / ALEXNET_WEIGHTS_FILE
    torch.save(reference, path)
    with caplog.at_level(logging.WARNING, logger="hrf_batch.model.nets.mil"):
        model = MilNet("binary", alexnet_weights=path)
    assert not caplog.records
    assert model.feature_init == f"imagenet:{ALEXNET_WEIGHTS_FILE}"
    assert torch.allclose(model.features[0].weight, reference["features.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.features[10].weight, reference["features.10.weight"])


def test_mil_refuses_missing_or_foreign_weight_files(tmp_path):
    with pytest.raises(PretrainedWeightsError, match=ALEXNET_WEIGHTS_FILE):
        MilNet("binary", alexnet_weights=tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedWeightsError, match="not a readable"):
        MilNet("binary", alexnet_weights=garbage)
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(PretrainedWeightsError, match="AlexNet"):
        MilNet("binary", alexnet_weights=other)


def test_relative_sincos_keeps_wider_grids_in_the_trained_range() -> None:
    from hrf_batch.model.nets.cct import sincos_2d

    ref = sincos_2d(31, 32, 16)
    wide = sincos_2d(31, 64, 16, ref_grid=(31, 32))
    # every second column of the 64-wide grid sits exactly on a column of the 32-wide reference grid
    torch.testing.assert_close(wide[..., ::2], ref, rtol=0, atol=1e-6)
    absolute = sincos_2d(31, 64, 16)
    assert not torch.allclose(absolute[..., 32:], wide[..., 32:])
