"""Iterative HRF segmentation of one volume (Morelle et al., BVM 2025), with guards.

Score every B-scan; for those at or above the decision threshold: explain (LRP), prompt a
4-px box at the relevance peak on a 75-px crop, segment, inpaint what was found with the image
mean, and explain again; a B-scan stops when its score falls below ``stop_score`` or after
``max_iterations``. The explain forward also gives the score after the previous inpainting, so
each iteration costs one forward+backward per active B-scan. Work stays batched across B-scans.
The HRF count is the number of connected components of at least ``min_lesion_px`` pixels.

Guards (each a parameter stored with the run; the retina band and the lesion filter are on by
default, the others off, as measured in the shipped model's card; all off gives the paper's loop):

- ``score_drop_guard``: when inpainting what an iteration found does not lower the B-scan's
  (log-odds) score, that object was not what the model saw; it is dropped and the B-scan stops.
  An iteration that found nothing inpaints nothing and moves on to the next peak.
- ``lesion_filter``: lesions outside the clinical HRF size range, elongated, not filled (a
  crescent), or not brighter than their surroundings are dropped
  (:mod:`hrf_batch.segment.lesion_filter`).
- ``peaks_per_iteration`` > 1: several separated relevance peaks (non-maximum suppression,
  ``nms_radius_px``, ``min_peak_fraction``) are prompted per iteration, for B-scans with more
  foci than iterations.
- ``retina_band`` (on by default): HRF exist only in the neurosensory retina, so relevance peaks are
  prompted only between the ILM and Bruch's membrane and lesions centred outside that band (vitreous
  floaters, choroid) are dropped. A column whose lines are unknown is not restricted.

Before scoring, the anatomy stage (:func:`hrf_batch.anatomy.analyse.analyse`) gives the layer
lines, the fovea and the thickness map; every lesion kept gets its layer zone and ETDRS subfield.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from scipy import ndimage

from hrf_batch import __version__
from hrf_batch.anatomy.analyse import analyse
from hrf_batch.anatomy.etdrs import lesion_subfield
from hrf_batch.anatomy.zones import retina_band, zone_of
from hrf_batch.io.volume import Volume
from hrf_batch.model.classify import Classifier, presence
from hrf_batch.model.explain import Explainer
from hrf_batch.results import BScanResult, Lesion, RunInfo, Segment, VolumeAnatomy, VolumeResult
from hrf_batch.segment import Segmenter
from hrf_batch.segment.lesion_filter import LesionFilter, check
from hrf_batch.segment.lesions import lesion_labels
from hrf_batch.segment.prompts import make_prompt, peaks

if TYPE_CHECKING:
    from hrf_batch.config import Settings


@dataclass(frozen=True)
class PipelineParams:
    threshold: float | None = None  # None: the model's own decision threshold
    stop_score: float = 0.05
    max_iterations: int = 6
    box_px: int = 4
    crop_px: int = 75
    min_lesion_px: int = 5
    score_drop_guard: bool = False  # measured on an unseen-generator study: cost recall, gained no precision
    lesion_filter: LesionFilter | None = LesionFilter()  # None: every component counts
    peaks_per_iteration: int = 1
    nms_radius_px: int = 10
    min_peak_fraction: float = 0.25
    retina_band: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> PipelineParams:
        """The pipeline parameters a run uses, from the merged settings."""
        return cls(threshold=settings.threshold, stop_score=settings.stop_score,
                   max_iterations=settings.max_iterations, box_px=settings.box_px,
                   crop_px=settings.crop_px, min_lesion_px=settings.min_lesion_px,
                   score_drop_guard=settings.score_drop_guard,
                   lesion_filter=LesionFilter() if settings.lesion_filter else None,
                   peaks_per_iteration=settings.peaks_per_iteration, retina_band=settings.retina_band)

    def resolved(self, clf: Classifier) -> dict[str, Any]:
        """Pipeline parameters as stored with the results, the threshold made explicit."""
        out = asdict(self)
        out["threshold"] = float(self.threshold if self.threshold is not None else clf.threshold)
        out["lesion_filter"] = self.lesion_filter.to_dict() if self.lesion_filter is not None else None
        return out


def run_info(clf: Classifier, segmenter: Segmenter, params: PipelineParams) -> RunInfo:
    """Provenance of runs with these inputs, and so the rerun key: the model id and its score
    calibration, the segmenter with its checkpoint hash *and its own parameters*, the pipeline
    parameters and the code version. Retuning anything that changes the masks makes a new run;
    the same inputs find the old one. A bf16 classifier adds ``precision: "bf16"``, so its results
    are told apart from fp32 ones, while fp32 runs keep the key they had before precision existed."""
    parameters = {**params.resolved(clf), "calibration": clf.calibration.to_dict(),
                  "segmenter_params": dict(segmenter.params)}
    if clf.precision != "fp32":
        parameters["precision"] = clf.precision
    return RunInfo(model_id=clf.model_id, segmenter=segmenter.name,
                   segmenter_checkpoint_sha256=segmenter.checkpoint_sha256, parameters=parameters,
                   code_version=__version__, device=str(clf.device))


@dataclass
class _State:
    """Per-B-scan working state across iterations."""

    image: np.ndarray  # the original B-scan (read only)
    work: np.ndarray  # inpainted copy of the B-scan
    fill: float  # the original image mean, used for inpainting
    scores: list[float]
    log_odds: float  # of the latest score
    mask: np.ndarray
    tried: np.ndarray  # pixels already prompted or segmented: never the peak again
    peaks: list[tuple[int, int]] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    relevance: np.ndarray | None = None
    pending: tuple[float, int] | None = None  # (log-odds before, first segment index) of the last inpainting

    def update(self, score: float, log_odds: float, guard: bool) -> bool:
        """Record the score after the last inpainting; False when the guard stops this B-scan."""
        self.scores.append(float(score))
        self.log_odds = float(log_odds)
        if self.pending is None:
            return True
        before, first = self.pending
        self.pending = None
        if not guard or self.log_odds < before:
            return True
        for seg in self.segments[first:]:  # the inpainted object was not what the model saw
            r0, c0, r1, c1 = seg.window
            self.work[r0:r1, c0:c1][seg.mask] = self.image[r0:r1, c0:c1][seg.mask]
        del self.segments[first:]
        self.mask[:] = False
        for seg in self.segments:
            r0, c0, r1, c1 = seg.window
            self.mask[r0:r1, c0:c1] |= seg.mask
        return False


def lesions_of(mask: np.ndarray, index: int, min_px: int) -> tuple[Lesion, ...]:
    """The lesions of a mask (:func:`~hrf_batch.segment.lesions.lesion_labels`), as Lesions."""
    labels, kept = lesion_labels(mask, min_px)
    slices = ndimage.find_objects(labels)
    out = []
    for k in kept.tolist():
        sl = slices[k - 1]
        crop = labels[sl] == k
        area = int(crop.sum())
        rows, cols = np.nonzero(crop)
        out.append(Lesion(
            bscan_index=index, centroid_rc=(float(rows.mean() + sl[0].start), float(cols.mean() + sl[1].start)),
            bbox_rc=(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop), area_px=area, mask=crop,
        ))
    return tuple(out)


def _iterate(states: dict[int, _State], clf: Classifier, segmenter: Segmenter, p: PipelineParams,
             seconds: dict[str, float], on_step: Callable[[], None]) -> None:
    active = sorted(states)
    with Explainer(clf) as explainer:
        for it in range(p.max_iterations):
            if not active:
                return
            t0 = time.perf_counter()
            expl = explainer.explain(np.stack([states[b].work for b in active]))
            seconds["explain"] += time.perf_counter() - t0
            keep = []
            for k, b in enumerate(active):
                if it == 0 or (states[b].update(expl.scores[k], expl.log_odds[k], p.score_drop_guard)
                               and expl.scores[k] >= p.stop_score):
                    keep.append(k)
            active = [active[k] for k in keep]
            t0 = time.perf_counter()
            active = _segment_once(states, active, expl.relevance[keep], segmenter, p, it)
            seconds["segment"] += time.perf_counter() - t0
            on_step()
    if active:  # score after the last inpainting
        t0 = time.perf_counter()
        final, final_log_odds = presence(clf, np.stack([states[b].work for b in active]))
        seconds["score"] += time.perf_counter() - t0
        for b, s, z in zip(active, final, final_log_odds):
            states[b].update(s, z, p.score_drop_guard)


def _segment_once(states: dict[int, _State], active: list[int], relevance: np.ndarray, segmenter: Segmenter,
                  p: PipelineParams, it: int) -> list[int]:
    """Prompt and segment each active B-scan once (at up to ``peaks_per_iteration`` peaks);
    returns those that could still be prompted."""
    prompts, owners = [], []
    for b, rel in zip(active, relevance):
        st = states[b]
        if st.relevance is None:
            st.relevance = rel.astype(np.float32)
        if not np.any((rel > 0) & ~st.tried):
            continue  # nothing relevant left to prompt: this B-scan is done
        for pk in peaks(rel, st.tried, p.peaks_per_iteration, p.nms_radius_px, p.min_peak_fraction):
            prompt = make_prompt(pk, st.work.shape, p.box_px, p.crop_px)
            prompts.append(prompt)
            owners.append(b)
            st.peaks.append(prompt.peak_rc)
    if not prompts:
        return []
    masks = segmenter.segment([states[b].work for b in owners], prompts)
    for b, prompt, mask in zip(owners, prompts, masks):
        st = states[b]
        r0, c0, r1, c1 = prompt.window
        if mask.any():
            if st.pending is None:
                st.pending = (st.log_odds, len(st.segments))
            st.segments.append(Segment(it, prompt.peak_rc, prompt.window, mask[r0:r1, c0:c1].copy()))
            st.mask |= mask
            st.work[mask] = st.fill
        br0, bc0, br1, bc1 = (int(v) for v in (np.floor(prompt.box[0]), np.floor(prompt.box[1]), np.ceil(prompt.box[2]), np.ceil(prompt.box[3])))
        st.tried[br0:br1, bc0:bc1] = True
        st.tried |= mask
    return sorted(set(owners))


def _kept_lesions(st: _State, index: int, p: PipelineParams, volume: Volume, anatomy: VolumeAnatomy,
                  band: np.ndarray | None) -> tuple[Lesion, ...]:
    """The lesions of a B-scan's mask that pass the lesion filter (all of them when it is off) and
    lie in the retina band (when it is on), each placed in its layer zone and ETDRS subfield."""
    spacing_mm = (volume.meta.spacing.lateral_mm, volume.meta.spacing.axial_mm)
    width = volume.bscan_shape[1]
    kept = []
    for les in lesions_of(st.mask, index, p.min_lesion_px):
        row, col = les.centroid_rc
        if band is not None and not band[int(round(row)), int(round(col))]:
            continue
        if p.lesion_filter is not None and check(st.image, les.bbox_rc, les.mask, spacing_mm, p.lesion_filter) is not None:
            continue
        kept.append(dataclasses.replace(
            les, zone=zone_of(anatomy.layers, index, row, col),
            subfield=lesion_subfield(volume.meta, anatomy.fovea, index, col, width)))
    return tuple(kept)


def run_volume(volume: Volume, clf: Classifier, segmenter: Segmenter, params: PipelineParams = PipelineParams(),
               on_step: Callable[[], None] | None = None, *, run: RunInfo | None = None) -> VolumeResult:
    """Find HRFs in every B-scan of ``volume``; one VolumeResult with provenance.

    ``on_step`` is called after the first scoring and after each iteration (for progress bars).
    ``run`` is :func:`run_info` of the same inputs when the caller built it already (an ingest
    builds it once, as its rerun key); the result carries it with the time per stage added."""
    on_step = on_step or (lambda: None)
    run = run or run_info(clf, segmenter, params)
    seconds = {"anatomy": 0.0, "score": 0.0, "explain": 0.0, "segment": 0.0}
    threshold = float(run.parameters["threshold"])
    t0 = time.perf_counter()
    anatomy = analyse(volume)
    seconds["anatomy"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    first, first_log_odds = presence(clf, volume.bscans)
    seconds["score"] += time.perf_counter() - t0
    on_step()
    states: dict[int, _State] = {}
    bands: dict[int, np.ndarray | None] = {}
    for b in np.flatnonzero(first >= threshold).tolist():
        img = volume.bscans[b]
        bands[b] = retina_band(anatomy.layers, b, img.shape) if params.retina_band else None
        states[b] = _State(image=img, work=img.copy(), fill=float(img.mean()), scores=[float(first[b])],
                           log_odds=float(first_log_odds[b]), mask=np.zeros(img.shape, bool),
                           tried=np.zeros(img.shape, bool) if bands[b] is None else ~bands[b])
    _iterate(states, clf, segmenter, params, seconds, on_step)
    bscans = []
    for b in range(volume.n_bscans):
        st = states.get(b)
        if st is None:
            bscans.append(BScanResult(b, (float(first[b]),), (), np.zeros(volume.bscan_shape, bool), ()))
            continue
        lesions = _kept_lesions(st, b, params, volume, anatomy, bands[b])
        kept = np.zeros(volume.bscan_shape, bool)
        for les in lesions:
            r0, c0, r1, c1 = les.bbox_rc
            kept[r0:r1, c0:c1] |= les.mask
        bscans.append(BScanResult(b, tuple(st.scores), tuple(st.peaks), kept, lesions, st.relevance, tuple(st.segments)))
    return VolumeResult(meta=volume.meta, bscan_shape=volume.bscan_shape, bscans=tuple(bscans),
                        run=dataclasses.replace(run, seconds=seconds), anatomy=anatomy)
