"""Compact Convolutional Transformer (CCT, after Hassani et al. 2021) for whole OCT B-scans.

A convolutional tokenizer turns a full-resolution B-scan ``(B, 1, H, W)`` into a grid of tokens
(each conv layer: conv without bias, optional BatchNorm, ReLU, max-pool 3/2/1), a 2-D positional
embedding is added, pre-LayerNorm transformer blocks mix the tokens, a pooling over tokens makes
one feature vector and a Linear head returns the task's logits (see :mod:`hrf_batch.model.nets.heads`).
No class token and no fixed input size: the same model serves 496×512, 496×768 and 496×1024
B-scans. The input must already be normalised with the training mean/std.

Conservative ("LRP") mode
-------------------------
LRP through a transformer is only conservative when the non-linear parts that mix tokens or
rescale features are treated as constants (Ali et al. 2022). Every module below that has such a
part derives from :class:`LrpAware` and consults its ``lrp_mode`` attribute (default ``False``):

* :class:`Attention` computes ``softmax(QK^T / sqrt(d)).detach() @ V`` explicitly,
* :class:`LayerNorm` divides by a detached standard deviation (centering stays linear),
* :class:`GELU` computes ``x * Phi(x).detach()`` — an identity for relevance,
* :class:`SeqPool` / :class:`SmoothMaxPool` detach their softmax weights over tokens.

The forward *values* are unchanged (to float rounding); only gradients differ, so a
gradient×input attribution in this mode is the LRP "AH/LN" rule set. Switch it with
``with conservative(model): ...`` or ``set_lrp_mode(model, True)``. Outside LRP mode attention
uses PyTorch's fused ``scaled_dot_product_attention`` (same maths, far less memory on 2 000
tokens); ``Attention.keep_weights = True`` forces the explicit path and keeps the weights in
``Attention.last_weights`` for attention maps.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hrf_batch.model.nets.heads import get_task

POOLINGS = ("max", "seq", "smooth-max")
POS_EMBEDS = ("sincos-2d", "sincos-2d-rel", "learned-2d", "none")

# Named presets (kwargs of CCT). Token grid = input / 16 for 2 conv layers with stride 2.
CCT_PRESETS: dict[str, dict[str, Any]] = {
    # for tests: ~3.6k parameters, 1 block, still the full structure
    "cct-tiny": dict(dim=16, depth=1, heads=2, mlp_ratio=2.0, tokenizer_layers=2, tokenizer_channels=8,
                     kernel_size=3, conv_stride=2, batchnorm=True, pooling="max", pos_embed="sincos-2d",
                     dropout=0.0, attn_dropout=0.0, drop_path=0.0),
    # the likely shipped default: max pooling learned where sequence pooling stayed at chance,
    # BatchNorm made training robust across seeds, 32 tokenizer channels were fastest on CPU
    "cct-small": dict(dim=128, depth=4, heads=4, mlp_ratio=2.0, tokenizer_layers=2, tokenizer_channels=32,
                      kernel_size=7, conv_stride=2, batchnorm=True, pooling="max", pos_embed="sincos-2d",
                      dropout=0.0, attn_dropout=0.1, drop_path=0.1),
    # half the width and depth of cct-small: ~3x cheaper per step on a CPU, the shipped default
    "cct-lite": dict(dim=64, depth=2, heads=2, mlp_ratio=2.0, tokenizer_layers=2, tokenizer_channels=32,
                     kernel_size=7, conv_stride=2, batchnorm=True, pooling="max", pos_embed="sincos-2d-rel",
                     dropout=0.0, attn_dropout=0.1, drop_path=0.05),
    # CCT-7/7x2 of Hassani et al. as the paper used it: 7 blocks, dim 256, sequence pooling
    "cct-7/7x2": dict(dim=256, depth=7, heads=4, mlp_ratio=2.0, tokenizer_layers=2, tokenizer_channels=64,
                      kernel_size=7, conv_stride=2, batchnorm=False, pooling="seq", pos_embed="learned-2d",
                      dropout=0.0, attn_dropout=0.1, drop_path=0.1),
}


# --------------------------------------------------------------------------- conservative mode


class LrpAware:
    """Mixin: a module whose forward changes its gradient (never its value) when ``lrp_mode``."""

    lrp_mode: bool = False


def set_lrp_mode(model: nn.Module, enabled: bool) -> None:
    """Switch the conservative forward on or off in every :class:`LrpAware` submodule."""
    for module in model.modules():
        if isinstance(module, LrpAware):
            module.lrp_mode = bool(enabled)


@contextmanager
def conservative(model: nn.Module) -> Iterator[nn.Module]:
    """``with conservative(model):`` run the LRP-friendly forward; restores the old flags after."""
    modules = [m for m in model.modules() if isinstance(m, LrpAware)]
    before = [m.lrp_mode for m in modules]
    try:
        for m in modules:
            m.lrp_mode = True
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.lrp_mode = flag


# --------------------------------------------------------------------------- building blocks


class LayerNorm(nn.LayerNorm, LrpAware):
    """LayerNorm over the last dimension; in LRP mode the standard deviation is a constant."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.lrp_mode:
            return super().forward(x)
        centred = x - x.mean(dim=-1, keepdim=True)
        std = torch.sqrt(centred.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return centred / std.detach() * self.weight + self.bias


class GELU(nn.Module, LrpAware):
    """Exact (erf) GELU ``x * Phi(x)``; in LRP mode the gate ``Phi(x)`` is a constant."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.lrp_mode:
            return F.gelu(x)
        gate = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
        return x * gate.detach()


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module, LrpAware):
    """Multi-head self-attention with its own q/k/v/proj Linear layers (reachable for LRP)."""

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}; pick heads that divide dim")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.keep_weights = False
        self.last_weights: Tensor | None = None

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        if self.lrp_mode or self.keep_weights:
            weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
            if self.lrp_mode:
                weights = weights.detach()
            if self.keep_weights:
                self.last_weights = weights.detach()
            out = self.attn_drop(weights) @ v
        else:
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1 → GELU → dropout → fc2 → dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, attn_dropout: float,
                 drop_path: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads, attn_dropout, dropout)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)), dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvTokenizer(nn.Module):
    """Conv (no bias) → BatchNorm (optional) → ReLU → max-pool(3, 2, 1), repeated per channel entry."""

    def __init__(self, in_channels: int, channels: Sequence[int], kernel_size: int, stride: int,
                 batchnorm: bool) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        layers = []
        prev = in_channels
        for out in channels:
            layers.append(nn.Sequential(
                nn.Conv2d(prev, out, kernel_size, stride=stride, padding=self.padding, bias=False),
                nn.BatchNorm2d(out) if batchnorm else nn.Identity(),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            ))
            prev = out
        self.layers = nn.Sequential(*layers)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, cols) the tokenizer makes of an ``height × width`` input."""
        for _ in self.layers:
            height = (height + 2 * self.padding - self.kernel_size) // self.stride + 1
            width = (width + 2 * self.padding - self.kernel_size) // self.stride + 1
            height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        return height, width

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def sincos_2d(rows: int, cols: int, dim: int, *, device: torch.device | None = None,
              dtype: torch.dtype = torch.float32, temperature: float = 10000.0,
              ref_grid: tuple[int, int] | None = None) -> Tensor:
    """Fixed 2-D sine-cosine embedding ``(1, dim, rows, cols)``: a quarter of the channels each for
    sin/cos of the row index and sin/cos of the column index, geometric frequencies.

    With ``ref_grid`` the positions are relative: a grid of any size spans the reference grid's
    range, so a model trained on 512-wide B-scans meets no unseen positions on 768 or 1024 A-scans
    over the same field (absolute token positions past the training width were seen to flag healthy
    real scans)."""
    if dim % 4:
        raise ValueError(f"sincos-2d needs dim divisible by 4, got {dim}; change dim or use learned-2d")
    quarter = dim // 4
    omega = temperature ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    step_r, step_c = (ref_grid[0] / rows, ref_grid[1] / cols) if ref_grid else (1.0, 1.0)
    ang_r = (torch.arange(rows, dtype=torch.float64, device=device) * step_r)[:, None] * omega[None]
    ang_c = (torch.arange(cols, dtype=torch.float64, device=device) * step_c)[:, None] * omega[None]
    emb_r = torch.cat([ang_r.sin(), ang_r.cos()], dim=1)[:, None, :].expand(rows, cols, 2 * quarter)
    emb_c = torch.cat([ang_c.sin(), ang_c.cos()], dim=1)[None, :, :].expand(rows, cols, 2 * quarter)
    return torch.cat([emb_r, emb_c], dim=2).permute(2, 0, 1)[None].to(dtype)


class PositionalEmbedding2d(nn.Module):
    """Adds a 2-D positional embedding to a token grid ``(B, dim, rows, cols)``.

    ``learned-2d`` learns one embedding on the reference grid and resamples it bilinearly to each
    input's grid (positions are relative to the scan width, which suits B-scans with 512, 768 or
    1024 A-scans over the same field); ``sincos-2d`` is computed for the grid in token units and
    ``sincos-2d-rel`` in units of the reference grid, relative to the scan width like ``learned-2d``.
    """

    def __init__(self, kind: str, dim: int, ref_grid: tuple[int, int]) -> None:
        super().__init__()
        if kind not in POS_EMBEDS:
            raise ValueError(f"unknown pos_embed {kind!r}; choose one of {POS_EMBEDS}")
        if kind.startswith("sincos-2d") and dim % 4:
            raise ValueError(f"sincos-2d needs dim divisible by 4, got {dim}; change dim or use learned-2d")
        self.kind, self.dim, self.ref_grid = kind, dim, ref_grid
        self.weight: nn.Parameter | None = None
        if kind == "learned-2d":
            self.weight = nn.Parameter(torch.empty(1, dim, *ref_grid))
            nn.init.trunc_normal_(self.weight, std=0.02)
        self._cache: dict[tuple, Tensor] = {}

    def embedding(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """The embedding ``(1, dim, rows, cols)`` for a grid, or None for ``none``."""
        if self.kind == "learned-2d":
            if tuple(self.weight.shape[2:]) == (rows, cols):
                return self.weight
            return F.interpolate(self.weight, size=(rows, cols), mode="bilinear", align_corners=False)
        if self.kind.startswith("sincos-2d"):
            key = (rows, cols, str(device), dtype)
            if key not in self._cache:
                ref = tuple(self.ref_grid) if self.kind == "sincos-2d-rel" else None
                self._cache[key] = sincos_2d(rows, cols, self.dim, device=device, dtype=dtype, ref_grid=ref)
            return self._cache[key]
        return None

    def forward(self, grid: Tensor) -> Tensor:
        emb = self.embedding(grid.shape[2], grid.shape[3], grid.device, grid.dtype)
        return grid if emb is None else grid + emb


# --------------------------------------------------------------------------- pooling over tokens


class MaxPool(nn.Module):
    """Max over tokens per channel: one HRF-bearing token can carry the decision."""

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.amax(dim=1)


class SeqPool(nn.Module, LrpAware):
    """CCT sequence pooling: softmax weights over tokens from a Linear, weighted sum of tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        weights = torch.softmax(self.score(tokens), dim=1)  # (B, N, 1)
        if self.lrp_mode:
            weights = weights.detach()
        return (weights * tokens).sum(dim=1)


class SmoothMaxPool(nn.Module, LrpAware):
    """Per-channel softmax-weighted mean over tokens, ``sum softmax(beta*x) * x``, learnable beta.

    Between mean (beta → 0) and max (beta → inf); unlike hard max it passes gradient to every
    strong token, and with the weights detached it is linear in the tokens for LRP.
    """

    def __init__(self, beta: float = 4.0) -> None:
        super().__init__()
        self.log_beta = nn.Parameter(torch.tensor(math.log(beta)))

    def forward(self, tokens: Tensor) -> Tensor:
        weights = torch.softmax(tokens * self.log_beta.exp(), dim=1)
        if self.lrp_mode:
            weights = weights.detach()
        return (weights * tokens).sum(dim=1)


def make_pool(kind: str, dim: int) -> nn.Module:
    """The pooling module called ``kind`` (one of :data:`POOLINGS`)."""
    if kind == "max":
        return MaxPool()
    if kind == "seq":
        return SeqPool(dim)
    if kind == "smooth-max":
        return SmoothMaxPool()
    raise ValueError(f"unknown pooling {kind!r}; choose one of {POOLINGS}")


# --------------------------------------------------------------------------- the model


class CCT(nn.Module):
    """CCT over a whole B-scan: tokenizer → pos_embed → blocks → norm → pool → head.

    ``forward(x)`` takes ``(B, in_channels, H, W)`` normalised images and returns logits
    ``(B, task.n_outputs)``. ``arch_kwargs`` holds every constructor argument except ``task``
    (JSON-ready), so ``CCT(task=..., **model.arch_kwargs)`` rebuilds the architecture.
    """

    arch = "cct"

    def __init__(self, task: str = "binary", *, dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 2.0, tokenizer_layers: int = 2, tokenizer_channels: int = 32,
                 kernel_size: int = 7, conv_stride: int | None = None, batchnorm: bool = True,
                 pooling: str = "max", pos_embed: str = "sincos-2d", ref_size: Sequence[int] = (496, 512),
                 dropout: float = 0.0, attn_dropout: float = 0.1, drop_path: float = 0.1,
                 in_channels: int = 1) -> None:
        super().__init__()
        if tokenizer_layers < 1 or depth < 0:
            raise ValueError("need tokenizer_layers >= 1 and depth >= 0; check the model kwargs")
        # Hassani et al.: stride max(1, k // 2 - 1), i.e. 2 for the 7×7 tokenizer
        stride = max(1, kernel_size // 2 - 1) if conv_stride is None else int(conv_stride)
        self.task = get_task(task)
        self.arch_kwargs: dict[str, Any] = dict(
            dim=dim, depth=depth, heads=heads, mlp_ratio=float(mlp_ratio), tokenizer_layers=tokenizer_layers,
            tokenizer_channels=tokenizer_channels, kernel_size=kernel_size, conv_stride=stride,
            batchnorm=bool(batchnorm), pooling=pooling, pos_embed=pos_embed, ref_size=[int(s) for s in ref_size],
            dropout=float(dropout), attn_dropout=float(attn_dropout), drop_path=float(drop_path),
            in_channels=in_channels)
        channels = [tokenizer_channels] * (tokenizer_layers - 1) + [dim]
        self.tokenizer = ConvTokenizer(in_channels, channels, kernel_size, stride, batchnorm)
        ref_grid = self.tokenizer.grid_size(int(ref_size[0]), int(ref_size[1]))
        self.pos_embed = PositionalEmbedding2d(pos_embed, dim, ref_grid)
        self.dropout = nn.Dropout(dropout)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, dropout, attn_dropout, r) for r in rates)
        self.norm = LayerNorm(dim)
        self.pool = make_pool(pooling, dim)
        self.head = nn.Linear(dim, self.task.n_outputs)
        self.apply(_init_weights)

    @property
    def task_name(self) -> str:
        return self.task.name

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, cols) for an ``height × width`` input."""
        return self.tokenizer.grid_size(height, width)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Encoded, normalised tokens ``(B, rows * cols, dim)`` in row-major grid order."""
        check_input(x, self.arch_kwargs["in_channels"])
        grid = self.pos_embed(self.tokenizer(x))
        tokens = self.dropout(grid.flatten(2).transpose(1, 2))
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.forward_tokens(x)))


def check_input(x: Tensor, channels: int) -> None:
    """Refuse anything but a (B, channels, H, W) batch, with the fix in the message."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(
            f"expected images of shape (B, {channels}, H, W), got {tuple(x.shape)}; "
            "add the batch and channel axes (e.g. x[None, None] for one B-scan)")


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_cct(preset: str, task: str = "binary", **overrides: Any) -> CCT:
    """A CCT from a named preset in :data:`CCT_PRESETS`, with keyword overrides."""
    if preset not in CCT_PRESETS:
        raise ValueError(f"unknown CCT preset {preset!r}; choose one of {sorted(CCT_PRESETS)}")
    return CCT(task, **{**CCT_PRESETS[preset], **overrides})


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
