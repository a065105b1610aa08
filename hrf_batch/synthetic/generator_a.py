"""Synthetic Spectralis-like OCT B-scans with hyper-reflective foci (HRF) and exact pixel masks.

Real AMD data with pixel-level HRF masks is scarce, so the classifier, the segmentation and their
tests run on images whose ground truth is known by construction. The generator draws the anatomy
of one eye in millimetres (retinal layers with a foveal pit, curvature, drusen, superficial vessels,
choroid), renders a mean image on HEYEX's 0..255 display scale, applies multiplicative speckle in
linear reflectivity and maps back through the display curve of :mod:`hrf_batch.io.volume`. Intensity
levels were matched to a real Spectralis line scan (vitreous/background near 0..30, bright bands
up to ~230..255).

Layer boundaries (rows per column) carry these keys, top to bottom: ``ILM``; ``RNFL``, ``GCL``,
``IPL``, ``INL``, ``OPL`` (each the outer edge of that layer, so the INL spans ``IPL``..``INL`` and
the ONL spans ``OPL``..``ELM``); ``ELM``; ``EZ`` (inner edge of the ellipsoid zone); ``RPE`` (inner
edge of the RPE band, lifted by drusen); ``BM`` (Bruch's membrane); ``CSI`` (choroid-sclera).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from hrf_batch.io.ground_truth import SyntheticVolume
from hrf_batch.io.volume import LAYER_NAMES, display_from_linear

# Display curve of the HEYEX export (see hrf_batch.io.volume): display = (ln(x + OFF) + A) / B * 255.
_OFF, _A, _B = 2.44e-4, 8.3, 8.285
_MIN_FIELD_MM = 3.0   # narrower images get a coarser lateral spacing so the fovea still fits
_MIN_DEPTH_MM = 1.0   # shorter images get a coarser axial spacing so retina and choroid fit

# Where HRFs sit: (upper boundary, lower boundary, probability). INL..ONL carry 85 %.
_HRF_BANDS = (("RNFL", "GCL", 0.04), ("GCL", "IPL", 0.11), ("IPL", "INL", 0.30), ("INL", "OPL", 0.15),
              ("OPL", "ELM", 0.40))


@dataclass(frozen=True)
class SyntheticBScan:
    """One synthetic B-scan: display-scale image, one label per HRF, layer boundary rows."""

    image: np.ndarray
    hrf_labels: np.ndarray
    layers: dict[str, np.ndarray]

    @property
    def n_hrf(self) -> int:
        return int(self.hrf_labels.max(initial=0))

    @property
    def hrf_mask(self) -> np.ndarray:
        return self.hrf_labels > 0


@dataclass(frozen=True)
class _Eye:
    """Anatomy of one eye in millimetres, shared by every B-scan of a volume (keeps them continuous)."""

    lat_mm: float
    ax_mm: float
    fovea_x: float
    fovea_z: float
    bm0: float              # depth of BM under the fovea, mm from the top row
    curv: tuple[float, float]
    tilt: tuple[float, float]
    thick: dict[str, float]  # base layer thicknesses, mm
    pit_w: float
    pit_p: float
    values: dict[str, float]  # mean display levels of the bands
    vessels: np.ndarray      # (n, 4): x at z=fovea_z, slope dx/dz, diameter, shadow depth (display)
    drusen: np.ndarray       # (n, 4): centre x, centre z, radius, height (mm)
    bg: float                # linear noise floor of the vitreous
    speckle: float           # speckle contrast gain
    ripple: np.ndarray       # (7, 4, 4): per layer 4 plane waves (kx, kz, phase, amplitude)


def _spacing(height: int, width: int, lateral_mm: float, axial_mm: float) -> tuple[float, float]:
    """Pixel size in mm, coarsened for tiny images so the whole anatomy stays in view."""
    if height < 16 or width < 16:
        raise ValueError(f"B-scan must be at least 16x16 pixels, got {height}x{width}")
    if lateral_mm <= 0 or axial_mm <= 0:
        raise ValueError(f"pixel spacing must be positive, got {lateral_mm} x {axial_mm} mm")
    return max(lateral_mm, _MIN_FIELD_MM / width), max(axial_mm, _MIN_DEPTH_MM / height)


def _band_values(rng: np.random.Generator) -> dict[str, float]:
    """Mean display level of each band, read off a real Spectralis scan, jittered per eye."""
    base = {
        "rnfl": 160.0, "gcl": 128.0, "ipl": 140.0, "inl": 104.0, "opl": 138.0, "onl": 71.0,
        "elm": 98.0, "is": 88.0, "ez": 236.0, "os": 165.0, "iz": 212.0, "gap": 192.0,
        "rpe": 230.0, "bm": 200.0, "drusen": 142.0, "choroid": 132.0, "csi": 58.0,
    }
    gain = rng.normal(5.0, 6.0)  # +5: log speckle pulls the median below the mean level
    out = {k: v + gain + rng.normal(0.0, 4.0) for k, v in base.items()}
    out["ez"] = min(out["ez"], 250.0)
    return out


def _make_eye(rng: np.random.Generator, height: int, width: int, lat: float, ax: float,
              fovea_x_mm: float, field_z_mm: float, fovea_z_mm: float | None,
              pit_depth: float = 1.0) -> _Eye:
    """Draw one eye: thicknesses, curvature, vessels and drusen laid out on the en-face field
    ``[0, width * lat] x [0, field_z_mm]``. ``fovea_z_mm`` None: a single B-scan at z = 0, placed
    off the foveal centre so that its pit has relative depth ``pit_depth``."""
    field_x = width * lat
    pit_w, pit_p = rng.uniform(0.40, 0.50), rng.uniform(2.3, 2.9)
    if fovea_z_mm is None:
        fovea_z_mm = -_pit_offset(pit_depth, pit_w, pit_p)
    thick = {
        "rnfl": rng.uniform(0.016, 0.026), "rnfl_gain": rng.uniform(0.010, 0.018),
        "gcl": rng.uniform(0.058, 0.072), "ipl": rng.uniform(0.038, 0.046),
        "inl": rng.uniform(0.036, 0.044), "opl": rng.uniform(0.022, 0.030),
        "onl": rng.uniform(0.058, 0.075), "onl_fov": rng.uniform(0.040, 0.060),
        "choroid": rng.uniform(0.18, 0.35),
    }
    vessels, drusen = _vessels_and_drusen(rng, field_x, field_z_mm)
    flat = min(1.0, (3.5 / (0.5 * field_x)) ** 2)  # wide fields: OCT optics flatten the sag
    curv = (rng.uniform(0.002, 0.012) * flat, rng.uniform(0.002, 0.012) * flat)
    tilt = (rng.uniform(-0.03, 0.03), rng.uniform(-0.02, 0.02))
    depth = height * ax
    bm0 = max(0.46, rng.uniform(0.30, 0.42) * depth)
    # Lift the eye so the rim of the field, where curvature raises the retina, stays in view.
    rise = max(curv[0] * dx * dx + curv[1] * dz * dz - tilt[0] * dx - tilt[1] * dz
               for dx in (-fovea_x_mm, field_x - fovea_x_mm) for dz in (-fovea_z_mm, field_z_mm - fovea_z_mm))
    bm0 = min(max(bm0, 0.03 * depth + 0.5 + rise), depth - 0.1)
    return _Eye(
        lat_mm=lat, ax_mm=ax, fovea_x=fovea_x_mm, fovea_z=fovea_z_mm,
        bm0=bm0, curv=curv, tilt=tilt, thick=thick,
        pit_w=pit_w, pit_p=pit_p, values=_band_values(rng),
        vessels=vessels, drusen=drusen, bg=float(rng.uniform(1.0e-4, 2.2e-4)),
        speckle=float(rng.uniform(0.48, 0.62)), ripple=_ripple_waves(rng),
    )


def _vessels_and_drusen(rng: np.random.Generator, field_x: float,
                        field_z: float) -> tuple[np.ndarray, np.ndarray]:
    """Superficial vessels as en-face lines and, in about half the eyes, drusen as domes."""
    n_ves = rng.poisson(0.9 * field_x) + 1
    vessels = np.column_stack([rng.uniform(0.0, field_x, n_ves), rng.normal(0.0, 0.6, n_ves),
                               rng.uniform(0.03, 0.10, n_ves), rng.uniform(8.0, 22.0, n_ves)])
    n_dru = rng.poisson(0.25 * field_x * max(field_z, 0.5)) if rng.random() < 0.45 else 0
    radius = rng.uniform(0.08, 0.35, n_dru)
    drusen = np.column_stack([rng.uniform(0.0, field_x, n_dru), rng.uniform(0.0, max(field_z, 1e-3), n_dru),
                              radius, np.minimum(rng.uniform(0.015, 0.08, n_dru), 0.35 * radius)])
    return vessels, drusen


def _ripple_waves(rng: np.random.Generator) -> np.ndarray:
    """Plane waves (wavelengths 0.25..1.5 mm) that make layer thicknesses undulate like real ones,
    continuously across the en-face field."""
    wavelength = rng.uniform(0.25, 1.5, (7, 4))
    angle = rng.uniform(0.0, math.pi, (7, 4))
    k = 2 * math.pi / wavelength
    return np.stack([k * np.cos(angle), k * np.sin(angle), rng.uniform(0, 2 * math.pi, (7, 4)),
                     rng.uniform(0.01, 0.04, (7, 4)) * np.array([1, 1, 1, 1, 1, 0.4, 1])[:, None]],
                    axis=-1)


def _undulation(eye: _Eye, layer: int, x: np.ndarray, z: float) -> np.ndarray:
    """Relative thickness factor (around 1) of layer ``layer`` along the B-scan."""
    kx, kz, ph, amp = eye.ripple[layer].T
    return 1.0 + (amp[:, None] * np.sin(kx[:, None] * x[None, :] + (kz * z + ph)[:, None])).sum(0)


def _drusen_height(eye: _Eye, x: np.ndarray, z: float) -> np.ndarray:
    """RPE elevation (mm) per column: dome-shaped drusen cut by this B-scan's plane."""
    h = np.zeros_like(x)
    for cx, cz, rad, top in eye.drusen:
        q = 1.0 - ((x - cx) ** 2 + (z - cz) ** 2) / rad**2
        if q.max() > 0:
            h = np.maximum(h, top * np.clip(q, 0.0, None) ** 1.2)
    return h


def _boundaries(eye: _Eye, x: np.ndarray, z: float, dru: np.ndarray) -> dict[str, np.ndarray]:
    """Layer boundary depths (mm from the top) per column, built outwards-in from BM."""
    t = eye.thick
    dx, dz = x - eye.fovea_x, z - eye.fovea_z
    r = np.hypot(dx, dz)
    pit = np.exp(-((r / eye.pit_w) ** eye.pit_p))     # 1 at the foveal centre
    inner = 1.0 - pit
    near = np.exp(-((r / 0.5) ** 2))
    bm = (eye.bm0 + eye.tilt[0] * dx + eye.tilt[1] * dz
          - eye.curv[0] * dx**2 - eye.curv[1] * dz**2)
    u = [_undulation(eye, i, x, z) for i in range(7)]
    rpe = bm - 0.024 - dru
    ez = rpe - 0.031 - 0.014 * near
    elm = ez - 0.024 - 0.006 * near
    # the ONL absorbs 70 % of a druse's height, the inner retina is lifted by the rest
    onl = (t["onl"] + t["onl_fov"] * np.exp(-((r / 0.4) ** 2))) * u[0]
    opl = elm - np.maximum(onl - 0.7 * dru, 0.35 * onl)
    inl = opl - t["opl"] * (1.0 - 0.85 * pit) * u[1]
    ipl = inl - t["inl"] * (0.8 + 0.2 * np.exp(-(((r - 1.0) / 1.3) ** 2))) * inner * u[2]
    gcl = ipl - t["ipl"] * (0.8 + 0.2 * np.exp(-(((r - 1.0) / 1.3) ** 2))) * inner * u[3]
    rnfl = gcl - t["gcl"] * (0.62 + 0.38 * np.exp(-(((r - 1.1) / 1.0) ** 2))) * inner * u[4]
    nasal = np.clip(dx, 0.0, 3.5)  # right eye: the disc, and the thick nasal RNFL, to the right
    ilm = rnfl - (t["rnfl"] + t["rnfl_gain"] * (nasal + 0.5 * np.abs(dz))) * inner * u[5]
    return {
        "ILM": ilm, "RNFL": rnfl, "GCL": gcl, "IPL": ipl, "INL": inl, "OPL": opl, "ELM": elm,
        "EZ": ez, "RPE": rpe, "BM": bm, "CSI": bm + t["choroid"],
    }


def _steps(rows: np.ndarray, values: np.ndarray, h: int) -> np.ndarray:
    """Piecewise-constant columns: ``values[i]`` from boundary ``rows[i]`` down to the next one.

    Each step is anti-aliased over one row and the image is one cumulative sum, so cost does not
    grow with the number of bands."""
    n, w = rows.shape
    pos = np.clip(rows + 0.5, 0.0, h + 0.999)
    y0 = np.floor(pos).astype(np.intp)
    frac = (pos - y0).astype(np.float32)
    d = np.diff(values, prepend=0.0).astype(np.float32)[:, None]
    diff = np.zeros((h + 2, w), np.float32)
    cols = np.broadcast_to(np.arange(w), (n, w))
    np.add.at(diff, (y0, cols), d * (1.0 - frac))
    np.add.at(diff, (y0 + 1, cols), d * frac)
    return np.cumsum(diff[:h], axis=0)


def _mean_image(eye: _Eye, rows: dict[str, np.ndarray], dru_px: np.ndarray,
                h: int) -> tuple[np.ndarray, np.ndarray]:
    """Band-wise mean display image and speckle contrast (granular inner retina, smoother ONL)."""
    v = eye.values
    px = 1.0 / (eye.ax_mm * 1000.0)  # rows per micrometre
    bands = [  # (upper edge, display level, speckle contrast)
        (rows["ILM"], v["rnfl"], 1.0), (rows["RNFL"], v["gcl"], 1.0), (rows["GCL"], v["ipl"], 1.0),
        (rows["IPL"], v["inl"], 0.9), (rows["INL"], v["opl"], 1.0), (rows["OPL"], v["onl"], 0.6),
        (rows["ELM"] - 2.5 * px, v["elm"], 0.6), (rows["ELM"] + 2.5 * px, v["is"], 0.7),
        (rows["EZ"], v["ez"], 0.8), (rows["EZ"] + 11 * px, v["os"], 0.9),
        (rows["RPE"] - 12 * px, v["iz"], 0.8), (rows["RPE"] - 4 * px, v["gap"], 0.9),
        (rows["RPE"], v["rpe"], 0.8), (rows["BM"] - 4.5 * px - dru_px, v["drusen"], 0.7),
        (rows["BM"] - 4.5 * px, v["bm"], 0.8), (rows["BM"], 0.0, 0.5),
    ]
    edges = np.stack([b[0] for b in bands]).astype(np.float32)
    mean = _steps(edges, np.array([b[1] for b in bands]), h)
    contrast = 1.0 + _steps(edges, np.array([b[2] - 1.0 for b in bands]), h)
    return mean, contrast


def _add_choroid(rng: np.random.Generator, img: np.ndarray, eye: _Eye, rows: dict[str, np.ndarray]) -> None:
    """Choroid below BM: stroma fading with depth, dark vessel lumens growing with depth, sclera."""
    ch = eye.thick["choroid"]
    top = int(max(0, math.floor(rows["BM"].min())))
    h = min(img.shape[0], int(math.ceil(rows["BM"].max() + (ch + 0.26) / eye.ax_mm)))
    w = img.shape[1]
    if top >= h:
        return
    dy = (np.arange(top, h, dtype=np.float32)[:, None] - rows["BM"][None, :]) * np.float32(eye.ax_mm)
    v0 = eye.values["choroid"]
    # attenuation is exponential in reflectivity, i.e. roughly linear on the log display scale
    stroma = v0 - (v0 - 12.0) * (1.0 - np.exp(-dy / np.float32(0.13)))
    stroma *= np.clip(1.0 - (dy - ch) / np.float32(0.25), 0.0, 1.0)
    fine = smooth_noise(rng, (h - top, w), (0.015 / eye.ax_mm, 0.05 / eye.lat_mm))
    coarse = smooth_noise(rng, (h - top, w), (0.045 / eye.ax_mm, 0.14 / eye.lat_mm))
    depth_w = np.clip(dy / np.float32(ch), 0.0, 1.0)
    field = (1.0 - depth_w) * fine + depth_w * coarse
    lumen = np.clip((field - 0.1) * 1.2, 0.0, 1.0)
    lumen_w = np.clip((dy - 0.01) / 0.03, 0.0, 1.0) * np.clip((ch - dy) / 0.05 + 1.0, 0.0, 1.0)
    chor = stroma * (1.0 - 0.55 * lumen * lumen_w)
    img[top:h] += (chor * np.clip(dy / np.float32(eye.ax_mm) + 0.5, 0.0, 1.0)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Unit-variance smooth random field with correlation lengths ``scale`` (rows, cols), made cheaply
    at low resolution and upsampled."""
    sy, sx = max(scale[0], 1.0), max(scale[1], 1.0)
    small = (max(2, int(shape[0] / sy) + 3), max(2, int(shape[1] / sx) + 3))
    f = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), 0.8, mode="wrap")
    f /= f.std() + 1e-6
    big = ndi.zoom(f, (shape[0] / (small[0] - 2), shape[1] / (small[1] - 2)), order=1, grid_mode=True,
                   mode="grid-wrap")
    return big[: shape[0], : shape[1]]


def _shadow(img: np.ndarray, x0: float, half: float, start: np.ndarray | float, depth: float) -> None:
    """Darken everything below ``start`` in a soft column band (light blocked by a vessel or focus)."""
    h, w = img.shape
    c0, c1 = max(0, int(math.floor(x0 - half - 2))), min(w, int(math.ceil(x0 + half + 3)))
    if c1 <= c0:
        return
    cols = np.arange(c0, c1)
    prof = np.clip(half + 0.8 - np.abs(cols - x0), 0.0, 1.0)
    starts = np.broadcast_to(np.asarray(start, dtype=np.float32), (w,))[c0:c1]
    y = np.arange(h, dtype=np.float32)[:, None]
    ramp = np.clip((y - starts[None, :]) / 3.0, 0.0, 1.0)
    img[:, c0:c1] -= (depth * prof[None, :] * ramp).astype(np.float32)


def _add_vessels(rng: np.random.Generator, img: np.ndarray, eye: _Eye, rows: dict[str, np.ndarray],
                 x_mm: np.ndarray, z: float) -> np.ndarray:
    """Superficial vessels: bright walls in RNFL/GCL with shadows below. Returns where foci must
    not go (the walls and a 2 px margin)."""
    h, w = img.shape
    occupied = np.zeros((h, w), bool)
    yy, xx = np.ogrid[:h, :w]
    for x_f, slope, diam, depth in eye.vessels:
        xv = x_f + slope * (z - eye.fovea_z)
        if math.hypot(xv - eye.fovea_x, z - eye.fovea_z) < 0.4:
            continue  # foveal avascular zone
        col = (xv - x_mm[0]) / eye.lat_mm
        if not 0 <= col < w:
            continue
        c = int(col)
        half = max(0.8, 0.5 * diam / eye.lat_mm)
        yc = 0.5 * (rows["RNFL"][c] + rows["GCL"][c])
        hh = max(1.0, min(0.5 * diam / eye.ax_mm * 0.35, 0.5 * (rows["IPL"][c] - rows["ILM"][c])))
        ys = slice(max(0, int(yc - hh - 3)), int(yc + hh + 4))
        xs = slice(max(0, int(col - half - 3)), int(col + half + 4))
        ey, ex = (yy[ys] - yc) ** 2, (xx[:, xs] - col) ** 2
        blob = ey / hh**2 + ex / half**2 <= 1.0
        img[ys, xs][blob] = np.maximum(img[ys, xs][blob], eye.values["rnfl"] + rng.uniform(0.0, 12.0))
        occupied[ys, xs] |= ey / (hh + 2) ** 2 + ex / (half + 2) ** 2 <= 1.0
        _shadow(img, col, half, yc + hh, depth)
    fovea_col = (eye.fovea_x - x_mm[0]) / eye.lat_mm
    for x in rng.integers(0, w, rng.poisson(w / 60)):  # capillary shadows: thin dark stripes
        if abs(x - fovea_col) * eye.lat_mm > 0.3 or abs(z - eye.fovea_z) > 0.3:
            _shadow(img, float(x), 0.2, rows["IPL"][x], rng.uniform(4.0, 12.0))
    return occupied


def _blob(rng: np.random.Generator, area: float) -> np.ndarray:
    """An irregular roundish 4-connected blob of about ``area`` pixels (at least 5)."""
    aspect = rng.uniform(0.75, 1.5)
    amp = rng.uniform(0.0, 0.16, 3)
    phase = rng.uniform(0.0, 2 * math.pi, 3)
    off = rng.uniform(-0.5, 0.5, 2)
    scale, lo, hi = 1.0, max(5.0, 0.85 * area), min(150.0, 1.15 * area)
    best = np.ones((2, 3), bool)  # fallback: 6 px
    for _ in range(8):
        rx = scale * math.sqrt(area / (math.pi * aspect))
        ry = aspect * rx
        n = int(math.ceil(max(rx, ry) * 1.5)) + 2
        yy, xx = np.mgrid[-n : n + 1, -n : n + 1].astype(np.float32)
        yy, xx = yy - off[0], xx - off[1]
        theta = np.arctan2(yy, xx)
        rad = 1.0 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 4), amp, phase))
        inside = (yy / ry) ** 2 + (xx / rx) ** 2 <= rad**2
        lab, nlab = ndi.label(inside)
        if nlab:
            sizes = np.bincount(lab.ravel())[1:]
            inside = lab == (int(np.argmax(sizes)) + 1)
        got = int(inside.sum())
        if 5 <= got <= 150:
            ys, xs = np.nonzero(inside)
            best = inside[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            if lo <= got <= hi:
                break
        scale *= math.sqrt(area / max(got, 1))
    return best


def _place_hrfs(rng: np.random.Generator, img: np.ndarray, rows: dict[str, np.ndarray], n: int,
                occupied: np.ndarray, rpe_value: float) -> np.ndarray:
    """Draw up to ``n`` foci into ``img`` (mostly INL..ONL), returning their labels 1..k.

    Each focus is one 4-connected blob of 5..150 px (median ~17, as in the paper's data) whose
    pixels are exactly its label; about 40 % cast a shadow below."""
    h, w = img.shape
    labels = np.zeros((h, w), np.int32)
    taken = occupied.copy()
    probs = np.array([p for *_, p in _HRF_BANDS])
    k = 0
    for _ in range(n * 25):
        if k == n:
            break
        area = float(np.clip(rng.lognormal(math.log(17.0), 0.7), 5.0, 150.0))
        blob = _blob(rng, area)
        bh, bw = blob.shape
        top_key, bot_key, _ = _HRF_BANDS[rng.choice(len(_HRF_BANDS), p=probs)]
        thick = rows[bot_key] - rows[top_key]
        ok = np.nonzero(thick[bw : w - bw] >= min(0.7 * bh, 3.0))[0] + bw
        if ok.size == 0:
            top_key, bot_key = "OPL", "ELM"
            ok = np.arange(bw, max(bw + 1, w - bw))
        x = int(rng.choice(ok))
        lo, hi = rows[top_key][x] + bh / 2, rows[bot_key][x] - bh / 2
        yc = rng.uniform(lo, hi) if hi > lo else 0.5 * (lo + hi)
        y0, x0 = int(round(yc - bh / 2)), x - bw // 2
        if y0 < 1 or y0 + bh >= h - 1 or x0 < 0 or x0 + bw > w:
            continue
        win = (slice(y0, y0 + bh), slice(x0, x0 + bw))
        if ((taken[win] & blob).any() or y0 + bh > rows["RPE"][x0 : x0 + bw].min()
                or y0 < rows["ILM"][x0 : x0 + bw].max() + 1):
            continue
        k += 1
        labels[win][blob] = k
        core = ndi.distance_transform_edt(np.pad(blob, 1))[1:-1, 1:-1]
        peak = rpe_value + rng.uniform(-20.0, 15.0)  # about as bright as the RPE, centre brightest
        img[win][blob] = peak - 20.0 * (1.0 - core[blob] / core.max())
        taken[max(0, y0 - 2) : y0 + bh + 2, max(0, x0 - 2) : x0 + bw + 2] = True
        if rng.random() < 0.4:  # back-shadowing: the focus blocks light, as dense HRFs do
            starts = np.full(w, h, np.float32)
            starts[x0 : x0 + bw] = y0 + bh - np.argmax(blob[::-1], axis=0)
            _shadow(img, x0 + (bw - 1) / 2, bw / 2 - 0.3, starts, rng.uniform(10.0, 30.0))
    return labels


def _lateral_gain(rng: np.random.Generator, w: int) -> np.ndarray:
    """Slow left-right brightness drift plus per-column flicker, as in averaged Spectralis scans."""
    knots = rng.normal(0.0, 5.0, 6)
    drift = np.interp(np.linspace(0, 5, w), np.arange(6), knots)
    edge = np.minimum(np.arange(w), np.arange(w)[::-1]) / max(1.0, 0.04 * w)
    flicker = ndi.gaussian_filter1d(rng.normal(0.0, 1.5, w), 0.7)
    return (drift + flicker - 8.0 * np.clip(1.0 - edge, 0.0, 1.0)).astype(np.float32)


def _to_display(rng: np.random.Generator, mean: np.ndarray, contrast: np.ndarray, eye: _Eye,
                hrf: np.ndarray) -> np.ndarray:
    """Speckle in linear reflectivity plus a depth-fading noise floor, then the display curve.

    The speckle is ``1 - c + c G`` with G the cube of smoothed exponential speckle (grain about
    2 px): as in averaged Spectralis frames, sparse bright grains (long bright tail) sit on a floor
    (short dark tail). ``c`` is about 0.55 in the granular inner retina, less in the ONL."""
    h, w = mean.shape
    e = rng.standard_exponential((h, w), dtype=np.float32)
    e = ndi.gaussian_filter(e, (1.0, 0.8), truncate=3.0)
    g = e * e * e
    g /= g[::3, ::3].mean()
    c = contrast * np.float32(eye.speckle)
    c[hrf] *= np.float32(0.7)  # foci look a little more uniform than the surrounding tissue
    sp = 1.0 - c + c * g
    lin = np.maximum(np.exp(mean * np.float32(_B / 255.0) - np.float32(_A)) - np.float32(_OFF), 0.0)
    depth = np.arange(h, dtype=np.float32)[:, None] * np.float32(eye.ax_mm)
    floor = np.float32(eye.bg) * np.exp(-depth / np.float32(0.4))
    noise = np.roll(g, (h // 3, w // 2), axis=(0, 1)) - np.float32(0.13)  # many exact zeros, as real
    lin = lin * sp + floor * np.maximum(noise, 0.0)
    out = display_from_linear(lin)
    return np.clip(ndi.gaussian_filter(out, 0.5, truncate=2.5), 0.0, 255.0).astype(np.float32)


def _render(rng: np.random.Generator, eye: _Eye, h: int, w: int, z: float, n_hrf: int) -> SyntheticBScan:
    """Render the B-scan of ``eye`` at en-face position ``z`` (mm) with ``n_hrf`` foci."""
    x_mm = np.arange(w, dtype=np.float64) * eye.lat_mm
    dru = _drusen_height(eye, x_mm, z)
    bounds = _boundaries(eye, x_mm, z, dru)
    rows = {k: (v / eye.ax_mm).astype(np.float32) for k, v in bounds.items()}
    mean, contrast = _mean_image(eye, rows, (dru / eye.ax_mm).astype(np.float32), h)
    _add_choroid(rng, mean, eye, rows)
    occupied = _add_vessels(rng, mean, eye, rows, x_mm, z)
    labels = _place_hrfs(rng, mean, rows, n_hrf, occupied, eye.values["rpe"])
    _add_choroid_decoys(rng, mean, rows, eye.values["rpe"])
    mean += _lateral_gain(rng, w)[None, :] * (mean > 0)
    image = _to_display(rng, mean, contrast, eye, labels > 0)
    return SyntheticBScan(image=image, hrf_labels=labels, layers=rows)


def _add_choroid_decoys(rng: np.random.Generator, img: np.ndarray, rows: dict[str, np.ndarray], rpe_value: float) -> None:
    """Bright stroma patches just below Bruch's membrane, as real choroids show between vessel
    lumens. They look like foci but lie outside the retina, so they are never HRF: without them
    a classifier learns "any small bright spot" and flags healthy real scans."""
    h, w = img.shape
    if rng.random() > 0.7:
        return
    for _ in range(int(rng.integers(1, 6))):
        blob = _blob(rng, float(np.clip(rng.lognormal(math.log(30.0), 0.6), 8.0, 150.0)))
        bh, bw = blob.shape
        x0 = int(rng.integers(0, max(1, w - bw)))
        below = rows["BM"][x0 : x0 + bw].max() + rng.uniform(3.0, 45.0)
        y0 = int(round(below))
        if y0 + bh >= h or x0 + bw > w:
            continue
        soft = ndi.gaussian_filter(blob.astype(np.float32), 0.8)
        level = np.float32(rng.uniform(0.5, 0.9) * rpe_value)
        win = img[y0 : y0 + bh, x0 : x0 + bw]
        win += soft * np.maximum(level - win, 0.0)


def _pit_offset(pit_depth: float, eye_w: float, eye_p: float) -> float:
    """Distance (mm) of the B-scan from the foveal centre that gives a pit of relative depth ``pit_depth``."""
    if pit_depth >= 1.0:
        return 0.0
    if pit_depth <= 1e-3:
        return 3.0 * eye_w
    return eye_w * (-math.log(pit_depth)) ** (1.0 / eye_p)


def synth_bscan(
    rng: np.random.Generator,
    *,
    height: int = 496,
    width: int = 512,
    n_hrf: int | None = None,
    fovea_x: float | None = None,
    pit_depth: float = 1.0,
    lateral_mm: float = 0.01182,
    axial_mm: float = 0.00387,
) -> SyntheticBScan:
    """One Spectralis-like B-scan of a right eye with ``n_hrf`` foci (random when None: 0 with
    probability 0.4, else 1..7). Mirror it for a left eye.

    ``fovea_x`` is the foveal column (random near the middle when None); ``pit_depth`` in 0..1 scales
    the foveal dip (1: the scan passes through the foveal centre, 0: no pit). Images too small for
    the anatomy at the given spacing (e.g. 64x96 test images) get a coarser spacing, and may hold
    fewer foci than asked when there is no room.
    """
    lat, ax = _spacing(height, width, lateral_mm, axial_mm)
    if n_hrf is None:
        n_hrf = 0 if rng.random() < 0.4 else int(rng.integers(1, 8))
    n = int(n_hrf)
    if n < 0:
        raise ValueError(f"n_hrf must be >= 0, got {n}")
    fx = rng.uniform(0.35, 0.65) * width if fovea_x is None else float(fovea_x)
    eye = _make_eye(rng, height, width, lat, ax, fx * lat, 0.0, None, float(pit_depth))
    return _render(rng, eye, height, width, 0.0, n)


def synth_volume_truth(
    rng: np.random.Generator,
    *,
    n_bscans: int,
    height: int = 496,
    width: int = 512,
    hrf_prevalence: float = 0.4,
    max_hrf: int = 6,
) -> SyntheticVolume:
    """A macular volume scan of a right eye: ``n_bscans`` parallel B-scans over a square field, with
    the anatomy it was drawn from.

    Anatomy (curvature, layers, pit, vessels, drusen) is continuous across B-scans and the fovea
    lies near the middle B-scan. Each B-scan holds HRFs with probability ``hrf_prevalence``
    (1..``max_hrf`` of them). Images are float32 ``(n, H, W)``, labels int32 ``(n, H, W)`` with ids
    1..k per B-scan; the layers are the true boundary rows of every LAYER_NAMES key, and the fovea is
    where the pit is centred, as fractional B-scan index (B-scans are evenly spaced) and column.
    """
    if n_bscans < 1:
        raise ValueError(f"n_bscans must be >= 1, got {n_bscans}")
    if not 0.0 <= hrf_prevalence <= 1.0 or max_hrf < 1:
        raise ValueError(f"need 0 <= hrf_prevalence <= 1 and max_hrf >= 1, got {hrf_prevalence}, {max_hrf}")
    lat, ax = _spacing(height, width, 0.01182, 0.00387)
    field_z = width * lat if n_bscans > 1 else 0.0
    fovea_x = rng.uniform(0.42, 0.58) * width * lat
    fovea_z = field_z * float(np.clip(rng.normal(0.5, 0.03), 0.45, 0.55))
    eye = _make_eye(rng, height, width, lat, ax, fovea_x, field_z, fovea_z)
    images = np.empty((n_bscans, height, width), np.float32)
    labels = np.empty((n_bscans, height, width), np.int32)
    layers = {name: np.empty((n_bscans, width), np.float32) for name in LAYER_NAMES}
    for i, z in enumerate(np.linspace(0.0, field_z, n_bscans)):
        n = int(rng.integers(1, max_hrf + 1)) if rng.random() < hrf_prevalence else 0
        scan = _render(rng, eye, height, width, float(z), n)
        images[i], labels[i] = scan.image, scan.hrf_labels
        for name, rows in layers.items():
            rows[i] = scan.layers[name]
    fovea_bscan = fovea_z / field_z * (n_bscans - 1) if field_z > 0 else 0.0
    # column c lies at c * lat mm (see _render)
    return SyntheticVolume(images, labels, layers, float(fovea_bscan), float(fovea_x / lat))


def synth_volume(
    rng: np.random.Generator,
    *,
    n_bscans: int,
    height: int = 496,
    width: int = 512,
    hrf_prevalence: float = 0.4,
    max_hrf: int = 6,
) -> tuple[np.ndarray, np.ndarray]:
    """The images and HRF labels of :func:`synth_volume_truth` (same random draws, same volume)."""
    truth = synth_volume_truth(rng, n_bscans=n_bscans, height=height, width=width, hrf_prevalence=hrf_prevalence,
                               max_hrf=max_hrf)
    return truth.images, truth.labels
