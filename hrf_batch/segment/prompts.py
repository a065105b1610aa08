"""Relevance map → SAM prompt: the most relevant pixel, a small box there, a crop around it.

Pure numpy, so the geometry can be tested without any model. Following Morelle et al. (BVM 2025),
the segmenter sees only a crop of 50..100 px centred on the relevance peak (upsampled to its input
size), prompted with a box of a few pixels around the peak.

Coordinates. Integer ``(row, col)`` name pixels. Continuous coordinates (boxes, :func:`to_crop`,
:func:`from_crop`) put pixel ``(r, c)`` on the unit square ``[r, r + 1) x [c, c + 1)``, so its centre
is ``(r + 0.5, c + 0.5)``. In this convention resizing a crop of ``h`` rows to ``S`` rows is exactly a
multiplication by ``S / h`` — the same convention as SAM 2's own box scaling and as
``interpolate(..., align_corners=False)``. Windows ``(r0, c0, r1, c1)`` are half-open:
rows ``r0..r1-1``, columns ``c0..c1-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CROP_MIN, CROP_MAX = 50, 100  # crop sizes the method was described with (px)
DEFAULT_BOX_PX = 4
DEFAULT_CROP_PX = 75

Scale = float | tuple[float, float]
Coords = tuple[float, float] | np.ndarray  # one (row, col) pair, or an (..., 2) array


@dataclass(frozen=True)
class Prompt:
    """Where to look in one B-scan: the peak pixel, a box around it, and the crop window.

    ``box`` is continuous ``(r0, c0, r1, c1)`` in B-scan coordinates, centred on the peak pixel's
    centre and clipped to the crop; ``window`` is the integer half-open crop window.
    """

    peak_rc: tuple[int, int]
    box: tuple[float, float, float, float]
    window: tuple[int, int, int, int]

    @property
    def crop_shape(self) -> tuple[int, int]:
        """(rows, cols) of the crop; square unless the image is smaller than the crop size."""
        r0, c0, r1, c1 = self.window
        return r1 - r0, c1 - c0

    def scale_to(self, size: int) -> tuple[float, float]:
        """(row, col) scale factors when the crop is resized to ``size`` x ``size``."""
        h, w = self.crop_shape
        return size / h, size / w


def peak(relevance: np.ndarray, exclude: np.ndarray | None = None) -> tuple[int, int]:
    """(row, col) of the largest positive relevance, ignoring pixels in ``exclude`` (e.g. foci
    already segmented, so iterative inference moves on to the next focus).

    Ties go to the first pixel in row-major order. NaN counts as not relevant. Raises ValueError
    when no positive relevance is left: the caller should stop iterating on this B-scan.
    """
    rel = np.asarray(relevance, dtype=np.float64)
    if rel.ndim != 2:
        raise ValueError(f"relevance must be a 2-D map (H, W), got shape {rel.shape}")
    candidates = np.where(np.isfinite(rel) & (rel > 0), rel, -np.inf)
    if exclude is not None:
        ex = np.asarray(exclude, dtype=bool)
        if ex.shape != rel.shape:
            raise ValueError(f"exclude mask shape {ex.shape} differs from the relevance map {rel.shape}; "
                             "pass a mask of the B-scan's shape")
        candidates[ex] = -np.inf
    flat = int(np.argmax(candidates))
    if not np.isfinite(candidates.flat[flat]):
        raise ValueError("no positive relevance left outside the excluded pixels; stop prompting this B-scan")
    r, c = np.unravel_index(flat, rel.shape)
    return int(r), int(c)


def peaks(relevance: np.ndarray, exclude: np.ndarray | None = None, k: int = 1, radius_px: float = 10.0,
          min_fraction: float = 0.25) -> list[tuple[int, int]]:
    """Up to ``k`` separated relevance peaks, strongest first (non-maximum suppression).

    The first is :func:`peak`; each next one is the largest positive relevance farther than
    ``radius_px`` from every peak taken, and at least ``min_fraction`` of the first peak's value
    (weaker maxima are speckle of the map, not foci). Raises ValueError like :func:`peak` when no
    positive relevance is left.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 peaks per iteration, got {k}")
    first = peak(relevance, exclude)
    out = [first]
    if k == 1:
        return out
    rel = np.asarray(relevance, dtype=np.float64)
    candidates = np.where(np.isfinite(rel) & (rel > 0), rel, -np.inf)
    if exclude is not None:
        candidates[np.asarray(exclude, dtype=bool)] = -np.inf
    floor = min_fraction * candidates[first]
    rows, cols = np.ogrid[: rel.shape[0], : rel.shape[1]]
    for _ in range(k - 1):
        r, c = out[-1]
        candidates[(rows - r) ** 2 + (cols - c) ** 2 <= radius_px**2] = -np.inf
        flat = int(np.argmax(candidates))
        if not candidates.flat[flat] >= floor or not np.isfinite(candidates.flat[flat]):
            break
        nr, nc = np.unravel_index(flat, rel.shape)
        out.append((int(nr), int(nc)))
    return out


def _window_1d(centre: int, size: int, length: int) -> tuple[int, int]:
    """A window of ``size`` centred on ``centre``, shifted (not shrunk) to fit in ``[0, length)``."""
    if length <= size:
        return 0, length
    start = min(max(centre - size // 2, 0), length - size)
    return start, start + size


def make_prompt(peak_rc: tuple[int, int], image_shape: tuple[int, ...],
                box_px: int = DEFAULT_BOX_PX, crop_px: int = DEFAULT_CROP_PX) -> Prompt:
    """Box of ``box_px`` centred on the peak pixel and a ``crop_px`` crop centred there.

    The crop is shifted to stay inside the image near its borders, so every crop has the same size
    (only images smaller than ``crop_px`` give a smaller crop: the whole axis).
    """
    if not CROP_MIN <= int(crop_px) <= CROP_MAX:
        raise ValueError(f"crop size must be {CROP_MIN}..{CROP_MAX} px (the method's range), got {crop_px}; "
                         f"pick a value in that range, e.g. {DEFAULT_CROP_PX}")
    if not 1 <= int(box_px) <= int(crop_px):
        raise ValueError(f"box size must be 1..{crop_px} px (inside the crop), got {box_px}; "
                         f"the method uses {DEFAULT_BOX_PX}")
    if len(image_shape) < 2 or min(image_shape[:2]) < 1:
        raise ValueError(f"image shape must be (H, W) with H, W >= 1, got {tuple(image_shape)}")
    h, w = int(image_shape[0]), int(image_shape[1])
    pr, pc = int(peak_rc[0]), int(peak_rc[1])
    if not (0 <= pr < h and 0 <= pc < w):
        raise ValueError(f"peak {peak_rc} lies outside the {h}x{w} image; take it from the B-scan's relevance map")
    r0, r1 = _window_1d(pr, int(crop_px), h)
    c0, c1 = _window_1d(pc, int(crop_px), w)
    half = box_px / 2.0
    box = (max(pr + 0.5 - half, float(r0)), max(pc + 0.5 - half, float(c0)),
           min(pr + 0.5 + half, float(r1)), min(pc + 0.5 + half, float(c1)))
    return Prompt(peak_rc=(pr, pc), box=box, window=(r0, c0, r1, c1))


def crop(image: np.ndarray, prompt: Prompt) -> np.ndarray:
    """The crop window of ``image`` (a view; copy it before writing)."""
    r0, c0, r1, c1 = prompt.window
    if image.shape[0] < r1 or image.shape[1] < c1:
        raise ValueError(f"image of shape {image.shape} is smaller than the prompt's crop window "
                         f"{prompt.window}; build the prompt from this image's shape")
    return image[r0:r1, c0:c1]


def _scales(scale: Scale) -> tuple[float, float]:
    sr, sc = (scale, scale) if np.ndim(scale) == 0 else scale  # type: ignore[misc]
    if not (sr > 0 and sc > 0):
        raise ValueError(f"scale must be positive, got {scale}")
    return float(sr), float(sc)


def _like(rc: Coords, out: np.ndarray) -> Coords:
    """Return arrays for array input, a (row, col) tuple of floats for a pair."""
    if isinstance(rc, np.ndarray):
        return out
    if out.shape != (2,):
        raise ValueError(f"expected one (row, col) pair or an (..., 2) array, got {rc!r}")
    return float(out[0]), float(out[1])


def to_crop(rc: Coords, prompt: Prompt, scale: Scale = 1.0) -> Coords:
    """B-scan coordinates → (resized) crop coordinates; ``scale`` = resized size / crop size,
    one number or (row, col). Takes one (row, col) pair or an (..., 2) array."""
    sr, sc = _scales(scale)
    r0, c0 = prompt.window[:2]
    arr = np.asarray(rc, dtype=np.float64)
    return _like(rc, np.stack([(arr[..., 0] - r0) * sr, (arr[..., 1] - c0) * sc], axis=-1))


def from_crop(rc: Coords, prompt: Prompt, scale: Scale = 1.0) -> Coords:
    """(Resized) crop coordinates → B-scan coordinates; the exact inverse of :func:`to_crop`."""
    sr, sc = _scales(scale)
    r0, c0 = prompt.window[:2]
    arr = np.asarray(rc, dtype=np.float64)
    return _like(rc, np.stack([arr[..., 0] / sr + r0, arr[..., 1] / sc + c0], axis=-1))


def box_in_crop(prompt: Prompt, scale: Scale = 1.0) -> tuple[float, float, float, float]:
    """The prompt's box as (r0, c0, r1, c1) in (resized) crop coordinates."""
    r0, c0 = to_crop((prompt.box[0], prompt.box[1]), prompt, scale)
    r1, c1 = to_crop((prompt.box[2], prompt.box[3]), prompt, scale)
    return r0, c0, r1, c1


def paste(mask_crop: np.ndarray, prompt: Prompt, image_shape: tuple[int, ...]) -> np.ndarray:
    """A bool mask of ``image_shape`` holding ``mask_crop`` at the prompt's crop window."""
    r0, c0, r1, c1 = prompt.window
    m = np.asarray(mask_crop)
    if m.shape != prompt.crop_shape:
        raise ValueError(f"crop mask has shape {m.shape}, the prompt's crop is {prompt.crop_shape}; "
                         "resize the mask to the crop size before pasting")
    h, w = int(image_shape[0]), int(image_shape[1])
    if h < r1 or w < c1:
        raise ValueError(f"image shape {tuple(image_shape)} does not contain the crop window {prompt.window}; "
                         "paste into the B-scan the prompt was made for")
    out = np.zeros((h, w), dtype=bool)
    out[r0:r1, c0:c1] = m.astype(bool)
    return out
