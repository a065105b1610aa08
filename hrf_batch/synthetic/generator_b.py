"""Generator B: a second, independent synthetic Spectralis OCT generator with HRF ground truth.

Why a second one: a classifier trained on one synthetic look learns that look. Generator B shares
no code or parameters with generator A (own layer model, own speckle and display model, own
pathology code) and randomises widely, so training on one and testing on the other measures
robustness: other band reflectivities and thicknesses, correlated speckle of varying strength and
grain, blur, gamma/contrast/brightness, tilted and curved retinas at any height in the frame,
vessels with shadows, vitreous floaters, drusen and PEDs that bend the outer retina, intraretinal
cysts with bright walls, hard exudates and a textured choroid.

Geometry: the B-scan spans 6 mm (lateral spacing ``6 / width`` mm, widths 256..1536) and
``height`` rows of 3.87 um (heights 256..1024). One eye model per volume, so B-scans are
anatomically continuous; B-scan ``i`` lies at slow-axis position ``5.8 * i / (n - 1)`` mm and the
fovea lies near the middle B-scan. Right eye (nasal to the right); mirror it for a left eye.

HRF definition used for the labels (clinical): discrete, well-circumscribed foci of 5..150 px at
Spectralis spacing (11.72 x 3.87 um; the pixel bounds scale with the pixel area at other widths,
see :func:`hrf_area_bounds`), inside the neurosensory retina (every pixel between the ILM and the
RPE rows; mostly INL, OPL and ONL, a sixth in GCL/IPL, some in the outer retina over drusen;
median area about 17 px at Spectralis spacing, as graded HRF are), about
as reflective as the RPE band (a minority only a little brighter than their surround: hard
positives), round, oval, irregular or small clusters, some casting a faint shadow; 0..20 per
B-scan. Not HRF, marked in ``hard_negatives`` (see :data:`DECOY_KINDS`): vessel cross-sections
in the inner retina (with shadows), vitreous floaters above the ILM, hard exudates (confluent,
larger than any HRF, in the OPL, shadowing), bright cyst walls, drusen/PED (under the RPE), and
bright choroidal stroma.

Layer boundaries (rows per column, float32, top to bottom) use the same keys as generator A:
``ILM``; ``RNFL``, ``GCL``, ``IPL``, ``INL``, ``OPL`` (outer edge of that layer, so ``INL`` is
the INL/OPL boundary); ``ELM``; ``EZ`` (inner edge of the ellipsoid zone); ``IZ`` (inner edge
of the interdigitation zone); ``RPE`` (inner edge of the RPE, lifted by drusen/PED); ``BM``;
``CSI`` (choroid-sclera interface).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

FIELD_MM = 6.0
AXIAL_MM = 0.00387
SLOW_FIELD_MM = 5.8
REF_PIXEL_UM2 = 11.72 * 3.87  # one pixel of a 512-wide Spectralis B-scan
HRF_REF_AREA = (5.0, 150.0)   # HRF area bounds in those reference pixels
DECOY_KINDS = {1: "vessel", 2: "floater", 3: "exudate", 4: "cyst wall", 5: "drusen", 6: "choroid"}
LAYER_KEYS = ("ILM", "RNFL", "GCL", "IPL", "INL", "OPL", "ELM", "EZ", "IZ", "RPE", "BM", "CSI")

_K = 8.3 / 255.0   # nepers per display unit of this generator's log display: D = ln(1 + I) / _K
_LOG_MEAN = (0.0, -0.5772157, 0.4227843 - math.log(2), 0.9227843 - math.log(3), 1.2561177 - math.log(4))
_LOG_STD = (1.0, 1.2825498, 0.8031966, 0.6216998, 0.5272039)  # of ln S for L-look speckle with mean 1
# Bands between the boundaries, top to bottom (``sub``: drusen/PED material under the lifted RPE),
# their mean display levels (read off a real Spectralis line scan, jittered per eye) and how
# strongly each is speckled (first entry: above the ILM, last: the choroid below BM).
_BANDS = ("rnfl", "gcl", "ipl", "inl", "opl", "onl", "elm", "myo", "ez", "os", "iz", "gap", "rpe", "sub", "bm")
_LEVEL = np.array([178, 126, 144, 104, 138, 72, 116, 86, 228, 152, 206, 172, 242, 130, 208], np.float32)
_SPECKLE = np.array([1.0, 0.85, 1.0, 1.0, 0.95, 1.0, 0.8, 0.7, 0.75, 0.7, 0.8, 0.7, 0.8, 0.65, 0.8, 0.7, 1.0],
                    np.float32)
_GRID = 14  # en-face control points per axis for slow anatomical variation


@dataclass(frozen=True)
class SyntheticBScan:
    """One generator-B B-scan: display image, HRF ids, decoy kinds, true layer boundary rows."""

    image: np.ndarray           # (H, W) float32, 0..255
    hrf_labels: np.ndarray      # (H, W) int32, 0 background, 1..k one id per HRF
    hard_negatives: np.ndarray  # (H, W) uint8, DECOY_KINDS code, 0 elsewhere
    layers: dict[str, np.ndarray]

    @property
    def n_hrf(self) -> int:
        return int(self.hrf_labels.max(initial=0))


@dataclass(frozen=True, eq=False)
class VolumeTruth:
    """One generator-B volume with the anatomy it was drawn from (the study writer turns it into the
    ground-truth type; this module imports nothing of hrf-batch, to stay independent of generator A)."""

    images: np.ndarray            # (n, H, W) float32, 0..255
    labels: np.ndarray            # (n, H, W) int32, HRF ids 1..k per B-scan
    layers: dict[str, np.ndarray]  # every LAYER_KEYS boundary, float32 (n, W) rows as rendered
    fovea_bscan: float            # foveal centre: fractional B-scan index ...
    fovea_col: float              # ... and column


@dataclass(frozen=True)
class _Look:
    """Scanner and display settings of one volume (domain randomisation)."""

    speckle: float               # spread of the speckle on the display scale (std, display units)
    looks: int                   # independent speckle patterns averaged: 1 raw .. 4 smooth
    grain: tuple[float, float]   # speckle correlation (rows, cols) in px
    blur: tuple[float, float]
    gamma: float
    contrast: float
    brightness: float
    floor: float                 # display level of the noise floor at the top row
    floor_decay: float           # mm
    floor_var: float
    flicker: float
    texture: float               # tissue structure below the speckle scale (display units)
    rough: float                 # small-scale waviness of the retinal boundaries (px)
    choroid: tuple[float, float, float, float]  # top level, decay (fraction of its thickness), lumens, sclera


@dataclass
class _Eye:
    """Anatomy of one eye in mm on the en-face field x in [0, 6], z in [0, 5.8]."""

    h: int
    w: int
    lat: float
    fx: float
    fz: float
    bm0: float
    tilt: tuple[float, float]
    curv: tuple[float, float]
    thick: dict[str, float]
    pit: tuple[float, float, float]  # depth 0..1, width mm, power
    levels: np.ndarray               # (15,) display level per band
    grid: np.ndarray                 # (7 + 1 + 15, G, G) smooth en-face modulations
    drusen: np.ndarray               # (n, 4) cx, cz, radius, height
    ped: np.ndarray                  # (m, 6) cx, cz, rx, rz, height, inner level
    cysts: np.ndarray                # (n, 6) cx, cz, rx, rz, r_ax, depth fraction in INL..ELM
    exudates: np.ndarray             # (n, 6) cx, cz, rx, rz, r_ax, offset (mm) from mid-OPL
    floaters: np.ndarray             # (n, 7) cx, cz, rx, rz, r_ax, height above ILM, level
    vessels: np.ndarray              # (n, 6) x at z0, z0, slope dx/dz, bend, diameter, depth fraction
    look: _Look


def hrf_area_bounds(width: int) -> tuple[int, int]:
    """HRF area bounds in pixels for a B-scan ``width`` A-scans wide (6 mm, 3.87 um rows)."""
    scale = REF_PIXEL_UM2 / (FIELD_MM / width * 1000.0 * AXIAL_MM * 1000.0)
    return max(3, round(HRF_REF_AREA[0] * scale)), round(HRF_REF_AREA[1] * scale)


def check_size(height: int, width: int) -> None:
    """Refuse sizes the anatomy is not laid out for (ValueError), before any work is done."""
    if not (256 <= height <= 1024 and 256 <= width <= 1536):
        raise ValueError(f"generator b needs height 256..1024 and width 256..1536 pixels, got {height}x{width}")


def _smooth(rng: np.random.Generator, shape: tuple[int, int], corr: tuple[float, float]) -> np.ndarray:
    """Unit-variance random field with correlation lengths ``corr`` (px): coarse grid, cubic upsampling."""
    gy, gx = (max(3, int(math.ceil(s / max(c, 1.0))) + 3) for s, c in zip(shape, corr))
    coarse = rng.standard_normal((gy, gx)).astype(np.float32)
    f = ndi.zoom(coarse, ((shape[0] + 2 * corr[0]) / gy, (shape[1] + 2 * corr[1]) / gx), order=3, prefilter=False)
    f = f[: shape[0], : shape[1]]
    return (f - f.mean()) / (f.std() + 1e-6)


def _draw_look(rng: np.random.Generator, lat: float) -> _Look:
    """Scanner settings: strong or weak, fine or coarse speckle; blur; tone curve; noise floor."""
    return _Look(
        speckle=float(rng.uniform(9.0, 18.0)), looks=int(rng.integers(1, 5)),
        grain=(float(rng.uniform(0.5, 1.3)), float(rng.uniform(0.004, 0.013) / lat)),
        blur=(float(rng.uniform(0.35, 1.1)), float(rng.uniform(0.002, 0.008) / lat)),
        gamma=float(rng.uniform(0.85, 1.18)), contrast=float(rng.uniform(0.86, 1.1)),
        brightness=float(rng.uniform(-5.0, 12.0)),
        floor=float(rng.uniform(6.0, 24.0)), floor_decay=float(rng.uniform(0.35, 1.3)),
        floor_var=float(rng.uniform(0.1, 0.5)), flicker=float(rng.uniform(0.5, 3.0)), texture=float(rng.uniform(3.0, 10.0)),
        rough=float(rng.uniform(0.3, 1.5)),
        choroid=(float(rng.uniform(120.0, 180.0)), float(rng.uniform(0.3, 0.8)),
                 float(rng.uniform(0.5, 0.8)), float(rng.uniform(8.0, 30.0))),
    )


def _draw_pathology(rng: np.random.Generator, fx: float, fz: float) -> dict[str, np.ndarray]:
    """Eye-level lesions and decoys laid out in 3-D, so neighbouring B-scans cut the same ones."""
    def near(n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
        return (np.clip(fx + rng.normal(0.0, spread, n), 0.1, FIELD_MM - 0.1),
                np.clip(fz + rng.normal(0.0, spread, n), 0.0, SLOW_FIELD_MM))

    n = rng.poisson(9) + 2 if rng.random() < 0.45 else 0
    r = rng.uniform(0.05, 0.33, n)
    drusen = np.column_stack([*near(n, 1.2), r, np.minimum(rng.uniform(0.015, 0.11, n), 0.45 * r)])
    m = int(rng.random() < 0.16)
    ped = np.column_stack([*near(m, 0.5), rng.uniform(0.35, 1.2, (m, 2)), rng.uniform(0.07, 0.28, m),
                           np.where(rng.random(m) < 0.4, rng.uniform(12.0, 45.0, m), rng.uniform(85.0, 150.0, m))])
    n = rng.integers(3, 20) if rng.random() < 0.3 else 0
    cysts = np.column_stack([*near(n, 0.9), rng.uniform(0.04, 0.2, n), rng.uniform(0.05, 0.4, n), rng.uniform(0.015, 0.11, n),
                             rng.choice([0.15, 0.65], n) + rng.uniform(-0.1, 0.25, n)])
    parts = []
    for _ in range(rng.integers(1, 5) if rng.random() < 0.3 else 0):
        cx, cz = near(1, 1.1)
        k = int(rng.integers(2, 8))
        parts.append(np.column_stack([cx + rng.normal(0, 0.12, k), cz + rng.normal(0, 0.25, k), rng.uniform(0.05, 0.15, k),
                                      rng.uniform(0.1, 0.5, k), rng.uniform(0.01, 0.03, k), rng.normal(0.0, 0.006, k)]))
    exudates = np.concatenate(parts) if parts else np.zeros((0, 6))
    n = rng.integers(3, 16) if rng.random() < 0.6 else 0
    floaters = np.column_stack([rng.uniform(0, FIELD_MM, n), rng.uniform(0, SLOW_FIELD_MM, n), rng.uniform(0.012, 0.07, n),
                                rng.uniform(0.05, 0.6, n), rng.uniform(0.006, 0.03, n), rng.uniform(0.03, 0.5, n),
                                rng.uniform(50.0, 210.0, n)])
    n = int(rng.integers(6, 15))
    diam = rng.uniform(0.02, 0.07, n)
    x0 = rng.uniform(0, FIELD_MM, n)
    diam += 0.03 * np.clip(x0 - fx, 0.0, 3.0) / 3.0  # larger towards the disc (nasal, right)
    vessels = np.column_stack([x0, rng.uniform(0, SLOW_FIELD_MM, n), rng.normal(0, 0.8, n), rng.normal(0, 0.08, n),
                               diam, rng.uniform(0.1, 0.6, n)])
    return {"drusen": drusen, "ped": ped, "cysts": cysts, "exudates": exudates, "floaters": floaters, "vessels": vessels}


def _draw_eye(rng: np.random.Generator, height: int, width: int, z_span: np.ndarray) -> _Eye:
    """One eye: thicknesses, reflectivities, shape, lesions; placed so the retina stays in the frame
    at every slow-axis position in ``z_span``."""
    fx = FIELD_MM / 2 + rng.normal(0.0, 0.35)
    fz = SLOW_FIELD_MM / 2 + rng.normal(0.0, 0.15)
    thick = {"rnfl": rng.uniform(0.012, 0.035), "rnfl_nasal": rng.uniform(0.004, 0.02), "gcl": rng.uniform(0.028, 0.055),
             "ipl": rng.uniform(0.028, 0.045), "inl": rng.uniform(0.026, 0.042), "opl": rng.uniform(0.016, 0.034),
             "onl": rng.uniform(0.045, 0.09), "onl_fov": rng.uniform(0.02, 0.07), "is": rng.uniform(0.018, 0.028),
             "os": rng.uniform(0.028, 0.042), "os_fov": rng.uniform(0.0, 0.02), "rpe": rng.uniform(0.014, 0.026),
             "choroid": rng.uniform(0.14, 0.4), "elm_t": rng.uniform(0.003, 0.006), "ez_t": rng.uniform(0.007, 0.013),
             "iz_t": rng.uniform(0.005, 0.01), "gap": rng.uniform(0.002, 0.006), "bm_t": rng.uniform(0.003, 0.005)}
    levels = _LEVEL + rng.normal(0.0, 10.0) + rng.normal(0.0, 14.0, _LEVEL.size).astype(np.float32)
    # keep the clinical brightness order: RNFL > GCL/IPL > INL > ONL, OPL > INL, RPE about the brightest
    levels[0] = max(levels[0], levels[1] + 12.0, levels[2] + 8.0)
    levels[3] = min(levels[3], levels[1] - 10.0, levels[2] - 15.0, levels[4] - 15.0)
    levels[5] = min(levels[5], levels[3] - 12.0)
    levels[12] = max(levels[12], levels[8] - 12.0)
    levels = np.clip(levels, 35.0, 248.0)
    amp = np.concatenate([rng.uniform(0.03, 0.1, 7), [rng.uniform(0.0, 0.012)], rng.uniform(2.0, 8.0, 15)])
    grid = ndi.gaussian_filter(rng.standard_normal((amp.size, _GRID, _GRID)), (0, 1.2, 1.2), mode="nearest")
    grid = grid / (grid.std(axis=(1, 2), keepdims=True) + 1e-9) * amp[:, None, None]
    grid[:7] += 1.0
    eye = _Eye(h=height, w=width, lat=FIELD_MM / width, fx=fx, fz=fz, bm0=0.0,
               tilt=(float(np.clip(rng.normal(0, 0.035), -0.09, 0.09)), float(rng.normal(0, 0.02))),
               curv=(float(rng.uniform(-0.004, 0.03)), float(rng.uniform(-0.004, 0.025))), thick=thick,
               pit=(float(rng.choice([rng.uniform(0.5, 0.85), rng.uniform(0.9, 1.0)], p=[0.15, 0.85])),
                    float(rng.uniform(0.35, 0.65)), float(rng.uniform(1.8, 3.0))),
               levels=levels.astype(np.float32), grid=grid.astype(np.float32), look=_draw_look(rng, FIELD_MM / width),
               **_draw_pathology(rng, fx, fz))
    _fit_in_frame(rng, eye, z_span)
    return eye


def _fit_in_frame(rng: np.random.Generator, eye: _Eye, z_span: np.ndarray) -> None:
    """Choose the retina's depth; flatten tilt, curvature and PEDs until it fits the frame."""
    depth = eye.h * AXIAL_MM
    x = np.linspace(0.0, FIELD_MM, 41)
    zs = np.linspace(z_span.min(), z_span.max(), 17)
    for _ in range(8):
        eye.bm0 = 0.0
        rows = [_layers(eye, x, float(z)) for z in zs]
        top = min(float(r["ILM"].min()) for r in rows)
        bottom = max(float(r["BM"].max()) for r in rows)
        lo = 0.05 * depth + 0.02 - top
        hi = depth - max(0.08, 0.12 * depth) - bottom
        if hi >= lo:
            eye.bm0 = lo + (hi - lo) * float(rng.beta(1.6, 2.4))
            return
        eye.tilt = (eye.tilt[0] * 0.5, eye.tilt[1] * 0.5)
        eye.curv = (eye.curv[0] * 0.5, eye.curv[1] * 0.5)
        eye.ped[:, 4] *= 0.6
    eye.bm0 = lo


def _en_face(eye: _Eye, x: np.ndarray, z: float) -> np.ndarray:
    """Sample the smooth en-face modulations along a B-scan: (channels, W)."""
    gx = (x + 0.5) / (FIELD_MM + 1.0) * (_GRID - 1)
    gz = np.full_like(gx, (z + 0.5) / (SLOW_FIELD_MM + 1.0) * (_GRID - 1))
    ch = np.arange(eye.grid.shape[0], dtype=np.float64)[:, None]
    coords = np.stack(np.broadcast_arrays(ch, gz[None, :], gx[None, :]))
    return ndi.map_coordinates(eye.grid, coords, order=1, mode="nearest")


def _elevation(eye: _Eye, x: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RPE elevation (mm) per column from drusen and from PED, and the sub-RPE display level."""
    dru = np.zeros_like(x)
    for cx, cz, r, top in eye.drusen:
        q = 1.0 - ((x - cx) ** 2 + (z - cz) ** 2) / r**2
        if q.max() > 0:
            dru = np.maximum(dru, top * np.clip(q, 0.0, None) ** 0.75)
    ped = np.zeros_like(x)
    level = np.full_like(x, 0.0)
    for cx, cz, rx, rz, top, inner in eye.ped:
        q = 1.0 - ((x - cx) / rx) ** 2 - ((z - cz) / rz) ** 2
        if q.max() > 0:
            hgt = top * np.clip(q, 0.0, None) ** 0.4
            level = np.where(hgt > ped, inner, level)
            ped = np.maximum(ped, hgt)
    return dru, ped, level


def _layers(eye: _Eye, x: np.ndarray, z: float, mod: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Boundary depths (mm from the top) per column: outer retina follows the (lifted) RPE, the
    ONL absorbs most of a lift, the inner layers thin to nothing in the foveal pit."""
    t = eye.thick
    g = _en_face(eye, x, z) if mod is None else mod
    dx, dz = x - eye.fx, z - eye.fz
    r = np.hypot(dx, dz)
    inner = 1.0 - eye.pit[0] * np.exp(-((r / eye.pit[1]) ** eye.pit[2]))
    para = np.exp(-(((r - 1.1) / 0.75) ** 2))
    fov = np.exp(-((r / 0.35) ** 2))
    dru, ped, _ = _elevation(eye, x, z)
    lift = np.maximum(dru, ped)
    bm = eye.bm0 + eye.tilt[0] * dx + eye.tilt[1] * dz - eye.curv[0] * dx**2 - eye.curv[1] * dz**2 + g[7]
    rpe = bm - t["rpe"] - lift
    ez = rpe - (t["os"] + t["os_fov"] * fov) * (1.0 - 0.45 * np.clip(lift / 0.1, 0.0, 1.0))
    elm = ez - t["is"]
    onl = (t["onl"] + t["onl_fov"] * fov) * g[5]
    opl = elm - np.maximum(onl - 0.65 * lift, 0.4 * onl)
    inl = opl - t["opl"] * (1.0 - 0.6 * (1.0 - inner)) * g[4]
    ipl = inl - t["inl"] * (1.0 + 0.35 * para) * inner * g[3]
    gcl = ipl - t["ipl"] * (1.0 + 0.15 * para) * inner * g[2]
    rnfl = gcl - t["gcl"] * (0.7 + 0.7 * para) * inner * g[1]
    arcade = np.clip(np.abs(dz) - 0.4, 0.0, 2.5) / 2.5
    ilm = rnfl - (t["rnfl"] + t["rnfl_nasal"] * np.clip(dx, 0.0, 3.0) + 0.012 * arcade) * inner * g[0]
    iz = rpe - t["gap"] - t["iz_t"]
    out = {"ILM": ilm, "RNFL": rnfl, "GCL": gcl, "IPL": ipl, "INL": inl, "OPL": opl, "ELM": elm, "EZ": ez,
           "IZ": np.maximum(iz, ez + t["ez_t"]), "RPE": rpe, "BM": bm, "CSI": bm + t["choroid"] * g[6]}
    stacked = np.maximum.accumulate(np.stack([out[k] for k in LAYER_KEYS]), axis=0)
    return dict(zip(LAYER_KEYS, stacked))


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """Window around an ellipse (clipped to the image, maybe empty) and the normalised radius
    squared ``q`` of each pixel in it: q <= 1 inside."""
    h, w = shape
    y0, y1 = max(0, int(cy - ry - 1)), min(h, int(cy + ry + 2))
    x0, x1 = max(0, int(cx - rx - 1)), min(w, int(cx + rx + 2))
    y1, x1 = max(y0, y1), max(x0, x1)
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry
    xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
    return (slice(y0, y1), slice(x0, x1)), yy * yy + xx * xx


def _shadow(shade: np.ndarray, c0: int, c1: int, start: np.ndarray | float, depth: float) -> None:
    """Light blocked above rows ``start`` in columns c0..c1: everything below gets darker."""
    h, w = shade.shape
    c0, c1 = max(0, c0), min(w, c1)
    if c1 <= c0:
        return
    y = np.arange(h, dtype=np.float32)[:, None]
    st = np.broadcast_to(np.asarray(start, np.float32), (c1 - c0,))
    shade[:, c0:c1] += depth * np.clip((y - st[None, :]) / 4.0, 0.0, 1.0)


def _bands(eye: _Eye, rows: dict[str, np.ndarray], lv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Layered mean image (display levels, anti-aliased edges) and the band index of every pixel."""
    h, w = eye.h, eye.w
    t = {k: v / AXIAL_MM for k, v in eye.thick.items()}
    edges = np.maximum.accumulate(np.stack([
        rows["ILM"], rows["RNFL"], rows["GCL"], rows["IPL"], rows["INL"], rows["OPL"],
        rows["ELM"] - t["elm_t"] / 2, rows["ELM"] + t["elm_t"] / 2, rows["EZ"], rows["EZ"] + t["ez_t"],
        rows["IZ"], rows["IZ"] + t["iz_t"], rows["RPE"], rows["RPE"] + t["rpe"], rows["BM"] - t["bm_t"], rows["BM"],
    ]), axis=0).astype(np.float32)
    r0, r1 = max(0, int(edges[0].min()) - 1), min(h, int(edges[-1].max()) + 2)
    steps = np.diff(np.vstack([np.zeros((1, w), np.float32), lv, np.zeros((1, w), np.float32)]), axis=0)
    y = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
    part = np.zeros((r1 - r0, w), np.float32)
    idx = np.zeros((r1 - r0, w), np.int8)
    for e, s in zip(edges, steps):
        part += s[None, :] * np.clip(y - e[None, :], 0.0, 1.0)
        idx += y > e[None, :]
    mean = np.zeros((h, w), np.float32)
    band = np.zeros((h, w), np.int8)
    mean[r0:r1], band[r0:r1], band[r1:] = part, idx, len(edges)
    return mean, band


def _choroid(rng: np.random.Generator, eye: _Eye, mean: np.ndarray, rows: dict[str, np.ndarray]) -> None:
    """Choroid under BM: bright stroma fading with depth around dark vessel lumens that grow from
    the choriocapillaris to Haller's layer, then a dim sclera."""
    h, w = mean.shape
    bm, csi = rows["BM"], rows["CSI"]
    top, bot = max(0, int(bm.min())), min(h, int(csi.max() + 0.35 / AXIAL_MM) + 1)
    if bot <= top:
        return
    level, decay, lum, sclera = eye.look.choroid
    y = np.arange(top, bot, dtype=np.float32)[:, None]
    dy = (y - bm[None, :]) * np.float32(AXIAL_MM)
    thick = ((csi - bm) * AXIAL_MM)[None, :]
    frac = np.clip(dy / thick, 0.0, 1.0)
    fine = _smooth(rng, (bot - top, w), (0.015 / AXIAL_MM, 0.05 / eye.lat))
    coarse = _smooth(rng, (bot - top, w), (0.045 / AXIAL_MM, 0.14 / eye.lat))
    field = (1.0 - frac) * fine + frac * coarse
    lumen = np.clip((field - 0.1) * 0.9, 0.0, 1.0) * np.clip((dy - 0.01) / 0.02, 0.0, 1.0)
    inside = np.clip((thick - dy) / 0.05 + 0.5, 0.0, 1.0)
    stroma = level * np.exp(-np.maximum(dy, 0.0) / (decay * thick)) * (1.0 - lum * lumen)
    deep = sclera * np.exp(-np.maximum(dy - thick, 0.0) / 0.1) * (1.0 + 0.15 * coarse)
    val = (inside * stroma + (1.0 - inside) * deep) * np.clip(y + 0.5 - bm[None, :], 0.0, 1.0)
    mean[top:bot] += val.astype(np.float32)


def _cut(center: float, radius: float, z: float) -> float:
    """Fraction of an object's radius that the B-scan plane at ``z`` cuts (0 when it misses)."""
    d = abs(z - center) / radius
    return math.sqrt(1.0 - d * d) if d < 1.0 else 0.0


def _floaters(eye: _Eye, z: float, rows: dict[str, np.ndarray], mean: np.ndarray, shade: np.ndarray,
              decoy: np.ndarray) -> None:
    """Vitreous floaters above the ILM (HRF-sized, sometimes as bright): faint shadows on the retina."""
    w = eye.w
    for cx, cz, ren, rz, rax, hgt, level in eye.floaters:
        s = _cut(cz, rz, z)
        col = cx / eye.lat
        rx, ry = max(0.7, ren * s / eye.lat), max(0.8, rax * s / AXIAL_MM)
        c0, c1 = max(0, int(col - rx - 1)), min(w, int(col + rx + 2))
        if s == 0.0 or c1 <= c0:
            continue
        cy = float(rows["ILM"][c0:c1].min()) - hgt / AXIAL_MM
        if cy - ry < 1 or cy + ry > rows["ILM"][c0:c1].min() - 2:
            continue
        win, q = _ellipse(mean.shape, cy, col, ry, rx)
        m = q <= 1.0
        mean[win][m] = np.maximum(mean[win][m], level * (1.0 - 0.3 * q[m]))
        decoy[win][m] = 2
        _shadow(shade, c0, c1, rows["ILM"][c0:c1], 0.06 * level)


def _cysts(rng: np.random.Generator, eye: _Eye, z: float, rows: dict[str, np.ndarray], lv: np.ndarray,
           mean: np.ndarray, decoy: np.ndarray, blocked: np.ndarray) -> None:
    """Intraretinal cysts in INL..ONL: dark round/oval spaces whose walls are partly bright."""
    for cx, cz, ren, rz, rax, frac in eye.cysts:
        s = _cut(cz, rz, z)
        col = cx / eye.lat
        c = int(np.clip(col, 0, eye.w - 1))
        top, bot = float(rows["IPL"][c]), float(rows["ELM"][c])
        ry, rx = min(rax * s / AXIAL_MM, (bot - top) / 2 - 2), ren * s / eye.lat
        if ry < 2.0 or rx < 1.5:
            continue
        cy = top + ry + 1 + float(np.clip(frac, 0, 1)) * (bot - top - 2 * ry - 2)
        win, q = _ellipse(mean.shape, cy, col, ry + 2, rx + 2)
        q = q * ((ry + 2) * (rx + 2)) / (ry * rx)  # normalise to the inner radii (approximately)
        inner, wall = q <= 1.0, (q > 1.0) & (np.sqrt(q) <= 1.0 + 1.6 / min(ry, rx))
        yy, xx = np.nonzero(wall)
        ang = np.arctan2(yy + win[0].start - cy, (xx + win[1].start - col) * ry / rx)
        bright = (0.5 + 0.5 * np.cos(ang - rng.uniform(0, 2 * math.pi))) ** 1.5
        base = mean[win][wall]
        mean[win][wall] = base + bright * rng.uniform(0.6, 1.0) * np.maximum(lv[12, c] - base, 0.0)
        mean[win][inner] = rng.uniform(15.0, 50.0)
        decoy[win][wall] = 4
        blocked[win] |= inner | wall


def _exudates(rng: np.random.Generator, eye: _Eye, z: float, rows: dict[str, np.ndarray], lv: np.ndarray,
              mean: np.ndarray, shade: np.ndarray, decoy: np.ndarray) -> None:
    """Hard exudates: confluent bright OPL deposits, always larger than any HRF, with shadows."""
    h, w = mean.shape
    mask = np.zeros((h, w), bool)
    for cx, cz, ren, rz, rax, off in eye.exudates:
        s = _cut(cz, rz, z)
        col = cx / eye.lat
        c = int(np.clip(col, 0, w - 1))
        if s == 0.0:
            continue
        mid = 0.5 * (rows["INL"][c] + rows["OPL"][c]) + off / AXIAL_MM
        win, q = _ellipse(mean.shape, float(mid), col, max(1.5, rax * s / AXIAL_MM), max(1.5, ren * s / eye.lat))
        mask[win] |= q <= 1.0
    if not mask.any():
        return
    y = np.arange(h)[:, None]
    mask &= (y >= rows["ILM"][None, :] + 2) & (y <= rows["ELM"][None, :] - 1)
    lab, n = ndi.label(mask)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    for k in np.nonzero(sizes[1:] >= 1.3 * hrf_area_bounds(w)[1])[0] + 1:
        ys, xs = np.nonzero(lab == k)
        mean[ys, xs] = lv[12, xs] + rng.uniform(-5.0, 15.0) + rng.normal(0.0, 6.0, ys.size)
        decoy[ys, xs] = 3
        bottom = np.full(w, -float(h), np.float32)
        np.maximum.at(bottom, xs, ys.astype(np.float32))
        c0, c1 = int(xs.min()), int(xs.max()) + 1
        start = np.where(bottom[c0:c1] >= 0, bottom[c0:c1] + 1, h)
        _shadow(shade, c0, c1, start, rng.uniform(15.0, 45.0))


def _vessels(rng: np.random.Generator, eye: _Eye, z: float, rows: dict[str, np.ndarray], lv: np.ndarray,
             mean: np.ndarray, shade: np.ndarray, decoy: np.ndarray, blocked: np.ndarray) -> None:
    """Superficial vessels (RNFL/GCL, continuous across B-scans) and deep-plexus capillary dots at
    the INL borders, all with shadows; plus thin capillary shadow stripes."""
    w = eye.w
    for x0, z0, slope, bend, diam, dfrac in eye.vessels:
        dz = z - z0
        col = (x0 + slope * dz + bend * dz * dz) / eye.lat
        if not 0 <= col < w or math.hypot(col * eye.lat - eye.fx, z - eye.fz) < 0.35:
            continue
        c = int(col)
        rx = min(diam * math.hypot(1.0, slope + 2 * bend * dz), 2 * diam) / 2 / eye.lat
        span = float(rows["IPL"][c] - rows["ILM"][c])
        ry = min(0.4 * diam / AXIAL_MM, 0.45 * span - 1)
        if ry < 1.0:
            continue
        cy = float(rows["ILM"][c]) + 1 + ry + dfrac * max(0.0, span - 2 * ry - 2)
        _vessel_dot(mean, shade, decoy, cy, col, ry, max(rx, 0.6), lv[0, c] + rng.uniform(-5, 20), 10 + 300 * diam)
    for _ in range(rng.poisson(2.5 * FIELD_MM)):
        c = int(rng.integers(2, w - 2))
        if math.hypot(c * eye.lat - eye.fx, z - eye.fz) < 0.4:
            continue
        edge = rows["IPL"][c] if rng.random() < 0.5 else rows["INL"][c]
        level = lv[4, c] + rng.uniform(5.0, 40.0)
        if blocked[max(0, int(edge) - 3) : int(edge) + 4, c - 2 : c + 3].any():
            continue  # not inside a cyst
        _vessel_dot(mean, shade, decoy, float(edge), c + 0.5, rng.uniform(0.8, 1.6),
                    max(0.6, 0.005 / eye.lat), level, rng.uniform(3.0, 10.0))
    for c in rng.integers(0, w, rng.poisson(w / 45)):
        _shadow(shade, int(c), int(c) + 1, rows["IPL"][c], rng.uniform(3.0, 12.0))


def _vessel_dot(mean: np.ndarray, shade: np.ndarray, decoy: np.ndarray, cy: float, cx: float, ry: float, rx: float,
                level: float, shadow: float) -> None:
    """One vessel cross-section: bright wall, darker core when large, shadow below."""
    win, q = _ellipse(mean.shape, cy, cx, ry, rx)
    m = q <= 1.0
    core = 0.75 + 0.25 * q[m] if ry > 4 else 1.0
    mean[win][m] = level * core
    decoy[win][m] = 1
    _shadow(shade, int(cx - 0.9 * rx), int(cx + 0.9 * rx) + 1, cy + ry, shadow)


def _choroid_spots(rng: np.random.Generator, rows: dict[str, np.ndarray], lv: np.ndarray, mean: np.ndarray,
                   decoy: np.ndarray, lat: float) -> None:
    """Bright stroma between choroidal vessels: HRF-like dots, but outside the retina."""
    h, w = mean.shape
    for _ in range(rng.integers(0, 6) if rng.random() < 0.6 else 0):
        c = int(rng.integers(0, w))
        cy = float(rows["BM"][c]) + rng.uniform(4.0, 30.0)
        ry = rng.uniform(1.5, 4.0)
        if cy + ry >= h - 1:
            continue
        win, q = _ellipse(mean.shape, cy, c + 0.5, ry, ry * rng.uniform(0.5, 1.5) * AXIAL_MM / lat + 0.5)
        m = q <= 1.0
        mean[win][m] = np.maximum(mean[win][m], rng.uniform(0.7, 1.0) * lv[12, c])
        decoy[win][m] = 6


def _blob(rng: np.random.Generator, area: float, ratio: float, lo: int, hi: int) -> np.ndarray | None:
    """A 4-connected focus of ``lo``..``hi`` px near ``area``: round, oval, irregular or a small
    cluster of touching dots. ``ratio`` = axial / lateral spacing (round in mm, not in px)."""
    style = int(rng.choice(4, p=[0.35, 0.25, 0.22, 0.18]))
    aspect = (rng.uniform(0.8, 1.25), rng.choice([rng.uniform(1.3, 2.3), rng.uniform(0.5, 0.75)]),
              rng.uniform(0.7, 1.5), rng.uniform(0.8, 1.3))[style]
    n_lobes = int(rng.integers(2, 4)) if style == 3 else 1
    harm = rng.uniform(0.0, 0.25, 3) if style == 2 else np.zeros(3)
    phase = rng.uniform(0.0, 2 * math.pi, 3)
    angles = rng.uniform(0.0, 2 * math.pi, n_lobes)
    sub = rng.uniform(-0.5, 0.5, 2)
    scale = 1.0
    for _ in range(7):
        ry = math.sqrt(scale * area / n_lobes * (1.3 if n_lobes > 1 else 1.0) / (math.pi * ratio * aspect))
        rx = ratio * aspect * ry
        ny, nx = int(math.ceil(ry * (2.6 if n_lobes > 1 else 1.2))) + 2, int(math.ceil(rx * (2.6 if n_lobes > 1 else 1.2))) + 2
        yy, xx = np.mgrid[-ny : ny + 1, -nx : nx + 1].astype(np.float32)
        inside = np.zeros(yy.shape, bool)
        for i, a in enumerate(angles):
            oy, ox = (0.0, 0.0) if i == 0 else (1.1 * ry * math.sin(a), 1.1 * rx * math.cos(a))
            v, u = (yy - oy - sub[0]) / ry, (xx - ox - sub[1]) / rx
            theta = np.arctan2(v, u)
            rad = 1.0 + sum(hk * np.cos((k + 2) * theta + pk) for k, (hk, pk) in enumerate(zip(harm, phase)))
            inside |= v * v + u * u <= rad * rad
        lab, n = ndi.label(inside)
        if n:
            inside = lab == int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
        got = int(inside.sum())
        if lo <= got <= hi:
            ys, xs = np.nonzero(inside)
            return inside[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        scale *= area / max(got, 1)
    return None


_HRF_SITES = (("RNFL", "IPL", 0.16), ("IPL", "INL", 0.25), ("INL", "OPL", 0.17), ("OPL", "ELM", 0.29),
              ("ELM", "RPE", 0.13))


def _place_hrfs(rng: np.random.Generator, eye: _Eye, rows: dict[str, np.ndarray], lv: np.ndarray, n: int,
                mean: np.ndarray, pmap: np.ndarray, shade: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    """Draw up to ``n`` HRFs (labels 1..k) away from every decoy: mostly INL/OPL/ONL, some over drusen."""
    h, w = mean.shape
    labels = np.zeros((h, w), np.int32)
    lo, hi = hrf_area_bounds(w)
    ref = REF_PIXEL_UM2 / (eye.lat * 1e3 * AXIAL_MM * 1e3)
    outer = np.nonzero(rows["BM"] - rows["RPE"] - eye.thick["rpe"] / AXIAL_MM > 4.0)[0]
    probs = np.array([p for *_, p in _HRF_SITES]) * ([1, 1, 1, 1, 1] if outer.size else [1, 1, 1, 1, 0])
    cluster = n > 6 and rng.random() < 0.5
    centre, k = rng.uniform(0.2, 0.8) * w, 0
    for _ in range(40 * n):
        if k == n:
            break
        blob = _blob(rng, float(np.clip(rng.lognormal(math.log(16.0 * ref), 0.8), lo, hi)), AXIAL_MM / eye.lat, lo, hi)
        site = int(rng.choice(len(_HRF_SITES), p=probs / probs.sum()))
        if blob is None:
            continue
        bh, bw = blob.shape
        c = int(rng.choice(outer)) if site == 4 else int(np.clip(rng.normal(centre, 0.08 * w), 2, w - 3)) if cluster \
            else int(rng.integers(2, w - 2))
        top, bot = float(rows[_HRF_SITES[site][0]][c]), float(rows[_HRF_SITES[site][1]][c])
        if bot - top < bh + 2:
            continue
        y0, x0 = int(round(rng.uniform(top + 1, bot - bh - 1))), c - bw // 2
        if x0 < 1 or x0 + bw > w - 1 or y0 < 1 or y0 + bh > h - 1:
            continue
        ys, xs = np.nonzero(blob)
        ys, xs = ys + y0, xs + x0
        if blocked[ys, xs].any() or not ((ys >= rows["ILM"][xs] + 1) & (ys <= rows["RPE"][xs] - 1)).all():
            continue
        k += 1
        labels[ys, xs] = k
        local, rpe = float(np.median(mean[max(0, y0 - 3) : y0 + bh + 3, max(0, x0 - 3) : x0 + bw + 3])), float(lv[12, c])
        u = rng.random()
        peak = (rpe + rng.uniform(-6.0, 16.0) if u < 0.6 else local + rng.uniform(0.5, 0.85) * max(rpe - local, 40.0)
                if u < 0.85 else local + rng.uniform(22.0, 40.0))  # the last 15 %: hard positives
        core = ndi.distance_transform_edt(np.pad(blob, 1))[1:-1, 1:-1][blob]
        ry, rx = np.nonzero(ndi.binary_dilation(np.pad(blob, 1)) & ~np.pad(blob, 1))
        ry, rx = np.clip(ry + y0 - 1, 0, h - 1), np.clip(rx + x0 - 1, 0, w - 1)
        mean[ry, rx] += 0.3 * np.maximum(peak - mean[ry, rx], 0.0)  # soft edge, as the optics blur it
        mean[ys, xs] = peak - rng.uniform(0.0, 18.0) * (1.0 - core / core.max())
        pmap[ys, xs] *= 0.75
        blocked[max(0, y0 - 2) : y0 + bh + 2, max(0, x0 - 2) : x0 + bw + 2] = True
        if rng.random() < 0.35:
            _shadow(shade, x0, x0 + bw, y0 + bh - np.argmax(blob[::-1], axis=0) + 1, rng.uniform(6.0, 28.0))
    return labels


def _column_gain(rng: np.random.Generator, look: _Look, w: int, lat: float) -> np.ndarray:
    """Per-A-scan brightness (display units): slow drift, flicker, dark streaks, darker edges."""
    knots = rng.normal(0.0, 4.0, int(FIELD_MM / 1.2) + 2)
    gain = np.interp(np.linspace(0, knots.size - 1, w), np.arange(knots.size), knots)
    gain += ndi.gaussian_filter1d(rng.normal(0.0, look.flicker, w), max(0.5, 0.005 / lat))
    for _ in range(rng.poisson(0.7)):
        c, half = int(rng.integers(0, w)), max(1, int(rng.uniform(0.005, 0.04) / lat))
        gain[max(0, c - half) : c + half + 1] -= rng.uniform(8.0, 35.0)
    edge = np.minimum(np.arange(w), np.arange(w)[::-1]) / (0.05 * w)
    return (gain - rng.uniform(0.0, 20.0) * np.clip(1.0 - edge, 0.0, 1.0)).astype(np.float32)


def _display(rng: np.random.Generator, look: _Look, mean: np.ndarray, pmap: np.ndarray, gain: np.ndarray,
             strength: float, lat: float) -> np.ndarray:
    """Correlated speckle on the tissue, a fading noise floor, log display, tone curve, blur.

    Speckle: the mean intensity of ``looks`` independent complex Gaussian fields smoothed to the
    grain size (a gamma pattern with real grain, not white noise), applied on the log scale with
    a spread of ``strength`` display units."""
    h, w = mean.shape
    intensity = np.zeros((h, w), np.float32)
    for _ in range(2 * look.looks):
        f = ndi.gaussian_filter(rng.standard_normal((h, w), dtype=np.float32), look.grain, truncate=2.5)
        intensity += f * f
    intensity /= intensity.mean()
    log_s = np.log(np.maximum(intensity, 1e-6)) - np.float32(_LOG_MEAN[look.looks])
    log_s *= np.float32(strength * _K / _LOG_STD[look.looks])
    tissue = np.expm1(np.float32(_K) * np.clip(mean, 0.0, 300.0)) * np.exp(np.float32(_K) * gain)[None, :]
    depth = np.arange(h, dtype=np.float32) * np.float32(AXIAL_MM)
    floor = np.float32(math.expm1(_K * look.floor)) * np.exp(-depth / np.float32(look.floor_decay))
    haze = np.exp(np.float32(look.floor_var) * (_smooth(rng, (h, w), (0.25 / AXIAL_MM, 0.4 / lat)) + log_s * np.float32(2.0)))
    d = np.log1p(tissue * np.exp(pmap * log_s) + floor[:, None] * haze) / np.float32(_K)
    d = np.float32(255.0 * look.contrast) * np.clip(d / 255.0, 0.0, 1.0) ** np.float32(look.gamma) + np.float32(look.brightness)
    d = ndi.gaussian_filter(d, look.blur, truncate=2.5)
    return np.clip(d, 0.0, 255.0).astype(np.float32)


def _render(rng: np.random.Generator, eye: _Eye, z: float, n_hrf: int, jitter: float) -> SyntheticBScan:
    """The B-scan of ``eye`` at slow-axis position ``z`` (mm) with up to ``n_hrf`` HRFs."""
    h, w = eye.h, eye.w
    x = (np.arange(w) + 0.5) * eye.lat
    g = _en_face(eye, x, z)
    rows = {k: (v / AXIAL_MM + jitter).astype(np.float32) for k, v in _layers(eye, x, z, g).items()}
    for key, amp in zip(("ILM", "RNFL", "GCL", "IPL", "INL", "OPL", "ELM"), (0.4, 1, 1, 1, 1, 1, 0.3)):
        rows[key] += np.float32(amp * eye.look.rough) * _smooth(rng, (1, w), (1.0, 0.06 / eye.lat))[0]
    rows = dict(zip(LAYER_KEYS, np.maximum.accumulate(np.stack([rows[k] for k in LAYER_KEYS]), axis=0)))
    dru, ped, ped_level = _elevation(eye, x, z)
    lv = (eye.levels[:, None] + g[8:] + rng.normal(0.0, 2.5)).astype(np.float32)
    lv[13] = np.where(ped > dru, ped_level, lv[13])
    mean, band = _bands(eye, rows, lv)
    r0, r1 = max(0, int(rows["ILM"].min())), min(h, int(rows["BM"].max()) + 1)
    if r1 > r0:  # tissue structure: the bands are not uniform under the speckle
        mean[r0:r1] += eye.look.texture * _smooth(rng, (r1 - r0, w), (1.5, 0.02 / eye.lat)) * (band[r0:r1] > 0)
    _choroid(rng, eye, mean, rows)
    shade = np.zeros((h, w), np.float32)
    decoy = np.zeros((h, w), np.uint8)
    blocked = np.zeros((h, w), bool)
    _floaters(eye, z, rows, mean, shade, decoy)
    _cysts(rng, eye, z, rows, lv, mean, decoy, blocked)
    _exudates(rng, eye, z, rows, lv, mean, shade, decoy)
    _vessels(rng, eye, z, rows, lv, mean, shade, decoy, blocked)
    _choroid_spots(rng, rows, lv, mean, decoy, eye.lat)
    y = np.arange(h, dtype=np.float32)[:, None]
    lifted = (rows["BM"] - rows["RPE"] - eye.thick["rpe"] / AXIAL_MM > 1.5)[None, :]
    decoy[lifted & (y >= rows["RPE"][None, :]) & (y < rows["BM"][None, :])] = 5
    blocked |= ndi.maximum_filter(decoy, size=5) > 0
    pmap = _SPECKLE[band]
    labels = _place_hrfs(rng, eye, rows, lv, n_hrf, mean, pmap, shade, blocked)
    image = _display(rng, eye.look, mean - shade, pmap, _column_gain(rng, eye.look, w, eye.lat),
                     eye.look.speckle * rng.uniform(0.9, 1.1), eye.lat)  # per B-scan: a little more or less speckle
    return SyntheticBScan(image=image, hrf_labels=labels, hard_negatives=decoy, layers=rows)


def _hrf_count(rng: np.random.Generator, prevalence: float) -> int:
    """0 with probability 1 - prevalence; else 1..6, or 7..20 in about a fifth (heavy B-scans)."""
    if rng.random() >= prevalence:
        return 0
    return int(rng.integers(7, 21)) if rng.random() < 0.22 else int(rng.integers(1, 7))


def synth_bscan(rng: np.random.Generator, height: int = 496, width: int = 512, n_hrf: int | None = None) -> SyntheticBScan:
    """One B-scan of a fresh random eye (through the fovea 40 % of the time) with ``n_hrf`` HRFs
    (random when None: none in half of the B-scans). Fewer are placed when there is no room."""
    check_size(height, width)
    if n_hrf is not None and n_hrf < 0:
        raise ValueError(f"n_hrf must be >= 0, got {n_hrf}")
    eye = _draw_eye(rng, height, width, np.array([0.0, SLOW_FIELD_MM]))
    z = eye.fz if rng.random() < 0.4 else float(np.clip(eye.fz + rng.uniform(-2.6, 2.6), 0.0, SLOW_FIELD_MM))
    n = _hrf_count(rng, 0.5) if n_hrf is None else int(n_hrf)
    return _render(rng, eye, z, n, 0.0)


def synth_volume_bscans(rng: np.random.Generator, n_bscans: int, height: int = 496, width: int = 512,
                        hrf_prevalence: float = 0.3) -> list[SyntheticBScan]:
    """A macular volume of one right eye, B-scan by B-scan with full truth (layers, decoys)."""
    return _volume(rng, n_bscans, height, width, hrf_prevalence)[1]


def _volume(rng: np.random.Generator, n_bscans: int, height: int, width: int,
            hrf_prevalence: float) -> tuple[_Eye, list[SyntheticBScan]]:
    """The eye of a volume and its B-scans (the eye holds the foveal centre)."""
    check_size(height, width)
    if n_bscans < 1:
        raise ValueError(f"n_bscans must be >= 1, got {n_bscans}")
    if not 0.0 <= hrf_prevalence <= 1.0:
        raise ValueError(f"hrf_prevalence must be within 0..1, got {hrf_prevalence}")
    eye = _draw_eye(rng, height, width, np.array([0.0, SLOW_FIELD_MM]))
    zs = np.linspace(0.0, SLOW_FIELD_MM, n_bscans) if n_bscans > 1 else np.array([eye.fz])
    scans, jitter = [], 0.0
    for z in zs:
        jitter = float(np.clip(jitter + rng.normal(0.0, 0.7), -3.0, 3.0))  # axial eye motion between B-scans
        scans.append(_render(rng, eye, float(z), _hrf_count(rng, hrf_prevalence), jitter))
    return eye, scans


def synth_volume_truth(rng: np.random.Generator, n_bscans: int, height: int = 496, width: int = 512,
                       hrf_prevalence: float = 0.3) -> VolumeTruth:
    """Images and HRF labels as :func:`synth_volume` returns them, with the true boundary rows of every
    LAYER_KEYS boundary (as rendered, eye motion included) and the foveal centre as fractional B-scan
    index and column, so layer and fovea estimates can be scored."""
    eye, scans = _volume(rng, n_bscans, height, width, hrf_prevalence)
    # B-scan i lies at z = SLOW_FIELD_MM * i / (n - 1); a lone B-scan passes through the fovea
    fovea_bscan = eye.fz / SLOW_FIELD_MM * (n_bscans - 1) if n_bscans > 1 else 0.0
    # column c is centred at (c + 0.5) * lat mm (see _render)
    fovea_col = eye.fx / eye.lat - 0.5
    layers = {name: np.stack([s.layers[name] for s in scans]) for name in LAYER_KEYS}
    return VolumeTruth(np.stack([s.image for s in scans]), np.stack([s.hrf_labels for s in scans]), layers,
                       float(fovea_bscan), float(fovea_col))


def synth_volume(rng: np.random.Generator, n_bscans: int, height: int = 496, width: int = 512,
                 hrf_prevalence: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as generator A's: images float32 (n, H, W) on 0..255 and int32 HRF labels
    (n, H, W), ids 1..k per B-scan, so the study writer can call either generator."""
    truth = synth_volume_truth(rng, n_bscans, height, width, hrf_prevalence)
    return truth.images, truth.labels
