"""What the page draws: the B-scan as PNG, the relevance map as a see-through heat map, lesion
outlines and layer lines as SVG path data in B-scan pixel coordinates.

Outlines follow pixel edges exactly (no smoothing), so a grader judges the very pixels stored; the
browser scales the SVG with the image when zooming.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from PIL import Image

#: Grey of the canvas drawn when the source file is gone (display levels 0..255).
MISSING_GREY = 96


def png_bytes(image: Image.Image) -> bytes:
    """An image as PNG bytes (fast compression: the page asks for one B-scan at a time)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def bscan_png(pixels: np.ndarray | None, shape: tuple[int, int]) -> bytes:
    """The B-scan (display scale 0..255) as 8-bit grey PNG; a plain grey canvas when ``pixels`` is None."""
    if pixels is None:
        return png_bytes(Image.new("L", (shape[1], shape[0]), MISSING_GREY))
    arr = np.clip(np.nan_to_num(np.asarray(pixels, dtype=np.float32)), 0, 255)
    return png_bytes(Image.fromarray(np.rint(arr).astype(np.uint8), mode="L"))


def relevance_png(relevance: np.ndarray) -> bytes:
    """RGBA heat map of a relevance map: positive relevance red to yellow, negative blue, opacity by |r|."""
    rel = np.nan_to_num(np.asarray(relevance, dtype=np.float32))
    peak = float(np.abs(rel).max())
    scaled = rel / peak if peak > 0 else np.zeros_like(rel)
    pos, neg = np.clip(scaled, 0, 1), np.clip(-scaled, 0, 1)
    rgba = np.zeros((*rel.shape, 4), dtype=np.uint8)
    rgba[..., 0] = np.rint(255 * (pos > 0))
    rgba[..., 1] = np.rint(255 * pos)
    rgba[..., 2] = np.rint(255 * neg)
    rgba[..., 3] = np.rint(200 * np.maximum(pos, neg) ** 0.7)
    return png_bytes(Image.fromarray(rgba, mode="RGBA"))


def outline_path(mask: np.ndarray, origin_rc: tuple[int, int] = (0, 0)) -> str:
    """SVG path data tracing the outer edges of the True pixels of ``mask`` placed at ``origin_rc``."""
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, 1)
    inner = padded[1:-1, 1:-1]
    r0, c0 = origin_rc
    parts: list[str] = []
    sides = (  # (neighbour, start offset (dr, dc), segment)
        (padded[:-2, 1:-1], (0, 0), "h1"),  # top
        (padded[2:, 1:-1], (1, 0), "h1"),  # bottom
        (padded[1:-1, :-2], (0, 0), "v1"),  # left
        (padded[1:-1, 2:], (0, 1), "v1"),  # right
    )
    for neighbour, (dr, dc), segment in sides:
        rows, cols = np.nonzero(inner & ~neighbour)
        parts.extend(f"M{c0 + c + dc} {r0 + r + dr}{segment}" for r, c in zip(rows.tolist(), cols.tolist()))
    return "".join(parts)


def layer_polylines(layers: Mapping[str, np.ndarray] | None, bscan_index: int) -> list[dict[str, object]]:
    """Each layer line of one B-scan as SVG polyline points ("x,y x,y …", pixel centres), one entry per
    run of known rows; unknown columns (NaN) break the line instead of bridging it."""
    out: list[dict[str, object]] = []
    for name, rows in (layers or {}).items():
        if bscan_index >= len(rows):
            continue
        line = np.asarray(rows[bscan_index], dtype=np.float64)
        known = np.isfinite(line)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], known.astype(np.int8), [0]))))
        for start, stop in zip(edges[::2], edges[1::2]):
            if stop - start < 2:
                continue
            cols = np.arange(start, stop)
            points = " ".join(f"{c + 0.5:g},{line[c] + 0.5:.1f}" for c in cols.tolist())
            out.append({"name": name, "points": points})
    return out
