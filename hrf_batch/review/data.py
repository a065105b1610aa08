"""What the review page shows and records, as plain dicts for the templates and the JSON API.

Holds the store, the grader (None: read-only), the small caches (a run's stored results never
change once done; the last source file read is kept) and the rule on identifiers: names, birth
dates and file paths appear only with ``show_identifiers``, as in the reports.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np

from hrf_batch.report.sources import SourcePixels, SourceReader
from hrf_batch.review.errors import ReviewError, ReviewNotFound
from hrf_batch.review.images import layer_polylines, outline_path
from hrf_batch.review.missed import SegmenterCache
from hrf_batch.store import ReviewProgress, ReviewState, Store, StoredBScan, StoredVolume, StoreError

_CACHED_RUNS = 3  # volumes with decoded masks kept in memory (a grader moves between few)


@dataclass(frozen=True)
class Bscan:
    """One B-scan of a run, with the volume it belongs to."""

    volume: StoredVolume
    bscan: StoredBScan


class ReviewData:
    """The store seen through the review page: lists, one B-scan's overlays and verdicts, the writes."""

    def __init__(self, store: Store, grader: str | None, show_identifiers: bool = False,
                 segmenters: SegmenterCache | None = None) -> None:
        self.store = store
        self.grader = grader
        self.show_identifiers = show_identifiers
        self._segmenters = segmenters or SegmenterCache()
        self._volumes: OrderedDict[int, StoredVolume] = OrderedDict()
        self._reader = SourceReader()
        self._lock = threading.Lock()

    @property
    def read_only(self) -> bool:
        return self.grader is None

    # lists

    def patients(self) -> list[dict[str, Any]]:
        """Every patient with HRF counts and review progress over the latest done run of each volume."""
        volumes = self.store.view_rows("hrf_burden_volume")
        progress = self._progress([v.run_id for v in volumes])
        per_patient: dict[str, list[Any]] = defaultdict(list)
        for v in volumes:
            per_patient[v.patient_id].append(v)
        out = []
        for p in self.store.list_patients(include_identifiers=self.show_identifiers):
            mine = per_patient.get(p.patient_id, [])
            out.append({
                "patient_id": p.patient_id, "n_visits": p.n_visits, "n_volumes": p.n_volumes,
                "name": p.name if self.show_identifiers else None,
                "birth_date": p.birth_date if self.show_identifiers else None,
                "hrf_count": sum(v.hrf_count for v in mine),
                **_summed([progress[v.run_id] for v in mine]),
            })
        return out

    def patient(self, patient_id: str) -> dict[str, Any]:
        """One patient's visits (date, eye) with their volumes, counts and review progress."""
        volumes = self.store.view_rows("hrf_burden_volume", patient_id)
        if not volumes:
            raise ReviewNotFound(f"no patient {patient_id!r} with finished runs in the database",
                                 "pick a patient from the list")
        progress = self._progress([v.run_id for v in volumes])
        stored_by_run = {s.run.run_id: s for s in self.store.volume_results(patient_id, masks=False)}
        visits: dict[tuple[date | None, str], list[dict[str, Any]]] = defaultdict(list)
        for v in volumes:
            stored = stored_by_run[v.run_id]
            visits[(v.visit_date, v.eye)].append({
                "run_id": v.run_id, "volume_id": v.volume_id, "model_id": v.model_id,
                "n_bscans": v.n_bscans, "hrf_count": v.hrf_count, "hrf_positive_bscans": v.hrf_positive_bscans,
                "source": self.source_label(stored), "format": stored.source_format, "device": stored.device,
                **_summed([progress[v.run_id]]),
            })
        return {"patient_id": patient_id,
                "visits": [{"visit_date": d, "eye": eye, "volumes": vols} for (d, eye), vols in visits.items()]}

    def source_label(self, volume: StoredVolume) -> str:
        """The source file's path with identifiers shown, else the start of its sha256."""
        return volume.source_path if self.show_identifiers else f"sha256 {volume.source_sha256[:12]}…"

    def _progress(self, run_ids: list[int]) -> dict[int, ReviewProgress]:
        return {p.run_id: p for p in self.store.review_progress(run_ids, grader=self.grader)}

    # one volume, one B-scan

    def volume(self, run_id: int) -> StoredVolume:
        """A run's volume with masks, cached (a done run's results never change)."""
        with self._lock:
            if run_id in self._volumes:
                self._volumes.move_to_end(run_id)
                return self._volumes[run_id]
        try:
            volume = self.store.run_volume(run_id)
        except StoreError as exc:
            if "no run" in exc.problem:
                raise ReviewNotFound(exc.problem, "open a volume from the list of patients") from exc
            raise
        if volume.run.status != "done":
            raise ReviewNotFound(f"run {run_id} is {volume.run.status!r}, not done",
                                 "only finished runs can be reviewed; open a volume from the list")
        with self._lock:
            self._volumes[run_id] = volume
            while len(self._volumes) > _CACHED_RUNS:
                self._volumes.popitem(last=False)
        return volume

    def bscan(self, run_id: int, index: int) -> Bscan:
        """One B-scan of a run; ReviewNotFound outside the volume."""
        volume = self.volume(run_id)
        by_index = {b.index: b for b in volume.bscans}
        if index not in by_index:
            raise ReviewNotFound(f"run {run_id} has no B-scan {index} (it has {len(volume.bscans)})",
                                 "use the B-scan numbers shown on the page")
        return Bscan(volume, by_index[index])

    def pixels(self, run_id: int) -> SourcePixels:
        """The run's source B-scans, or why they cannot be shown (file gone or changed)."""
        volume = self.volume(run_id)
        with self._lock:
            return self._reader.pixels(volume)

    def bscan_image(self, run_id: int, index: int) -> np.ndarray | None:
        """One B-scan's pixels (display scale); None when the source file is gone or changed."""
        self.bscan(run_id, index)
        pixels = self.pixels(run_id)
        return None if pixels.bscans is None else pixels.bscans[index]

    def bscan_view(self, run_id: int, index: int) -> dict[str, Any]:
        """Everything the page draws and lists for one B-scan, as JSON-ready data."""
        item = self.bscan(run_id, index)
        volume, bscan = item.volume, item.bscan
        state = self.store.review_state(run_id)
        pixels = self.pixels(run_id)
        mine = self.grader
        verdicts: dict[int, dict[str, str]] = defaultdict(dict)
        for v in state.lesion_verdicts:
            if v.bscan_index == index:
                verdicts[v.lesion_index][v.grader] = v.verdict
        lesions = [{
            "index": les.lesion_index, "bbox": list(les.bbox_rc), "centroid": [round(x, 1) for x in les.centroid_rc],
            "area_px": les.area_px, "area_mm2": les.area_mm2, "zone": les.zone, "subfield": les.subfield,
            "outline": outline_path(les.mask, les.bbox_rc[:2]) if les.mask is not None else "",
            "verdict": verdicts[les.lesion_index].get(mine) if mine else None,
            "others": {g: v for g, v in sorted(verdicts[les.lesion_index].items()) if g != mine},
        } for les in bscan.lesions]
        added = [{
            "id": a.added_id, "grader": a.grader, "mine": a.grader == mine, "bbox": list(a.bbox_rc),
            "area_px": a.area_px, "click": list(a.click_rc),
            "outline": outline_path(a.mask, a.bbox_rc[:2]) if a.mask is not None else "",
        } for a in state.added_lesions if a.bscan_index == index]
        has_hrf = {v.grader: v.has_hrf for v in state.bscan_verdicts if v.bscan_index == index}
        anatomy = volume.anatomy
        return {
            "run_id": run_id, "index": index, "n_bscans": len(volume.bscans), "shape": list(volume.bscan_shape),
            "score": bscan.score, "hrf_count": bscan.hrf_count, "grader": mine, "read_only": self.read_only,
            "lesions": lesions, "added": added,
            "has_hrf": has_hrf.get(mine) if mine else None,
            "others_has_hrf": {g: v for g, v in sorted(has_hrf.items()) if g != mine},
            "relevance": bscan.relevance is not None,
            "image": {"available": pixels.bscans is not None, "note": pixels.problem},
            "layers": layer_polylines(anatomy.layers if anatomy is not None else None, index),
            "status": _statuses(volume, state, mine),
            "progress": _summed(self.store.review_progress([run_id], grader=mine)),
        }

    # writes (the app refuses them before this point when read-only)

    def _grader(self) -> str:
        if self.grader is None:
            raise ReviewError("this review page is read-only", "start `hrf-batch review` with --grader NAME")
        return self.grader

    def lesion_verdict(self, run_id: int, index: int, lesion: int, verdict: str | None) -> None:
        """Accept or reject a found lesion; None withdraws the grader's verdict."""
        item = self.bscan(run_id, index)
        if lesion not in {les.lesion_index for les in item.bscan.lesions}:
            raise ReviewNotFound(f"B-scan {index} of run {run_id} has no lesion {lesion}", "reload the page")
        if verdict is None:
            self.store.delete_lesion_verdict(run_id, index, lesion, self._grader())
        else:
            self.store.save_lesion_verdict(run_id, index, lesion, self._grader(), verdict)

    def bscan_verdict(self, run_id: int, index: int, has_hrf: bool | None) -> None:
        """Say whether the B-scan has HRF; None withdraws the grader's answer."""
        self.bscan(run_id, index)
        if has_hrf is None:
            self.store.delete_bscan_verdict(run_id, index, self._grader())
        else:
            self.store.save_bscan_verdict(run_id, index, self._grader(), has_hrf)

    def add_missed(self, run_id: int, index: int, click_rc: tuple[int, int]) -> int:
        """Outline the HRF at the click with the run's segmenter and store it as the grader's; its id."""
        grader = self._grader()
        item = self.bscan(run_id, index)
        pixels = self.pixels(run_id)
        if pixels.bscans is None:
            raise ReviewError(f"cannot outline a missed HRF: {pixels.problem}",
                              "put the analysed file back at its stored path to mark missed HRF")
        mask = self._segmenters.segment_at(item.volume.run, pixels.bscans[index], click_rc)
        if not mask.any():
            raise ReviewError(f"the segmenter found no HRF at row {click_rc[0]}, column {click_rc[1]}",
                              "click on the centre of the bright spot (zoom in to aim)")
        added = self.store.save_added_lesion(run_id, index, grader, click_rc, mask, item.volume.run.segmenter)
        return added.added_id

    def delete_added(self, added_id: int) -> None:
        """Undo a lesion this grader added; ReviewNotFound when it is not theirs or gone."""
        if not self.store.delete_added_lesion(added_id, self._grader()):
            raise ReviewNotFound(f"no added lesion {added_id} of grader {self.grader!r}",
                                 "only the grader who added a lesion can remove it")


def _summed(progress: list[ReviewProgress]) -> dict[str, int]:
    """Progress counts added over several runs."""
    keys = ("n_bscans", "n_lesions", "lesions_decided", "lesions_accepted", "lesions_rejected", "lesions_added",
            "bscans_decided")
    return {k: sum(getattr(p, k) for p in progress) for k in keys}


def _statuses(volume: StoredVolume, state: ReviewState, grader: str | None) -> list[str]:
    """Per B-scan: 'done' (HRF yes/no and every lesion decided), 'partial' (some of it) or 'open'
    for this grader (any grader's rows when read-only)."""
    decided_lesions: dict[int, set[int]] = defaultdict(set)
    for v in state.lesion_verdicts:
        if grader is None or v.grader == grader:
            decided_lesions[v.bscan_index].add(v.lesion_index)
    answered = {v.bscan_index for v in state.bscan_verdicts if grader is None or v.grader == grader}
    out = []
    for b in volume.bscans:
        n_decided = len(decided_lesions[b.index])
        if b.index in answered and n_decided == len(b.lesions):
            out.append("done")
        elif b.index in answered or n_decided:
            out.append("partial")
        else:
            out.append("open")
    return out
