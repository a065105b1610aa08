"""Label-preserving augmentation of B-scan batches, as in the paper: vertical shift, horizontal
flip, scale, rotation and intensity. One affine warp per B-scan keeps it cheap on a CPU; the
ranges are small so a 5-px HRF stays inside the retina and keeps its label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    max_shift_frac: float = 0.08  # vertical shift, fraction of the height
    flip_p: float = 0.5
    scale: tuple[float, float] = (0.9, 1.1)
    max_rotation_deg: float = 5.0
    gain: tuple[float, float] = (0.8, 1.2)  # multiplicative intensity
    gamma: tuple[float, float] = (0.8, 1.25)


def _uniform(lo: float, hi: float, n: int, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def augment(images: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Augment display-scale images ``(B, 1, H, W)`` (0..255) before normalisation."""
    b = images.shape[0]
    angle = _uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, b, gen) * math.pi / 180
    scale = _uniform(*cfg.scale, b, gen)
    flip = torch.where(torch.rand(b, generator=gen) < cfg.flip_p, -1.0, 1.0)
    shift = _uniform(-cfg.max_shift_frac, cfg.max_shift_frac, b, gen) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, 1, 2] = shift
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = _uniform(*cfg.gain, b, gen).view(b, 1, 1, 1).to(images.device, images.dtype)
    gamma = _uniform(*cfg.gamma, b, gen).view(b, 1, 1, 1).to(images.device, images.dtype)
    return (255.0 * (warped.clamp(0, 255) / 255.0) ** gamma * gain).clamp(0, 255)
