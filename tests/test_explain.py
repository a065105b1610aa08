"""LRP relevance maps: conservation, a slow reference of the rules, no leftovers, MIL, batching, usefulness.

Tolerances (the map is float32 at the boundary, which bounds every float64 check):
* float64, no biases, epsilon=1e-12: |sum(R) - logit| <= 5e-7 |logit| (measured <= 3e-8 CCT, 2e-10 MIL).
* float32, no biases, default epsilon 1e-6: <= 1e-4 |logit| (measured <= 4e-6 CCT, 7e-6 MIL): float32
  arithmetic plus the 1e-6 relative stabiliser at each hooked layer.
* with biases: the biases, LayerNorm and BatchNorm shifts and the positional embedding hold the
  share ``sum(c * dlogit/dc)``; under the "epsilon" rules sum(R) + share = logit to 1e-7 (measured 9e-9).
* slow reference: max |R - R_ref| <= 1e-5 max |R_ref| (measured <= 5e-8).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import erf
from torch import nn

from hrf_batch.model.classify import Classifier, to_tensor
from hrf_batch.model.explain import RULE_SETS, Explainer, Explanation, relevance_maps
from hrf_batch.model.files import ModelConfig, ModelInfo, load_model, save_model
from hrf_batch.model.nets import LrpAware, build_preset, conservative, get_task
from hrf_batch.synthetic.generator_a import synth_bscan

TASK_NAMES = ("binary", "3class", "regression")
MEAN, STD = 128.0, 64.0  # powers of two: normalised integer pixels are exact in float32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _classifier(model: nn.Module, batch_size: int = 4, device: str = "cpu") -> Classifier:
    config = ModelConfig.for_model(model, norm_mean=MEAN, norm_std=STD)
    info = ModelInfo(model_id="test-model", sha256="0" * 64, config=config, path=Path("."))
    return Classifier(model=model.eval(), info=info, task=model.task, device=torch.device(device),
                      batch_size=batch_size)


def _images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width)).astype(np.float32)


def _cct(task: str = "binary", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_preset("cct-tiny", task, **overrides)


def _without_biases(model: nn.Module) -> nn.Module:
    """Zero every additive constant; BatchNorm keeps a random scale so the fold is exercised."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    return model


def _randomised(model: nn.Module, seed: int = 3) -> nn.Module:
    """Random weights, biases, LayerNorm affines and BatchNorm statistics: nothing is trivially 0 or 1."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype) * scale

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(rnd(m.weight, 1.0 / math.sqrt(m.in_features)))
                if m.bias is not None:
                    m.bias.copy_(rnd(m.bias, 0.1))
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + rnd(m.weight, 0.2))
                m.bias.copy_(rnd(m.bias, 0.1))
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(rnd(m.running_mean, 0.2))
                m.running_var.copy_(0.5 + rnd(m.running_var, 1.0).abs())
                m.weight.copy_(1.0 + rnd(m.weight, 0.2))
                m.bias.copy_(rnd(m.bias, 0.1))
    return model


def _rel_gap(relevance: np.ndarray, logits: np.ndarray) -> float:
    sums = relevance.astype(np.float64).reshape(len(relevance), -1).sum(axis=1)
    return float(np.max(np.abs(sums - logits) / np.abs(logits)))


# --------------------------------------------------------------------------- 1. conservation


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("pooling", ("max", "seq", "smooth-max"))
def test_relevance_sums_to_the_explained_logit_in_float64(task, pooling):
    model = _without_biases(_cct(task, pooling=pooling, pos_embed="none", depth=2)).double()
    images = _images(3, 64, 96)
    for rules in RULE_SETS:
        with Explainer(_classifier(model), rules=rules, epsilon=1e-12) as explainer:
            out = explainer.explain(images)
        with torch.no_grad():
            logits = model(to_tensor(images, MEAN, STD, torch.device("cpu")).double())
        assert np.allclose(out.logits, model.task.explain_logit(logits).numpy(), rtol=1e-9)
        assert np.abs(out.logits).min() > 1e-4, "a near-zero logit would make the check meaningless"
        assert _rel_gap(out.relevance, out.logits) < 5e-7, rules


def test_float32_conservation_with_the_default_stabiliser():
    model = _without_biases(_cct("binary", pos_embed="none", depth=2))
    out = relevance_maps(_classifier(model), _images(3, 64, 96))
    assert out.relevance.dtype == np.float32 and out.relevance.shape == (3, 64, 96)
    assert _rel_gap(out.relevance, out.logits) < 1e-4


def _constant_share(model: nn.Module, x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(logit, share held by additive constants, x·grad), by plain autograd in conservative mode."""
    consts = [p for n, p in model.named_parameters() if n.endswith("bias") or n == "pos_embed.weight"]
    with conservative(model):
        x = x.clone().requires_grad_(True)
        f = model.task.explain_logit(model(x)).sum()
        grads = dict(zip([id(x)] + [id(p) for p in consts],
                         torch.autograd.grad(f, [x] + consts, allow_unused=True)))
    share = sum(float((c * grads[id(c)]).sum().detach()) for c in consts if grads[id(c)] is not None)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        # the eval-mode BatchNorm shift is bias - mean * weight / std; its bias part is counted above
        extra = -bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        share += float((extra * grads[id(bn.bias)]).sum().detach())
    return float(f.detach()), share, (x * grads[id(x)]).detach()


@pytest.mark.parametrize("pooling", ("max", "seq"))
def test_biases_and_positional_embedding_hold_the_rest_of_the_logit(pooling):
    model = _randomised(_cct("3class", pooling=pooling, pos_embed="learned-2d")).double().eval()
    images = _images(1, 64, 96, seed=5)
    with Explainer(_classifier(model), rules="epsilon", epsilon=1e-12) as explainer:
        out = explainer.explain(images)
    f, share, grad_x_input = _constant_share(model, to_tensor(images, MEAN, STD, torch.device("cpu")).double())
    assert abs(share) > 0.05 * abs(f), "the constants should hold a visible share in this model"
    assert abs(out.relevance.astype(np.float64).sum() + share - f) < 1e-7 * abs(f)
    # the epsilon rules are exactly gradient × input of the conservative forward (Ali et al.'s AH/LN)
    expected = grad_x_input[:, 0].numpy()
    assert np.abs(out.relevance - expected).max() < 1e-6 * np.abs(expected).max()


# --------------------------------------------------------------------------- 2. slow reference


EPS_REF = 1e-6


def _stab(v: np.ndarray) -> np.ndarray:
    """Denominator stabiliser: v + eps * rms(v) * sign(v), sign(0) = +1 (the module's definition)."""
    return v + EPS_REF * np.sqrt(np.mean(v ** 2)) * np.where(v >= 0, 1.0, -1.0)


def _windows(h: int, w: int, k: int, stride: int, pad: int):
    """Every output position with its in-bounds taps (ky, kx, iy, ix)."""
    for oy in range((h + 2 * pad - k) // stride + 1):
        for ox in range((w + 2 * pad - k) // stride + 1):
            yield oy, ox, [(ky, kx, oy * stride - pad + ky, ox * stride - pad + kx)
                           for ky in range(k) for kx in range(k)
                           if 0 <= oy * stride - pad + ky < h and 0 <= ox * stride - pad + kx < w]


def _conv(x, weight, bias, k, stride, pad):
    cout = weight.shape[0]
    wins = list(_windows(x.shape[1], x.shape[2], k, stride, pad))
    out = np.zeros((cout, wins[-1][0] + 1, wins[-1][1] + 1))
    for oy, ox, taps in wins:
        out[:, oy, ox] = bias + sum(weight[:, :, ky, kx] @ x[:, iy, ix] for ky, kx, iy, ix in taps)
    return out


def _maxpool(x):
    """3×3 stride-2 padding-1 max-pool with the winner of each window."""
    wins = list(_windows(x.shape[1], x.shape[2], 3, 2, 1))
    out = np.zeros((x.shape[0], wins[-1][0] + 1, wins[-1][1] + 1))
    winner = {}
    for oy, ox, taps in wins:
        for c in range(x.shape[0]):
            vals = [x[c, iy, ix] for _, _, iy, ix in taps]
            best = int(np.argmax(vals))
            out[c, oy, ox] = vals[best]
            winner[c, oy, ox] = taps[best][2:]
    return out, winner


def _conv_relevance(rule, x, weight, bias, z, r_out, k, stride, pad, box=None):
    """Input relevance of a conv layer: R_i = sum_j c_ij R_j / (sum_i c_ij + bias term), explicit sums."""
    gamma = 0.25

    def contributions(wt, xi, positive):
        xw = wt * xi[None, :]
        if rule == "epsilon":
            return xw
        if rule == "zplus":
            return np.clip(xw, 0, None)
        if rule == "gamma":
            return xw + gamma * (np.clip(xw, 0, None) if positive else np.clip(xw, None, 0))
        if rule == "zbox":
            low, high = box
            return xw - low * np.clip(wt, 0, None) - high * np.clip(wt, None, 0)
        return np.ones_like(wt)  # flat

    bias_terms = {"epsilon": (bias, bias), "zplus": (np.clip(bias, 0, None),) * 2,
                  "gamma": (bias + gamma * np.clip(bias, 0, None), bias + gamma * np.clip(bias, None, 0))}
    b_up, b_down = bias_terms.get(rule, (0.0 * bias, 0.0 * bias))
    wins = list(_windows(x.shape[1], x.shape[2], k, stride, pad))
    den_up, den_down = np.zeros_like(z), np.zeros_like(z)
    for oy, ox, taps in wins:
        den_up[:, oy, ox] = b_up + sum(contributions(weight[:, :, ky, kx], x[:, iy, ix], True).sum(1)
                                       for ky, kx, iy, ix in taps)
        den_down[:, oy, ox] = b_down + sum(contributions(weight[:, :, ky, kx], x[:, iy, ix], False).sum(1)
                                           for ky, kx, iy, ix in taps)
    den_up, den_down = _stab(den_up), _stab(den_down)
    r_in = np.zeros_like(x)
    for oy, ox, taps in wins:
        up = z[:, oy, ox] > 0
        share = r_out[:, oy, ox] / np.where(up, den_up[:, oy, ox], den_down[:, oy, ox])
        for ky, kx, iy, ix in taps:
            c = np.where(up[:, None], contributions(weight[:, :, ky, kx], x[:, iy, ix], True),
                         contributions(weight[:, :, ky, kx], x[:, iy, ix], False))
            r_in[:, iy, ix] += c.T @ share
    return r_in


def _linear_relevance(x, weight, z, r_out):
    """ε rule on (tokens, features): R_i = x_i sum_j w_ji R_j / stab(z_j)."""
    return x * ((r_out / _stab(z)) @ weight)


def _layernorm(x, ln):
    sd = np.sqrt(x.var(axis=-1, keepdims=True) + ln.eps)
    return (x - x.mean(axis=-1, keepdims=True)) / sd * _np(ln.weight) + _np(ln.bias), sd


def _layernorm_relevance(x, y, sd, ln, r_out):
    """LN rule: the std is a constant, so y = M x + beta with M = diag(gamma / sd) (I - 1/D): LRP-0."""
    d = x.shape[-1]
    r_in = np.zeros_like(x)
    for n in range(x.shape[0]):
        m = (_np(ln.weight) / sd[n])[:, None] * (np.eye(d) - 1.0 / d)
        r_in[n] = x[n] * (m.T @ (r_out[n] / y[n]))
    return r_in


def _split(a, b, r):
    """Relevance of a sum a + b, shared in proportion to the summands (LRP-0 on the addition, 0/0 = 0)."""
    total = a + b
    ratio = np.divide(r, total, out=np.zeros_like(r), where=total != 0)
    return a * ratio, b * ratio


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _attention_relevance(attn, y, r_out):
    """AH rule: softmax weights constant, o = A v is linear in v; then ε on proj and v."""
    n, dim = y.shape
    heads, hd = attn.heads, attn.head_dim
    q, k, v = (y @ _np(lin.weight).T for lin in (attn.q, attn.k, attn.v))
    o = np.zeros_like(v)
    weights = []
    for h in range(heads):
        cols = slice(h * hd, (h + 1) * hd)
        s = q[:, cols] @ k[:, cols].T / math.sqrt(hd)
        a = np.exp(s - s.max(axis=1, keepdims=True))
        a /= a.sum(axis=1, keepdims=True)
        weights.append(a)
        o[:, cols] = a @ v[:, cols]
    out = o @ _np(attn.proj.weight).T + _np(attn.proj.bias)
    if r_out is None:
        return out
    r_o = _linear_relevance(o, _np(attn.proj.weight), out, r_out)
    r_v = np.zeros_like(v)
    for h, a in enumerate(weights):
        cols = slice(h * hd, (h + 1) * hd)
        for m in range(n):
            r_v[m, cols] = sum(a[i, m] * v[m, cols] * r_o[i, cols] / o[i, cols] for i in range(n))
    return _linear_relevance(y, _np(attn.v.weight), v, r_v)


def _tokenizer_forward(model, image):
    """Folded conv → ReLU → max-pool per tokenizer layer; keeps (input, weight, bias, z, winners)."""
    tok = model.tokenizer
    acts, x = [], image[None]
    for layer in tok.layers:
        conv, bn = layer[0], layer[1]
        scale = _np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps)
        w = _np(conv.weight) * scale[:, None, None, None]
        b = _np(bn.bias) - _np(bn.running_mean) * scale
        z = _conv(x, w, b, tok.kernel_size, tok.stride, tok.padding)
        pooled, winner = _maxpool(np.maximum(z, 0))
        acts.append((x, w, b, z, winner))
        x = pooled
    return acts, x


def _tokenizer_relevance(model, acts, r, rules):
    """Max-pools pass relevance to their winners, ReLUs pass it on, the convs apply their rule."""
    first_rule = {"default": "zbox", "gamma": "zbox", "flat": "flat", "epsilon": "epsilon"}[rules]
    conv_rule = {"gamma": "gamma", "epsilon": "epsilon"}.get(rules, "zplus")
    tok = model.tokenizer
    for i in reversed(range(len(acts))):
        x, w, b, z, winner = acts[i]
        r_z = np.zeros_like(z)
        for (c, oy, ox), (iy, ix) in winner.items():
            r_z[c, iy, ix] += r[c, oy, ox]
        box = (min((0 - MEAN) / STD, x.min()), max((255 - MEAN) / STD, x.max()))
        r = _conv_relevance(first_rule if i == 0 else conv_rule, x, w, b, z, r_z,
                            tok.kernel_size, tok.stride, tok.padding, box)
    return r[0]


def _block_reference(blk, t0, r_out=None):
    """Pre-LN block: forward (``r_out`` None) or the relevance of its input t0."""
    y1, sd1 = _layernorm(t0, blk.norm1)
    att = _attention_relevance(blk.attn, y1, None)
    t1 = t0 + att
    y2, sd2 = _layernorm(t1, blk.norm2)
    h1 = y2 @ _np(blk.mlp.fc1.weight).T + _np(blk.mlp.fc1.bias)
    u = h1 * 0.5 * (1 + erf(h1 / math.sqrt(2)))
    h2 = u @ _np(blk.mlp.fc2.weight).T + _np(blk.mlp.fc2.bias)
    if r_out is None:
        return t1 + h2
    r_t1, r_h2 = _split(t1, h2, r_out)
    r_u = _linear_relevance(u, _np(blk.mlp.fc2.weight), h2, r_h2)  # = relevance of h1: GELU is an identity
    r_y2 = _linear_relevance(y2, _np(blk.mlp.fc1.weight), h1, r_u)
    r_t1 = r_t1 + _layernorm_relevance(t1, y2, sd2, blk.norm2, r_y2)
    r_t0, r_att = _split(t0, att, r_t1)
    return r_t0 + _layernorm_relevance(t0, y1, sd1, blk.norm1, _attention_relevance(blk.attn, y1, r_att))


def _pool_head_reference(model, tf):
    """(explained logit, relevance of the final tokens): pooling weights or max winners, ε on the head."""
    dim = tf.shape[1]
    if hasattr(model.pool, "score"):
        s = tf @ _np(model.pool.score.weight).T + _np(model.pool.score.bias)
        pw = np.exp(s - s.max())
        pw /= pw.sum()
        pooled = (pw * tf).sum(axis=0)
    else:
        pooled, arg = tf.max(axis=0), tf.argmax(axis=0)
    logits = pooled @ _np(model.head.weight).T + _np(model.head.bias)
    weights = model.task.explain_weights(torch.from_numpy(logits[None]))[0].numpy()
    r = _linear_relevance(pooled[None], _np(model.head.weight), logits[None], (weights * logits)[None])[0]
    if hasattr(model.pool, "score"):
        return float(weights @ logits), pw * tf * r / pooled
    r_tf = np.zeros_like(tf)
    r_tf[arg, np.arange(dim)] = r
    return float(weights @ logits), r_tf


def _reference(model, image, rules):
    """Explicit forward and layer-by-layer relevance for one normalised image (float64 numpy)."""
    acts, x = _tokenizer_forward(model, image)
    dim, rows, cols = x.shape
    grid = x.reshape(dim, -1).T
    pos = _np(model.pos_embed.embedding(rows, cols, torch.device("cpu"), torch.float64)[0]).reshape(dim, -1).T
    t0 = grid + pos
    t2 = _block_reference(model.blocks[0], t0)
    tf, sdf = _layernorm(t2, model.norm)
    logit, r_tf = _pool_head_reference(model, tf)
    r_t2 = _layernorm_relevance(t2, tf, sdf, model.norm, r_tf)
    r_t0 = _block_reference(model.blocks[0], t0, r_t2)
    r_grid, _ = _split(grid, pos, r_t0)
    return _tokenizer_relevance(model, acts, r_grid.T.reshape(dim, rows, cols), rules), logit


@pytest.mark.parametrize("rules", RULE_SETS)
@pytest.mark.parametrize("task,pooling", [("binary", "max"), ("binary", "seq"), ("3class", "max")])
def test_matches_a_slow_reference_written_from_the_rules(rules, task, pooling):
    model = _randomised(_cct(task, dim=8, heads=2, depth=1, tokenizer_channels=4, pooling=pooling))
    model = model.double().eval()
    image = _images(1, 32, 48, seed=11)
    with Explainer(_classifier(model), rules=rules) as explainer:
        out = explainer.explain(image)
    expected, logit = _reference(model, (image[0].astype(np.float64) - MEAN) / STD, rules)
    assert out.logits[0] == pytest.approx(logit, rel=1e-9)
    scale = np.abs(expected).max()
    assert scale > 0
    assert np.abs(out.relevance[0] - expected).max() < 1e-5 * scale


# --------------------------------------------------------------------------- 3. nothing left behind


def _state(model: nn.Module) -> dict:
    """Everything the Explainer may touch, as comparable values."""
    return {
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     + len(m._backward_pre_hooks) for m in model.modules()),
        "global_hooks": sum(len(h) for h in (nn.modules.module._global_forward_hooks,
                                             nn.modules.module._global_forward_pre_hooks,
                                             nn.modules.module._global_backward_hooks,
                                             nn.modules.module._global_backward_pre_hooks)),
        "lrp": [m.lrp_mode for m in model.modules() if isinstance(m, LrpAware)],
        "training": [m.training for m in model.modules()],
        "modules": [id(m) for m in model.modules()],
        "params": [(id(p), p.requires_grad) for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _assert_same_state(before: dict, after: dict) -> None:
    assert after["hooks"] == before["hooks"] == 0
    assert after["global_hooks"] == before["global_hooks"]
    assert not any(after["lrp"])
    for key in ("training", "modules", "params", "grads"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name


@pytest.mark.parametrize("mode", ("eval", "train"))
def test_nothing_is_left_hooked_or_changed_after_the_block(tmp_path, mode):
    model = _randomised(_cct("binary", pos_embed="learned-2d"))
    save_model(model, ModelConfig.for_model(model, norm_mean=MEAN, norm_std=STD), tmp_path / "m")
    loaded, info = load_model(tmp_path / "m")
    clf = Classifier(model=loaded, info=info, task=get_task(info.config.task), device=torch.device("cpu"))
    loaded.train(mode == "train")
    before = _state(loaded)
    with Explainer(clf) as explainer:
        inside = _state(loaded)
        assert inside["hooks"] > 0 and all(inside["lrp"]) and not any(inside["training"])
        assert inside["modules"] != before["modules"]  # BatchNorm folded away for the duration
        explainer.explain(_images(2, 64, 96))
    _assert_same_state(before, _state(loaded))
    assert loaded.training == (mode == "train")
    with pytest.raises(KeyError, match="raised in the block"):
        with Explainer(clf) as explainer:
            explainer.explain(_images(1, 64, 96))
            raise KeyError("raised in the block")
    _assert_same_state(before, _state(loaded))


def test_misuse_is_refused_with_a_fix():
    clf = _classifier(_cct())
    explainer = Explainer(clf)
    with pytest.raises(RuntimeError, match="with block"):
        explainer.explain(_images(1, 32, 48))
    with pytest.raises(ValueError, match="choose one of"):
        Explainer(clf, rules="alpha-beta")
    with pytest.raises(ValueError, match="epsilon"):
        Explainer(clf, epsilon=0.0)
    with explainer:
        with pytest.raises(ValueError, match=r"\(B, H, W\)"):
            explainer.explain(_images(1, 32, 48)[0])
        with pytest.raises(RuntimeError, match="already active"):
            explainer.__enter__()
    assert _state(clf.model)["hooks"] == 0


# --------------------------------------------------------------------------- 4. MIL


def _mil_images(n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(4)
    return np.stack([synth_bscan(rng, height=256, width=200, n_hrf=2).image for _ in range(n)]).astype(np.float32)


def _mil(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_preset("mil-alexnet", "binary", warn_random_init=False)


def test_mil_relevance_fills_the_patch_boxes_only_and_leaves_nothing_behind():
    model = _mil().train()
    clf = _classifier(model)
    model.train()
    images = _mil_images()
    before = _state(model)
    with Explainer(clf) as explainer:
        out = explainer.explain(images)
    _assert_same_state(before, _state(model))
    assert out.relevance.shape == images.shape and out.scores.shape == out.logits.shape == (2,)
    boxes = model.eval().bag_boxes(to_tensor(images, MEAN, STD, torch.device("cpu")))
    inside = np.zeros(images.shape, bool)
    for i, bag in enumerate(boxes):
        for r0, c0, r1, c1 in bag:
            inside[i, r0:r1, c0:c1] = True
    assert (~inside).any() and inside.any()
    assert np.all(out.relevance[~inside] == 0)
    assert np.count_nonzero(out.relevance[inside]) > 0.5 * inside.sum()


def test_mil_conserves_relevance_with_attention_weights_held_constant():
    model = _without_biases(_mil())
    images = _mil_images()
    out32 = relevance_maps(_classifier(model), images)
    assert _rel_gap(out32.relevance, out32.logits) < 1e-4
    model = model.double()
    with Explainer(_classifier(model), epsilon=1e-12) as explainer:
        out64 = explainer.explain(images)
    assert _rel_gap(out64.relevance, out64.logits) < 5e-7


# --------------------------------------------------------------------------- 5. batching


@pytest.mark.parametrize("kind", ("cct", "mil"))
def test_a_batch_gives_the_same_maps_as_one_image_at_a_time(kind):
    model = _randomised(_cct("3class")) if kind == "cct" else _mil()
    images = _images(3, 64, 96, seed=2) if kind == "cct" else _mil_images(3)
    batched = relevance_maps(_classifier(model, batch_size=4), images)
    split = relevance_maps(_classifier(model, batch_size=2), images)
    singles = [relevance_maps(_classifier(model, batch_size=1), images[i:i + 1]) for i in range(3)]
    single = np.concatenate([s.relevance for s in singles])
    scale = np.abs(single).max()
    assert scale > 0
    for out in (batched, split):
        assert isinstance(out, Explanation)
        assert np.abs(out.relevance - single).max() < 1e-5 * scale
        assert np.allclose(out.logits, [s.logits[0] for s in singles], rtol=1e-5)
        assert np.allclose(out.scores, [s.scores[0] for s in singles], rtol=1e-5)


# --------------------------------------------------------------------------- 6. usefulness


def _dot_images(rng: np.random.Generator, n: int, with_dot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 32×48 images with a bright band (as bright as the dot) and, where asked, one bright dot."""
    yy, xx = np.mgrid[:32, :48]
    images = rng.normal(60, 12, (n, 32, 48))
    band = rng.integers(8, 20, n)
    centres = np.stack([rng.integers(4, 28, n), rng.integers(4, 44, n)], axis=1)
    for i in range(n):
        images[i][(yy >= band[i]) & (yy < band[i] + 5)] += 130
        if with_dot[i]:
            images[i] += 140 * np.exp(-((yy - centres[i, 0]) ** 2 + (xx - centres[i, 1]) ** 2) / 2.88)
    return np.clip(images, 0, 255).astype(np.float32), centres


def test_relevance_peaks_on_the_bright_dot_of_a_trained_model():
    rng = np.random.default_rng(2)
    model = _cct("binary", seed=2)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        with_dot = rng.random(16) < 0.5
        images, _ = _dot_images(rng, 16, with_dot)
        loss = model.task.loss(model(to_tensor(images, MEAN, STD, torch.device("cpu"))),
                               torch.from_numpy(with_dot.astype(np.float32)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    images, centres = _dot_images(np.random.default_rng(99), 40, np.ones(40, bool))
    out = relevance_maps(_classifier(model), images)
    peaks = np.array([np.unravel_index(np.argmax(r), r.shape) for r in out.relevance])
    hits = np.abs(peaks - centres).max(axis=1) <= 3
    assert hits.mean() >= 0.75, f"relevance peaked on the dot in {hits.mean():.0%} of positives"


# --------------------------------------------------------------------------- CUDA (where present)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_maps_match_cpu_maps():
    model = _randomised(_cct("binary"))
    images = _images(2, 64, 96)
    cpu = relevance_maps(_classifier(model), images)
    gpu = relevance_maps(_classifier(model.cuda(), device="cuda"), images)
    assert np.abs(gpu.relevance - cpu.relevance).max() < 1e-3 * np.abs(cpu.relevance).max()
    assert np.allclose(gpu.logits, cpu.logits, rtol=1e-4)
