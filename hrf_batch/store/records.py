"""What the store hands back: small frozen dataclasses, never ORM rows (numpy + dataclasses only).

Field names of :class:`VolumeBurden`, :class:`VisitBurden` and :class:`PatientBurden` are the column
names of the SQL views they are read from, so a report can use either.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import numpy as np

from hrf_batch.io.volume import BScanPosition, Spacing


@dataclass(frozen=True)
class RunRecord:
    """One pipeline run over one volume and its provenance."""

    run_id: int
    volume_id: int
    model_id: str
    segmenter: str
    segmenter_checkpoint_sha256: str | None
    parameters: dict[str, Any]
    params_hash: str
    code_version: str
    device: str
    seconds: dict[str, float]
    status: str  # 'running' | 'done' | 'failed'
    started_at: datetime | None  # naive UTC
    finished_at: datetime | None  # naive UTC
    error: str | None


@dataclass(frozen=True, eq=False)
class StoredLesion:
    """One HRF as stored; ``mask`` is the bool crop inside ``bbox_rc``."""

    lesion_index: int
    bscan_index: int
    centroid_rc: tuple[float, float]
    bbox_rc: tuple[int, int, int, int]
    area_px: int
    area_mm2: float
    centroid_mm: tuple[float, float] | None  # (x, y) on the localizer; None without positions
    mask: np.ndarray | None  # None when read without masks
    zone: str = "unknown"  # layer zone (hrf_batch.results.ZONES) or "unknown"
    subfield: str = "unknown"  # ETDRS subfield (hrf_batch.results.SUBFIELDS), "outside" or "unknown"


@dataclass(frozen=True, eq=False)
class StoredBScan:
    """One B-scan's result as stored; the relevance map is the downsampled 8-bit QC copy."""

    index: int
    scores: tuple[float, ...]
    score: float | None  # classifier score of the original B-scan
    final_score: float | None  # score before the last iteration
    hrf_count: int
    hrf_area_px: int
    hrf_area_mm2: float
    relevance_peaks: tuple[tuple[int, int], ...]
    mask: np.ndarray | None  # bool (H, W); None when read without masks
    relevance: np.ndarray | None  # float32, ≤ 1/4 of the B-scan per side
    relevance_max: float | None
    lesions: tuple[StoredLesion, ...]


@dataclass(frozen=True)
class StoredFovea:
    """The foveal centre stored with a run (see :class:`hrf_batch.results.Fovea`)."""

    bscan: float
    col: float
    x_mm: float | None
    y_mm: float | None
    method: str


@dataclass(frozen=True, eq=False)
class StoredAnatomy:
    """Layer lines, fovea and thickness stored with a run."""

    layer_source: str | None  # 'device' | 'estimated' | 'ground-truth'; None: no layer lines
    layer_names: tuple[str, ...]
    estimated_layer_names: tuple[str, ...]  # of a 'device' set: the lines the estimate added
    layers: dict[str, np.ndarray] | None  # name -> float32 (n_bscans, width) rows; None when read without them
    fovea: StoredFovea | None
    fovea_note: str
    mean_thickness_um: float | None  # over every A-scan with both ILM and BM
    etdrs_thickness_um: dict[str, float]  # mean ILM-BM thickness per subfield the scan covers


@dataclass(frozen=True, eq=False)
class StoredVolume:
    """A volume's metadata (no identifiers) with the B-scans of one of its runs."""

    volume_id: int
    patient_id: str
    visit_date: date | None
    eye: str
    source_path: str
    source_sha256: str
    source_format: str
    series_uid: str
    device: str
    scan_pattern: str
    n_bscans: int
    bscan_shape: tuple[int, int]
    spacing: Spacing
    positions: tuple[BScanPosition, ...]
    acquired_at: datetime | None
    run: RunRecord
    bscans: tuple[StoredBScan, ...]
    anatomy: StoredAnatomy | None = None  # None for runs stored before anatomy existed


@dataclass(frozen=True)
class PatientRecord:
    """A patient with how much is stored; name and birth date only when asked for."""

    patient_id: str
    n_visits: int
    n_volumes: int
    first_visit_date: date | None
    latest_visit_date: date | None
    name: str | None = None
    birth_date: date | None = None


@dataclass(frozen=True)
class VolumeBurden:
    """A row of the `hrf_burden_volume` view."""

    volume_id: int
    run_id: int
    model_id: str
    finished_at: datetime | None
    patient_id: str
    visit_date: date | None
    eye: str
    series_uid: str
    n_bscans: int
    hrf_count: int
    hrf_positive_bscans: int
    hrf_area_px: int
    hrf_area_mm2: float


@dataclass(frozen=True)
class VisitBurden:
    """A row of the `hrf_burden_visit` view: one patient, visit date and eye."""

    patient_id: str
    visit_date: date | None
    eye: str
    n_volumes: int
    n_bscans: int
    hrf_count: int
    hrf_positive_bscans: int
    hrf_area_mm2: float
    previous_visit_date: date | None
    delta_hrf_count: int | None
    delta_hrf_area_mm2: float | None


@dataclass(frozen=True)
class PatientBurden:
    """A row of the `hrf_burden_patient` view: totals over both eyes."""

    patient_id: str
    n_visits: int
    first_visit_date: date | None
    latest_visit_date: date | None
    latest_hrf_count: int | None
    latest_hrf_area_mm2: float | None
    max_hrf_count: int | None
    hrf_count_change: int | None
    hrf_area_mm2_change: float | None


@dataclass(frozen=True)
class EtdrsBurden:
    """A row of the `hrf_burden_etdrs` view: one patient, visit date, eye and ETDRS subfield."""

    patient_id: str
    visit_date: date | None
    eye: str
    subfield: str
    n_volumes: int
    hrf_count: int
    hrf_area_mm2: float
    density_per_mm2: float | None  # HRF count / the subfield's area on the grid
    mean_thickness_um: float | None


@dataclass(frozen=True)
class LayerBurden:
    """A row of the `hrf_burden_layer` view: one patient, visit date, eye and layer zone."""

    patient_id: str
    visit_date: date | None
    eye: str
    zone: str
    n_volumes: int
    hrf_count: int
    hrf_area_mm2: float


@dataclass(frozen=True)
class PatientSummary:
    """Everything a per-patient report needs from the views."""

    patient: PatientBurden
    visits: tuple[VisitBurden, ...]
    volumes: tuple[VolumeBurden, ...]
    etdrs: tuple[EtdrsBurden, ...] = ()
    layers: tuple[LayerBurden, ...] = ()


@dataclass(frozen=True)
class IngestErrorRecord:
    """A file an ingest left out, and why."""

    path: str
    reason: str
    kind: str  # 'error' | 'skipped'
    recorded_at: datetime  # naive UTC
    batch_id: str | None


@dataclass(frozen=True)
class LesionVerdict:
    """One grader's 'accept' or 'reject' of the stored lesion (run, B-scan, lesion index)."""

    run_id: int
    bscan_index: int
    lesion_index: int
    grader: str
    verdict: str  # 'accept' | 'reject'
    decided_at: datetime  # naive UTC


@dataclass(frozen=True, eq=False)
class AddedLesion:
    """An HRF the model missed, marked by a grader's click and outlined by ``segmenter``; ``mask`` is the
    bool crop inside ``bbox_rc`` (None when read without masks), as in :class:`StoredLesion`."""

    added_id: int
    run_id: int
    bscan_index: int
    grader: str
    click_rc: tuple[int, int]
    centroid_rc: tuple[float, float]
    bbox_rc: tuple[int, int, int, int]
    area_px: int
    area_mm2: float
    mask: np.ndarray | None
    segmenter: str
    created_at: datetime  # naive UTC


@dataclass(frozen=True)
class BScanVerdict:
    """One grader's "this B-scan has HRF: yes/no"."""

    run_id: int
    bscan_index: int
    grader: str
    has_hrf: bool
    decided_at: datetime  # naive UTC


@dataclass(frozen=True, eq=False)
class ReviewState:
    """Every review row of one run (all graders, or one when read for one), sorted by B-scan, lesion, grader."""

    run_id: int
    volume_id: int
    lesion_verdicts: tuple[LesionVerdict, ...]
    added_lesions: tuple[AddedLesion, ...]
    bscan_verdicts: tuple[BScanVerdict, ...]

    @property
    def graders(self) -> tuple[str, ...]:
        """Everyone who left a row on this run, sorted."""
        rows = (*self.lesion_verdicts, *self.added_lesions, *self.bscan_verdicts)
        return tuple(sorted({r.grader for r in rows}))


@dataclass(frozen=True)
class ReviewProgress:
    """How far the review of one run has come (one grader's rows, or any grader's when ``grader`` is None):
    a lesion is decided when it has a verdict, a B-scan when it has an HRF yes/no."""

    run_id: int
    volume_id: int
    grader: str | None
    n_bscans: int
    n_lesions: int
    lesions_decided: int
    lesions_accepted: int
    lesions_rejected: int
    lesions_added: int
    bscans_decided: int

    @property
    def done(self) -> bool:
        """Every lesion and every B-scan decided."""
        return self.lesions_decided == self.n_lesions and self.bscans_decided == self.n_bscans
