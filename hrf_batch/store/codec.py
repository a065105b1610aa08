"""Compact, exact encodings of what the pipeline produces, plus the stable parameter hash.

Masks are stored as 1-bit PNG: exact, small (a 496×1024 mask with a few HRF is ~1–2 kB), self-describing
(the shape is in the header) and openable by any image viewer when someone inspects the database.
Layer lines are one compressed npz blob with an integer array per boundary: the row × 10 (0.1 px is
far below what any segmentation resolves), -32768 where unknown; int16 while every row fits (B-scans
up to 3276 px tall), int32 beyond. Relevance maps are lossy by design (QC only): at most 1/4 of the
B-scan size per side, scaled by their largest absolute value ``m`` and stored as 8-bit PNG with ``q = 128 + round(127·r/m)``, so
zero and ±m decode exactly and every other value is within m/254.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import PurePath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from hrf_batch.store.errors import StoreError

RELEVANCE_DOWNSAMPLE = 4
_BUG_HINT = "this is a bug in the pipeline output; please report it with the file that caused it"


def encode_mask(mask: np.ndarray) -> bytes:
    """A 2-D boolean mask as 1-bit PNG bytes; decoding gives the same array back."""
    arr = np.asarray(mask)
    if arr.dtype != np.bool_ or arr.ndim != 2 or arr.size == 0:
        raise StoreError(f"a mask must be a non-empty 2-D bool array, got {arr.dtype} {arr.shape}", _BUG_HINT)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """The bool array stored by :func:`encode_mask`."""
    image = _open_png(data, "mask")
    if image.mode != "1":
        raise StoreError(f"stored mask is a {image.mode!r} image, not 1-bit", _DAMAGED_HINT)
    return np.asarray(image, dtype=np.bool_).copy()


def encode_relevance(relevance: np.ndarray, bscan_shape: tuple[int, int]) -> tuple[bytes, float]:
    """8-bit PNG of a relevance map (downsampled to ≤ 1/4 of the B-scan per side) and its max |r|."""
    arr = np.asarray(relevance, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0 or not np.isfinite(arr).all():
        raise StoreError(f"a relevance map must be a finite, non-empty 2-D array, got shape {arr.shape}", _BUG_HINT)
    arr = _downsample_to(arr, tuple(max(1, math.ceil(s / RELEVANCE_DOWNSAMPLE)) for s in bscan_shape))
    peak = float(np.abs(arr).max())
    scaled = arr / peak if peak > 0 else np.zeros_like(arr)
    quantised = (np.rint(scaled * 127.0) + 128.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(quantised).save(buf, format="PNG")
    return buf.getvalue(), peak


def decode_relevance(data: bytes, peak: float) -> np.ndarray:
    """The float32 relevance map stored by :func:`encode_relevance` (values within peak/254)."""
    image = _open_png(data, "relevance map")
    if image.mode != "L":
        raise StoreError(f"stored relevance map is a {image.mode!r} image, not 8-bit grey", _DAMAGED_HINT)
    q = np.asarray(image, dtype=np.float64)
    return ((q - 128.0) / 127.0 * float(peak)).astype(np.float32)


def _downsample_to(arr: np.ndarray, limit: tuple[int, ...]) -> np.ndarray:
    """Block mean by the smallest integer factors that bring each side within ``limit``."""
    fr = max(1, math.ceil(arr.shape[0] / limit[0]))
    fc = max(1, math.ceil(arr.shape[1] / limit[1]))
    if fr == 1 and fc == 1:
        return arr
    pad = ((0, -arr.shape[0] % fr), (0, -arr.shape[1] % fc))
    padded = np.pad(arr, pad, mode="edge")
    return padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc).mean(axis=(1, 3))


_DAMAGED_HINT = "the database row is damaged; delete the run and ingest the volume again"
LAYER_SCALE = 10.0  # stored layer rows are round(row × 10)
LAYER_UNKNOWN = -32768  # stored value of a NaN (unknown) row


def encode_layers(rows: dict[str, np.ndarray]) -> bytes:
    """Layer lines (name -> float (n_bscans, width) rows, NaN = unknown) as a compressed npz blob."""
    arrays = {}
    for name, values in rows.items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 2 or np.isinf(arr).any():
            raise StoreError(f"layer {name!r} must be a 2-D array of rows or NaN, got shape {arr.shape}", _BUG_HINT)
        scaled = np.rint(np.nan_to_num(arr, nan=0.0) * LAYER_SCALE)
        if scaled.size and (scaled.min() <= LAYER_UNKNOWN or scaled.max() > np.iinfo(np.int32).max):
            raise StoreError(f"layer {name!r} has rows outside the B-scan ({arr[np.isfinite(arr)].min():g} "
                             f"to {arr[np.isfinite(arr)].max():g})", _BUG_HINT)
        fits16 = not scaled.size or scaled.max() <= np.iinfo(np.int16).max
        stored = scaled.astype(np.int16 if fits16 else np.int32)
        stored[np.isnan(arr)] = LAYER_UNKNOWN
        arrays[name] = stored
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def decode_layers(data: bytes) -> dict[str, np.ndarray]:
    """The float32 rows stored by :func:`encode_layers` (within 0.05 px; NaN where unknown)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            stored = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise StoreError("stored layer lines are not a readable npz blob", _DAMAGED_HINT) from exc
    out = {}
    for name, arr in stored.items():
        rows = (arr.astype(np.float32) / np.float32(LAYER_SCALE)).astype(np.float32)
        rows[arr == LAYER_UNKNOWN] = np.nan
        out[name] = rows
    return out


def _open_png(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise StoreError(f"stored {what} is not a readable PNG", _DAMAGED_HINT) from exc
    return image


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def canonical_json(value: Any) -> str:
    """Key-sorted compact JSON: the same parameters always give the same text."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"run parameters cannot be stored as JSON: {exc}",
            "use only str, int, float (finite), bool, None, lists and dicts with string keys in the parameters",
        ) from exc


def normalise_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Parameters as they come back from the database (tuples become lists, numpy scalars numbers)."""
    return json.loads(canonical_json(parameters))


def params_hash(parameters: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the parameters; key order and tuple/list do not matter."""
    return hashlib.sha256(canonical_json(parameters).encode("utf-8")).hexdigest()
