"""Label-preserving augmentation of B-scan batches: the paper's moves (vertical shift, horizontal
flip, scale, rotation, intensity) made strong enough for scans unlike the training data.

A model trained on one synthetic generator was measured at AUROC 0.91 on another: it had learned
the look of its generator. Devices, exports and eyes differ in brightness, contrast, gamma, speckle
grain, blur, tilt, lateral sampling (512 to 1536 A-scans over the same 6 mm) and where the retina
sits in the frame, so each of these is randomised here: one affine warp per B-scan with separate
lateral and axial scale, then gain/offset/gamma, Gaussian blur and correlated (grainy) noise, each
blur/noise applied to a random part of the batch. Ranges keep a 5-px HRF an HRF: the zoom
never shrinks a B-scan by more than 0.81, blur stays below a focus's radius.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    max_shift_frac: float = 0.15  # vertical shift, fraction of the height
    flip_p: float = 0.5
    scale: tuple[float, float] = (0.9, 1.2)  # isotropic zoom
    lateral_stretch: tuple[float, float] = (0.9, 1.6)  # extra horizontal zoom: other A-scan densities
    max_rotation_deg: float = 8.0
    gain: tuple[float, float] = (0.6, 1.5)  # multiplicative intensity
    gamma: tuple[float, float] = (0.6, 1.6)
    offset: tuple[float, float] = (-15.0, 15.0)  # display levels added
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 1.5)  # px
    noise_p: float = 0.5
    noise_std: tuple[float, float] = (2.0, 14.0)  # display levels
    noise_grain: tuple[int, int] = (1, 3)  # px: the noise is drawn at 1/grain resolution and upsampled


IDENTITY = AugmentConfig(max_shift_frac=0.0, flip_p=0.0, scale=(1.0, 1.0), lateral_stretch=(1.0, 1.0),
                         max_rotation_deg=0.0, gain=(1.0, 1.0), gamma=(1.0, 1.0), offset=(0.0, 0.0),
                         blur_p=0.0, noise_p=0.0)


def _uniform(lo: float, hi: float, n: int, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _warp(images: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    b = images.shape[0]
    angle = _uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, b, gen) * math.pi / 180
    scale = _uniform(*cfg.scale, b, gen)
    stretch = _uniform(*cfg.lateral_stretch, b, gen)
    flip = torch.where(torch.rand(b, generator=gen) < cfg.flip_p, -1.0, 1.0)
    shift = _uniform(-cfg.max_shift_frac, cfg.max_shift_frac, b, gen) * 2
    sx, sy = scale * stretch, scale  # output → input sampling: divide by the zoom
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos / sx * flip, -sin / sx
    theta[:, 1, 0], theta[:, 1, 1] = sin / sy * flip, cos / sy
    theta[:, 1, 2] = shift
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image."""
    radius = int(math.ceil(3 * float(sigma.max())))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    out = []
    for img, s in zip(images, sigma.tolist()):
        k = torch.exp(-0.5 * (x / s) ** 2)
        k = (k / k.sum()).view(1, 1, 1, -1)
        y = F.conv2d(F.pad(img[None], (radius, radius, 0, 0), mode="replicate"), k)
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.transpose(2, 3))
        out.append(y[0])
    return torch.stack(out)


def _grainy_noise(shape: torch.Size, grain: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Unit-variance noise whose grains are about ``grain`` px across."""
    h, w = shape[-2:]
    small = torch.randn(shape[0], 1, math.ceil(h / grain), math.ceil(w / grain), generator=gen)
    noise = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False) if grain > 1 else small
    noise = noise / noise.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    return noise.to(device, dtype)


def augment(images: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Augment display-scale images ``(B, 1, H, W)`` (0..255) before normalisation."""
    b = images.shape[0]
    x = _warp(images, gen, cfg) if cfg != IDENTITY else images
    gain = _uniform(*cfg.gain, b, gen).view(b, 1, 1, 1).to(x.device, x.dtype)
    gamma = _uniform(*cfg.gamma, b, gen).view(b, 1, 1, 1).to(x.device, x.dtype)
    offset = _uniform(*cfg.offset, b, gen).view(b, 1, 1, 1).to(x.device, x.dtype)
    x = 255.0 * (x.clamp(0, 255) / 255.0) ** gamma * gain + offset
    blur = torch.rand(b, generator=gen) < cfg.blur_p
    if bool(blur.any()):
        idx = torch.nonzero(blur).flatten()
        x[idx] = _blur(x[idx], _uniform(*cfg.blur_sigma, len(idx), gen))
    noisy = torch.rand(b, generator=gen) < cfg.noise_p
    if bool(noisy.any()):
        idx = torch.nonzero(noisy).flatten()
        grain = int(torch.randint(cfg.noise_grain[0], cfg.noise_grain[1] + 1, (1,), generator=gen))
        std = _uniform(*cfg.noise_std, len(idx), gen).view(-1, 1, 1, 1).to(x.device, x.dtype)
        x[idx] = x[idx] + std * _grainy_noise(x[idx].shape, grain, gen, x.device, x.dtype)
    return x.clamp(0, 255)
