"""Retinal layer lines estimated from the pixels, for exports that carry none or only some.

HRF are counted per layer zone, so every volume needs at least ILM, INL/OPL, ELM and BM, but many
exports carry no segmentation and Spectralis files carry only ILM, BM and RNFL. The estimate is
classical and needs no trained weights: every line is the best path through an edge or ridge image
inside a band set by the lines already found and by thickness priors in micrometres, so it works at
any pixel spacing.

Order of the search, each step restricting the next:

1. ILM: the best continuous path over dark-to-bright edges with vitreous above them and tissue below
   them for 120 um (a vitreous floater is too small, and too short across columns, to pass), then
   the strongest edge just below it (past a faint hyaloid membrane lying over the ILM).
2. Outer bright complex (EZ..RPE): the band 40..800 um below the ILM that is bright and has the dark
   ONL above it (a thick bright RNFL around the disc is bright, but has RNFL above it).
3. Lower edge of the RPE: the first strong bright-to-dark edge below that band. Drusen and PED lift
   it, so BM is that edge where it lies on the smooth baseline of the eye (a grey-level closing that
   removes upward bumps narrower than 2.6 mm) and the baseline where the edge is lifted.
4. RPE, EZ, ELM: the inner edge of the RPE band, the strong dark-to-bright edge of the ellipsoid zone
   above it, and the thin bright ELM line above that, each in a band parallel to the line below.
5. INL/OPL: the top of the ONL (the bright-over-dark step with nothing brighter than the ONL from
   there down to the ELM), then the dark-to-bright edge of the OPL just above it.

Columns that are padding (HEYEX fills missing A-scans with 0), show no ILM contrast over a stretch
wider than 0.3 mm, or have tissue in their top rows (the retina runs out of the frame) get NaN.

Paths come from dynamic programming over columns with a limit and a cost on the jump between
neighbouring columns, on B-scans binned to about 30 um per column (speed, and less speckle).
Row values are pixel indices (fractional): the boundary lies at that row.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage as ndi

from hrf_batch.io.volume import LAYER_NAMES, LayerLines, Spacing

_BIN_MM = 0.030          # lateral size of one binned column
_BLANK_FRACTION = 0.9    # a column with more zero pixels than this is padding, not tissue
_RETINA_RUN_UM = 120.0   # ILM test: this much tissue must follow, more than any floater is tall
_OUTER_UM = (40.0, 800.0)   # outer bright complex below the ILM (fovea thin .. thick oedema / disc rim)
_BASELINE_MM = 2.6       # drusen and PED narrower than this are lifts above BM, not BM itself
_TOP_UM = 30.0           # tissue in this many top rows means the retina runs out of the frame
_ILM_CONTRAST = 0.25     # tissue below the ILM minus vitreous above, over the image's tissue level
_GAP_MM = 0.3            # columns without clear ILM contrast shorter than this are bridged
_LIFT_UM = 12.0          # RPE edge this far above the baseline counts as lifted
_ESTIMATED = ("ILM", "INL", "ELM", "EZ", "RPE", "BM")
_NEG = -1.0e9


def estimate_layers(bscans: np.ndarray, spacing: Spacing) -> LayerLines:
    """Layer lines of every B-scan from its pixels: ILM, INL (INL/OPL), ELM, EZ, RPE and BM.

    ``bscans`` is float32 ``(n, H, W)`` on the 0..255 display scale. Rows are NaN in padded (blank)
    columns and where no retina was found.
    """
    stack = _check(bscans, spacing)
    per = [_bscan_lines(img, spacing, {}) for img in stack]
    return LayerLines(rows={k: np.stack([p[k] for p in per]) for k in _ESTIMATED}, source="estimated")


def complete_layers(device: LayerLines, bscans: np.ndarray, spacing: Spacing) -> LayerLines:
    """The device's lines plus estimates of the ones it lacks, searched between its ILM and BM.

    Device lines are kept as they are; where the device ILM or BM is NaN the estimate fills in. The
    result keeps the device's source, since its anchor lines are the device's, and names in
    ``estimated`` every line the estimate added.
    """
    stack = _check(bscans, spacing)
    n, _, w = stack.shape
    for name, rows in device.rows.items():
        if rows.shape != (n, w):
            raise ValueError(f"device layer {name} has shape {rows.shape}, the B-scans need {(n, w)}")
    per = []
    for i, img in enumerate(stack):
        given = {k: device.rows[k][i] for k in ("ILM", "BM") if k in device.rows}
        per.append(_bscan_lines(img, spacing, given))
    out = {k: np.array(v, dtype=np.float32, copy=True) for k, v in device.rows.items()}
    added = []
    for name in _ESTIMATED:
        est = np.stack([p[name] for p in per])
        if name not in out:
            out[name] = est
            added.append(name)
        elif name in ("ILM", "BM"):
            out[name] = np.where(np.isnan(out[name]), est, out[name]).astype(np.float32)
    return LayerLines(rows=out, source=device.source, estimated=tuple(n for n in LAYER_NAMES if n in added))


def _check(bscans: np.ndarray, spacing: Spacing) -> np.ndarray:
    stack = np.asarray(bscans, dtype=np.float32)
    if stack.ndim != 3 or min(stack.shape) < 1:
        raise ValueError(f"B-scans must be an (n, H, W) array, got shape {stack.shape}")
    if not (spacing.lateral_mm > 0 and spacing.axial_mm > 0):
        raise ValueError(f"pixel spacing must be positive to apply thickness priors, got {spacing}")
    return stack


def _dp_path(score: np.ndarray, max_jump: int, penalty: float) -> np.ndarray:
    """Index per column of the path through ``score`` (D, W) with the highest total, where the index
    changes by at most ``max_jump`` between columns at ``penalty`` per step."""
    d, w = score.shape
    k = max(1, int(max_jump))
    cost = penalty * np.abs(np.arange(-k, k + 1, dtype=np.float64))
    acc = score[:, 0].astype(np.float64)
    back = np.zeros((d, w), dtype=np.int32)
    padded = np.full(d + 2 * k, -np.inf, dtype=np.float64)
    view = sliding_window_view(padded, 2 * k + 1)  # shares memory with ``padded``
    win = np.empty(view.shape, dtype=np.float64)
    rows = np.arange(d)
    score = score.astype(np.float64)
    for j in range(1, w):
        padded[k:k + d] = acc
        np.subtract(view, cost, out=win)
        best = win.argmax(axis=1)
        acc = win[rows, best]
        acc += score[:, j]
        back[:, j] = best
    back -= k
    path = np.empty(w, dtype=np.int64)
    path[-1] = int(acc.argmax())
    for j in range(w - 1, 0, -1):
        path[j - 1] = min(max(path[j] + back[path[j], j], 0), d - 1)
    return path


def _trace(feature: np.ndarray, ref: np.ndarray, lo: np.ndarray, hi: np.ndarray, max_jump: int,
           penalty: float, invalid: np.ndarray) -> np.ndarray:
    """Best path of ``feature`` (H, W) in rows ``ref + lo .. ref + hi`` per column, following ``ref``
    (jumps are counted relative to it); sub-pixel by a parabola through the peak. Columns marked
    ``invalid`` score nothing, so the path crosses them smoothly."""
    h, w = feature.shape
    base = np.round(ref).astype(np.int64)
    lo_i, hi_i = np.floor(lo).astype(np.int64), np.ceil(hi).astype(np.int64)
    d0, d1 = int(lo_i.min()), int(hi_i.max())
    offs = np.arange(d0, d1 + 1)
    rows = base[None, :] + offs[:, None]
    inside = (offs[:, None] >= lo_i[None, :]) & (offs[:, None] <= hi_i[None, :]) & (rows >= 1) & (rows <= h - 2)
    rows_c = np.clip(rows, 0, h - 1)
    score = np.take_along_axis(feature, rows_c, axis=0)
    score = np.where(inside, score, _NEG)
    score[:, invalid] = np.where(inside[:, invalid], 0.0, _NEG)
    idx = _dp_path(score, max_jump, penalty)
    r = np.clip(base + offs[idx], 1, h - 2)
    cols = np.arange(w)
    f0, f1, f2 = feature[r - 1, cols], feature[r, cols], feature[r + 1, cols]
    denom = f0 - 2 * f1 + f2
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(denom < 0, 0.5 * (f0 - f2) / denom, 0.0)
    return r + np.clip(shift, -0.5, 0.5)


def _trace_coarse(feature: np.ndarray, ref: np.ndarray, lo: np.ndarray, hi: np.ndarray, max_jump: int,
                  penalty: float, invalid: np.ndarray) -> np.ndarray:
    """:func:`_trace` over a wide band at half the axial resolution (pairs of rows, their maximum),
    then again at full resolution within two rows of that path: a quarter of the work."""
    h = feature.shape[0] - feature.shape[0] % 2
    pairs = np.maximum(feature[0:h:2], feature[1:h:2])
    rough = _trace(pairs, ref / 2.0, lo / 2.0, hi / 2.0, max(1, (max_jump + 1) // 2), penalty * 2.0, invalid)
    return _snap(feature, 2.0 * rough + 0.5, 2)


def _snap(feature: np.ndarray, line: np.ndarray, reach: int, down: int | None = None) -> np.ndarray:
    """The line moved, column by column, to the peak of ``feature`` from ``reach`` rows above to
    ``down`` rows below it (``reach`` when None), sub-pixel."""
    h, w = feature.shape
    base = np.round(line).astype(np.int64)
    offs = np.arange(-reach, (reach if down is None else down) + 1)
    rows = np.clip(base[None, :] + offs[:, None], 1, h - 2)
    cols = np.arange(w)
    r = rows[np.take_along_axis(feature, rows, axis=0).argmax(axis=0), cols]
    f0, f1, f2 = feature[r - 1, cols], feature[r, cols], feature[r + 1, cols]
    denom = f0 - 2 * f1 + f2
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(denom < 0, 0.5 * (f0 - f2) / denom, 0.0)
    return r + np.clip(shift, -0.5, 0.5)


def _bin_columns(img: np.ndarray, blank: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of every ``size`` neighbouring non-blank columns; bins without tissue copy their nearest
    neighbour (no false edges) and are returned as invalid."""
    h, w = img.shape
    nb = -(-w // size)
    pad = nb * size - w
    good = np.pad(~blank, (0, pad)).astype(np.float32)
    data = np.pad(img, ((0, 0), (0, pad))) * good[None, :]
    total = data.reshape(h, nb, size).sum(axis=2)
    count = good.reshape(nb, size).sum(axis=1)
    invalid = count == 0
    binned = total / np.maximum(count, 1.0)[None, :]
    if invalid.all():
        return binned, invalid
    if invalid.any():
        idx = np.where(~invalid, np.arange(nb), 0)
        np.maximum.accumulate(idx, out=idx)
        first = int(np.argmax(~invalid))
        idx[:first] = first
        binned = binned[:, idx]
    return binned, invalid


def _given_binned(line: np.ndarray | None, size: int, nb: int) -> np.ndarray | None:
    """A full-width line averaged over the bins (NaN where it is unknown in the whole bin)."""
    if line is None:
        return None
    pad = nb * size - line.size
    vals = np.pad(np.asarray(line, dtype=np.float64), (0, pad), constant_values=np.nan).reshape(nb, size)
    ok = np.isfinite(vals)
    cnt = ok.sum(axis=1)
    with np.errstate(invalid="ignore"):
        out = np.where(ok, vals, 0.0).sum(axis=1) / cnt
    return np.where(cnt > 0, out, np.nan)


def _robust(line: np.ndarray, size: int, tol: float) -> np.ndarray:
    """Median filter across columns; points farther than ``tol`` from it take the median."""
    med = ndi.median_filter(line, size=max(3, size | 1), mode="nearest")
    return np.where(np.abs(line - med) > tol, med, line)


def _box_mean(s: np.ndarray, start: np.ndarray, length: int) -> np.ndarray:
    """Mean of ``s`` over rows ``start .. start + length`` (clipped to the image) for every row offset
    ``start`` = row + shift, by cumulative sums."""
    h = s.shape[0]
    csum = np.vstack([np.zeros((1, s.shape[1]), np.float64), np.cumsum(s, axis=0, dtype=np.float64)])
    a = np.clip(start, 0, h)
    b = np.clip(start + length, 0, h)
    cols = np.arange(s.shape[1])
    n = np.maximum(b - a, 1)[:, None]
    return (csum[b[:, None], cols] - csum[a[:, None], cols]) / n


def _closing(line: np.ndarray, size: int) -> np.ndarray:
    """Grey-level closing of a row line (fills upward bumps narrower than ``size``), with the line
    continued past both ends by point reflection so that a tilted or curved eye keeps its slope."""
    pad = min(size, line.size - 1)
    if pad < 1:
        return line.copy()
    ext = np.concatenate([2 * line[0] - line[pad:0:-1], line, 2 * line[-1] - line[-2:-pad - 2:-1]])
    closed = ndi.grey_closing(ext, size=size, mode="nearest")
    closed = ndi.uniform_filter1d(closed, max(3, size // 8), mode="nearest")
    return closed[pad:pad + line.size]


def _ilm_score(s: np.ndarray, grad: np.ndarray, valid: np.ndarray,
               px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score of each pixel as the ILM: a dark-to-bright edge with vitreous above it and tissue below
    it for 120 um (more than any floater is tall); which columns may show the ILM at all; and the
    contrast of tissue below each row against the rows above it, in units of tissue over vitreous.

    The vitreous level is taken per row (the noise floor fades with depth): the darkest fifth of each
    row, never rising with depth, so rows through the retina keep the level of the rows above them."""
    h, _ = s.shape
    vals = s[:, valid]
    vit = np.minimum.accumulate(np.percentile(vals, 20, axis=1))[:, None]
    tissue = float(np.percentile(vals, 90))
    span = np.maximum(tissue - vit, 10.0)
    rows = np.arange(h)
    run = max(4, int(round(_RETINA_RUN_UM * px)))
    above_len = max(3, int(round(30.0 * px)))
    below = _box_mean(s, rows + 2, run)
    above = _box_mean(s, rows - above_len - 1, above_len)
    tissue_below = np.clip((below - vit) / span * 2.5, 0.0, 1.0)
    vitreous_above = np.clip(1.0 - 2.0 * (above - vit) / span, 0.0, 1.0)
    edge = np.clip(grad / span * 4.0, 0.0, 1.0)
    # tissue right below as well: a thin hyaloid membrane lying over the ILM has a dark gap under it
    near_below = _box_mean(s, rows + 1, max(2, int(round(12.0 * px))))
    tissue_near = np.clip((near_below - vit) / span * 2.5, 0.0, 1.0)
    score = edge * tissue_below * tissue_near * vitreous_above
    score[: above_len + 2] = 0.0  # no vitreous above to see: the ILM is not in the frame there
    # tissue in the top rows: the retina is cut off or folded back by the scan's depth window
    top_len = max(2, int(round(_TOP_UM * px)))
    cut = (s[:top_len].mean(axis=0) - vit[0, 0]) > 0.4 * span[0, 0]
    found = (score.max(axis=0) > 0.05) & valid & ~cut
    contrast = (below - above) / span  # tissue below the row against vitreous above it
    return score, found, contrast


def _bscan_lines(img: np.ndarray, spacing: Spacing, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All estimated lines of one B-scan, full width; ``given`` ILM/BM (full width, may hold NaN)
    replace the search for those lines wherever they are known."""
    h, w = img.shape
    ax_um = spacing.axial_mm * 1000.0
    px = 1.0 / ax_um  # rows per micrometre
    blank = (img <= 0.0).mean(axis=0) > _BLANK_FRACTION
    size = max(1, int(round(_BIN_MM / spacing.lateral_mm)))
    b, invalid = _bin_columns(img, blank, size)
    nb = b.shape[1]
    nan_line = np.full(w, np.nan, dtype=np.float32)
    if invalid.all():
        return {k: nan_line.copy() for k in _ESTIMATED}
    valid = ~invalid
    bin_um = size * spacing.lateral_mm * 1000.0
    s = ndi.gaussian_filter(b, (1.5, 1.0), mode="nearest")
    grad = np.zeros_like(s)
    grad[1:-1] = 0.5 * (s[2:] - s[:-2])

    # 1. ILM
    score, found, contrast = _ilm_score(s, grad, valid, px)
    ilm_given = _given_binned(given.get("ILM"), size, nb)
    has = found | (np.isfinite(ilm_given) if ilm_given is not None else False)
    if not has.any():
        return {k: nan_line.copy() for k in _ESTIMATED}
    score[:, invalid] = 0.0
    strong = score > 0.15
    first = np.where(found, np.argmax(strong, axis=0), -1)
    r_lo = max(1, int(first[found].min()) - int(round(50.0 * px))) if found.any() else 1
    r_hi = min(h - 2, int(first[found].max()) + int(round(250.0 * px))) if found.any() else h - 2
    steep = max(2, int(round(bin_um * 1.0 * px)))  # up to 45 degrees: tilted circle scans, the pit
    ilm = _trace_coarse(score, np.zeros(nb), np.full(nb, float(r_lo)), np.full(nb, float(r_hi)), steep, 0.05, invalid)
    # onto the edge itself: the strongest one just below, since a faint hyaloid membrane lying a few
    # micrometres above the ILM has an edge of its own
    ilm = _snap(grad, ilm, 2, max(2, int(round(30.0 * px))))
    at = np.clip(np.round(ilm).astype(np.int64), 0, h - 1)
    found &= contrast[at, np.arange(nb)] > _ILM_CONTRAST  # a path through the vitreous is no ILM
    # a short stretch with weak contrast (the foveal pit over the dark ONL) lies between found columns
    gap = max(1, int(round(_GAP_MM * 1000.0 / bin_um)))
    found |= ndi.binary_closing(np.pad(found, gap), structure=np.ones(2 * gap + 1, bool))[gap:-gap] & valid
    has = found | (np.isfinite(ilm_given) if ilm_given is not None else False)
    if ilm_given is not None:
        ilm = np.where(np.isfinite(ilm_given), ilm_given, ilm)

    # 2. outer bright complex
    bm_given = _given_binned(given.get("BM"), size, nb)
    # the vitreous is filled with the tissue just below the ILM, so that the ILM edge cannot pass for
    # a later edge (the OPL's, or the top of the outer bright complex)
    top = np.clip(np.round(ilm).astype(np.int64) + 2, 0, h - 1)
    rows = np.arange(h)[:, None]
    filled = np.where(rows < top[None, :], b[top, np.arange(nb)][None, :], b)
    s_wide = ndi.gaussian_filter(filled, (10.0 * px, 1.0), mode="nearest")
    # the EZ..RPE complex is bright with the dark ONL above it; a thick bright RNFL (around the disc)
    # is bright too, but with more RNFL above it
    gap_lo, gap_len = int(round(70.0 * px)), max(2, int(round(40.0 * px)))
    above = _box_mean(s_wide, np.arange(h) - gap_lo, gap_len)
    colmax = np.maximum(s_wide.max(axis=0, keepdims=True), 1.0)
    peak_norm = (s_wide + np.maximum(s_wide - above, 0.0)) / colmax * 100.0
    lo = np.full(nb, _OUTER_UM[0] * px)
    hi = np.full(nb, _OUTER_UM[1] * px)
    if bm_given is not None:
        hi = np.where(np.isfinite(bm_given), np.maximum(bm_given - ilm, lo + 1.0), hi)
    outer = _trace_coarse(peak_norm, ilm, lo, hi, max(2, int(round(bin_um * 1.2 * px))), 0.4, invalid)

    # 3. lower edge of the RPE, BM
    # the first strong drop below the complex, not a drop into a choroidal vessel further down
    depth = np.arange(h, dtype=np.float32)[:, None] - outer[None, :]
    neg = -grad * np.clip(1.0 - depth / (120.0 * px), 0.3, 1.0)
    edge = _trace(neg, outer, np.zeros(nb), np.full(nb, 70.0 * px), max(2, int(round(bin_um * 1.2 * px))), 0.5, invalid)
    smooth_edge = _robust(edge, 5, 8.0 * px)
    win = max(3, int(round(_BASELINE_MM * 1000.0 / bin_um)))
    baseline = _closing(smooth_edge, win)
    lifted = smooth_edge < baseline - _LIFT_UM * px
    bm = np.where(lifted, np.maximum(baseline, smooth_edge), smooth_edge)
    if bm_given is not None:
        bm = np.where(np.isfinite(bm_given), bm_given, bm)

    # 4. RPE, EZ, ELM, each parallel to the line below it
    small = max(1, int(round(bin_um * 0.6 * px)))
    rpe = _trace(grad, edge, np.full(nb, -40.0 * px), np.full(nb, -6.0 * px), small, 0.5, invalid)
    ez = _trace(grad, rpe, np.full(nb, -75.0 * px), np.full(nb, -10.0 * px), small, 0.5, invalid)
    s_thin = ndi.gaussian_filter(b, (1.0, 2.0), mode="nearest")
    ridge = np.zeros_like(s_thin)
    ridge[3:-3] = s_thin[3:-3] - 0.5 * (s_thin[:-6] + s_thin[6:])
    elm = _trace(ridge, ez, np.full(nb, -40.0 * px), np.full(nb, -10.0 * px), small, 1.0, invalid)

    # 5. INL/OPL between the ILM and the ELM
    g_inl = ndi.gaussian_filter(filled, (2.0, 2.0), mode="nearest")
    grad_inl = np.zeros_like(g_inl)
    grad_inl[1:-1] = 0.5 * (g_inl[2:] - g_inl[:-2])
    # the ONL is the thick dark band over the ELM: its top (the OPL/ONL boundary) is the strongest
    # bright-over-dark step at a 20 um / 40 um scale, and the INL/OPL boundary the dark-to-bright
    # edge of the OPL just above it
    rows_h = np.arange(h)
    a_len, b_len = max(2, int(round(20.0 * px))), max(3, int(round(40.0 * px)))
    step = _box_mean(g_inl, rows_h - a_len, a_len) - _box_mean(g_inl, rows_h + 1, b_len)
    # ... and everything from it down to the ELM is as dark as the ONL just above the ELM, which
    # tells it from the RNFL/GCL and IPL/INL steps that have brighter layers below them
    cols = np.arange(nb)
    csum = np.vstack([np.zeros((1, nb)), np.cumsum(g_inl, axis=0, dtype=np.float64)])
    elm_r = np.clip(np.round(elm).astype(np.int64), 2, h)
    onl_len = max(2, int(round(14.0 * px)))
    onl_start = np.clip(elm_r - int(round(6.0 * px)) - onl_len, 0, h)
    onl_level = (csum[onl_start + onl_len, cols] - csum[onl_start, cols]) / onl_len
    start = np.clip(rows_h[:, None] + 1, 0, elm_r[None, :] - 1)
    to_elm = (csum[elm_r, cols][None, :] - csum[start, cols]) / np.maximum(elm_r[None, :] - start, 1)
    retina = np.percentile(g_inl[:, valid], 90)
    span_onl = np.maximum(retina - onl_level, 10.0)[None, :]
    step *= np.clip(1.0 - (to_elm - onl_level[None, :]) / (0.5 * span_onl), 0.0, 1.0)
    lo_onl = np.minimum(ilm - elm + 3.0, -20.0 * px)
    jump = max(2, int(round(bin_um * 0.8 * px)))
    onl = _trace(step, elm, lo_onl, np.full(nb, -12.0 * px), jump, 0.3, invalid)
    lo_inl = np.minimum(ilm - onl + 1.0, -3.0 * px)
    inl = _trace(grad_inl, onl, np.maximum(lo_inl, -45.0 * px), np.full(nb, -3.0 * px), jump, 0.3, invalid)

    lines = {"ILM": ilm, "INL": inl, "ELM": elm, "EZ": ez, "RPE": rpe, "BM": bm}
    prev = None
    for name in _ESTIMATED:  # ILM <= INL <= ELM <= EZ <= RPE <= BM
        if prev is not None:
            lines[name] = np.maximum(lines[name], prev)
        prev = lines[name]
    for name in ("RPE", "EZ", "ELM", "INL"):  # and never below BM (a given BM wins)
        nxt = {"RPE": "BM", "EZ": "RPE", "ELM": "EZ", "INL": "ELM"}[name]
        lines[name] = np.minimum(lines[name], lines[nxt])

    centres = np.arange(nb) * size + (size - 1) / 2.0
    cols = np.arange(w)
    keep = np.repeat(has, size)[:w] & ~blank
    out = {}
    for name, line in lines.items():
        full = np.interp(cols, centres, line).astype(np.float32)
        full[~keep] = np.nan
        out[name] = full
    for name in ("ILM", "BM"):
        if name in given:
            g = np.asarray(given[name], dtype=np.float32)
            out[name] = np.where(np.isfinite(g), g, out[name]).astype(np.float32)
    return out
