"""The per-patient PDF: numbers from the store's views, figures from stored results, jinja2 + weasyprint.

Identifiers (name, birth date, source paths, which often carry names) appear only with
``show_identifiers=True``. Volumes are drawn one at a time and their pixels dropped afterwards,
so a patient with many visits does not hold every B-scan in memory; the layer lines are read only
for the gallery's volumes (:func:`gallery_layers`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import unicodedata
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from hrf_batch import __version__
from hrf_batch.io.volume import LAYER_NAMES
from hrf_batch.report import figures
from hrf_batch.report.errors import ReportError, UnknownPatientError
from hrf_batch.report.sources import SourcePixels, SourceReader
from hrf_batch.results import SUBFIELD_OUTSIDE, SUBFIELD_UNKNOWN, SUBFIELDS, ZONE_UNKNOWN, ZONES
from hrf_batch.store import PatientRecord, PatientSummary, Store, StoredBScan, StoredVolume, VisitBurden
from hrf_batch.store.read import ReviewAgreement
from hrf_batch.store.records import EtdrsBurden, LayerBurden, StoredAnatomy

log = logging.getLogger(__name__)

TEMPLATE = "patient_report.html"
NOTICE = "Research use only — not for clinical decisions"
GALLERY_SIZE = 6
LAYER_SOURCE_TEXT = {"device": "device", "estimated": "estimated", "ground-truth": "ground truth"}
ZONE_TEXT = {
    "above-ilm": "above ILM", "inner-retina": "inner retina (ILM – INL/OPL)",
    "outer-retina": "outer retina (INL/OPL – ELM)", "elm-bm": "ELM – BM", "below-bm": "below BM",
    ZONE_UNKNOWN: "unknown (no layer lines there)",
}


@dataclass(frozen=True)
class GalleryPick:
    """One B-scan chosen for the gallery, ranked by HRF count then area over the whole patient."""

    rank: int
    volume_id: int
    bscan_index: int


def find_patient(store: Store, patient_id: str, *, include_identifiers: bool = False) -> PatientRecord:
    """The patient's record; UnknownPatientError naming the patients that do exist (close matches
    first) otherwise. An empty or blank id is refused: a report is for one named patient."""
    if not patient_id.strip():
        raise ReportError("the patient id is empty", "pass the id as stored, e.g. --patient P012 "
                          "(`hrf-batch export` lists every patient in hrf_patients.csv)")
    patients = store.list_patients(include_identifiers=include_identifiers)
    for patient in patients:
        if patient.patient_id == patient_id:
            return patient
    raise UnknownPatientError(patient_id, [p.patient_id for p in patients], store.url)


def render_patient_report(
    store: Store, patient_id: str, out_dir: Path | str, *, show_identifiers: bool = False,
    gallery_size: int = GALLERY_SIZE, report_date: date | None = None,
) -> Path:
    """Write ``<out_dir>/<report_stem(patient_id)>_hrf_report.pdf`` and return its path.

    Raises UnknownPatientError for an id that is not in the database, ReportError when the PDF
    cannot be written.
    """
    html = patient_report_html(
        store, patient_id, show_identifiers=show_identifiers, gallery_size=gallery_size, report_date=report_date
    )
    return write_pdf(html, Path(out_dir) / f"{report_stem(patient_id)}_hrf_report.pdf")


def patient_report_html(
    store: Store, patient_id: str, *, show_identifiers: bool = False, gallery_size: int = GALLERY_SIZE,
    report_date: date | None = None,
) -> str:
    """The report as HTML: what the PDF shows, so its numbers can be checked without laying out pages."""
    patient = find_patient(store, patient_id, include_identifiers=show_identifiers)
    summary = store.patient_summary(patient_id)
    volumes = store.volume_results(patient_id, masks=False)
    picks = gallery_picks(volumes, gallery_size)
    lines = gallery_layers(store, volumes, picks)
    sections, gallery = _volume_sections(store, summary, volumes, picks, lines, show_identifiers)
    context = {
        "patient": patient, "show_identifiers": show_identifiers, "notice": NOTICE,
        "report_date": (report_date or date.today()).isoformat(), "version": __version__,
        "overview": _overview(summary, volumes), "visits": [_visit_row(v) for v in summary.visits],
        "trend_png": _data_uri(figures.trend_figure(summary.visits)) if summary.visits else None,
        "sections": sections, "gallery": gallery, "gallery_size": gallery_size,
        "anatomy": anatomy_blocks(summary, volumes),
        "review": review_rows(store.view_rows("hrf_review_agreement", patient_id), volumes),
        "unfinished": [_unfinished_row(v, show_identifiers) for v in store.unfinished_volumes(patient_id)],
    }
    context["settings"], context["provenance"] = provenance(volumes, show_identifiers)
    return render_html(context)


def render_html(context: dict[str, Any]) -> str:
    """The report's HTML from the packaged template (found in an installed wheel as well)."""
    env = Environment(
        loader=PackageLoader("hrf_batch.report", "templates"), autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    return env.get_template(TEMPLATE).render(**context)


def write_pdf(html: str, path: Path) -> Path:
    """Lay out the HTML on A4 pages and write it; ReportError when the folder is not writable."""
    from weasyprint import HTML  # imported late: it loads pango, which a CSV export does not need

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        HTML(string=html, base_url=str(path.parent)).write_pdf(path)
    except OSError as exc:
        raise ReportError(
            f"cannot write the report {path}: {exc.strerror or exc}",
            "choose an output folder you can write to (--out) and check free disk space",
        ) from exc
    return path


STEM_MAX_BYTES = 120  # far below the 255 bytes a file name may have, with room for the suffix


def report_stem(patient_id: str) -> str:
    """The patient id as a file name that is safe and belongs to this id alone.

    Letters (any script), digits, '-', '_' and inner '.' are kept; anything else (path separators,
    control characters, spaces) becomes '_' and leading dots go, so a name can never leave the output
    folder or hide. When that changed the id, or left it empty or too long, ``-`` and 8 hex digits of
    the id's sha256 follow: ids that read the same after cleaning ('a/b', 'a\\b', 'a:b') still get
    their own files, and ids that needed no cleaning keep their plain name (P012_hrf_report.pdf).
    """
    nfc = unicodedata.normalize("NFC", patient_id)
    stem = "".join(c if (c.isalnum() and c.isprintable()) or c in "-_." else "_" for c in nfc).lstrip(".")
    if stem == patient_id and stem and len(stem.encode("utf-8")) <= STEM_MAX_BYTES:
        return stem
    digest = hashlib.sha256(patient_id.encode("utf-8", errors="surrogatepass")).hexdigest()[:8]
    cut = stem.encode("utf-8")[:STEM_MAX_BYTES].decode("utf-8", errors="ignore")
    return f"{cut}-{digest}" if cut else f"patient-{digest}"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def fmt_area(value: float | None) -> str:
    """mm² with 4 decimals: HRF areas are small (a 17-px HRF is about 0.0008 mm²)."""
    return "–" if value is None else f"{value:.4f}"


def fmt_delta(value: float | int | None, area: bool = False) -> str:
    """A signed change, or '–' for the first visit of an eye."""
    if value is None:
        return "–"
    return f"{value:+.4f}" if area else f"{int(value):+d}"


def fmt_date(value: date | None) -> str:
    return value.isoformat() if value is not None else "unknown"


def _visit_row(v: VisitBurden) -> dict[str, Any]:
    return {
        "date": fmt_date(v.visit_date), "eye": v.eye, "volumes": v.n_volumes, "bscans": v.n_bscans,
        "hrf": v.hrf_count, "positive": v.hrf_positive_bscans, "area": fmt_area(v.hrf_area_mm2),
        "delta": fmt_delta(v.delta_hrf_count), "delta_area": fmt_delta(v.delta_hrf_area_mm2, area=True),
        "previous": fmt_date(v.previous_visit_date) if v.previous_visit_date else "",
    }


def _overview(summary: PatientSummary, volumes: list[StoredVolume]) -> dict[str, Any]:
    p = summary.patient
    return {
        "visits": p.n_visits, "volumes": len(volumes), "bscans": sum(v.n_bscans for v in summary.volumes),
        "hrf": sum(v.hrf_count for v in summary.volumes), "period": _period(p.first_visit_date, p.latest_visit_date),
        "latest_hrf": "–" if p.latest_hrf_count is None else p.latest_hrf_count,
        "change": fmt_delta(p.hrf_count_change if p.n_visits > 1 else None),
        "change_area": fmt_delta(p.hrf_area_mm2_change if p.n_visits > 1 else None, area=True),
        "max_hrf": "–" if p.max_hrf_count is None else p.max_hrf_count,
    }


def _period(first: date | None, latest: date | None) -> str:
    if first is None or latest is None:
        return ""
    return f" ({first.isoformat()})" if first == latest else f" ({first.isoformat()} – {latest.isoformat()})"


def gallery_picks(volumes: list[StoredVolume], size: int) -> list[GalleryPick]:
    """The ``size`` B-scans with most HRFs over all volumes (ties: larger area, then earlier visit)."""
    candidates = [
        (-b.hrf_count, -b.hrf_area_px, order, b.index, v.volume_id)
        for order, v in enumerate(volumes) for b in v.bscans if b.hrf_count > 0
    ]
    chosen = sorted(candidates)[: max(size, 0)]
    return [GalleryPick(rank, volume_id, index) for rank, (*_, index, volume_id) in enumerate(chosen)]


def _volume_label(v: StoredVolume) -> str:
    return f"{fmt_date(v.visit_date)} · {v.eye}"


def _volume_sections(
    store: Store, summary: PatientSummary, volumes: list[StoredVolume], picks: list[GalleryPick],
    lines: dict[tuple[int, int], dict[str, np.ndarray]], show_identifiers: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per volume: its numbers (from the view), en-face map and per-B-scan bars; plus its gallery entries."""
    burden = {row.volume_id: row for row in summary.volumes}
    reader = SourceReader()
    area_ref = max((les.area_mm2 for v in volumes for b in v.bscans for les in b.lesions), default=0.0)
    sections, gallery = [], []
    for volume in volumes:
        pixels = reader.pixels(volume)
        if pixels.problem:
            log.warning("report for %s: %s (%s)", volume.patient_id, pixels.problem, volume.source_path)
        enface, enface_note = _enface(volume, pixels, area_ref)
        sections.append({
            "label": _volume_label(volume), "volume": volume, "hrf": burden[volume.volume_id].hrf_count,
            "positive": burden[volume.volume_id].hrf_positive_bscans,
            "area": fmt_area(burden[volume.volume_id].hrf_area_mm2),
            "enface_png": _data_uri(enface), "enface_note": enface_note,
            "counts_png": _data_uri(figures.bscan_counts_figure(volume)),
            "source": volume.source_path if show_identifiers else f"sha256 {volume.source_sha256[:12]}…",
            "problem": pixels.problem,
        })
        mine = [p for p in picks if p.volume_id == volume.volume_id]
        if mine:
            gallery.extend(_gallery_entries(store, volume, mine, pixels, lines))
        del pixels  # the B-scans of one volume at a time
    gallery.sort(key=lambda entry: entry["rank"])
    return sections, gallery


def _enface(volume: StoredVolume, pixels: SourcePixels, area_ref: float) -> tuple[bytes, str]:
    """The localizer map when localizer, its spacing and B-scan positions are known, else the grid."""
    has_mm = volume.positions and volume.scan_pattern != "circle"
    if pixels.localizer is not None and pixels.localizer_spacing_mm and has_mm:
        png = figures.enface_localizer_figure(volume, pixels.localizer, pixels.localizer_spacing_mm, area_ref)
        return png, "HRF on the localizer; faint lines: B-scans (▸ marks B-scan 0); dot area ∝ HRF area."
    if pixels.problem:
        why = "no localizer: the source file could not be used"
    elif not has_mm:
        why = "no B-scan positions on the localizer"
    else:
        why = "the file has no localizer image"
    return figures.enface_grid_figure(volume, area_ref), f"HRF by B-scan and lateral position ({why}); dot area ∝ HRF area."


def _gallery_entries(
    store: Store, volume: StoredVolume, picks: list[GalleryPick], pixels: SourcePixels,
    lines: dict[tuple[int, int], dict[str, np.ndarray]],
) -> list[dict[str, Any]]:
    """Gallery figures for the chosen B-scans of one volume (masks read for this run only)."""
    by_index: dict[int, StoredBScan] = {b.index: b for b in store.bscans_for_run(volume.run.run_id, masks=True)}
    entries = []
    for pick in picks:
        bscan = by_index[pick.bscan_index]
        image = pixels.bscans[pick.bscan_index] if pixels.bscans is not None else None
        rows = lines.get((pick.volume_id, pick.bscan_index), {})
        entries.append({
            "rank": pick.rank, "label": _volume_label(volume), "index": bscan.index, "hrf": bscan.hrf_count,
            "area": fmt_area(bscan.hrf_area_mm2), "score": "–" if bscan.score is None else f"{bscan.score:.2f}",
            "iterations": len(bscan.relevance_peaks), "problem": pixels.problem,
            "layers": _layer_caption(volume.anatomy, rows),
            "png": _data_uri(figures.gallery_figure(image, bscan, volume.bscan_shape, layers=rows)),
        })
    return entries


def gallery_layers(
    store: Store, volumes: list[StoredVolume], picks: list[GalleryPick]
) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Layer lines of each gallery B-scan, keyed by (volume id, B-scan index).

    The report reads results without masks or layer lines; the lines of each picked volume's run are
    read on their own, so only the gallery's volumes are decoded.
    """
    by_id = {v.volume_id: v for v in volumes}
    decoded: dict[int, dict[str, np.ndarray]] = {}
    for volume_id in {p.volume_id for p in picks}:
        volume = by_id[volume_id]
        anatomy = volume.anatomy
        if anatomy is not None and anatomy.layers:
            decoded[volume_id] = anatomy.layers
        elif anatomy is not None and anatomy.layer_names:
            full = store.run_anatomy(volume.run.run_id, layers=True)
            if full is not None and full.layers:
                decoded[volume_id] = full.layers
    return {
        (p.volume_id, p.bscan_index): _bscan_lines(decoded[p.volume_id], p.bscan_index)
        for p in picks if p.volume_id in decoded
    }


def _bscan_lines(layers: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """Row per column of each layer line of B-scan ``index``, in the order of LAYER_NAMES."""
    ordered = [n for n in LAYER_NAMES if n in layers] + [n for n in layers if n not in LAYER_NAMES]
    return {name: layers[name][index] for name in ordered if layers[name].ndim == 2 and index < layers[name].shape[0]}


def layer_source_text(source: str | None) -> str:
    """How the caption names where the layer lines came from."""
    return LAYER_SOURCE_TEXT.get(source or "", source or "none")


def _layer_caption(anatomy: StoredAnatomy | None, lines: dict[str, np.ndarray]) -> str:
    """E.g. 'layer lines (device): ILM, RNFL, BM', or why the B-scan shows none."""
    if anatomy is None:
        return "no layer lines stored with this run"
    drawn = [name for name, rows in lines.items() if np.isfinite(rows).any()]
    if not drawn:
        return f"no layer lines on this B-scan ({layer_source_text(anatomy.layer_source)})"
    added = [n for n in drawn if n in anatomy.estimated_layer_names]
    own = [n for n in drawn if n not in added]
    text = f"layer lines ({layer_source_text(anatomy.layer_source)}): {', '.join(own)}"
    if added:
        text += f"; estimated: {', '.join(added)}"
    return text


VisitKey = tuple[date | None, str]


def anatomy_blocks(summary: PatientSummary, volumes: list[StoredVolume]) -> list[dict[str, Any]]:
    """Per visit and eye: HRF per ETDRS subfield (with the grid figure) and per layer zone.

    Subfield and zone counts come from the `hrf_burden_etdrs` and `hrf_burden_layer` views, as the
    visit table's come from theirs; the HRF outside the grid or without a subfield (which the ETDRS
    view leaves out) are counted from the stored lesions. Empty for a patient whose runs were all
    stored before anatomy existed, so such a report looks as it did.
    """
    if not summary.etdrs and not any(v.anatomy is not None for v in volumes):
        return []
    by_visit: dict[VisitKey, list[StoredVolume]] = {}
    for v in volumes:
        by_visit.setdefault((v.visit_date, v.eye), []).append(v)
    etdrs: dict[VisitKey, list[EtdrsBurden]] = {}
    for row in summary.etdrs:
        etdrs.setdefault((row.visit_date, row.eye), []).append(row)
    zones: dict[VisitKey, list[LayerBurden]] = {}
    for zrow in summary.layers:
        zones.setdefault((zrow.visit_date, zrow.eye), []).append(zrow)
    vmax = max((r.hrf_count for r in summary.etdrs if r.subfield in SUBFIELDS), default=0)
    blocks = []
    for visit in summary.visits:
        key = (visit.visit_date, visit.eye)
        group = by_visit.get(key, [])
        block: dict[str, Any] = {
            "label": f"{fmt_date(visit.visit_date)} · {visit.eye}", "hrf": visit.hrf_count,
            "stored": any(v.anatomy is not None for v in group) or key in etdrs,
        }
        block |= _etdrs_block(etdrs.get(key, []), group, visit.eye, vmax)
        block |= _zone_block(zones.get(key, []), [v.anatomy for v in group if v.anatomy is not None])
        blocks.append(block)
    return blocks


def _etdrs_block(rows: list[EtdrsBurden], group: list[StoredVolume], eye: str, vmax: int) -> dict[str, Any]:
    """The grid figure and its counts, or the stored reason why the scan has no grid."""
    counts = {r.subfield: r.hrf_count for r in rows if r.subfield in SUBFIELDS}
    centred = [v for v in group if v.anatomy is not None and v.anatomy.fovea is not None]
    places = [les.subfield for v in centred for b in v.bscans for les in b.lesions]
    notes = sorted({v.anatomy.fovea_note for v in centred if v.anatomy is not None and v.anatomy.fovea_note})
    block: dict[str, Any] = {
        "grid_png": None, "subfield_counts": {name: counts.get(name, 0) for name in SUBFIELDS},
        "outside": places.count(SUBFIELD_OUTSIDE), "no_subfield": places.count(SUBFIELD_UNKNOWN),
        "fovea_note": "; ".join(notes), "no_grid": "", "thickness": {},
    }
    if not rows and not centred:
        others = [v.anatomy for v in group if v.anatomy is not None]
        block["no_grid"] = "; ".join(sorted({a.fovea_note for a in others if a.fovea_note})) or (
            "no fovea stored with this run" if others else "no anatomy stored with this run"
        )
        return block
    thickness = _subfield_thickness(rows, [v.anatomy for v in centred if v.anatomy is not None])
    block["thickness"] = {name: f"{t:.0f}" for name, t in thickness.items()}
    block["grid_png"] = _data_uri(figures.etdrs_figure(block["subfield_counts"], thickness, eye, vmax))
    return block


def _subfield_thickness(rows: list[EtdrsBurden], anatomies: list[StoredAnatomy]) -> dict[str, float]:
    """Mean ILM–BM thickness per subfield: the view's where it has one, else the volumes' mean."""
    out = {r.subfield: r.mean_thickness_um for r in rows if r.subfield in SUBFIELDS and r.mean_thickness_um is not None}
    for name in SUBFIELDS:
        values = [a.etdrs_thickness_um[name] for a in anatomies if name in a.etdrs_thickness_um]
        if name not in out and values:
            out[name] = float(np.mean(values))
    return {name: float(t) for name, t in out.items() if np.isfinite(t)}


def _zone_block(rows: list[LayerBurden], anatomies: list[StoredAnatomy]) -> dict[str, Any]:
    """Count and area per layer zone, every zone listed (zeros too), with a bar scaled to the largest."""
    by_zone = {r.zone: r for r in rows}
    top = max((r.hrf_count for r in rows), default=0)
    table = []
    for zone in (*ZONES, ZONE_UNKNOWN):
        row = by_zone.get(zone)
        count = row.hrf_count if row else 0
        table.append({
            "zone": zone, "name": ZONE_TEXT[zone], "hrf": count, "area": fmt_area(row.hrf_area_mm2 if row else 0.0),
            "bar": round(100.0 * count / top) if top else 0,
        })
    sources = sorted({layer_source_text(a.layer_source) for a in anatomies if a.layer_source})
    thickness = [a.mean_thickness_um for a in anatomies if a.mean_thickness_um is not None]
    return {
        "zones": table,
        "layer_source": ", ".join(sources) if sources else ("none" if anatomies else "not stored"),
        "mean_thickness": f"{np.mean(thickness):.0f} µm" if thickness else "",
    }


def fmt_share(num: int, den: int, value: float | None) -> str:
    """A figure with the counts it is made of, e.g. '0.750 (3/4)'; '–' when undefined."""
    return "–" if value is None else f"{value:.3f} ({num}/{den})"


def review_rows(view: list[ReviewAgreement], volumes: list[StoredVolume]) -> list[dict[str, Any]]:
    """The tool against each grader, per volume of the report: rows of the `hrf_review_agreement` view
    for the run each volume is reported with. Empty when nobody reviewed them, so the report looks as
    it did before review existed."""
    labels = {v.run.run_id: _volume_label(v) for v in volumes}
    order = {v.run.run_id: i for i, v in enumerate(volumes)}
    rows = []
    for r in sorted((r for r in view if r.run_id in labels), key=lambda r: (order[r.run_id], r.grader)):
        rows.append({
            "label": labels[r.run_id], "grader": r.grader, "reviewed": f"{r.reviewed_bscans} of {r.n_bscans}",
            "sensitivity": fmt_share(r.tp_bscans, r.tp_bscans + r.fn_bscans, r.sensitivity),
            "specificity": fmt_share(r.tn_bscans, r.tn_bscans + r.fp_bscans, r.specificity),
            "precision": fmt_share(r.lesions_confirmed, r.lesions_judged, r.lesion_precision),
            "recall": fmt_share(r.lesions_confirmed, r.lesions_confirmed + r.lesions_missed, r.lesion_recall),
            "counts": f"{r.tool_count} / {r.grader_count}" if r.counted_bscans else "–",
            "abs_error": "–" if r.mean_abs_count_error is None else f"{r.mean_abs_count_error:.2f}",
            "bias": "–" if r.count_bias is None else f"{r.count_bias:+.2f}",
            "equal": fmt_share(r.equal_count_bscans, r.counted_bscans, r.equal_count_share),
        })
    return rows


def _unfinished_row(v: StoredVolume, show_identifiers: bool) -> dict[str, Any]:
    return {
        "date": fmt_date(v.visit_date), "eye": v.eye, "format": v.source_format, "status": v.run.status,
        "error": (v.run.error or "no error recorded").strip().splitlines()[0][:300],
        "source": v.source_path if show_identifiers else f"sha256 {v.source_sha256[:12]}…",
        "model": v.run.model_id,
    }


def provenance(volumes: list[StoredVolume], show_identifiers: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Distinct analysis settings (model, segmenter, parameters, code, device) once each, lettered
    A, B, …, and one row per volume saying which setting analysed it, how long it took and when."""
    settings: dict[tuple[str, ...], dict[str, Any]] = {}
    rows = []
    for v in volumes:
        run = v.run
        key = (run.model_id, run.segmenter, run.segmenter_checkpoint_sha256 or "", run.params_hash, run.code_version, run.device)
        if key not in settings:
            settings[key] = {
                "letter": chr(ord("A") + len(settings)) if len(settings) < 26 else str(len(settings) + 1),
                "model": run.model_id, "segmenter": run.segmenter,
                "checkpoint": run.segmenter_checkpoint_sha256 or "none (no checkpoint file)",
                "code": run.code_version, "device": run.device, "params_hash": run.params_hash,
                "parameters": json.dumps(run.parameters, sort_keys=True, separators=(", ", ": ")),
            }
        rows.append({
            "label": _volume_label(v), "setting": settings[key]["letter"], "format": v.source_format,
            "shape": f"{v.n_bscans} × {v.bscan_shape[0]} × {v.bscan_shape[1]}", "device_oct": v.device,
            "seconds": ", ".join(f"{k} {t:.1f}" for k, t in sorted(run.seconds.items())) or "–",
            "total": f"{sum(run.seconds.values()):.1f}",
            "run_date": run.finished_at.strftime("%Y-%m-%d %H:%M UTC") if run.finished_at else "–",
            "source": v.source_path if show_identifiers else f"sha256 {v.source_sha256[:16]}…",
        })
    return list(settings.values()), rows
