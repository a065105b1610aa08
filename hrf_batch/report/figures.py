"""Report figures as PNG bytes, sized for an A4 page.

Each figure is drawn on its own Agg canvas without pyplot, so no display is needed, the process-wide
backend is left alone, and nothing is shared between reports rendered in one process.

Figures are drawn at the size they are printed (inches = cm / 2.54), so fonts keep their point size
in the PDF. Every function takes stored records and numpy arrays only; none reads files.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
from matplotlib import colormaps, patheffects, rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.patches import Wedge
from matplotlib.text import Text
from scipy import ndimage

from hrf_batch.results import ETDRS_RADII_MM, SUBFIELDS
from hrf_batch.store import StoredBScan, StoredLesion, StoredVolume, VisitBurden

CM = 1 / 2.54
EYE_COLOURS = {"OD": "#1f5fa8", "OS": "#d1601a", "unknown": "#555555"}
HRF_COLOUR = "#e8112d"
OUTLINE_COLOUR = "#ffd400"
LINE_COLOUR = "#00a0e8"
# layer lines in the gallery: retina borders (ILM, BM) in one colour, the lines between in another
LAYER_LINE_COLOURS = {"ILM": "#00e5ff", "BM": "#00e5ff", "RPE": "#7cff6b", "EZ": "#7cff6b", "ELM": "#7cff6b"}
LAYER_LINE_OTHER = "#ff9df0"
LAYER_LINE_ALPHA = 0.45
ETDRS_CMAP = "OrRd"
_HALO = [patheffects.withStroke(linewidth=1.2, foreground="black")]
_STYLE = {
    "font.size": 7.5, "axes.titlesize": 8, "axes.labelsize": 7.5, "xtick.labelsize": 6.5, "ytick.labelsize": 6.5,
    "legend.fontsize": 6.5, "axes.spines.top": False, "axes.spines.right": False, "font.family": "DejaVu Sans",
}


@contextmanager
def _figure(width_cm: float, height_cm: float) -> Iterator[Figure]:
    """A Figure with the report style, detached from pyplot so nothing leaks between reports."""
    with rc_context(_STYLE):
        fig = Figure(figsize=(width_cm * CM, height_cm * CM), layout="constrained")
        FigureCanvasAgg(fig)
        yield fig


def _png(fig: Figure, dpi: int = 150) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def mm_to_px(points_mm: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
    """Localizer positions (x, y) in mm from its top-left corner → pixel (column, row) coordinates."""
    return np.asarray(points_mm, dtype=np.float64).reshape(-1, 2) / np.asarray(spacing_mm, dtype=np.float64)


def dot_sizes(areas_mm2: np.ndarray, reference_mm2: float) -> np.ndarray:
    """Marker areas (pt²) proportional to HRF area, so the largest HRF of the patient is the largest dot."""
    ref = reference_mm2 if reference_mm2 > 0 else 1.0
    return 6.0 + 90.0 * np.clip(np.asarray(areas_mm2, dtype=np.float64) / ref, 0.0, 1.0)


def trend_figure(visits: Sequence[VisitBurden], width_cm: float = 18.0) -> bytes:
    """HRF count and total HRF area per dated visit, one line per eye."""
    with _figure(width_cm, 5.8) as fig:
        ax_count, ax_area = fig.subplots(1, 2)
        for eye in sorted({v.eye for v in visits}):
            rows = sorted((v for v in visits if v.eye == eye and v.visit_date is not None), key=lambda v: v.visit_date)
            if not rows:
                continue
            when = [v.visit_date for v in rows]
            style = {"color": EYE_COLOURS.get(eye, "#555555"), "marker": "o", "markersize": 3.5, "linewidth": 1.2}
            ax_count.plot(when, [v.hrf_count for v in rows], label=eye, **style)
            ax_area.plot(when, [v.hrf_area_mm2 for v in rows], label=eye, **style)
        top_count = max((v.hrf_count for v in visits), default=0)
        top_area = max((v.hrf_area_mm2 for v in visits), default=0.0)
        ax_count.set_ylim(0, max(top_count * 1.15, 1))
        ax_count.yaxis.get_major_locator().set_params(integer=True)
        ax_area.set_ylim(0, top_area * 1.15 if top_area > 0 else 0.001)
        for ax, title, label in ((ax_count, "HRF count", "HRF"), (ax_area, "Total HRF area", "mm²")):
            ax.set_title(title, loc="left")
            ax.set_ylabel(label)
            ax.grid(axis="y", linewidth=0.4, alpha=0.5)
            _date_axis(ax, [v.visit_date for v in visits if v.visit_date is not None])
            if ax.get_legend_handles_labels()[0]:
                ax.legend(title="eye", frameon=False)
        return _png(fig)


def _date_axis(ax: Axes, dates: list[date]) -> None:
    """Ticks at the visit dates themselves (there are few), written as ISO dates."""
    unique = sorted(set(dates))
    if not unique:
        return
    many = len(unique) > 3
    ax.set_xticks(unique, [d.isoformat() for d in unique], rotation=30 if many else 0, ha="right" if many else "center")
    pad = timedelta(days=30 if len(unique) == 1 else max(7, (unique[-1] - unique[0]).days // 12))
    ax.set_xlim(unique[0] - pad, unique[-1] + pad)


def _lesions(volume: StoredVolume) -> list[StoredLesion]:
    return [les for b in volume.bscans for les in b.lesions]


def enface_localizer_figure(
    volume: StoredVolume, localizer: np.ndarray, spacing_mm: tuple[float, float], area_ref_mm2: float,
    size_cm: float = 7.0,
) -> bytes:
    """HRF dots on the localizer, B-scan lines drawn faintly, zoomed to the scanned area."""
    starts = mm_to_px(np.array([p.start_mm for p in volume.positions]), spacing_mm)
    ends = mm_to_px(np.array([p.end_mm for p in volume.positions]), spacing_mm)
    lesions = [les for les in _lesions(volume) if les.centroid_mm is not None]
    with _figure(size_cm, size_cm) as fig:
        ax = fig.subplots()
        ax.imshow(localizer, cmap="gray", interpolation="bilinear")
        for (x0, y0), (x1, y1) in zip(starts, ends, strict=True):
            ax.plot([x0, x1], [y0, y1], color=LINE_COLOUR, linewidth=0.5, alpha=0.6)
        ax.plot(*starts[0], marker=">", color=LINE_COLOUR, markersize=3.5)  # marks B-scan 0 and its direction
        if lesions:
            xy = mm_to_px(np.array([les.centroid_mm for les in lesions]), spacing_mm)
            sizes = dot_sizes(np.array([les.area_mm2 for les in lesions]), area_ref_mm2)
            ax.scatter(xy[:, 0], xy[:, 1], s=sizes, c=HRF_COLOUR, edgecolors="white", linewidths=0.4, alpha=0.9)
        _zoom_to(ax, np.vstack([starts, ends]), localizer.shape)
        _scale_bar(ax, spacing_mm[0])
        _bare(ax)
        ax.set_title(f"{len(lesions)} HRF on the localizer", loc="left")
        return _png(fig)


def _zoom_to(ax: Axes, points: np.ndarray, shape: tuple[int, ...]) -> None:
    """Limit the view to the scanned region plus a margin, keeping pixels square."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) * 0.62, 20.0)
    x0, x1 = max(centre[0] - half, -0.5), min(centre[0] + half, shape[1] - 0.5)
    y0, y1 = max(centre[1] - half, -0.5), min(centre[1] + half, shape[0] - 0.5)
    if x1 - x0 < 10 or y1 - y0 < 10:  # positions (mostly) off the image: show all of it
        x0, x1, y0, y1 = -0.5, shape[1] - 0.5, -0.5, shape[0] - 0.5
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)


def _scale_bar(ax: Axes, mm_per_px: float) -> None:
    """A 1-mm bar in the lower right corner, readable on dark and light localizers."""
    x0, x1 = ax.get_xlim()
    y1, y0 = ax.get_ylim()
    length = 1.0 / mm_per_px
    right, base = x1 - 0.05 * (x1 - x0), y1 - 0.05 * (y1 - y0)
    ax.plot([right - length, right], [base, base], color="white", linewidth=2, solid_capstyle="butt", path_effects=_HALO)
    ax.text(right - length / 2, base - 0.02 * (y1 - y0), "1 mm", color="white", ha="center", va="bottom",
            fontsize=6.5, path_effects=_HALO)


def enface_grid_figure(volume: StoredVolume, area_ref_mm2: float, size_cm: float = 7.0) -> bytes:
    """HRF dots on a B-scan index × lateral position grid, for volumes without a usable localizer."""
    lateral = volume.spacing.lateral_mm
    width_mm = volume.bscan_shape[1] * lateral
    lesions = _lesions(volume)
    with _figure(size_cm, size_cm) as fig:
        ax = fig.subplots()
        for index in range(volume.n_bscans):
            ax.axhline(index, color=LINE_COLOUR, linewidth=0.5, alpha=0.5)
        if lesions:
            x = np.array([les.centroid_rc[1] * lateral for les in lesions])
            y = np.array([les.bscan_index for les in lesions])
            ax.scatter(x, y, s=dot_sizes(np.array([les.area_mm2 for les in lesions]), area_ref_mm2), c=HRF_COLOUR,
                       edgecolors="white", linewidths=0.4, alpha=0.9)
        ax.set_xlim(0, width_mm)
        ax.set_ylim(-0.7, volume.n_bscans - 0.3)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("lateral position (mm)")
        ax.set_ylabel("B-scan index")
        ax.set_title(f"{len(lesions)} HRF by B-scan and position", loc="left")
        return _png(fig)


def bscan_counts_figure(volume: StoredVolume, width_cm: float = 10.6, height_cm: float = 7.0) -> bytes:
    """Bars of HRF count per B-scan: shows whether HRFs cluster (e.g. around the fovea)."""
    indices = np.array([b.index for b in volume.bscans])
    counts = np.array([b.hrf_count for b in volume.bscans])
    with _figure(width_cm, height_cm) as fig:
        ax = fig.subplots()
        ax.bar(indices, counts, width=0.8, color=EYE_COLOURS.get(volume.eye, "#555555"))
        ax.set_xlabel("B-scan index")
        ax.set_ylabel("HRF")
        ax.set_title("HRF per B-scan", loc="left")
        ax.set_xlim(-0.7, max(volume.n_bscans, 1) - 0.3)
        ax.set_ylim(0, max(int(counts.max()) if counts.size else 0, 1) * 1.1)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(axis="y", linewidth=0.4, alpha=0.5)
        return _png(fig)


def gallery_rows(mask: np.ndarray, peaks: Sequence[tuple[int, int]], shape: tuple[int, int]) -> tuple[int, int]:
    """The band of rows to show: the HRFs and prompts plus a margin, at least 0.35 × width tall.

    HRFs lie in a thin retinal band of a tall B-scan; showing every row would make them specks.
    """
    height, width = shape
    rows = np.nonzero(mask.any(axis=1))[0].tolist() + [int(r) for r, _c in peaks]
    if not rows:
        return 0, height
    want = max(int(0.35 * width), max(rows) - min(rows) + 1 + 2 * max(12, height // 20))
    if want >= height:
        return 0, height
    top = min(max((min(rows) + max(rows)) // 2 - want // 2, 0), height - want)
    return top, top + want


def gallery_figure(
    image: np.ndarray | None, bscan: StoredBScan, shape: tuple[int, int], width_cm: float = 18.0,
    layers: Mapping[str, np.ndarray] | None = None,
) -> bytes:
    """The B-scan band with HRF outlines, and its relevance map with the same outlines, side by side.

    Without the image (source changed or missing) the left panel says so and still shows the outlines.
    ``layers`` (name → row per column of this B-scan, NaN where unknown) are drawn thin and
    half-transparent on the left panel, so a reader sees which layer an HRF lies in without the
    lines hiding it.
    """
    width = shape[1]
    mask = bscan.mask if bscan.mask is not None else np.zeros(shape, dtype=bool)
    top, bottom = gallery_rows(mask, bscan.relevance_peaks, shape)
    panel_h = min((width_cm - 0.6) / 2 * (bottom - top) / width, 9.0) + 0.75
    with _figure(width_cm, panel_h) as fig:
        ax_img, ax_rel = fig.subplots(1, 2)
        band = f"rows {top}–{bottom - 1}" if (top, bottom) != (0, shape[0]) else "all rows"
        if image is not None:
            ax_img.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
            ax_img.set_title(f"B-scan with HRF outlines ({band})", loc="left")
        else:
            ax_img.imshow(np.full(shape, 0.92), cmap="gray", vmin=0, vmax=1)
            ax_img.text(width / 2, (top + bottom) / 2, "source file changed or missing", ha="center", va="center", color="#7a0000")
            ax_img.set_title(f"HRF outlines, no image ({band})", loc="left")
        _layer_lines(ax_img, layers or {})
        _outline(ax_img, mask, OUTLINE_COLOUR if image is not None else HRF_COLOUR)
        _relevance_panel(ax_rel, bscan, shape, mask)
        for ax in (ax_img, ax_rel):
            _bare(ax)
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(bottom - 0.5, top - 0.5)
        return _png(fig, dpi=220)


def _bare(ax: Axes) -> None:
    """No ticks and no frame: for image panels."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _outline(ax: Axes, mask: np.ndarray, colour: str) -> None:
    """A ring just outside each HRF (mask dilated by 2 px), so the HRF's own pixels stay visible."""
    if mask.any():
        ring = ndimage.binary_dilation(mask, iterations=2)
        ax.contour(ring.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.7)


def _relevance_panel(ax: Axes, bscan: StoredBScan, shape: tuple[int, int], mask: np.ndarray) -> None:
    height, width = shape
    if bscan.relevance is None:
        ax.imshow(np.full(shape, 0.92), cmap="gray", vmin=0, vmax=1)
        ax.text(width / 2, height / 2, "no relevance map stored", ha="center", va="center", color="#444444")
    else:
        peak = float(np.abs(bscan.relevance).max()) or 1.0
        ax.imshow(bscan.relevance, cmap="RdBu_r", vmin=-peak, vmax=peak, extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                  interpolation="bilinear")
    _outline(ax, mask, "#111111")
    if bscan.relevance_peaks:
        rows, cols = zip(*bscan.relevance_peaks, strict=True)
        ax.scatter(cols, rows, marker="x", s=14, c="#00a000", linewidths=0.8)
    ax.set_title("Relevance (red: evidence for HRF; ×: prompts)", loc="left")


def _layer_lines(ax: Axes, layers: Mapping[str, np.ndarray]) -> None:
    """Each layer line as a thin, half-transparent curve; NaN (unknown) columns leave gaps."""
    for name, rows in layers.items():
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 1 or not np.isfinite(rows).any():
            continue
        ax.plot(np.arange(rows.size), rows, color=LAYER_LINE_COLOURS.get(name, LAYER_LINE_OTHER),
                linewidth=0.45, alpha=LAYER_LINE_ALPHA, solid_capstyle="butt")


@dataclass(frozen=True)
class EtdrsLayout:
    """Where the ETDRS grid is drawn, in mm from the foveal centre as seen on the fundus image
    (x to the right, y up = superior), so that the grid reads like the device's thickness map."""

    eye: str
    nasal_right: bool  # OD: nasal on the right of the fundus image; OS: on the left
    wedges: dict[str, tuple[float, float, float, float]]  # subfield -> (inner r, outer r, from °, to °)
    cells: dict[str, tuple[float, float]]  # subfield -> centre of its text
    sides: dict[str, tuple[float, float]]  # "S", "I", "N", "T" -> position of the side label


def etdrs_layout(eye: str) -> EtdrsLayout:
    """The grid for one eye: superior at the top, nasal right for OD and left for OS (an eye not
    known is drawn like OD; the figure says so). Quadrants are split by the diagonals."""
    nasal_right = eye != "OS"
    angle = {"S": 90.0, "I": 270.0, "N": 0.0 if nasal_right else 180.0}
    angle["T"] = (angle["N"] + 180.0) % 360.0
    r0, r1, r2 = ETDRS_RADII_MM
    wedges: dict[str, tuple[float, float, float, float]] = {"C0": (0.0, r0, 0.0, 360.0)}
    cells: dict[str, tuple[float, float]] = {"C0": (0.0, 0.0)}
    for ring, (inner, outer) in ((1, (r0, r1)), (2, (r1, r2))):
        for side, theta in angle.items():
            name = f"{side}{ring}"
            wedges[name] = (inner, outer, theta - 45.0, theta + 45.0)
            mid = (inner + outer) / 2
            cells[name] = (mid * float(np.cos(np.radians(theta))), mid * float(np.sin(np.radians(theta))))
    label_r = r2 + 0.42
    sides = {
        side: (label_r * float(np.cos(np.radians(t))), label_r * float(np.sin(np.radians(t))))
        for side, t in angle.items()
    }
    return EtdrsLayout(eye, nasal_right, {k: wedges[k] for k in SUBFIELDS}, {k: cells[k] for k in SUBFIELDS}, sides)


def draw_etdrs_grid(
    ax: Axes, counts: Mapping[str, int], thickness_um: Mapping[str, float], eye: str, vmax: int,
    cmap: str | Colormap = ETDRS_CMAP,
) -> dict[str, Text]:
    """Draw the grid with the HRF count per subfield (shaded by count up to ``vmax``) and the mean
    thickness (µm, number only, as on the device's map) in small type where known; returns the text
    artists by subfield and side letter."""
    layout = etdrs_layout(eye)
    colours = cmap if isinstance(cmap, Colormap) else colormaps[cmap]
    scale = max(vmax, 1)
    texts: dict[str, Text] = {}
    for name in SUBFIELDS:
        inner, outer, theta1, theta2 = layout.wedges[name]
        count = int(counts.get(name, 0))
        level = min(count / scale, 1.0)
        face = colours(0.08 + 0.8 * level) if count > 0 else "white"
        ax.add_patch(Wedge((0.0, 0.0), outer, theta1, theta2, width=outer - inner, facecolor=face,
                           edgecolor="#333333", linewidth=0.6))
        x, y = layout.cells[name]
        ink = "white" if level > 0.6 else "#111111"
        thick = thickness_um.get(name)
        known = thick is not None and np.isfinite(thick)
        texts[name] = ax.text(x, y + (0.14 if known else 0.0), str(count), ha="center", va="center", fontsize=8,
                              fontweight="bold", color=ink)
        if known:
            ax.text(x, y - 0.25, f"{thick:.0f}", ha="center", va="center", fontsize=5, color=ink)
    for side, (x, y) in layout.sides.items():
        letter = side if eye in ("OD", "OS") or side in ("S", "I") else f"{side}?"
        texts[side] = ax.text(x, y, letter, ha="center", va="center", fontsize=8, fontweight="bold", color="#12355b")
    lim = ETDRS_RADII_MM[-1] + 0.75
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    _bare(ax)
    return texts


def etdrs_figure(
    counts: Mapping[str, int], thickness_um: Mapping[str, float], eye: str, vmax: int, size_cm: float = 6.2,
) -> bytes:
    """The ETDRS grid (1, 3 and 6 mm circles) with HRF counts per subfield, drawn for ``eye``."""
    with _figure(size_cm, size_cm) as fig:
        ax = fig.subplots()
        draw_etdrs_grid(ax, counts, thickness_um, eye, vmax)
        side = eye if eye in ("OD", "OS") else "eye unknown: drawn as OD"
        ax.set_title(f"HRF per ETDRS subfield ({side})", loc="left")
        return _png(fig, dpi=200)
