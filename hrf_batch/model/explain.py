"""LRP relevance maps for the CCT and the MIL model: display-scale B-scans in, pixel relevance out.

The relevance map's argmax is where SAM 2 is prompted, so the map has to be faithful (its sum is
the explained logit, not 1e17) and sharp (it peaks on a small bright focus, not on the retina).

How it is computed
------------------
* Transformer (Ali et al. 2022, "AH/LN" rules): inside ``conservative(model)`` the attention
  softmax, the pooling weights over tokens, LayerNorm's standard deviation and GELU's gate are
  constants, so everything between two Linear/Conv layers is linear (residual adds, attention
  matmul, centring, max-pools) and plain backpropagation carries relevance through it conservatively.
* Linear and Conv layers get LRP rules, attached as zennit hooks by a zennit ``Composite`` (which
  removes them again). zennit's stock rules pass *relevance* as the gradient, which is only
  conservative when every linear operation between hooked layers is a hooked module; the residual
  adds and the attention matmul are not. The rules below are therefore written in gradient form:
  a hook receives the modified gradient ``g`` at its output (output relevance ``R = z * g``) and
  returns the gradient ``g_in`` with ``x * g_in`` = the rule's input relevance. Only the first layer
  returns relevance itself, so the gradient at the image *is* the relevance map.
* Rules (``rules="default"``): ε on Linear layers (ε = 1e-6 × the layer's output RMS: gradient ×
  input through the transformer, the AH/LN rule itself); z+ on the tokenizer/feature convolutions
  (relevance flows only along positive evidence, which keeps the maps sparse and positive where
  the logit is positive); z^B on the first convolution with the bounds of the 0..255 display range
  after normalisation (pixels far from the dark bound — bright foci — get the relevance).
  ``"gamma"`` uses γ = 0.25 instead of z+, ``"flat"`` the flat rule on the first layer,
  ``"epsilon"`` ε everywhere (gradient × input of the conservative forward; the least sharp).
* BatchNorm after a convolution is folded into it while explaining, so the conv rules see one
  affine layer (the fold is exact: the BatchNorm is swapped for an identity, then put back).
* MIL: the same rules on AlexNet's convs and the Linear layers, the gated-attention weights held
  constant (pooling is then linear); each patch's relevance lands in its box on the B-scan through
  the gradient of the patch cut-out (overlaps add up, pixels outside every patch get 0).

Conservation: ``relevance.sum() == logit - (relevance held by biases)``. Biases of the ε layers,
LayerNorm's shift, the positional embedding and positive biases under z+/γ keep their share (the
standard LRP choice; distributing a bias over the inputs amplifies weak inputs); z^B and flat
distribute the first layer's bias. Without biases the sum equals the logit to a few 1e-6 (float32
model, default ε; the stabilisers) or to the float32 rounding of the map (float64 model, ε=1e-12).

bf16 (a classifier with ``precision="bf16"``): the forward and the rules run under bf16 autocast.
Conservation is then checked per batch on its first B-scan against an fp32 map of the same B-scan:
:func:`conservation_error` is the change of ``sum(R) - logit`` (the constants' share, the same in exact
arithmetic) over the fp32 map's total ``|R|``. Measured on the shipped model (24 synthetic 496x512
B-scans, CPU autocast, one B-scan per batch): median 0.003, 22 of 24 below 0.01, then 0.023 and 0.026
(relevance peak unchanged) and 0.055 on the one B-scan whose bf16 peak moved (its map changed by
half its maximum). The tolerance :data:`BF16_CONSERVATION_TOLERANCE` = 0.03 passes the first 23 and
catches the last; a batch above it is explained again in fp32 (logged once per process). The check
costs one fp32 B-scan per bf16 batch and covers that B-scan only; fp32 classifiers are not checked.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from zennit.core import Composite, Hook, Stabilizer

from hrf_batch.model.calibration import log_odds
from hrf_batch.model.classify import EXPLAIN_BYTES_PER_PIXEL, Classifier, normalise
from hrf_batch.model.nets import conservative

log = logging.getLogger(__name__)

DISPLAY_RANGE = (0.0, 255.0)  # pixel range of display-scale B-scans; the z^B rule's box
EPSILON = 1e-6  # ε of the ε rule and stabiliser of the other rules, relative to the layer's RMS
BF16_CONSERVATION_TOLERANCE = 0.03  # of a map's total |relevance|; measured median 0.003 (module docstring)
_fallback_logged = False  # the fp32 fallback is logged once per process, not once per batch


@dataclass(frozen=True)
class Explanation:
    """Relevance maps of a batch of B-scans and what they explain."""

    relevance: np.ndarray  # float32 (B, H, W) at input resolution; sums to the logit minus bias share
    logits: np.ndarray  # (B,) the explained quantity, task.explain_logit of the same forward
    scores: np.ndarray  # (B,) calibrated HRF-presence probability of the same forward
    log_odds: np.ndarray  # (B,) its log-odds (float64): compares without saturating near 0 and 1


# --------------------------------------------------------------------------- layer arithmetic


def _apply(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The layer's forward with other parameters (the rules' modified weights)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)


def _transpose(module: nn.Module, x: Tensor, weight: Tensor, grad: Tensor) -> Tensor:
    """The layer's input gradient for output gradient ``grad`` under ``weight`` (W^T grad)."""
    if isinstance(module, nn.Linear):
        return grad @ weight
    return torch.nn.grad.conv2d_input(x.shape, weight, grad, module.stride, module.padding,
                                      module.dilation, module.groups)


def _pos(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


def _add(a: Tensor | None, b: Tensor | None, scale: float = 1.0) -> Tensor | None:
    return None if a is None else a + scale * b


# --------------------------------------------------------------------------- rules (gradient form)


class _Rule(Hook, ABC):
    """A zennit hook whose backward maps the modified output gradient ``g`` to the input's.

    ``propagate(module, x, z, g)`` gets the layer input ``x``, its output ``z`` and ``g``;
    subclasses implement it. The output is cloned because an in-place ReLU (AlexNet) follows.
    """

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params = params
        self.stabilise = Stabilizer(epsilon=params.get("epsilon", EPSILON), norm_scale=True)

    def forward(self, module: nn.Module, input: tuple[Tensor, ...], output: Tensor) -> None:
        self.stored_tensors["input"] = input[0].detach()
        self.stored_tensors["output"] = output.detach().clone()

    def backward(self, module: nn.Module, grad_input: tuple[Tensor, ...],
                 grad_output: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        x, z = self.stored_tensors["input"], self.stored_tensors["output"]
        with torch.no_grad():
            new = self.propagate(module, x, z, grad_output[0])
        # under bf16 autocast the rule computes in bf16; autograd wants the input's own dtype back
        return (new.to(x.dtype),) + (None,) * (len(grad_input) - 1)

    @abstractmethod
    def propagate(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        """The input-side gradient for output gradient ``g``: the rule itself."""

    def copy(self) -> "_Rule":
        return type(self)(**self.params)


class _Epsilon(_Rule):
    """ε rule ``R_i = sum_j x_i w_ij R_j / (z_j + ε)``; the bias keeps ``b_j R_j / z_j``.

    With ``first=True`` it returns the input relevance itself (first layer of ``"epsilon"``).
    """

    def propagate(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        grad = _transpose(module, x, module.weight, g * z / self.stabilise(z))
        return x * grad if self.params.get("first") else grad


class _ZPlus(_Rule):
    """z+ rule: output relevance shared among the positive contributions ``(x_i w_ij)^+`` only."""

    def propagate(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        w, b = module.weight, module.bias
        zp = _apply(module, x.clamp(min=0), _pos(w), _pos(b))
        negative = bool((x < 0).any())  # never after a ReLU: skip the second half
        if negative:
            zp = zp + _apply(module, x.clamp(max=0), _neg(w))
        s = g * z / self.stabilise(zp)
        grad = _transpose(module, x, _pos(w), s)
        return torch.where(x > 0, grad, _transpose(module, x, _neg(w), s)) if negative else grad


class _Gamma(_Rule):
    """γ rule (generalised to either sign): contributions that agree with the output weighted ``1 + γ``."""

    def propagate(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        gamma, w, b = self.params["gamma"], module.weight, module.bias
        w_up, w_down = w + gamma * w.clamp(min=0), w + gamma * w.clamp(max=0)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        z_up = _apply(module, xp, w_up, _add(b, _pos(b), gamma)) + _apply(module, xn, w_down)
        z_down = _apply(module, xp, w_down, _add(b, _neg(b), gamma)) + _apply(module, xn, w_up)
        s_up = g * z * (z > 0) / self.stabilise(z_up)
        s_down = g * z * (z < 0) / self.stabilise(z_down)
        grad_pos = _transpose(module, x, w_up, s_up) + _transpose(module, x, w_down, s_down)
        if not bool((x < 0).any()):
            return grad_pos
        grad_neg = _transpose(module, x, w_down, s_up) + _transpose(module, x, w_up, s_down)
        return torch.where(x > 0, grad_pos, grad_neg)


class _ZBox(_Rule):
    """z^B rule for the first layer: contributions measured from the box ``[low, high]`` per pixel.

    ``R_i = sum_j (x_i w_ij - l w_ij^+ - h w_ij^-) R_j / sum_i (...)``. The box is the display
    range, widened per sample to its own min/max so the denominator stays positive. The bias
    cancels from the denominator, so the first layer's bias relevance goes to the pixels.
    """

    def propagate(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        dims = tuple(range(1, x.ndim))
        low = torch.clamp(x.amin(dim=dims, keepdim=True), max=self.params["low"])
        high = torch.clamp(x.amax(dim=dims, keepdim=True), min=self.params["high"])
        wp, wn = module.weight.clamp(min=0), module.weight.clamp(max=0)
        ones = torch.ones_like(x[:1])  # low and high are constant per sample: one image serves all
        linear_part = z if module.bias is None else z - module.bias.view(1, -1, *([1] * (z.ndim - 2)))
        den = linear_part - low * _apply(module, ones, wp) - high * _apply(module, ones, wn)
        s = g * z / self.stabilise(den)
        return (x - low) * _transpose(module, x, wp, s) + (x - high) * _transpose(module, x, wn, s)


class _Flat(_Rule):
    """Flat rule for the first layer: each output's relevance spread evenly over its receptive field."""

    def propagate(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        ones_w = torch.ones_like(module.weight)
        den = _apply(module, torch.ones_like(x[:1]), ones_w)  # the same for every sample
        return _transpose(module, x, ones_w, g * z / self.stabilise(den))


def _rule_templates(name: str, low: float, high: float, eps: float) -> tuple[_Rule, _Rule, _Rule]:
    """(first conv, other convs, Linear) rule templates of a rule set."""
    first = {"flat": _Flat(epsilon=eps), "epsilon": _Epsilon(first=True, epsilon=eps)}.get(
        name, _ZBox(low=low, high=high, epsilon=eps))
    conv = {"gamma": _Gamma(gamma=0.25, epsilon=eps), "epsilon": _Epsilon(epsilon=eps)}.get(name, _ZPlus(epsilon=eps))
    return first, conv, _Epsilon(epsilon=eps)


RULE_SETS = ("default", "gamma", "flat", "epsilon")


# --------------------------------------------------------------------------- model preparation


@contextmanager
def folded_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Fold every BatchNorm2d that directly follows a Conv2d (in an ``nn.Sequential``) into it.

    For the duration the conv holds ``w * a`` and bias ``b * a + c`` (``a``, ``c``: the eval-mode
    BatchNorm's scale and shift) and the BatchNorm is replaced by an identity, so a conv rule sees
    the whole affine map; afterwards the original parameter and module objects are put back.
    """
    pairs = []
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            names = list(seq._modules)
            pairs += [(seq, a, b) for a, b in zip(names, names[1:])
                      if isinstance(seq._modules[a], nn.Conv2d) and isinstance(seq._modules[b], nn.BatchNorm2d)]
    undo: list[Callable[[], None]] = []
    try:
        for seq, conv_name, bn_name in pairs:
            conv, bn = seq._modules[conv_name], seq._modules[bn_name]
            undo.append(_fold(seq, conv, bn_name, bn))
        yield model
    finally:
        for restore in reversed(undo):
            restore()


def _fold(seq: nn.Sequential, conv: nn.Conv2d, bn_name: str, bn: nn.BatchNorm2d) -> Callable[[], None]:
    """Fold one pair; return the function that undoes it."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"BatchNorm {bn_name!r} keeps no running statistics, so it cannot be folded for LRP; "
                         "explain a model trained with track_running_stats=True")
    weight, bias = conv.weight, conv.bias
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.weight is not None:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        new_bias = shift if bias is None else bias * scale + shift
        conv.weight = nn.Parameter(weight * scale.view(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter(new_bias.clone(), requires_grad=False)
    identity = nn.Identity()
    identity.train(bn.training)
    setattr(seq, bn_name, identity)

    def restore() -> None:
        conv.weight, conv.bias = weight, bias
        setattr(seq, bn_name, bn)

    return restore


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (running BatchNorm statistics, no dropout) inside; each module's flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def _first_conv(model: nn.Module) -> nn.Conv2d:
    """The layer that sees the pixels: the first Conv2d in module order (CCT tokenizer, AlexNet)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ValueError("LRP here supports zero-padded convolutions only; rebuild the model with "
                                 "padding_mode='zeros'")
            return module
    raise ValueError(f"{type(model).__name__} has no Conv2d to start LRP from; explain a CCT or MIL model")


def _composite(model: nn.Module, rules: str, bounds: tuple[float, float], eps: float) -> Composite:
    """A zennit Composite attaching the rule set to every Conv2d and Linear layer of the model."""
    first, conv, linear = _rule_templates(rules, *bounds, eps)
    first_layer = _first_conv(model)

    def module_map(ctx: dict, name: str, module: nn.Module) -> _Rule | None:
        if module is first_layer:
            return first
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ValueError(f"conv {name!r} is not zero-padded; LRP here supports padding_mode='zeros' only")
            return conv
        return linear if isinstance(module, nn.Linear) else None

    return Composite(module_map=module_map)


# --------------------------------------------------------------------------- the attributor


def conservation_error(relevance: np.ndarray, logit: float, reference: np.ndarray, reference_logit: float) -> float:
    """How far a map's conservation balance moved from a reference map of the same B-scan, relative
    to the reference's total absolute relevance.

    The balance ``sum(R) - logit`` is minus the share held by the additive constants, the same
    quantity for any exact arithmetic; so its change between a bf16 and an fp32 map is the bf16
    rounding's conservation error, in units of what the map distributes."""
    gap = float(np.sum(relevance, dtype=np.float64)) - float(logit)
    ref_gap = float(np.sum(reference, dtype=np.float64)) - float(reference_logit)
    scale = float(np.sum(np.abs(reference), dtype=np.float64))
    if scale == 0.0:
        return 0.0 if gap == ref_gap else math.inf
    return abs(gap - ref_gap) / scale


class Explainer:
    """Attribution object used in a ``with`` block so no hook, patch or lrp_mode flag outlives it.

    Entering puts the model in eval mode, folds BatchNorms into their convs, switches on the
    conservative forward and attaches the LRP rules (``rules``: one of :data:`RULE_SETS`); leaving
    undoes all of it in reverse order, also when the block raises. ``epsilon`` is the ε rule's ε
    and the other rules' stabiliser, relative to each layer's output RMS (larger: sparser maps).

    With a bf16 classifier each batch is explained under bf16 autocast and its first B-scan once more
    in fp32; when their :func:`conservation_error` exceeds ``conservation_tolerance`` the batch is
    explained again in fp32 (counted in ``fallbacks``, logged once per process).
    """

    def __init__(self, clf: Classifier, *, rules: str = "default", epsilon: float = EPSILON,
                 conservation_tolerance: float = BF16_CONSERVATION_TOLERANCE) -> None:
        if rules not in RULE_SETS:
            raise ValueError(f"unknown LRP rule set {rules!r}; choose one of {RULE_SETS}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0 (it keeps LRP's divisions finite), got {epsilon}")
        self.clf, self.rules, self.epsilon = clf, rules, float(epsilon)
        self.conservation_tolerance = float(conservation_tolerance)
        self.conservation_errors: list[float] = []  # one per bf16 batch
        self.fallbacks = 0  # bf16 batches explained again in fp32
        mean, std = clf.info.config.norm_mean, clf.info.config.norm_std
        self._bounds = ((DISPLAY_RANGE[0] - mean) / std, (DISPLAY_RANGE[1] - mean) / std)
        self._stack: ExitStack | None = None
        self._composite: Composite | None = None

    def __enter__(self) -> "Explainer":
        if self._stack is not None:
            raise RuntimeError("this Explainer is already active; leave its with block before entering again")
        model = self.clf.model
        stack = ExitStack()
        try:
            stack.enter_context(_eval_mode(model))
            stack.enter_context(folded_batchnorm(model))
            stack.enter_context(conservative(model))
            self._composite = _composite(model, self.rules, self._bounds, self.epsilon)
            stack.enter_context(self._composite.context(model))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info: object) -> None:
        stack, self._stack, self._composite = self._stack, None, None
        if stack is not None:
            stack.close()

    def explain(self, images: np.ndarray) -> Explanation:
        """Relevance maps for display-scale B-scans ``(B, H, W)``, in batches of ``clf.batch_for(shape)``."""
        if self._stack is None:
            raise RuntimeError("Explainer.explain was called outside its with block; "
                               "use `with Explainer(clf) as ex: ex.explain(images)`")
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3:
            raise ValueError(f"expected B-scans of shape (B, H, W), got {images.shape}; "
                             "stack single B-scans with images[None]")
        relevance = np.zeros(images.shape, dtype=np.float32)
        logits = np.zeros(len(images), dtype=np.float64)
        scores = np.zeros(len(images), dtype=np.float64)
        step = max(1, int(self.clf.batch_for(images.shape, EXPLAIN_BYTES_PER_PIXEL)))
        for start in range(0, len(images), step):
            part = slice(start, start + step)
            relevance[part], logits[part], scores[part] = self._explain_checked(images[part])
        cal = self.clf.calibration
        return Explanation(relevance=relevance, logits=logits, scores=cal.apply(scores),
                           log_odds=cal.apply_logits(log_odds(scores)))

    def _explain_checked(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch in the classifier's precision; a bf16 batch whose first map breaks conservation
        by more than the tolerance (against an fp32 map of the same B-scan) is redone in fp32."""
        if self.clf.precision != "bf16":
            return self._explain_batch(images, low_precision=False)
        relevance, logits, scores = self._explain_batch(images, low_precision=True)
        reference = self._explain_batch(images[:1], low_precision=False)
        error = conservation_error(relevance[0], logits[0], reference[0][0], reference[1][0])
        self.conservation_errors.append(error)
        if error <= self.conservation_tolerance:
            return relevance, logits, scores
        self.fallbacks += 1
        global _fallback_logged
        if not _fallback_logged:
            _fallback_logged = True
            log.warning("bf16 LRP broke relevance conservation by %.3g of the map (tolerance %.3g); such batches "
                        "are explained again in fp32", error, self.conservation_tolerance)
        return reference if len(images) == 1 else self._explain_batch(images, low_precision=False)

    def _explain_batch(self, images: np.ndarray, low_precision: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One forward and one backward for the batch: the gradient of the summed explained logits,
        under the classifier's bf16 autocast when ``low_precision``."""
        model, task = self.clf.model, self.clf.task
        dtype = next(model.parameters()).dtype
        try:
            with torch.inference_mode(False), torch.enable_grad(), \
                    (self.clf.autocast() if low_precision else nullcontext()):
                x = normalise(self.clf, images).to(dtype).requires_grad_(True)
                out = model(x)
                explained = task.explain_logit(out)
                (grad,) = torch.autograd.grad(explained.sum(), x)
                scores = task.score(out.detach().double())
        finally:  # drop this batch's stored tensors and tensor hooks (the module hooks stay)
            for hook in list(self._composite.hook_refs):
                hook.remove()
        return (grad[:, 0].float().cpu().numpy(), explained.detach().double().cpu().numpy(),
                scores.cpu().numpy())


def relevance_maps(clf: Classifier, images: np.ndarray, *, rules: str = "default") -> Explanation:
    """Convenience: relevance maps of ``images`` with a fresh :class:`Explainer`."""
    with Explainer(clf, rules=rules) as explainer:
        return explainer.explain(images)
