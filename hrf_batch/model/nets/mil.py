"""Attention-based multiple-instance learning (after Ilse et al. 2018) — the paper's MIL baseline.

A B-scan becomes a bag of 64×64 patches laid in 3 rows over the retina, which is found by Otsu
thresholding a smoothed image (:func:`retina_band`, :func:`patch_boxes`, :func:`patch_grid` —
pure numpy, testable alone). Each patch goes through AlexNet's convolutional features and a small
projection; gated attention pools the bag; a Linear head returns the task's logits. The
attention weight per patch is kept (``last_attention``, with ``last_boxes``) as a coarse
explanation.

ImageNet weights are used only when a local file is given (``alexnet_weights=path``): torchvision's
``alexnet-owt-7be5be79.pth``, loaded with ``torch.load(weights_only=True)``. Nothing is ever
downloaded; without the file the features start from random init and a WARNING says what to get
and where to put it. The first convolution takes one grey channel: ImageNet's RGB kernels are
summed over colour, which equals feeding the grey patch as three identical channels.
"""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from torch import Tensor, nn
from torchvision.models import alexnet

from hrf_batch.errors import HrfBatchError
from hrf_batch.model.nets.cct import LrpAware, check_input
from hrf_batch.model.nets.heads import get_task

log = logging.getLogger(__name__)

ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"

MIL_PRESETS: dict[str, dict[str, Any]] = {
    "mil-alexnet": dict(embed_dim=128, attn_dim=64, dropout=0.25, patch_size=64, patch_rows=3),
}


class PretrainedWeightsError(HrfBatchError):
    """The ImageNet AlexNet weights file is missing or is not torchvision's AlexNet."""


# --------------------------------------------------------------------------- patches (numpy)


def retina_band(image: np.ndarray, *, sigma: float = 4.0, min_component: float = 0.1,
                smooth_cols: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top and bottom row of the retina per column, ``(top, bottom)`` int arrays of length W.

    The image is Gaussian-smoothed (``sigma`` px, so speckle does not pass the threshold), Otsu
    separates tissue from background, bright blobs smaller than ``min_component`` of the largest
    one (vitreous floaters, streaks) are dropped, and per column the first and last bright row
    are taken. Columns without tissue are interpolated from their neighbours; both curves are
    median- then mean-filtered over ``smooth_cols`` columns (default ~W/24) against outliers.
    Works on any affine intensity scale (display 0..255 or normalised). A blank image gives the
    whole height.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"retina_band needs one 2-D B-scan, got shape {img.shape}; pass bscans[i]")
    height, width = img.shape
    smooth = ndi.gaussian_filter(img, sigma)
    if float(smooth.max() - smooth.min()) < 1e-6:
        return np.zeros(width, np.int64), np.full(width, height - 1, np.int64)
    mask = _large_components(smooth > threshold_otsu(smooth), min_component)
    cols = np.arange(width)
    has = mask.any(axis=0)
    if not has.any():
        return np.zeros(width, np.int64), np.full(width, height - 1, np.int64)
    top = np.argmax(mask, axis=0).astype(np.float64)
    bottom = (height - 1 - np.argmax(mask[::-1], axis=0)).astype(np.float64)
    top = np.interp(cols, cols[has], top[has])
    bottom = np.interp(cols, cols[has], bottom[has])
    k = smooth_cols or max(3, (width // 24) | 1)
    top = ndi.uniform_filter1d(ndi.median_filter(top, size=k, mode="nearest"), k, mode="nearest")
    bottom = ndi.uniform_filter1d(ndi.median_filter(bottom, size=k, mode="nearest"), k, mode="nearest")
    top = np.clip(np.round(top), 0, height - 1).astype(np.int64)
    bottom = np.clip(np.round(bottom), 0, height - 1).astype(np.int64)
    return top, np.maximum(bottom, top)


def _large_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Keep the connected components with at least ``min_fraction`` of the largest one's area."""
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    areas = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(areas >= min_fraction * areas.max()) + 1
    return np.isin(labels, keep)


def patch_boxes(band: tuple[np.ndarray, np.ndarray], height: int, width: int, *, size: int = 64,
                rows: int = 3) -> np.ndarray:
    """Boxes ``(N, 4)`` as ``(row0, col0, row1, col1)`` (end-exclusive) of a patch bag over the band.

    Columns are cut into ``ceil(W / size)`` windows (the last one flush with the right edge).
    In each window ``rows`` patches are stacked around the band's centre, touching when the
    band is at most ``rows * size`` tall, spread evenly over it when taller; patches are shifted
    to stay inside the image. Order: patch row major, then window left to right.
    """
    if height < size or width < size:
        raise ValueError(f"image {height}x{width} is smaller than one {size}x{size} patch; "
                         "use full B-scans or a smaller patch size")
    top, bottom = (np.asarray(b, dtype=np.float64) for b in band)
    n_win = math.ceil(width / size)
    lefts = [min(i * size, width - size) for i in range(n_win)]
    boxes = np.empty((rows, n_win, 4), np.int64)
    for w, left in enumerate(lefts):
        t, b = top[left:left + size].mean(), bottom[left:left + size].mean() + 1  # b: end-exclusive
        step = max(float(size), (b - t - size) / (rows - 1)) if rows > 1 else 0.0
        for r in range(rows):
            centre = (t + b) / 2 + (r - (rows - 1) / 2) * step
            row0 = int(np.clip(round(centre - size / 2), 0, height - size))
            boxes[r, w] = (row0, left, row0 + size, left + size)
    return boxes.reshape(-1, 4)


def patch_grid(image: np.ndarray, band: tuple[np.ndarray, np.ndarray], size: int = 64,
               rows: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The patch bag of one B-scan: patches ``(N, size, size)`` float32 and their boxes ``(N, 4)``."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"patch_grid needs one 2-D B-scan, got shape {img.shape}; pass bscans[i]")
    boxes = patch_boxes(band, img.shape[0], img.shape[1], size=size, rows=rows)
    patches = np.stack([img[r0:r1, c0:c1] for r0, c0, r1, c1 in boxes])
    return patches, boxes


# --------------------------------------------------------------------------- AlexNet features


def suggested_alexnet_path() -> Path:
    """Where torchvision itself would cache the file; a sensible place to copy it to."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS_FILE


def alexnet_features() -> nn.Sequential:
    """AlexNet's convolutional part (torchvision architecture) with a one-channel first conv."""
    features = alexnet(weights=None).features
    first = features[0]
    features[0] = nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride, first.padding)
    return features


def load_alexnet_features(features: nn.Sequential, path: str | Path) -> None:
    """Load torchvision's ImageNet AlexNet weights (local file) into :func:`alexnet_features`."""
    path = Path(path).expanduser()
    hint = (f"download torchvision's ImageNet AlexNet weights {ALEXNET_WEIGHTS_FILE} on a machine with "
            f"internet access and copy the file to {suggested_alexnet_path()} (or any local path you pass)")
    if not path.is_file():
        raise PretrainedWeightsError(f"AlexNet weights file not found: {path}", hint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise PretrainedWeightsError(f"{path}: not a readable torch weights file ({exc})", hint) from exc
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path}: holds a {type(state).__name__}, not a state dict", hint)
    feats = {k[len("features."):]: v for k, v in state.items() if str(k).startswith("features.")}
    if "0.weight" in feats and feats["0.weight"].ndim == 4:
        feats["0.weight"] = feats["0.weight"].sum(dim=1, keepdim=True)
    try:
        features.load_state_dict(feats, strict=True)
    except RuntimeError as exc:
        raise PretrainedWeightsError(f"{path}: does not hold torchvision's AlexNet weights", hint) from exc


# --------------------------------------------------------------------------- the model


class GatedAttention(nn.Module, LrpAware):
    """Gated attention pooling: ``a = softmax(w^T (tanh(V h) * sigmoid(U h)))`` over the bag."""

    def __init__(self, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.V = nn.Linear(dim, attn_dim)
        self.U = nn.Linear(dim, attn_dim)
        self.w = nn.Linear(attn_dim, 1)

    def weights(self, h: Tensor) -> Tensor:
        """Attention weights ``(B, N)`` for instance features ``(B, N, dim)``; sum to 1 per bag."""
        scores = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))[..., 0]
        return torch.softmax(scores, dim=1)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        a = self.weights(h)
        if self.lrp_mode:
            a = a.detach()
        return (a.unsqueeze(-1) * h).sum(dim=1), a


class MilNet(nn.Module):
    """Bag of AlexNet patch features over the retina, gated attention pooling, task head.

    ``forward(x)`` takes ``(B, 1, H, W)`` normalised B-scans like the CCT and returns logits
    ``(B, task.n_outputs)``; afterwards ``last_attention`` ``(B, N)`` and ``last_boxes``
    ``(B, N, 4)`` (numpy) tell which patch weighed how much. ``alexnet_weights`` and
    ``warn_random_init`` only choose the starting weights and are not in ``arch_kwargs``.
    """

    arch = "mil"
    LOAD_OPTIONS: dict[str, Any] = {"warn_random_init": False}  # weights follow: no init warning

    def __init__(self, task: str = "binary", *, embed_dim: int = 128, attn_dim: int = 64,
                 dropout: float = 0.25, patch_size: int = 64, patch_rows: int = 3, band_sigma: float = 4.0,
                 alexnet_weights: str | Path | None = None, warn_random_init: bool = True) -> None:
        super().__init__()
        self.task = get_task(task)
        self.arch_kwargs: dict[str, Any] = dict(
            embed_dim=embed_dim, attn_dim=attn_dim, dropout=float(dropout), patch_size=patch_size,
            patch_rows=patch_rows, band_sigma=float(band_sigma))
        self.features = alexnet_features()
        self.project = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, embed_dim),
                                     nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(embed_dim, attn_dim)
        self.head = nn.Linear(embed_dim, self.task.n_outputs)
        self.last_attention: Tensor | None = None
        self.last_boxes: np.ndarray | None = None
        if alexnet_weights is not None:
            load_alexnet_features(self.features, alexnet_weights)
            self.feature_init = f"imagenet:{Path(alexnet_weights).name}"
        else:
            self.feature_init = "random"
            if warn_random_init:
                log.warning(
                    "MIL: no ImageNet AlexNet weights given, patch features start from random init "
                    "(the paper's MIL used ImageNet weights). Get torchvision's %s, put it at %s "
                    "(or anywhere local) and pass that path as alexnet_weights.",
                    ALEXNET_WEIGHTS_FILE, suggested_alexnet_path())

    @property
    def task_name(self) -> str:
        return self.task.name

    def bag_boxes(self, x: Tensor) -> np.ndarray:
        """Patch boxes ``(B, N, 4)`` for a batch of B-scans (Otsu band on each, no gradient)."""
        s, rows = self.arch_kwargs["patch_size"], self.arch_kwargs["patch_rows"]
        images = x[:, 0].detach().float().cpu().numpy()
        h, w = images.shape[1:]
        return np.stack([
            patch_boxes(retina_band(img, sigma=self.arch_kwargs["band_sigma"]), h, w, size=s, rows=rows)
            for img in images])

    def forward_bags(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``(B, n)`` and attention ``(B, N)`` for patch bags ``(B, N, 1, s, s)``."""
        b, n = patches.shape[:2]
        h = self.project(self.features(patches.flatten(0, 1))).view(b, n, -1)
        pooled, attention = self.attention(h)
        return self.head(pooled), attention

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, 1)
        boxes = self.bag_boxes(x)
        patches = torch.stack([
            torch.stack([x[i, :, r0:r1, c0:c1] for r0, c0, r1, c1 in boxes[i]]) for i in range(x.shape[0])])
        logits, attention = self.forward_bags(patches)
        self.last_attention, self.last_boxes = attention.detach(), boxes
        return logits
