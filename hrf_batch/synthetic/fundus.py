"""Synthetic IR/SLO-like localizer (fundus) images: optic disc, branching vessels, fovea.

Split from :mod:`hrf_batch.synthetic.generator_a` (B-scans) so each module keeps one job; used as the
localizer of synthetic volumes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from hrf_batch.synthetic.generator_a import smooth_noise


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, length: float, size: int,
          fovea: np.ndarray) -> np.ndarray:
    """Points of a meandering branch vessel; it stops at the image rim or near the fovea."""
    n = max(2, int(length / 3.0))
    drift = ndi.gaussian_filter1d(rng.normal(0.0, 0.1, n), 4.0)
    angles = angle + np.cumsum(rng.normal(0.0, 0.03, n) + drift)
    pts = start + np.cumsum(3.0 * np.column_stack([np.cos(angles), np.sin(angles)]), axis=0)
    bad = (np.hypot(*(pts - fovea).T) < 0.07 * size) | (np.abs(pts - size / 2).max(1) > size / 2 + 10)
    stop = int(np.argmax(bad)) if bad.any() else n
    return pts[:stop]


def _vessel_paths(rng: np.random.Generator, size: int, disc: np.ndarray,
                  fovea: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Centre lines and widths (px): four arcades leaving the disc vertically and running
    temporally around the fovea, nasal trunks, and branches off all of them."""
    wide = size / 100.0
    paths: list[tuple[np.ndarray, float]] = []
    u = np.linspace(0.0, 1.3 * size, 400)
    for up in (-1.0, 1.0):
        for k in range(2):
            height = rng.uniform(0.26, 0.36) * size * (1.0 if k == 0 else rng.uniform(0.4, 0.7))
            bend = rng.uniform(0.06, 0.14) * size
            wiggle = ndi.gaussian_filter1d(np.interp(u, np.linspace(0, u[-1], 16),
                                                     rng.normal(0.0, 0.015 * size, 16)), 12.0)
            closing = np.exp(-((np.clip(u - 0.5 * size, 0.0, None) / (0.8 * size)) ** 2))
            v = up * (height * (1.0 - np.exp(-u / bend)) * closing + wiggle - wiggle[0])
            pts = np.column_stack([disc[0] - u, disc[1] + v])
            paths.append((pts, wide * (1.0 - 0.4 * k)))
        ang = math.atan2(up * rng.uniform(0.5, 1.5), 1.0)
        paths.append((_walk(rng, disc, ang, 0.6 * size, size, fovea), wide * 0.8))
    trunks = list(paths)
    for pts, width in trunks:  # branches: towards the macula and towards the periphery
        for _ in range(int(rng.integers(8, 14))):
            if len(pts) < 10:
                break
            i = int(rng.integers(5, len(pts) - 1))
            d = pts[i + 1] - pts[i - 1]
            side = rng.choice([-1.0, 1.0])
            ang = math.atan2(d[1], d[0]) + side * rng.uniform(0.5, 1.2)
            branch = _walk(rng, pts[i], ang, rng.uniform(0.1, 0.35) * size, size, fovea)
            paths.append((branch, width * rng.uniform(0.35, 0.6)))
            for _ in range(min(2, len(branch) // 25)):
                j = int(rng.integers(4, len(branch) - 1))
                twig = _walk(rng, branch[j], ang + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2),
                             rng.uniform(0.05, 0.15) * size, size, fovea)
                paths.append((twig, 1.5))
    return paths


def _vessel_map(paths: list[tuple[np.ndarray, float]], size: int) -> np.ndarray:
    """Vessel darkness 0..1 from centre lines: one distance transform per width class; wide vessels
    get the pale central reflex of infrared images."""
    classes = np.array([1.5, 2.5, 4.0, 6.0, 8.5])
    masks = np.zeros((len(classes), size, size), bool)
    for pts, width in paths:
        if len(pts) < 2:
            continue
        seg = np.hypot(*np.diff(pts, axis=0).T)
        t = np.concatenate([[0.0], np.cumsum(seg)])
        tt = np.arange(0.0, t[-1], 0.7)
        q = np.round(np.column_stack([np.interp(tt, t, pts[:, 0]), np.interp(tt, t, pts[:, 1])])).astype(int)
        q = q[(q >= 0).all(1) & (q < size).all(1)]
        masks[int(np.argmin(np.abs(classes - width))), q[:, 1], q[:, 0]] = True
    dark = np.zeros((size, size), np.float32)
    for width, mask in zip(classes, masks):
        if not mask.any():
            continue
        dist = ndi.distance_transform_edt(~mask).astype(np.float32)
        prof = np.sqrt(np.clip(1.0 - dist / (width / 2 + 0.5), 0.0, 1.0)) * min(1.0, 0.3 + width / 8.0)
        if width >= 4.0:
            prof -= 0.35 * np.clip(1.0 - dist / (0.15 * width + 0.4), 0.0, 1.0)
        dark = np.maximum(dark, prof)
    return ndi.gaussian_filter(dark, 0.7)


def synth_localizer(rng: np.random.Generator, *, size: int = 768) -> np.ndarray:
    """An infrared (SLO) fundus image like the Spectralis localizer: grey granular fundus, darker
    rim, dark optic disc at the nasal edge, branching dark vessels, slightly darker fovea."""
    if size < 32:
        raise ValueError(f"localizer size must be >= 32, got {size}")
    fovea = np.array([size / 2, size / 2]) + rng.normal(0.0, 0.03 * size, 2)
    disc = fovea + np.array([rng.uniform(0.40, 0.48) * size, -rng.uniform(0.0, 0.05) * size])
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = 162.0 + 6.0 * smooth_noise(rng, (size, size), (size / 5, size / 5))
    img += 5.0 * smooth_noise(rng, (size, size), (size / 40, size / 40))
    img += 36.0 * ndi.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 1.3)
    rim = np.hypot(xx - size / 2, yy - size / 2) / (0.75 * size)
    img *= 1.0 - 0.4 * np.clip(rim, 0.0, 1.0) ** 4
    img -= 16.0 * np.exp(-((xx - fovea[0]) ** 2 + (yy - fovea[1]) ** 2) / (2 * (0.035 * size) ** 2))
    d_disc = np.hypot(xx - disc[0], yy - disc[1]) / (0.09 * size)
    img += 10.0 * np.exp(-((d_disc - 1.2) ** 2) / 0.04)  # pale peripapillary ring
    img -= 70.0 / (1.0 + np.exp((d_disc - 0.9) * 10.0))
    img -= 90.0 * _vessel_map(_vessel_paths(rng, size, disc, fovea), size)
    img += rng.normal(0.0, 3.0, (size, size)).astype(np.float32)
    return np.clip(ndi.gaussian_filter(img, 0.6), 0.0, 255.0).astype(np.float32)
