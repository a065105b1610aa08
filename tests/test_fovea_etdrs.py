"""Retinal thickness map, foveal centre and ETDRS grid: where a point lies around the fovea, on
right and left eyes, whichever way the export orders its B-scans."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hrf_batch.anatomy.etdrs import etdrs_thickness, lesion_subfield, subfield_areas_mm2, subfield_of
from hrf_batch.anatomy.fovea import find_fovea, fovea_mm
from hrf_batch.anatomy.thickness import thickness_map
from hrf_batch.io.volume import BScanPosition, LayerLines, Spacing, VolumeMeta
from hrf_batch.results import ETDRS_RADII_MM, SUBFIELD_OUTSIDE, SUBFIELD_UNKNOWN, SUBFIELDS, Fovea
from hrf_batch.synthetic.study import _positions

N, W = 25, 512
LATERAL = 6.0 / W
BETWEEN = 5.8 / (N - 1)
FIELD = 9.0  # localizer side in mm


def make_meta(eye: str = "OD", n: int = N, width: int = W, pattern: str = "volume", *, flip: bool = False,
              positions: tuple[BScanPosition, ...] | None = None) -> VolumeMeta:
    """Metadata laid out like the synthetic study's (B-scan 0 inferior); ``flip``: B-scan 0 superior."""
    pos = _positions(n, width, LATERAL, FIELD) if positions is None else positions
    if flip:
        pos = pos[::-1]
    return VolumeMeta(source_path="", source_sha256="", source_format="heyex-vol", series_uid="s", patient_id="P",
                      eye=eye, visit_date=None, acquired_at=None, device="d", scan_pattern=pattern,
                      spacing=Spacing(LATERAL, 0.00387, BETWEEN if n > 1 else 0.0), positions=pos)


def pit_map(bscan: float, col: float, n: int = N, width: int = W, depth: float = 150.0) -> np.ndarray:
    """An analytic foveal pit: 300 um retina thinned by ``depth`` um around (bscan, col)."""
    y = (np.arange(n)[:, None] - bscan) * BETWEEN
    x = (np.arange(width)[None, :] - col) * LATERAL
    r = np.hypot(x, y)
    return (300.0 - depth * np.exp(-((r / 0.5) ** 2.4))).astype(np.float32)


def fovea_at(meta: VolumeMeta, bscan: float, col: float) -> Fovea:
    x, y = fovea_mm(meta, bscan, col, W)
    return Fovea(bscan=bscan, col=col, x_mm=x, y_mm=y, method="ground-truth")


# --- thickness map ---------------------------------------------------------------------------

def test_thickness_map_is_ilm_to_bm_in_micrometres_with_nan_where_unknown_or_crossed():
    ilm = np.array([[10.0, 20.0, np.nan, 30.0]], np.float32)
    bm = np.array([[110.0, np.nan, 80.0, 25.0]], np.float32)
    t = thickness_map(LayerLines({"ILM": ilm, "BM": bm}, "estimated"), axial_mm=0.004)
    assert t is not None and t.dtype == np.float32 and t.shape == (1, 4)
    assert t[0, 0] == pytest.approx(400.0)
    assert np.isnan(t[0, 1:]).all()  # BM unknown, ILM unknown, BM above ILM


def test_thickness_map_is_none_without_ilm_or_bm():
    rows = np.zeros((2, 3), np.float32)
    assert thickness_map(LayerLines({"ILM": rows}, "device"), 0.004) is None
    assert thickness_map(LayerLines({"BM": rows, "RPE": rows}, "device"), 0.004) is None
    assert thickness_map(None, 0.004) is None


@pytest.mark.parametrize("axial", [0.0, -1.0, float("nan"), None])
def test_thickness_map_refuses_a_spacing_that_is_not_positive(axial):
    rows = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="axial spacing"):
        thickness_map(LayerLines({"ILM": rows, "BM": rows + 1}, "device"), axial)


def test_thickness_map_from_a_real_spectralis_line_scan(fixtures_dir):
    """The device's own ILM and BM of a real foveal line scan: a plausible retina, thinnest near the
    middle of the scan, unknown where the device did not segment; a line scan has no fovea."""
    from hrf_batch.io.readers import read_volume

    vol = read_volume(fixtures_dir / "spectralis-raw-data" / "Willis_B_716_0.vol")
    assert vol.layers is not None and vol.meta.scan_pattern == "line"
    t = thickness_map(vol.layers, vol.meta.spacing.axial_mm)
    assert t is not None and t.shape == (1, vol.bscans.shape[2])
    known = np.isfinite(t[0])
    assert 0.5 < known.mean() < 1.0  # the device leaves the scan's ends unsegmented
    assert 150.0 < float(np.nanmin(t)) < 300.0 < float(np.nanmax(t)) < 500.0
    width = t.shape[1]
    assert width / 3 < int(np.nanargmin(t[0])) < 2 * width / 3
    assert find_fovea(t, vol.meta, width) == (None, "line scan: no fovea (one B-scan)")


# --- fovea -----------------------------------------------------------------------------------

def test_fovea_mm_interpolates_between_neighbouring_bscans():
    meta = make_meta()
    a, b = fovea_mm(meta, 7.0, 100.0, W), fovea_mm(meta, 8.0, 100.0, W)
    mid = fovea_mm(meta, 7.25, 100.0, W)
    assert mid == pytest.approx((a[0] + 0.25 * (b[0] - a[0]), a[1] + 0.25 * (b[1] - a[1])))
    assert a[1] > b[1]  # study convention: B-scan 0 is inferior (larger y)
    assert fovea_mm(meta, N - 1.0, 0.0, W) is not None
    assert fovea_mm(meta, N - 0.5, 0.0, W) is None
    assert fovea_mm(meta, -0.1, 0.0, W) is None
    assert fovea_mm(make_meta(positions=()), 3.0, 0.0, W) is None


@pytest.mark.parametrize("bscan, col", [(12.37, 260.4), (9.6, 201.2), (14.0, 300.0), (11.5, 255.5)])
def test_find_fovea_on_an_analytic_pit_is_within_a_pixel(bscan, col):
    meta = make_meta()
    fovea, note = find_fovea(pit_map(bscan, col), meta, W)
    assert fovea is not None, note
    assert fovea.method == "thickness-map"
    assert abs(fovea.bscan - bscan) < 1.0 and abs(fovea.col - col) < 1.0
    assert (fovea.x_mm, fovea.y_mm) == pytest.approx(fovea_mm(meta, fovea.bscan, fovea.col, W))
    assert "thickness map" in note


def test_find_fovea_tolerates_missing_a_scans_and_noise():
    rng = np.random.default_rng(3)
    t = pit_map(12.2, 270.0) + rng.normal(0.0, 6.0, (N, W)).astype(np.float32)
    t[:, 100:130] = np.nan  # a shadowed stripe
    t[5, :] = np.nan  # a B-scan without layer lines
    fovea, note = find_fovea(t, make_meta(), W)
    assert fovea is not None, note
    assert abs(fovea.bscan - 12.2) < 1.0 and abs(fovea.col - 270.0) < 2.0


def test_find_fovea_rejects_a_flat_map_and_a_shallow_dip():
    meta = make_meta()
    fovea, note = find_fovea(np.full((N, W), 300.0, np.float32), meta, W)
    assert fovea is None and note.startswith("no foveal pit found") and "30 µm" in note
    fovea, note = find_fovea(pit_map(12.0, 256.0, depth=20.0), meta, W)
    assert fovea is None and note.startswith("no foveal pit found")


def test_find_fovea_ignores_a_pit_outside_the_central_area():
    fovea, note = find_fovea(pit_map(12.0, 20.0), make_meta(), W)  # thinning at the scan's edge only
    assert fovea is None or abs(fovea.col - 20.0) > 50.0, note


def test_find_fovea_rejects_a_mostly_unknown_map():
    t = pit_map(12.0, 256.0)
    t[:, 60:450] = np.nan
    fovea, note = find_fovea(t, make_meta(), W)
    assert fovea is None and "no foveal pit found" in note and "known" in note


@pytest.mark.parametrize("pattern, n, words", [("line", 1, "line scan"), ("circle", 1, "circle scan"),
                                               ("radial", 6, "radial scan"), ("unknown", 25, "unknown scan pattern")])
def test_find_fovea_gives_none_with_a_note_for_scans_other_than_a_volume(pattern, n, words):
    meta = make_meta(n=n, pattern=pattern)
    fovea, note = find_fovea(pit_map(n / 2, 256.0, n=n), meta, W)
    assert fovea is None and note.startswith(words) and "no fovea" in note


def test_find_fovea_needs_enough_bscans_and_layer_lines():
    fovea, note = find_fovea(pit_map(2.0, 256.0, n=4), make_meta(n=4), W)
    assert fovea is None and "4 B-scans" in note
    fovea, note = find_fovea(None, make_meta(), W)
    assert fovea is None and "ILM and BM" in note


# --- ETDRS grid ------------------------------------------------------------------------------

@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("eye", ["OD", "OS"])
def test_a_nasal_focus_lands_in_a_nasal_subfield_in_both_eyes(eye, flip):
    """The study writes a left eye as the mirror image of a right one: nasal is the right side of an
    OD B-scan and the left side of an OS B-scan, whichever B-scan the export stores first."""
    meta = make_meta(eye, flip=flip)
    fovea = fovea_at(meta, 12.0, 256.0)
    nasal_col = 256.0 + (1.0 if eye == "OD" else -1.0) * 1.0 / LATERAL  # 1 mm towards the disc
    assert lesion_subfield(meta, fovea, 12, nasal_col, W) == "N1"
    assert lesion_subfield(meta, fovea, 12, 256.0 + (256.0 - nasal_col) * 2.2, W) == "T2"
    superior = 16 if not flip else 8  # B-scan 0 inferior, unless the export flips the order
    assert lesion_subfield(meta, fovea, superior, 256.0, W) == "S1"
    assert lesion_subfield(meta, fovea, 24 - superior, 256.0, W) == "I1"


@pytest.mark.parametrize("eye", ["OD", "OS"])
def test_every_subfield_is_reachable(eye):
    sign = 1.0 if eye == "OD" else -1.0
    points = {"C0": (0.0, 0.0), "S1": (0.0, -1.0), "I1": (0.0, 1.0), "N1": (sign, 0.0), "T1": (-sign, 0.0),
              "S2": (0.2, -2.0), "I2": (-0.2, 2.0), "N2": (2 * sign, 0.3), "T2": (-2 * sign, -0.3),
              SUBFIELD_OUTSIDE: (2.5, 2.5)}
    found = {name: subfield_of(5.0 + dx, 4.0 + dy, 5.0, 4.0, eye) for name, (dx, dy) in points.items()}
    assert found == {name: name for name in points}
    assert set(found) == set(SUBFIELDS) | {SUBFIELD_OUTSIDE}


def test_points_on_a_border_go_to_the_documented_side():
    c0, inner, outer = ETDRS_RADII_MM
    assert subfield_of(c0, 0.0, 0.0, 0.0, "OD") == "C0"  # on a circle: the inner subfield
    assert subfield_of(math.nextafter(c0, 1.0), 0.0, 0.0, 0.0, "OD") == "N1"
    assert subfield_of(0.0, -inner, 0.0, 0.0, "OD") == "S1"
    assert subfield_of(0.0, outer, 0.0, 0.0, "OS") == "I2"
    assert subfield_of(0.0, math.nextafter(outer, 4.0), 0.0, 0.0, "OS") == SUBFIELD_OUTSIDE
    assert subfield_of(1.5, -1.5, 0.0, 0.0, "OD") == "S2"  # on a diagonal: superior or inferior
    assert subfield_of(-0.7, 0.7, 0.0, 0.0, "OS") == "I1"
    assert subfield_of(0.0, 0.0, 0.0, 0.0, "OD") == "C0"


def test_unknown_eye_names_the_centre_and_outside_but_not_the_rings():
    assert subfield_of(0.2, 0.1, 0.0, 0.0, "unknown") == "C0"
    assert subfield_of(1.0, 0.0, 0.0, 0.0, "unknown") == SUBFIELD_UNKNOWN
    assert subfield_of(0.0, -2.0, 0.0, 0.0, "unknown") == SUBFIELD_UNKNOWN
    assert subfield_of(4.0, 0.0, 0.0, 0.0, "unknown") == SUBFIELD_OUTSIDE
    with pytest.raises(ValueError, match="eye"):
        subfield_of(0.0, 0.0, 0.0, 0.0, "left")


def test_lesion_subfield_is_unknown_without_fovea_or_position():
    meta = make_meta()
    assert lesion_subfield(meta, None, 12, 256.0, W) == SUBFIELD_UNKNOWN
    assert lesion_subfield(meta, Fovea(12.0, 256.0, None, None, "thickness-map"), 12, 256.0, W) == SUBFIELD_UNKNOWN
    assert lesion_subfield(make_meta(positions=()), fovea_at(meta, 12.0, 256.0), 12, 256.0, W) == SUBFIELD_UNKNOWN


def test_subfield_areas_add_up_to_the_grid():
    areas = subfield_areas_mm2()
    assert list(areas) == list(SUBFIELDS)
    assert areas["C0"] == pytest.approx(math.pi * 0.25)
    assert areas["N1"] == pytest.approx(math.pi * (1.5**2 - 0.5**2) / 4)
    assert areas["T2"] == pytest.approx(math.pi * (3.0**2 - 1.5**2) / 4)
    assert sum(areas.values()) == pytest.approx(math.pi * 9.0)


def test_etdrs_thickness_means_the_a_scans_of_each_subfield():
    meta = make_meta("OD")
    fovea = fovea_at(meta, 12.0, 256.0)
    t = np.full((N, W), 300.0, np.float32)
    cols = np.arange(W)
    t[:, cols > 256] = 320.0  # nasal half of a right eye thicker (column 256 itself is the vertical border)
    t[12, 250:262] = 150.0  # the pit, in C0
    t[12, 256 + 90] = np.nan  # an unknown A-scan in N1 is left out, not averaged as 0
    out = etdrs_thickness(t, meta, fovea, W)
    assert list(out) == list(SUBFIELDS)  # 6 x 5.8 mm covers every subfield
    assert out["N1"] == pytest.approx(320.0) and out["N2"] == pytest.approx(320.0)
    assert out["T1"] == pytest.approx(300.0) and out["T2"] == pytest.approx(300.0)
    assert 150.0 < out["C0"] < 310.0
    assert etdrs_thickness(t, make_meta("OS"), fovea_at(make_meta("OS"), 12.0, 256.0), W)["T1"] == pytest.approx(320.0)


def test_etdrs_thickness_leaves_out_subfields_the_scan_does_not_reach():
    meta = make_meta("OD")
    fovea = fovea_at(meta, 12.0, 60.0)  # fovea near the temporal edge of a right-eye scan
    out = etdrs_thickness(np.full((N, W), 280.0, np.float32), meta, fovea, W)
    assert "T2" not in out and "N2" in out and "C0" in out
    assert etdrs_thickness(None, meta, fovea, W) == {}
    assert etdrs_thickness(np.full((N, W), 280.0, np.float32), meta, None, W) == {}
