"""The report's anatomy: ETDRS grid figure, HRF per layer zone, layer lines in the gallery.

The records are built by hand over a small synthetic store, so every number the report shows is
known here; the real store path is covered by the report built from saved results with anatomy.
"""

from __future__ import annotations

import dataclasses
import io
import re
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from pypdf import PdfReader

from hrf_batch.report.figures import draw_etdrs_grid, etdrs_figure, etdrs_layout, gallery_figure
from hrf_batch.report.pdf import anatomy_blocks, patient_report_html, write_pdf
from hrf_batch.report.sources import SourceReader
from hrf_batch.results import SUBFIELDS, ZONE_UNKNOWN, ZONES
from hrf_batch.store import Store, StoredBScan, StoredVolume, open_store
from hrf_batch.store.records import EtdrsBurden, LayerBurden, StoredAnatomy, StoredFovea

from test_report import SPEC, fill_store

# the 11 HRF of P001's OD on 2023-04-11: 8 on the grid, 2 outside it, 1 without a position
COUNTS = {"C0": 2, "S1": 1, "N1": 1, "I1": 0, "T1": 1, "S2": 0, "N2": 3, "I2": 0, "T2": 0}
PLACES = ["outside", "outside", "unknown"] + [name for name, n in COUNTS.items() for _ in range(n)]
THICKNESS = {name: 250.0 + 10.0 * i for i, name in enumerate(SUBFIELDS)}
ZONE_COUNTS = {"above-ilm": 0, "inner-retina": 3, "outer-retina": 4, "elm-bm": 2, "below-bm": 1, ZONE_UNKNOWN: 1}
VMAX = max(COUNTS.values())


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(png)).size


# --- the grid figure ---------------------------------------------------------------------------


@pytest.mark.parametrize("eye, nasal_sign", [("OD", 1.0), ("OS", -1.0)])
def test_grid_puts_nasal_on_the_eyes_side_and_superior_on_top(eye: str, nasal_sign: float) -> None:
    layout = etdrs_layout(eye)
    assert np.sign(layout.sides["N"][0]) == nasal_sign and np.sign(layout.sides["T"][0]) == -nasal_sign
    assert layout.sides["S"][1] > 0 > layout.sides["I"][1] and abs(layout.sides["S"][0]) < 1e-9
    for ring in ("1", "2"):
        assert np.sign(layout.cells["N" + ring][0]) == nasal_sign and np.sign(layout.cells["T" + ring][0]) == -nasal_sign
        assert layout.cells["S" + ring][1] > 0 > layout.cells["I" + ring][1]
    assert layout.cells["C0"] == (0.0, 0.0)
    # the quadrant wedges are split by the diagonals: nasal spans ±45° around its side
    inner, outer, theta1, theta2 = layout.wedges["N2"]
    assert (inner, outer) == (1.5, 3.0) and theta2 - theta1 == 90.0
    assert np.isclose(np.cos(np.radians((theta1 + theta2) / 2)), nasal_sign)

    # the figure draws its text where the layout says, with the counts and thicknesses given
    fig = Figure(figsize=(3, 3))
    FigureCanvasAgg(fig)
    texts = draw_etdrs_grid(fig.subplots(), COUNTS, THICKNESS, eye, vmax=VMAX)
    assert np.sign(texts["N"].get_position()[0]) == nasal_sign and texts["N"].get_text() == "N"
    assert np.sign(texts["N2"].get_position()[0]) == nasal_sign
    assert {name: texts[name].get_text() for name in SUBFIELDS} == {k: str(v) for k, v in COUNTS.items()}
    shown = {t.get_text() for t in fig.axes[0].texts}
    assert {f"{t:.0f}" for t in THICKNESS.values()} <= shown


def test_grid_figure_shades_the_busiest_subfield_on_the_nasal_side() -> None:
    """Pixels agree with the layout: N2 (most HRF, darkest) is right of centre for OD, left for OS."""
    darkest_x = {}
    for eye in ("OD", "OS"):
        png = etdrs_figure(COUNTS, THICKNESS, eye, vmax=VMAX)
        width, height = png_size(png)
        assert 350 <= width <= 600 and width == height  # 6.2 cm at 200 dpi
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        red = (rgb[..., 0] > 140) & (rgb[..., 1] < 40) & (rgb[..., 2] < 40)  # the deep end of the colour map
        assert red.sum() > 500, eye
        darkest_x[eye] = np.nonzero(red)[1].mean() / width
    assert darkest_x["OD"] > 0.6 and darkest_x["OS"] < 0.4


def test_unknown_eye_is_drawn_like_od_and_says_so() -> None:
    fig = Figure(figsize=(3, 3))
    FigureCanvasAgg(fig)
    texts = draw_etdrs_grid(fig.subplots(), COUNTS, {}, "unknown", vmax=VMAX)
    assert texts["N"].get_text() == "N?" and texts["N"].get_position()[0] > 0
    assert texts["S"].get_text() == "S"


# --- layer lines in the gallery ---------------------------------------------------------------


def test_gallery_draws_layer_lines_faintly() -> None:
    shape = (96, 128)
    rng = np.random.default_rng(0)
    image = rng.integers(60, 120, size=shape).astype(np.float32)
    mask = np.zeros(shape, dtype=bool)
    mask[40:44, 60:64] = True
    bscan = StoredBScan(0, (0.9, 0.1), 0.9, 0.1, 1, 16, 0.001, ((42, 62),), mask, None, None, ())
    cols = np.arange(shape[1])
    ilm = (30 + 3 * np.sin(cols / 20)).astype(np.float32)
    bm = np.full(shape[1], 60.0, dtype=np.float32)
    bm[:20] = np.nan  # unknown there: a gap, not a line to row 0
    plain = gallery_figure(image, bscan, shape)
    lined = gallery_figure(image, bscan, shape, layers={"ILM": ilm, "BM": bm})
    assert png_size(lined) == png_size(plain) and png_size(lined)[0] > 1000
    a = np.asarray(Image.open(io.BytesIO(plain)).convert("RGB")).astype(int)
    b = np.asarray(Image.open(io.BytesIO(lined)).convert("RGB")).astype(int)
    changed = np.abs(a - b).sum(axis=2) > 0
    assert changed.any()
    left = changed[:, : changed.shape[1] // 2]
    assert left.sum() > 0.95 * changed.sum()  # lines on the B-scan panel only
    # faint: the lines tint the B-scan, they do not paint over it in full colour
    tinted = b[changed] - a[changed]
    assert np.abs(tinted).max() < 200


# --- the report from hand-built records -------------------------------------------------------


def _layers_from_pixels(bscans: np.ndarray) -> dict[str, np.ndarray]:
    """Plausible ILM, INL, ELM and BM rows for a synthetic volume: the bright band's edges per column."""
    n, height, width = bscans.shape
    out = {name: np.full((n, width), np.nan, dtype=np.float32) for name in ("ILM", "INL", "ELM", "BM")}
    for i, image in enumerate(bscans):
        bright = image > 0.5 * np.percentile(image, 99)
        rows = np.arange(height)[:, None]
        has = bright.any(axis=0)
        top = np.where(bright, rows, height).min(axis=0).astype(np.float32)
        bottom = np.where(bright, rows, -1).max(axis=0).astype(np.float32)
        out["ILM"][i, has], out["BM"][i, has] = top[has], bottom[has]
        out["INL"][i, has] = top[has] + 0.4 * (bottom[has] - top[has])
        out["ELM"][i, has] = top[has] + 0.75 * (bottom[has] - top[has])
    return out


def _anatomy(volume: StoredVolume, *, grid: bool, source: str = "device") -> StoredAnatomy:
    pixels = SourceReader().pixels(volume)
    assert pixels.bscans is not None, pixels.problem
    layers = _layers_from_pixels(pixels.bscans)
    fovea = StoredFovea(1.0, volume.bscan_shape[1] / 2, 3.0, 2.9, "thickness-map") if grid else None
    return StoredAnatomy(
        layer_source=source, layer_names=tuple(layers), estimated_layer_names=(), layers=layers, fovea=fovea,
        fovea_note="centre of the thinnest retina (thickness map)" if grid else "line scan: no fovea",
        mean_thickness_um=287.4, etdrs_thickness_um=dict(THICKNESS) if grid else {},
    )


class HandBuiltAnatomy:
    """The store's answers for P001 with anatomy added: 2023-04-11 OD has a grid, OS a line scan, the
    first visit's OD a grid without HRF, and its OS an old run without anatomy."""

    LATEST = date(2023, 4, 11)

    def __init__(self, store: Store) -> None:
        self.store = store
        self.anatomies: dict[tuple[date | None, str], StoredAnatomy] = {}
        for v in store.volume_results("P001", masks=False):
            if (v.visit_date, v.eye) != (date(2023, 1, 10), "OS"):
                source = "device" if v.eye == "OD" else "ground-truth"
                self.anatomies[(v.visit_date, v.eye)] = _anatomy(v, grid=v.eye == "OD", source=source)

    def volume_results(self, patient_id: str, *, masks: bool = True) -> list[StoredVolume]:
        out = []
        for v in self.store.volume_results(patient_id, masks=masks):
            v = dataclasses.replace(v, anatomy=self.anatomies.get((v.visit_date, v.eye)))
            if (v.visit_date, v.eye) == (self.LATEST, "OD"):
                v = dataclasses.replace(v, bscans=_placed(v.bscans))
            out.append(v)
        return out

    def patient_summary(self, patient_id: str):
        summary = self.store.patient_summary(patient_id)
        etdrs = [
            EtdrsBurden("P001", self.LATEST, "OD", name, 1, n, 0.001 * n, None, THICKNESS[name] + 1.0)
            for name, n in COUNTS.items()
        ]
        etdrs += [EtdrsBurden("P001", date(2023, 1, 10), "OD", name, 1, 0, 0.0, 0.0, None) for name in SUBFIELDS]
        layers = [
            LayerBurden("P001", v.visit_date, v.eye, zone, 1, n, 0.0011 * n)
            for v in summary.visits
            for zone, n in ((z, ZONE_COUNTS[z] if (v.visit_date, v.eye) == (self.LATEST, "OD") else 0) for z in ZONE_COUNTS)
        ]
        return dataclasses.replace(summary, etdrs=tuple(etdrs), layers=tuple(layers))

    def __getattr__(self, name: str):
        return getattr(self.store, name)


def _placed(bscans: tuple[StoredBScan, ...]) -> tuple[StoredBScan, ...]:
    """The B-scans with their lesions given the subfields of PLACES, in lesion order."""
    places = iter(PLACES)
    out = []
    for b in bscans:
        lesions = tuple(dataclasses.replace(les, subfield=next(places)) for les in b.lesions)
        out.append(dataclasses.replace(b, lesions=lesions))
    assert next(places, None) is None, "PLACES must name one subfield per HRF"
    return tuple(out)


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("anatomy")
    from hrf_batch.synthetic.study import write_synthetic_study

    write_synthetic_study(out / "study", SPEC)
    with open_store(f"sqlite:///{out / 'db.sqlite'}") as store:
        fill_store(store, out / "study")
        wrapped = HandBuiltAnatomy(store)
        yield wrapped, patient_report_html(wrapped, "P001", report_date=date(2024, 1, 2))  # type: ignore[arg-type]


def _block(html: str, label: str) -> str:
    """The HTML of the anatomy block headed ``label``."""
    start = html.index(f'<h3 class="anatomy-head">{label} ·')
    end = html.find('<div class="anatomy">', start)
    return html[start : end if end > 0 else html.index("<h2>B-scans with most HRF")]


def _zone_cells(block: str) -> dict[str, tuple[int, str]]:
    cells = r'<tr class="zone-([a-z-]+)"><td>[^<]*</td><td class="num">(\d+)</td><td class="num">([\d.]+)</td>'
    rows = re.findall(cells, block)
    return {zone: (int(n), area) for zone, n, area in rows}


def test_report_html_shows_grid_zones_and_the_no_grid_note(hand_built) -> None:
    _store, html = hand_built
    assert "Where the HRF lie" in html
    latest_od = _block(html, "2023-04-11 · OD")
    assert latest_od.count('class="etdrs"') == 1 and "Outside 6 mm: 2 · no position on the grid: 1" in latest_od
    assert "No ETDRS grid" not in latest_od
    cells = _zone_cells(latest_od)
    assert list(cells) == [*ZONES, ZONE_UNKNOWN]
    assert {z: n for z, (n, _a) in cells.items()} == ZONE_COUNTS
    assert cells["outer-retina"][1] == f"{0.0011 * ZONE_COUNTS['outer-retina']:.4f}" and cells["above-ilm"] == (0, "0.0000")
    assert 'style="width: 100%"' in latest_od and "Layer lines: device" in latest_od and "287 µm" in latest_od

    latest_os = _block(html, "2023-04-11 · OS")
    assert 'class="etdrs"' not in latest_os
    assert "No ETDRS grid:</b> line scan: no fovea." in latest_os
    assert set(_zone_cells(latest_os).values()) == {(0, "0.0000")} and "Layer lines: ground truth" in latest_os

    old_os = _block(html, "2023-01-10 · OS")
    assert "analysed before anatomy was kept" in old_os and "<table" not in old_os
    assert "Outside 6 mm: 0" in _block(html, "2023-01-10 · OD")


def test_grid_numbers_come_from_the_view_and_thickness_falls_back_to_the_volumes(hand_built) -> None:
    store, _html = hand_built
    found = anatomy_blocks(store.patient_summary("P001"), store.volume_results("P001", masks=False))
    blocks = {b["label"]: b for b in found}
    od = blocks["2023-04-11 · OD"]
    assert od["subfield_counts"] == COUNTS and od["outside"] == 2 and od["no_subfield"] == 1
    assert od["thickness"] == {name: f"{t + 1.0:.0f}" for name, t in THICKNESS.items()}  # the view's, not the volume's
    first = blocks["2023-01-10 · OD"]  # the view has no thickness there: the volume's is shown
    assert first["thickness"] == {name: f"{t:.0f}" for name, t in THICKNESS.items()} and first["outside"] == 0
    assert blocks["2023-04-11 · OS"]["grid_png"] is None and blocks["2023-04-11 · OS"]["no_grid"] == "line scan: no fovea"
    assert not blocks["2023-01-10 · OS"]["stored"]


def test_gallery_caption_names_the_layer_source(hand_built) -> None:
    _store, html = hand_built
    captions = re.findall(r"iterations · ([^<]+)</p>", html)
    assert captions, "the gallery must show B-scans for this test to mean anything"
    for caption in captions:
        assert caption in ("layer lines (device): ILM, INL, ELM, BM", "layer lines (ground truth): ILM, INL, ELM, BM"), caption


def test_report_without_anatomy_has_no_anatomy_section(hand_built) -> None:
    store, _html = hand_built
    plain = store.store  # the unwrapped store: runs stored before anatomy existed
    assert anatomy_blocks(plain.patient_summary("P001"), plain.volume_results("P001", masks=False)) == []
    assert "Where the HRF lie" not in patient_report_html(plain, "P001")


def test_pdf_with_anatomy_renders(hand_built, tmp_path: Path) -> None:
    _store, html = hand_built
    path = write_pdf(html, tmp_path / "P001_hrf_report.pdf")
    reader = PdfReader(path)
    text = " ".join(" ".join((page.extract_text() or "").split()) for page in reader.pages)
    assert "Where the HRF lie" in text and "Outside 6 mm: 2" in text
    assert "No ETDRS grid: line scan: no fovea." in text and "Layer lines: ground truth" in text
    assert "layer lines (device): ILM, INL, ELM, BM" in text
    assert len(reader.pages) >= 4


# --- the report from results saved with anatomy -------------------------------------------------


def _saved_with_anatomy(tmp_path: Path) -> tuple[Store, dict[str, int]]:
    """One volume saved through the store with layer lines, a fovea and lesions in known places."""
    from hrf_batch.io.volume import LayerLines
    from hrf_batch.results import BScanResult, Fovea, Lesion, VolumeAnatomy, VolumeResult

    from conftest import make_test_volume
    from test_report import TEST_RUN

    volume = make_test_volume(n=3, height=40, width=64, eye="OS")
    meta = dataclasses.replace(volume.meta, patient_id="P321", source_sha256="3" * 64, source_path="/gone/P321.vol")
    lines = (("ILM", 8), ("INL", 16), ("ELM", 24), ("BM", 32))
    rows = {name: np.full((3, 64), row, dtype=np.float32) for name, row in lines}
    rows["ELM"][:, :10] = np.nan
    anatomy = VolumeAnatomy(
        layers=LayerLines(rows, "ground-truth"), fovea=Fovea(1.0, 32.0, 0.58, 0.42, "ground-truth"),
        fovea_note="the generator's foveal centre", thickness_um=np.full((3, 64), 93.0, dtype=np.float32),
        etdrs_thickness_um={"C0": 93.0, "T1": 95.0},
    )
    places = [("C0", "inner-retina"), ("C0", "outer-retina"), ("T1", "outer-retina"), ("outside", "elm-bm"),
              ("unknown", "unknown")]
    bscans = []
    for i in range(3):
        lesions = []
        for k, (subfield, zone) in enumerate(places if i == 1 else places[:1]):
            mask = np.zeros((40, 64), dtype=bool)
            mask[12 + 4 * k : 14 + 4 * k, 5 + 10 * k : 8 + 10 * k] = True
            r, c = np.nonzero(mask)
            lesions.append(Lesion(i, (float(r.mean()), float(c.mean())), (int(r.min()), int(c.min()), int(r.max()) + 1,
                                  int(c.max()) + 1), int(mask.sum()), np.ones((2, 3), dtype=bool), zone, subfield))
        full = np.zeros((40, 64), dtype=bool)
        for les in lesions:
            r0, c0, r1, c1 = les.bbox_rc
            full[r0:r1, c0:c1] = True
        peaks = tuple((int(les.centroid_rc[0]), int(les.centroid_rc[1])) for les in lesions)
        bscans.append(BScanResult(i, (0.9, 0.1), peaks, full, tuple(lesions)))
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.save_volume_result(VolumeResult(meta, (40, 64), tuple(bscans), TEST_RUN, anatomy=anatomy))
    expected = {"C0": 4, "T1": 1}  # C0: one on each B-scan and a second on B-scan 1; T1: one on B-scan 1
    return store, expected


def test_report_from_saved_anatomy_shows_the_views_numbers_and_the_stored_lines(tmp_path: Path) -> None:
    store, expected = _saved_with_anatomy(tmp_path)
    with store:
        summary = store.patient_summary("P321")
        html = patient_report_html(store, "P321")
    view = {r.subfield: r.hrf_count for r in summary.etdrs}
    assert view == {name: expected.get(name, 0) for name in SUBFIELDS}  # the store agrees with the places saved
    block = html[html.index('<h3 class="anatomy-head">'):html.index("<h2>B-scans with most HRF")]
    assert block.count('class="etdrs"') == 1 and "Outside 6 mm: 1 · no position on the grid: 1" in block
    zones = {z: n for z, (n, _a) in _zone_cells(block).items()}
    assert zones == {r.zone: r.hrf_count for r in summary.layers}
    assert zones["inner-retina"] == 3 and zones["outer-retina"] == 2 and zones["elm-bm"] == 1
    assert "Layer lines: ground truth" in block and "93 µm" in block and "the generator" in block
    # the results are read without layer lines; the gallery reads them for its B-scans
    captions = re.findall(r"iterations · ([^<]+)</p>", html)
    assert captions and all(c == "layer lines (ground truth): ILM, INL, ELM, BM" for c in captions)


def test_caption_names_the_lines_the_estimate_added_to_a_device_set() -> None:
    from hrf_batch.report.pdf import _layer_caption

    rows = {n: np.full(8, 10.0 + i, np.float32) for i, n in enumerate(("ILM", "INL", "ELM", "BM"))}
    anatomy = StoredAnatomy(layer_source="device", layer_names=tuple(rows), estimated_layer_names=("INL", "ELM"),
                            layers=None, fovea=None, fovea_note="line scan: no fovea", mean_thickness_um=None,
                            etdrs_thickness_um={})
    assert _layer_caption(anatomy, rows) == "layer lines (device): ILM, BM; estimated: INL, ELM"
