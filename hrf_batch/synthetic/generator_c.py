"""Generator C: a held-out synthetic Spectralis-like OCT volume, for evaluation only.

Why it exists: the HRF classifier is trained on generators a and b. A model can learn the look of its
generators instead of the lesion, so it is scored on this third generator, written independently,
whose images nothing is trained on. Do not add it to training data, or it stops measuring that.

How it draws a B-scan (its own physical model, not a copy of a or b):

* anatomy: layer thicknesses in micrometres as smooth functions of the distance from the foveal
  centre (a steep pit where the inner layers thin out, a thicker ONL under it, a GCL ring, an RNFL
  that thickens nasally), stacked upward from Bruch's membrane, which is bent by eye curvature, tilt
  and per-B-scan axial eye motion; drusen and PEDs are domes in the en-face plane that lift the RPE;
  vessels are curves in the en-face plane, so both are continuous from one B-scan to the next;
* signal: a linear reflectivity map attenuated along each A-scan (Beer-Lambert), so dense objects
  cast shadows, then SD-OCT depth roll-off, lateral vignetting and per-A-scan gain;
* speckle: complex Gaussian scatterers filtered by the optical PSF; |field|^2 averaged over a few
  frames that share a static part (the look of ART frame averaging), plus detector noise; the mean
  intensity is log-like compressed (a random power near 1/4) to an 8-bit display scale.

HRF (what ``labels`` marks): discrete, well-circumscribed hyper-reflective dots inside the
neurosensory retina (strictly between the ILM and the RPE rows), 5..150 px at Spectralis spacing
(11.72 x 3.87 um pixels, scaled by pixel area at other widths, median about 17 px), about as
reflective as the RPE band (some only modestly brighter than their surroundings), round, oval or
irregular, sometimes with a faint shadow; mostly in INL, OPL and ONL, some in GCL/IPL, a few in the
outer retina above drusen. One id per focus; foci never touch each other.

Hard negatives (drawn, never labelled; ``SyntheticBScanC.hard_negatives`` gives their kind codes,
see NEGATIVE_KINDS): retinal vessel cross-sections with a shadow column, vitreous floaters and the
posterior hyaloid, hard exudates (confluent, larger than any HRF, shadowing), intraretinal cysts
with bright walls, drusen and PEDs, bright choroidal spots, epiretinal membranes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from hrf_batch.io.ground_truth import SyntheticVolume
from hrf_batch.io.volume import LAYER_NAMES

FIELD_MM = 6.0          # fast axis: a B-scan spans 6 mm
AXIAL_MM = 0.00387      # one row
SLOW_FIELD_MM = 5.8     # B-scan i of n lies at 5.8 * i / (n - 1) mm on the slow axis

#: kind codes of ``SyntheticBScanC.hard_negatives`` (0: none)
NEGATIVE_KINDS = {1: "vessel", 2: "floater/hyaloid", 3: "hard exudate", 4: "cyst", 5: "druse/PED",
                  6: "choroid spot", 7: "epiretinal membrane"}
_MIN_H, _MAX_H, _MIN_W, _MAX_W = 240, 2048, 192, 4096
_REF_WIDTH = 512        # the width at which HRF areas are 5..150 px
_TOP_MARGIN, _BOTTOM_MARGIN = 6, 20  # rows kept free above the ILM and below BM (a piece of choroid)

# the regions between interfaces, top to bottom; reflectivity is relative to the RPE band (= 1)
_REGIONS = ("vitreous", "rnfl", "gcl", "ipl", "inl", "opl", "onl", "elm", "myoid", "ez", "os", "iz", "rpe",
            "druse", "cc", "choroid")


@dataclass(frozen=True, eq=False)
class SyntheticBScanC:
    """One drawn B-scan: display image, HRF ids, true layer rows, and where the hard negatives are."""

    image: np.ndarray                 # float32 (H, W), 0..255
    labels: np.ndarray                # int32 (H, W), 0 or HRF id 1..k
    layers: dict[str, np.ndarray]     # LAYER_NAMES -> float32 (W,) rows
    hard_negatives: np.ndarray        # uint8 (H, W), NEGATIVE_KINDS code or 0
    fovea_col: float
    n_hrf: int = field(default=0)


def check_size(height: int, width: int) -> None:
    """ValueError unless a B-scan of ``height`` x ``width`` px can hold the retina at Spectralis spacing."""
    if not _MIN_H <= int(height) <= _MAX_H:
        raise ValueError(f"generator c needs a height of {_MIN_H}..{_MAX_H} rows (3.87 um each, so the retina "
                         f"and a piece of choroid fit), got {height}")
    if not _MIN_W <= int(width) <= _MAX_W:
        raise ValueError(f"generator c needs a width of {_MIN_W}..{_MAX_W} A-scans over {FIELD_MM:g} mm, got {width}")


def hrf_area_bounds(width: int) -> tuple[int, int]:
    """HRF area bounds in px: 5..150 px at 512 A-scans, scaled by pixel area (rows are fixed at 3.87 um)."""
    s = int(width) / _REF_WIDTH
    return max(2, int(math.floor(5 * s + 0.5))), int(math.floor(150 * s + 0.5))


# ----------------------------------------------------------------------------------------------- volume


@dataclass
class _Eye:
    """Everything drawn once per volume, so the B-scans of a volume are one eye."""

    height: int
    width: int
    lat_um: float
    fovea_col: float
    fovea_slow: float                # mm on the slow axis, relative to the middle B-scan
    slow: np.ndarray                 # (n,) mm of each B-scan, relative to the middle B-scan
    thick: dict[str, float]          # scale per layer
    pit_w: float
    pit_p: float
    ellip: float
    nasal: float
    refl: dict[str, float]
    shape_rows: np.ndarray           # (n, W): BM rows before the vertical offset
    drusen: list[tuple[float, float, float, float, float, float]]  # x, y, radius, height mm, lift share, content R
    vessels: list[tuple[float, float, float, float, float, float]]  # x0, a, b, diameter um, R, optical depth
    flags: dict[str, bool]
    optics: dict[str, float]
    choroid_um: float


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _draw_eye(rng: np.random.Generator, n: int, height: int, width: int) -> _Eye:
    lat_um = FIELD_MM * 1000 / width
    fovea_col = (width - 1) / 2 + float(np.clip(rng.normal(0, 0.15), -0.4, 0.4)) * 1000 / lat_um
    if n > 1:
        step = SLOW_FIELD_MM / (n - 1)
        slow = np.arange(n) * step - SLOW_FIELD_MM / 2
        fovea_slow = float(np.clip(rng.normal(0, 0.12), -0.3, 0.3))
    else:  # a line scan through (nearly) the fovea
        fovea_slow = 0.0
        slow = np.array([_u(rng, -0.06, 0.06)])
    thick = {k: _u(rng, 0.8, 1.2) for k in ("rnfl", "gcl", "ipl", "inl", "opl", "onl", "myoid", "ezrpe", "rpe")}
    glob = _u(rng, 0.9, 1.15)
    thick = {k: v * glob for k, v in thick.items()}
    ln = lambda mu, s=0.3: float(mu * math.exp(rng.normal(0, s)))  # noqa: E731 - a log-normal draw
    refl = {"vitreous": 10 ** _u(rng, -6.3, -4.7), "rnfl": ln(0.13), "gcl": ln(0.06), "ipl": ln(0.11),
            "inl": ln(0.03), "opl": ln(0.1), "onl": ln(0.008, 0.4), "elm": ln(0.035), "myoid": ln(0.008),
            "ez": ln(0.95, 0.2), "os": ln(0.1, 0.4), "iz": ln(0.45, 0.3), "rpe": 1.0, "cc": ln(0.22),
            "choroid": ln(0.075, 0.4)}
    # the retina's shape in the frame: curvature, tilt (both axes), axial motion between B-scans
    xc = (np.arange(width) - (width - 1) / 2) * lat_um / 1000
    curv = _u(rng, -1.0, 7.0) if rng.random() < 0.9 else _u(rng, -3.0, 0.0)
    tilt_x, tilt_y = _u(rng, -9, 9), _u(rng, -6, 6)
    curv_y = curv * _u(rng, 0.5, 1.2)
    motion = np.cumsum(rng.normal(0, _u(rng, 0.0, 2.0), n))
    motion -= motion.mean()
    shape_rows = (-curv * xc[None, :] ** 2 - curv_y * slow[:, None] ** 2 + tilt_x * xc[None, :]
                  + tilt_y * slow[:, None] + motion[:, None])
    max_lift = float(np.clip(height * AXIAL_MM - 0.72, 0.05, 0.25))
    drusen = []
    if rng.random() < 0.4:  # drusen: small domes, moderately reflective content
        for _ in range(int(rng.integers(2, 14))):
            drusen.append((_u(rng, -2.8, 2.8), _u(rng, -2.8, 2.8), _u(rng, 0.05, 0.3),
                           min(_u(rng, 0.02, 0.11), max_lift), _u(rng, 0.5, 1.0), ln(0.15, 0.6)))
    if rng.random() < 0.12:  # a pigment epithelial detachment: wide, tall, serous (dark) or drusenoid
        drusen.append((_u(rng, -1.5, 1.5), _u(rng, -1.2, 1.2), _u(rng, 0.4, 1.0), _u(rng, 0.08, max_lift),
                       _u(rng, 0.4, 0.9), 10 ** _u(rng, -3.0, -0.8)))
    vessels = []
    for _ in range(int(rng.integers(2, 9))):  # curves x = x0 + a*y + b*y^2 in the en-face plane
        vessels.append((_u(rng, -3.2, 3.2), _u(rng, -0.6, 0.6), _u(rng, -0.15, 0.15), _u(rng, 30, 120),
                        10 ** _u(rng, -1.3, -0.2), _u(rng, 0.15, 1.0)))
    flags = {"cysts": rng.random() < 0.25, "exudates": rng.random() < 0.25, "erm": rng.random() < 0.15,
             "floaters": rng.random() < 0.55, "hyaloid": rng.random() < 0.3, "choroid_spots": rng.random() < 0.4}
    optics = {
        "psf_ax": _u(rng, 0.55, 1.1),                  # rows (sigma)
        "psf_lat": _u(rng, 5.0, 12.0) / lat_um,       # px (sigma)
        "frames": int(rng.integers(1, 4)),
        "static": _u(rng, 0.2, 0.5),                  # speckle share that frame averaging cannot remove
        "dynamic": _u(rng, 0.03, 0.3),                # share of the few frames that decorrelate
        "noise": 10 ** _u(rng, -6.8, -4.6),           # detector noise power (RPE = 1)
        "noise_sub": _u(rng, 0.3, 2.6),               # display floor, in units of the noise power
        "gamma": _u(rng, 0.21, 0.33),
        "ref": _u(rng, 0.55, 1.0),
        "gain": _u(rng, 0.9, 1.1), "offset": _u(rng, -4.0, 5.0),
        "kappa": _u(rng, 4.0, 14.0),                  # attenuation per unit reflectivity, 1/mm
        "rpe_mu": _u(rng, 8.0, 30.0),                 # melanin: extra attenuation in the RPE band, 1/mm
        "choroid_mu": _u(rng, 2.0, 7.0),              # blood: extra attenuation below BM, 1/mm
        "rolloff": _u(rng, 1.2, 4.0),                 # mm
        "vignette": _u(rng, 0.0, 0.6), "vig_p": _u(rng, 2.0, 4.0), "vig_shift": _u(rng, -0.3, 0.3),
        "col_gain": _u(rng, 0.02, 0.2),
        "texture": _u(rng, 0.05, 0.3),
        "low_signal_p": 0.07,
    }
    return _Eye(height, width, lat_um, fovea_col, fovea_slow, slow, thick, _u(rng, 0.45, 0.75), _u(rng, 2.2, 3.8),
                _u(rng, 0.88, 1.12), _u(rng, 0.1, 0.7), refl, shape_rows, drusen, vessels, flags, optics,
                _u(rng, 170, 380))


def _bump(r: np.ndarray, far: float, peak: float, at: float, wide: float) -> np.ndarray:
    return far + (peak - far) * np.exp(-(((r - at) / wide) ** 2))


def _thicknesses(eye: _Eye, x: np.ndarray, y: float) -> dict[str, np.ndarray]:
    """Layer thicknesses (rows) along a B-scan; ``x`` and ``y`` are mm from the foveal centre."""
    r = np.sqrt((x / eye.ellip) ** 2 + (y * eye.ellip) ** 2)
    pit = np.exp(-((r / eye.pit_w) ** eye.pit_p))        # 1 at the foveal centre, 0 outside the pit
    t = eye.thick
    um = {
        "rnfl": 22 * t["rnfl"] * (0.2 + 0.8 * np.clip(r / 2.0, 0, 1)) * (1 + eye.nasal * np.clip(x, 0, None))
                * (1 + 0.15 * abs(y)) * (1 - 0.97 * pit),
        "gcl": _bump(r, 22, 58, 1.1, 0.9) * t["gcl"] * (1 - 0.97 * pit),
        "ipl": _bump(r, 27, 38, 1.1, 1.1) * t["ipl"] * (1 - 0.95 * pit),
        "inl": _bump(r, 27, 44, 1.0, 1.0) * t["inl"] * (1 - 0.93 * pit),
        "opl": _bump(r, 22, 30, 0.9, 1.0) * t["opl"] * (1 - 0.85 * pit),
        "onl": (66 + 25 * np.exp(-((r / 0.55) ** 2)) - 10 * np.clip(r - 1.5, 0, 1.5)) * t["onl"],
        "myoid": (21 + 8 * pit) * t["myoid"],
        "ezrpe": (34 + 14 * np.exp(-((r / 0.6) ** 2))) * t["ezrpe"],
        "rpe": np.full_like(r, 17.0 * t["rpe"]),
    }
    return {k: np.maximum(v / (AXIAL_MM * 1000), 0.3) for k, v in um.items()}


def _elevation(eye: _Eye, x: np.ndarray, y: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RPE lift (rows) by drusen/PED along a B-scan, how much of it the inner layers follow, content R."""
    lift = np.zeros_like(x)
    share = np.ones_like(x)
    content = np.zeros_like(x)
    for dx, dy, rad, h, follow, refl in eye.drusen:
        d2 = ((x - dx) ** 2 + (y - dy) ** 2) / rad ** 2
        e = h * np.clip(1 - d2, 0, None) ** 0.6 / AXIAL_MM
        better = e > lift
        lift = np.where(better, e, lift)
        share = np.where(better, follow, share)
        content = np.where(better, refl, content)
    return lift, share, content


def _stack(eye: _Eye, i: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Boundary rows relative to BM = 0 (upward negative) of B-scan ``i``, the lift and the druse content R."""
    x = (np.arange(eye.width) - eye.fovea_col) * eye.lat_um / 1000
    y = float(eye.slow[i] - eye.fovea_slow)
    t = _thicknesses(eye, x, y)
    lift, share, content = _elevation(eye, x, y)
    rows = {"BM": np.zeros_like(x)}
    rows["RPE"] = -t["rpe"] - lift
    rows["EZ"] = rows["RPE"] - t["ezrpe"]
    rows["ELM"] = rows["EZ"] - t["myoid"]
    onl = np.maximum(t["onl"] - lift * (1 - share), 0.35 * t["onl"])  # the ONL gives way over a dome
    rows["OPL"] = rows["ELM"] - onl
    rows["INL"] = rows["OPL"] - t["opl"]
    rows["IPL"] = rows["INL"] - t["inl"]
    rows["GCL"] = rows["IPL"] - t["ipl"]
    rows["RNFL"] = rows["GCL"] - t["gcl"]
    rows["ILM"] = rows["RNFL"] - t["rnfl"]
    return rows, lift, content


def _place_in_frame(rng: np.random.Generator, eye: _Eye, stacks: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Vertical offset per B-scan (n,) so the whole retina fits; tilt and curvature shrink if they must."""
    top = np.stack([s["ILM"] for s in stacks])            # (n, W), negative
    room = eye.height - 1 - _TOP_MARGIN - _BOTTOM_MARGIN
    alpha = 1.0
    while alpha > 0.02:
        shape = eye.shape_rows * alpha
        span = float(shape.max() - (shape + top).min())
        if span <= room:
            break
        alpha *= 0.8
    else:
        alpha, shape = 0.0, eye.shape_rows * 0.0
        span = float(-top.min())
    eye.shape_rows = shape
    lo = _TOP_MARGIN - float((shape + top).min())
    hi = lo + max(room - span, 0.0)
    return np.full(len(stacks), lo + (hi - lo) * float(rng.beta(1.6, 3.2)))


# ----------------------------------------------------------------------------------------------- drawing


def _soft_step(rows: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of each pixel below boundary ``b`` (anti-aliased)."""
    return np.clip(rows - b[None, :] + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-variance smooth field with features about ``cell`` px (rows, cols) big."""
    small = (max(2, int(shape[0] / cell[0]) + 2), max(2, int(shape[1] / cell[1]) + 2))
    g = rng.standard_normal(small).astype(np.float32)
    g = ndimage.zoom(g, (shape[0] / (small[0] - 1) * 1.0001, shape[1] / (small[1] - 1) * 1.0001), order=3,
                     mode="nearest")[: shape[0], : shape[1]]
    return (g - g.mean()) / (g.std() + 1e-6)


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0,
             wobble: tuple[float, ...] = (), ext: float | None = None) -> tuple[slice, slice, np.ndarray]:
    """A filled (optionally irregular) ellipse as a boolean patch and where it goes in an (h, w) frame."""
    if ext is None:
        ext = max(ry, rx) * (1.6 if wobble else 1.05) + 1
    r0, r1 = max(0, int(cy - ext)), min(h, int(cy + ext) + 2)
    c0, c1 = max(0, int(cx - ext)), min(w, int(cx + ext) + 2)
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = (dx * ca + dy * sa) / rx, (-dx * sa + dy * ca) / ry
    rad = np.sqrt(u ** 2 + v ** 2)
    limit = np.ones_like(rad)
    if wobble:
        theta = np.arctan2(v, u)
        for k, (amp, phase) in enumerate(zip(wobble[::2], wobble[1::2]), start=2):
            limit = limit + amp * np.cos(k * theta + phase)
    return slice(r0, r1), slice(c0, c1), rad <= limit


@dataclass
class _Canvas:
    """The per-B-scan maps that pathology drawing edits."""

    refl: np.ndarray        # linear reflectivity (H, W)
    mu: np.ndarray          # extra attenuation, optical depth per row (H, W)
    labels: np.ndarray      # int32 HRF ids
    negatives: np.ndarray   # uint8 kind codes
    blocked: np.ndarray     # bool: no HRF may go here (shadows, near negatives)
    rows: dict[str, np.ndarray]
    lift: np.ndarray


def _paint(cv: _Canvas, sl: tuple[slice, slice], mask: np.ndarray, value: float | np.ndarray, depth: float = 0.0,
           kind: int = 0, soft: bool = True) -> None:
    """Set reflectivity inside ``mask`` (``value``: one number, or an array broadcast over the patch);
    ``depth`` is the optical depth the object adds to its A-scans."""
    weight = mask.astype(np.float32)
    if soft and mask.size > 1:
        weight = np.maximum(weight, ndimage.gaussian_filter(weight, 0.5) * 0.9)
    patch = cv.refl[sl]
    cv.refl[sl] = patch * (1 - weight) + value * weight
    if depth > 0:
        per_col = mask.sum(axis=0)
        cv.mu[sl] += np.where(mask, depth / np.maximum(per_col, 1)[None, :], 0.0).astype(np.float32)
    if kind:
        cv.negatives[sl][mask] = kind


def _shadow_block(cv: _Canvas, sl: tuple[slice, slice], mask: np.ndarray) -> None:
    """Keep HRFs out of the columns under a shadowing object (they would be dimmed)."""
    cols = np.flatnonzero(mask.any(axis=0)) + sl[1].start
    bottom = sl[0].start
    cv.blocked[bottom:, cols] = True


def _vessels(rng: np.random.Generator, eye: _Eye, cv: _Canvas, i: int) -> None:
    h, w = cv.refl.shape
    y = float(eye.slow[i] - eye.fovea_slow)
    for x0, a, b, diam, refl, depth in eye.vessels:
        x_mm = x0 + a * y + b * y * y
        col = eye.fovea_col + x_mm * 1000 / eye.lat_um
        if not 2 <= col <= w - 3 or math.hypot(x_mm, y) < 0.55:  # out of the scan, or the avascular zone
            continue
        c = int(round(col))
        rx = max(0.8, diam / 2 / eye.lat_um)
        ry = max(1.5, diam / 2 / (AXIAL_MM * 1000) * 0.8)
        ilm, rnfl, gcl = cv.rows["ILM"][c], cv.rows["RNFL"][c], cv.rows["GCL"][c]
        cy = max(ilm + ry + 1.5, rnfl + (gcl - rnfl) * float(rng.uniform(-0.3, 0.5)))
        sy, sx, mask = _ellipse(h, w, cy, col, ry, rx)
        if not mask.any():
            continue
        top_bright = np.linspace(1.3, 0.7, mask.shape[0])[:, None]  # bright upper wall, blood below
        _paint(cv, (sy, sx), mask, refl * top_bright, depth, kind=1, soft=False)
        _shadow_block(cv, (sy, sx), mask)


def _floaters(rng: np.random.Generator, eye: _Eye, cv: _Canvas) -> None:
    h, w = cv.refl.shape
    ilm = cv.rows["ILM"]
    if eye.flags["floaters"]:
        for _ in range(int(rng.integers(0, 5))):
            c = float(rng.uniform(4, w - 5))
            room = ilm[int(c)] - 5
            if room < 6:
                continue
            ry, rx = float(rng.uniform(1.0, 6.0)), float(rng.uniform(1.0, 10.0)) * w / _REF_WIDTH
            cy = float(rng.uniform(ry + 1, max(ry + 1.5, room - ry)))
            wob = tuple(rng.uniform(0, 0.25, 4))
            sy, sx, mask = _ellipse(h, w, cy, c, ry, rx, float(rng.uniform(0, np.pi)), wob)
            mask &= (np.arange(sy.start, sy.stop)[:, None] < ilm[sx][None, :] - 3)
            if mask.any():
                _paint(cv, (sy, sx), mask, eye.refl["rnfl"] * 10 ** float(rng.uniform(-1.5, 0.6)), 0.1, kind=2)
    if eye.flags["hyaloid"]:
        gap = 8 + 40 * (0.5 + 0.5 * np.sin(np.linspace(0, float(rng.uniform(1, 4)), w) + float(rng.uniform(0, 6))))
        line = ndimage.gaussian_filter1d(ilm, w / 6, mode="nearest") - gap * float(rng.uniform(0.4, 1.2))
        c0, c1 = sorted(rng.integers(0, w, 2))
        if c1 - c0 > w // 8:
            rows = np.arange(h, dtype=np.float32)[:, None]
            band = (np.abs(rows - line[None, :]) < 0.9) & (rows > 1) & (rows < ilm[None, :] - 3)
            band[:, :c0] = False
            band[:, c1:] = False
            cv.refl[band] = eye.refl["rnfl"] * 10 ** float(rng.uniform(-1.5, -0.3))
            cv.negatives[band] = 2


def _erm(rng: np.random.Generator, eye: _Eye, cv: _Canvas) -> None:
    h, w = cv.refl.shape
    ilm = cv.rows["ILM"]
    c0 = int(rng.integers(0, w // 2))
    c1 = int(rng.integers(c0 + w // 6, w))
    lift = 1.5 + np.clip(_smooth_noise(rng, (1, w), (1, 40 * w / _REF_WIDTH))[0], 0, None) * float(rng.uniform(0, 5))
    rows = np.arange(h, dtype=np.float32)[:, None]
    band = (rows < ilm[None, :] - 0.6) & (rows >= ilm[None, :] - lift[None, :] - 1.4) & (rows > 1)
    band[:, :c0] = False
    band[:, c1:] = False
    cv.refl[band] = 10 ** float(rng.uniform(-0.8, 0.0))
    cv.negatives[band] = 7


def _band_mask(cv: _Canvas, sl: tuple[slice, slice], mask: np.ndarray, top: str, bottom: str) -> np.ndarray:
    r = np.arange(sl[0].start, sl[0].stop)[:, None]
    return mask & (r > cv.rows[top][sl[1]][None, :] + 0.5) & (r < cv.rows[bottom][sl[1]][None, :] - 0.5)


def _cysts(rng: np.random.Generator, eye: _Eye, cv: _Canvas) -> None:
    h, w = cv.refl.shape
    for _ in range(int(rng.integers(1, 7))):
        c = float(rng.uniform(0.05 * w, 0.95 * w))
        ic = int(c)
        top, bottom = ("IPL", "OPL") if rng.random() < 0.6 else ("INL", "ELM")
        t0, t1 = cv.rows[top][ic], cv.rows[bottom][ic]
        if t1 - t0 < 6:
            continue
        ry = float(rng.uniform(2.5, min(20.0, (t1 - t0) / 2 + 2)))
        rx = float(rng.uniform(15, 130)) / eye.lat_um
        cy = float(rng.uniform(t0 + ry * 0.6, max(t0 + ry * 0.6 + 0.1, t1 - ry * 0.6)))
        ext = max(ry, rx) + 3
        sy, sx, outer = _ellipse(h, w, cy, c, ry + 1.0, rx + 1.0 * w / _REF_WIDTH, ext=ext)
        _, _, inner = _ellipse(h, w, cy, c, ry, rx, ext=ext)
        outer = _band_mask(cv, (sy, sx), outer, "ILM", "ELM")
        inner &= outer
        wall = outer & ~inner
        if not inner.any():
            continue
        local = float(np.median(cv.refl[sy, sx][outer]))
        _paint(cv, (sy, sx), wall, local * float(rng.uniform(1.5, 6.0)), kind=4, soft=False)
        _paint(cv, (sy, sx), inner, eye.refl["vitreous"] * float(rng.uniform(1, 30)), kind=4, soft=False)


def _exudates(rng: np.random.Generator, eye: _Eye, cv: _Canvas) -> None:
    h, w = cv.refl.shape
    hi = hrf_area_bounds(w)[1]
    for _ in range(int(rng.integers(1, 4))):
        c = float(rng.uniform(0.08 * w, 0.92 * w))
        ic = int(c)
        cy0 = cv.rows["OPL"][ic] + float(rng.uniform(-0.6, 0.4)) * (cv.rows["OPL"][ic] - cv.rows["INL"][ic])
        target = hi * float(rng.uniform(1.3, 4.0))
        total = np.zeros((h, w), bool)
        for _ in range(12):
            ry = float(rng.uniform(2.0, 6.0))
            rx = float(rng.uniform(2.0, 7.0)) * w / _REF_WIDTH
            sy, sx, m = _ellipse(h, w, cy0 + float(rng.normal(0, 3)), c + float(rng.normal(0, 6)) * w / _REF_WIDTH,
                                 ry, rx, float(rng.uniform(0, np.pi)), tuple(rng.uniform(0, 0.2, 4)))
            total[sy, sx] |= _band_mask(cv, (sy, sx), m, "IPL", "ELM")
            if total.sum() >= target:
                break
        if total.sum() <= hi:
            continue
        rr, cc = np.nonzero(total)
        sl = (slice(rr.min(), rr.max() + 1), slice(cc.min(), cc.max() + 1))
        mask = total[sl]
        _paint(cv, sl, mask, 10 ** float(rng.uniform(-0.2, 0.25)), float(rng.uniform(0.8, 2.5)), kind=3)
        _shadow_block(cv, sl, mask)


def _choroid_spots(rng: np.random.Generator, eye: _Eye, cv: _Canvas) -> None:
    h, w = cv.refl.shape
    for _ in range(int(rng.integers(1, 8))):
        c = float(rng.uniform(2, w - 3))
        r = cv.rows["BM"][int(c)] + float(rng.uniform(3, 0.6 * eye.choroid_um / (AXIAL_MM * 1000)))
        if r > h - 3:
            continue
        sy, sx, m = _ellipse(h, w, r, c, float(rng.uniform(1, 4)), float(rng.uniform(1, 4)) * w / _REF_WIDTH)
        m &= np.arange(sy.start, sy.stop)[:, None] > cv.rows["BM"][sx][None, :] + 1.5
        if m.any():
            _paint(cv, (sy, sx), m, 10 ** float(rng.uniform(-1.0, 0.1)), kind=6)


# ----------------------------------------------------------------------------------------------- HRF

_HRF_HOMES = (("RNFL", "GCL", 0.07), ("GCL", "IPL", 0.10), ("IPL", "INL", 0.27), ("INL", "OPL", 0.22),
              ("OPL", "ELM", 0.28), ("ELM", "RPE", 0.06))


def _hrf_count(rng: np.random.Generator) -> int:
    """Foci in a B-scan that has some: mostly 1..6, sometimes many."""
    if rng.random() < 0.85:
        return int(min(6, rng.geometric(0.42)))
    return int(rng.integers(7, 21))


def _hrf_shape(rng: np.random.Generator, width: int) -> np.ndarray | None:
    """A boolean patch of one HRF (one 8-connected piece) whose area is within :func:`hrf_area_bounds`."""
    lo, hi = hrf_area_bounds(width)
    scale = width / _REF_WIDTH
    area_ref = float(np.clip(rng.lognormal(math.log(20), 0.75), 5, 150))
    aspect = float(np.exp(rng.normal(0.25, 0.35)))             # height / width in pixels at 512
    rx_ref = math.sqrt(area_ref / (math.pi * aspect))
    ry, rx = rx_ref * aspect, rx_ref * scale
    kind = rng.random()
    wobble = () if kind < 0.35 else tuple(rng.uniform(0, 0.12 if kind < 0.75 else 0.25, 6))
    angle = float(rng.uniform(-0.5, 0.5)) if rng.random() < 0.5 else 0.0
    _, _, m = _ellipse(10_000, 10_000, 5000 + float(rng.uniform(-0.5, 0.5)), 5000 + float(rng.uniform(-0.5, 0.5)),
                       ry, rx, angle, wobble)
    lab, k = ndimage.label(m, structure=np.ones((3, 3)))
    if k == 0:
        return None
    if k > 1:
        sizes = ndimage.sum(m, lab, range(1, k + 1))
        m = lab == (1 + int(np.argmax(sizes)))
    if not lo <= int(m.sum()) <= hi:
        return None
    rr, cc = np.nonzero(m)
    return m[rr.min(): rr.max() + 1, cc.min(): cc.max() + 1]


def _touches(taken: np.ndarray, sl: tuple[slice, slice], shape: np.ndarray) -> bool:
    """Whether ``shape`` placed at ``sl`` overlaps or 8-touches a pixel of ``taken``."""
    r0, c0 = sl[0].start, sl[1].start
    a, b = max(0, r0 - 1), max(0, c0 - 1)
    near = taken[a: r0 + shape.shape[0] + 1, b: c0 + shape.shape[1] + 1]
    grown = np.zeros((shape.shape[0] + 2, shape.shape[1] + 2), bool)
    grown[1:-1, 1:-1] = shape
    grown = ndimage.binary_dilation(grown, structure=np.ones((3, 3)))
    grown = grown[a - r0 + 1:, b - c0 + 1:]  # the frame edge cuts the grown border
    return bool((grown[: near.shape[0], : near.shape[1]] & near).any())


def _hrfs(rng: np.random.Generator, eye: _Eye, cv: _Canvas, n_hrf: int) -> int:
    h, w = cv.refl.shape
    taken = np.zeros((h, w), bool)   # the HRFs so far: a new one may not touch them (8-neighbours)
    near_neg = ndimage.binary_dilation(cv.negatives > 0, iterations=2) | cv.blocked
    homes = [hm for hm in _HRF_HOMES if hm[0] != "ELM" or (cv.lift > 2).any()]
    p = np.array([hm[2] for hm in homes])
    p /= p.sum()
    cluster = float(rng.uniform(0.1 * w, 0.9 * w)) if rng.random() < 0.5 else None
    placed = 0
    for _ in range(n_hrf * 30):
        if placed == n_hrf:
            break
        shape = _hrf_shape(rng, w)
        if shape is None:
            continue
        top, bottom, _ = homes[int(rng.choice(len(homes), p=p))]
        sh, sw = shape.shape
        if cluster is not None and rng.random() < 0.7:
            c0 = int(round(cluster + rng.normal(0, 0.06 * w))) - sw // 2
        else:
            c0 = int(rng.integers(int(0.03 * w), int(0.97 * w) - sw))
        if top == "ELM":  # outer retina: only above a druse
            c0 = int(rng.choice(np.flatnonzero(cv.lift > 2))) - sw // 2
        if c0 < 1 or c0 + sw > w - 1:
            continue
        cols = slice(c0, c0 + sw)
        upper = float(cv.rows[top][cols].max()) + 1
        lower = float(cv.rows[bottom][cols].min()) - 1 - sh
        if lower < upper:
            continue
        r0 = int(math.ceil(rng.uniform(upper, lower)))
        sl = (slice(r0, r0 + sh), cols)
        if r0 + sh > h - 1:
            continue
        rr = np.arange(r0, r0 + sh)[:, None]
        inside = (rr > cv.rows["ILM"][cols][None, :] + 0.5) & (rr < cv.rows["RPE"][cols][None, :] - 0.5)
        if not inside[shape].all() or (near_neg[sl] & shape).any() or _touches(taken, sl, shape):
            continue
        local = float(np.median(cv.refl[max(0, r0 - 3): r0 + sh + 3, cols]))
        value = max(10 ** float(rng.uniform(-1.1, 0.1)), local * float(rng.uniform(2.5, 5.0)))
        depth = float(rng.uniform(0.0, 0.5)) if rng.random() < 0.5 else 0.0
        placed += 1
        _paint(cv, sl, shape, value, depth, soft=rng.random() < 0.6)
        cv.labels[sl][shape] = placed
        taken[sl] |= shape
    return placed


# ----------------------------------------------------------------------------------------------- imaging


def _reflectivity(rng: np.random.Generator, eye: _Eye, rows: dict[str, np.ndarray], content: np.ndarray
                  ) -> np.ndarray:
    """Linear reflectivity of the layered retina and choroid (RPE band = 1), with lateral texture."""
    h, w = eye.height, eye.width
    ax_um = AXIAL_MM * 1000
    r = np.arange(h, dtype=np.float32)[:, None]
    bounds = [rows["ILM"], rows["RNFL"], rows["GCL"], rows["IPL"], rows["INL"], rows["OPL"], rows["ELM"],
              rows["ELM"] + 1.2, rows["EZ"], rows["EZ"] + 9 / ax_um, rows["RPE"] - 6 / ax_um, rows["RPE"],
              np.minimum(rows["RPE"] + 17 * eye.thick["rpe"] / ax_um, rows["BM"]), rows["BM"],
              rows["BM"] + 12 / ax_um]
    refl = eye.refl
    lateral = lambda v, s=0.12: (v * np.exp(s * _smooth_noise(rng, (1, w), (1, 60 * w / _REF_WIDTH))[0]))  # noqa: E731
    values = [np.full(w, refl["vitreous"], np.float32)] + [lateral(refl[k]) for k in _REGIONS[1:13]]
    values.append(np.where(content > 0, content, refl["rpe"]).astype(np.float32))   # druse content
    values.append(lateral(refl["cc"]))
    out = np.zeros((h, w), np.float32)
    below_prev = np.ones((h, w), np.float32)
    for b, value in zip(bounds, values, strict=True):  # each region between two boundaries
        below = _soft_step(r, b)
        out += (below_prev - below) * value[None, :]
        below_prev = below
    share_ch = below_prev  # what lies below the last boundary: the choroid
    # choroid: stroma around dark lumens that grow with depth, fading (not ending) into the sclera
    depth = np.clip((r - rows["BM"][None, :]) / (eye.choroid_um / ax_um), 0, None)
    fine = _smooth_noise(rng, (h, w), (4.0, 35 / eye.lat_um))
    coarse = _smooth_noise(rng, (h, w), (10.0, 110 / eye.lat_um))
    mix = np.minimum(depth, 1)
    f = (1 - mix) * fine + mix * coarse
    lumen = 1 / (1 + np.exp(-(f - 0.2) * 4))
    fade = 1 / (1 + np.exp((depth - 0.9) / 0.12))
    stroma = refl["choroid"] * (1 - 0.9 * lumen) * np.exp(-depth * 2.0) * fade
    out += share_ch * stroma
    tex = np.exp(eye.optics["texture"] * _smooth_noise(rng, (h, w), (6.0, 20 * w / _REF_WIDTH)))
    return out * tex


def _attenuate(eye: _Eye, refl: np.ndarray, extra: np.ndarray, rows: dict[str, np.ndarray]) -> np.ndarray:
    """Beer-Lambert along each A-scan (round trip): what lies above dims what lies below."""
    o = eye.optics
    h = refl.shape[0]
    r = np.arange(h, dtype=np.float32)[:, None]
    in_rpe = (r >= rows["RPE"][None, :]) & (r <= rows["BM"][None, :])
    below_bm = r > rows["BM"][None, :]
    mu = (o["kappa"] * np.minimum(refl, 1.5) * AXIAL_MM + in_rpe * (o["rpe_mu"] * AXIAL_MM)
          + below_bm * (o["choroid_mu"] * AXIAL_MM) + extra)
    od = 2 * (np.cumsum(mu, axis=0) - 0.5 * mu)
    return refl * np.exp(-od) * np.exp(-(r * AXIAL_MM) / o["rolloff"])


def _speckle(rng: np.random.Generator, eye: _Eye, signal: np.ndarray, noise: float) -> np.ndarray:
    """Frame-averaged intensity: a static speckle pattern (the same tissue in every frame), a few
    decorrelated frames, and the many-frame limit (the PSF-blurred signal), plus detector noise."""
    o = eye.optics
    sig = (o["psf_ax"], max(o["psf_lat"], 0.3))
    probe = np.zeros((21, 21), np.float32)
    probe[10, 10] = 1
    norm = 1 / math.sqrt(2 * float((ndimage.gaussian_filter(probe, sig, truncate=3.0) ** 2).sum()))
    amp = np.sqrt(signal).astype(np.float32)

    def frame() -> np.ndarray:
        re = ndimage.gaussian_filter(amp * rng.standard_normal(signal.shape, dtype=np.float32), sig, truncate=3.0)
        im = ndimage.gaussian_filter(amp * rng.standard_normal(signal.shape, dtype=np.float32), sig, truncate=3.0)
        return (re * re + im * im) * norm ** 2

    frames = int(o["frames"])
    a, b = o["static"], o["dynamic"]
    out = a * frame() + (1 - a - b) * ndimage.gaussian_filter(signal, sig, truncate=3.0)
    for _ in range(frames):
        out += (b / frames) * frame()
    # detector noise: exponential intensity per frame, averaged over the frames that were taken
    looks = frames + 1
    return out + rng.gamma(looks, noise / looks, signal.shape).astype(np.float32)


def _render(rng: np.random.Generator, eye: _Eye, i: int, rows: dict[str, np.ndarray], lift: np.ndarray,
            content: np.ndarray, n_hrf: int) -> SyntheticBScanC:
    h, w = eye.height, eye.width
    refl = _reflectivity(rng, eye, rows, content)
    cv = _Canvas(refl, np.zeros((h, w), np.float32), np.zeros((h, w), np.int32), np.zeros((h, w), np.uint8),
                 np.zeros((h, w), bool), rows, lift)
    druse = (np.arange(h)[:, None] > rows["RPE"][None, :] + 17 * eye.thick["rpe"] / (AXIAL_MM * 1000)) & \
            (np.arange(h)[:, None] < rows["BM"][None, :]) & (lift[None, :] > 0.5)
    cv.negatives[druse] = 5
    _vessels(rng, eye, cv, i)
    _floaters(rng, eye, cv)
    if eye.flags["erm"]:
        _erm(rng, eye, cv)
    if eye.flags["cysts"] and rng.random() < 0.7:
        _cysts(rng, eye, cv)
    if eye.flags["exudates"] and rng.random() < 0.6:
        _exudates(rng, eye, cv)
    if eye.flags["choroid_spots"]:
        _choroid_spots(rng, eye, cv)
    placed = _hrfs(rng, eye, cv, n_hrf) if n_hrf else 0
    o = eye.optics
    signal = _attenuate(eye, cv.refl, cv.mu, rows)
    xn = np.linspace(-1, 1, w) - o["vig_shift"]
    gain = (1 - o["vignette"] * np.abs(xn) ** o["vig_p"]).clip(0.2, None)
    gain *= np.exp(o["col_gain"] * ndimage.gaussian_filter1d(rng.standard_normal(w), float(rng.uniform(0.5, 2.0))))
    signal *= gain[None, :].astype(np.float32)
    ref = float(np.percentile(signal, 99.7)) * o["ref"]
    if rng.random() < o["low_signal_p"]:  # a dim B-scan (blink, media opacity): noisier after display gain
        signal *= float(rng.uniform(0.08, 0.4))
        ref *= float(rng.uniform(0.3, 0.8))
    intensity = _speckle(rng, eye, signal, o["noise"])
    shown = np.clip(intensity - o["noise_sub"] * o["noise"], 0, None) / ref
    image = 255 * shown ** o["gamma"] * o["gain"] + o["offset"]
    image = np.round(np.clip(image, 0, 255)).astype(np.float32)
    layers = {name: rows[name].astype(np.float32) for name in LAYER_NAMES}
    return SyntheticBScanC(image, cv.labels, layers, cv.negatives, eye.fovea_col, placed)


# ----------------------------------------------------------------------------------------------- public


def _check_args(n_bscans: int, height: int, width: int, hrf_prevalence: float) -> None:
    check_size(height, width)
    if int(n_bscans) != n_bscans or n_bscans < 1:
        raise ValueError(f"n_bscans must be a whole number >= 1, got {n_bscans}")
    if not 0.0 <= float(hrf_prevalence) <= 1.0:  # also rejects NaN
        raise ValueError(f"hrf_prevalence must be within 0..1, got {hrf_prevalence}")


def synth_volume_scans(rng: np.random.Generator, n_bscans: int, height: int = 496, width: int = 512,
                       hrf_prevalence: float = 0.3) -> tuple[list[SyntheticBScanC], float, float]:
    """The B-scans of one eye (with their hard-negative maps), fovea B-scan index (fractional) and column."""
    _check_args(n_bscans, height, width, hrf_prevalence)
    n = int(n_bscans)
    eye = _draw_eye(rng, n, int(height), int(width))
    stacks, lifts, contents = [], [], []
    for i in range(n):
        rows, lift, content = _stack(eye, i)
        stacks.append(rows)
        lifts.append(lift)
        contents.append(content)
    offset = _place_in_frame(rng, eye, stacks)
    scans = []
    for i in range(n):
        base = eye.shape_rows[i] + offset[i]
        rows = {k: (v + base).astype(np.float64) for k, v in stacks[i].items()}
        count = _hrf_count(rng) if rng.random() < hrf_prevalence else 0
        scans.append(_render(rng, eye, i, rows, lifts[i], contents[i], count))
    if n > 1:
        fovea_bscan = (eye.fovea_slow + SLOW_FIELD_MM / 2) / (SLOW_FIELD_MM / (n - 1))
    else:
        fovea_bscan = 0.0
    return scans, float(fovea_bscan), float(eye.fovea_col)


def synth_bscan(rng: np.random.Generator, height: int = 496, width: int = 512, n_hrf: int | None = None
                ) -> SyntheticBScanC:
    """One B-scan through (nearly) the fovea of a freshly drawn eye; ``n_hrf`` foci are asked for
    (None: none in half the draws, else the usual 1..6, sometimes many). Fewer may fit."""
    check_size(height, width)
    if n_hrf is not None and n_hrf < 0:
        raise ValueError(f"n_hrf must be >= 0, got {n_hrf}")
    eye = _draw_eye(rng, 1, int(height), int(width))
    rows, lift, content = _stack(eye, 0)
    offset = _place_in_frame(rng, eye, [rows])
    rows = {k: (v + eye.shape_rows[0] + offset[0]).astype(np.float64) for k, v in rows.items()}
    if n_hrf is None:
        n_hrf = _hrf_count(rng) if rng.random() < 0.5 else 0
    return _render(rng, eye, 0, rows, lift, content, int(n_hrf))


def synth_volume_truth(rng: np.random.Generator, n_bscans: int, height: int = 496, width: int = 512,
                       hrf_prevalence: float = 0.3) -> SyntheticVolume:
    """A volume of one right eye with its HRF labels, true layer rows and foveal centre."""
    scans, fovea_bscan, fovea_col = synth_volume_scans(rng, n_bscans, height, width, hrf_prevalence)
    images = np.stack([s.image for s in scans]).astype(np.float32)
    labels = np.stack([s.labels for s in scans]).astype(np.int32)
    layers = {name: np.stack([s.layers[name] for s in scans]).astype(np.float32) for name in LAYER_NAMES}
    return SyntheticVolume(images, labels, layers, fovea_bscan, fovea_col)


def synth_volume(rng: np.random.Generator, n_bscans: int, height: int = 496, width: int = 512,
                 hrf_prevalence: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, H, W) float32 0..255 and HRF labels (n, H, W) int32 of one volume."""
    truth = synth_volume_truth(rng, n_bscans, height, width, hrf_prevalence)
    return truth.images, truth.labels
