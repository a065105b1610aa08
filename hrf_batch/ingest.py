"""`hrf-batch ingest`: discover → read → pipeline → store, one transaction per volume.

A volume whose file (sha256) and series were already processed with the same model, segmenter,
parameters and code version is skipped, so an interrupted ingest simply resumes. A file that
cannot be read and a volume the pipeline fails on are recorded in the database and the walk goes
on; nothing already stored is touched.

Before computing a volume the ingest claims it (:meth:`~hrf_batch.store.Store.claim_volume`): a run
marked 'running' plus a lock that ends with the process. Two ingests on one database therefore split a
study: a volume another live ingest holds is skipped and counted as such, and a claim left by a killed
ingest is taken over by the next one.

The next file is read and decoded in a background thread while the current volume computes
(:func:`~hrf_batch.io.prefetch.prefetch`, one volume ahead); files are still handled, and their
failures recorded, in discovery order.

Volumes enter through the same reading path as `scan` and `info` (discovery, then the readers'
validation), which normalises the patient id (:func:`~hrf_batch.io.volume.normalise_patient_id`), so
the id stored is the id those commands show. Nothing here logs a name or a birth date.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from hrf_batch.config import Settings
from hrf_batch.errors import HrfBatchError, one_line
from hrf_batch.io.discover import FileIssue, discover, display_text, read_sources
from hrf_batch.io.prefetch import prefetch
from hrf_batch.io.volume import Volume
from hrf_batch.model.classify import Classifier, load_classifier
from hrf_batch.pipeline import PipelineParams, run_info, run_volume
from hrf_batch.results import RunInfo
from hrf_batch.segment import Segmenter, make_segmenter
from hrf_batch.store import Claim, Store, StoreError, open_store, utc_now

log = logging.getLogger(__name__)


PROCESSED = "processed"
ALREADY_DONE = "already done"
FAILED = "failed"
ELSEWHERE = "elsewhere"  # being processed by another ingest at the time
NOT_OCT = "not oct"
READ_AHEAD = 1  # volumes read while one computes: enough to hide reading, and one more volume in memory


@dataclass(frozen=True)
class VolumeOutcome:
    """What became of one volume, or of one file that gave none: small and picklable, so that a worker
    process (:mod:`hrf_batch.workers`) can send it to the ingest that counts, as the serial loop counts it."""

    status: str  # PROCESSED, ALREADY_DONE, FAILED, ELSEWHERE or NOT_OCT
    path: str = ""
    reason: str = ""
    hrf_count: int = 0
    bscans: int = 0


@dataclass
class IngestSummary:
    """What one ingest did; ``failed`` > 0 makes the command exit with code 3."""

    batch_id: str
    processed: int = 0
    already_done: int = 0
    failed: int = 0
    elsewhere: int = 0  # being processed by another ingest at the time
    not_oct: int = 0
    hrf_count: int = 0
    bscans: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def add(self, outcome: VolumeOutcome) -> None:
        """Count one outcome; the serial loop and the worker driver both count through here."""
        if outcome.status == PROCESSED:
            self.processed += 1
            self.hrf_count += outcome.hrf_count
            self.bscans += outcome.bscans
        elif outcome.status == ALREADY_DONE:
            self.already_done += 1
        elif outcome.status == ELSEWHERE:
            self.elsewhere += 1
        elif outcome.status == NOT_OCT:
            self.not_oct += 1
        else:
            self.failed += 1
            self.failures.append((outcome.path, outcome.reason))

    def show(self, bar: tqdm) -> None:
        """The progress bar's running counts (the worker and Ray drivers)."""
        bar.set_postfix(volumes=self.processed + self.already_done + self.elsewhere, failed=self.failed, refresh=False)

    def text(self) -> str:
        lines = [
            f"volumes: {self.processed} processed, {self.already_done} already done (skipped), {self.failed} failed, "
            f"{self.elsewhere} being processed by another ingest (skipped)",
            f"files not OCT (skipped): {self.not_oct}",
            f"HRFs found: {self.hrf_count} in {self.bscans} B-scans processed now, {self.seconds:.1f} s",
        ]
        lines += [f"FAILED {display_text(path)}: {display_text(reason)}" for path, reason in self.failures]
        return "\n".join(lines)


@dataclass(frozen=True)
class Models:
    """The classifier and segmenter of one process, with the parameters and rerun key they give."""

    clf: Classifier
    segmenter: Segmenter
    params: PipelineParams
    key: RunInfo


@dataclass
class IngestContext:
    """What every volume of one ingest (or of one worker process) is computed and stored with."""

    store: Store
    models: Models
    batch_id: str

    @property
    def key(self) -> RunInfo:
        return self.models.key


def new_batch_id() -> str:
    """The id that ties the ingest errors of one ingest together."""
    return uuid.uuid4().hex[:12]


def load_models(settings: Settings, segmenter: Segmenter | None = None) -> Models:
    """Load the classifier and the segmenter the settings name (once per process: they are the slow part)."""
    clf = load_classifier(settings.model, settings.device, settings.batch_size, settings.precision)
    if segmenter is None:
        segmenter = make_segmenter(settings.segmenter, sam2_checkpoint=settings.sam2_checkpoint,
                                   sam2_size=settings.sam2_size, device=settings.device)
    params = PipelineParams.from_settings(settings)
    return Models(clf, segmenter, params, run_info(clf, segmenter, params))


def process_volume(volume: Volume, ctx: IngestContext, progress: bool) -> VolumeOutcome:
    """Run and store one volume; whatever goes wrong with it is recorded and the study goes on."""
    path = volume.meta.source_path
    if ctx.store.find_done_run_for(volume.meta, ctx.key) is not None:
        return VolumeOutcome(ALREADY_DONE, path)
    started = utc_now()
    try:
        claim = ctx.store.claim_volume(volume.meta, ctx.key, n_bscans=volume.n_bscans,
                                       bscan_shape=volume.bscan_shape, started_at=started)
    except StoreError as exc:  # e.g. metadata the database refuses: recorded like any other failure
        return _record_failure(volume, ctx, started, f"claiming the volume failed: StoreError: {one_line(exc)}", exc)
    if claim is Claim.DONE:  # finished by another ingest since the look-up above
        return VolumeOutcome(ALREADY_DONE, path)
    if claim is Claim.ELSEWHERE:
        return VolumeOutcome(ELSEWHERE, path)
    try:
        return _compute_and_save(volume, ctx, started, progress)
    finally:
        ctx.store.release_volume(volume.meta, ctx.key)


def _compute_and_save(volume: Volume, ctx: IngestContext, started: datetime, progress: bool) -> VolumeOutcome:
    """Pipeline and store for a claimed volume; a failure is recorded and counted as such."""
    name = display_text(Path(volume.meta.source_path).name)
    m = ctx.models
    bar = tqdm(total=m.params.max_iterations + 1, desc=f"{name} {volume.meta.eye}", unit="step", leave=False,
               disable=not progress)
    stage = "pipeline"
    try:
        with bar:
            result = run_volume(volume, m.clf, m.segmenter, m.params, on_step=lambda: bar.update(1), run=m.key)
        stage = "storing the results"
        ctx.store.save_volume_result(result, started_at=started)
    except Exception as exc:  # one volume's failure, whatever its cause, must not stop the study: recorded below
        return _record_failure(volume, ctx, started, f"{stage} failed: {type(exc).__name__}: {one_line(exc)}", exc)
    return VolumeOutcome(PROCESSED, volume.meta.source_path, hrf_count=result.hrf_count, bscans=volume.n_bscans)


def _record_failure(volume: Volume, ctx: IngestContext, started: datetime, reason: str,
                    exc: Exception) -> VolumeOutcome:
    """A failed run for the volume, or, when even its metadata cannot be stored, an ingest error for
    its file. Only a database that accepts neither stops the ingest (it raises from here)."""
    path = volume.meta.source_path
    if isinstance(exc, HrfBatchError):
        log.error("%s: %s", path, reason)
    else:  # not one of ours: a bug or an unforeseen input; keep its traceback in the log
        log.exception("%s: %s", path, reason)
    try:
        ctx.store.record_failed_run(volume.meta, ctx.key, reason, n_bscans=volume.n_bscans,
                                    bscan_shape=volume.bscan_shape, started_at=started)
    except StoreError as store_exc:
        log.error("%s: cannot record the failed run (%s); recording the file instead", path, one_line(store_exc))
        ctx.store.record_ingest_error(path, reason, "error", ctx.batch_id)
    return VolumeOutcome(FAILED, path, reason)


def ingest_study(study_dir: Path, settings: Settings, *, progress: bool = True,
                 on_volume: Callable[[str], None] | None = None, segmenter: Segmenter | None = None) -> IngestSummary:
    """Ingest every OCT volume under ``study_dir`` into the database named by ``settings.db``.

    ``segmenter`` replaces the one the settings name (for library callers with their own, e.g. a
    retuned region grower); its name, checkpoint hash and parameters go into the rerun key."""
    start = time.perf_counter()
    disc = discover(study_dir)
    models = load_models(settings, segmenter)
    summary = IngestSummary(batch_id=new_batch_id())
    with open_store(settings.db) as store:
        ctx = IngestContext(store, models, summary.batch_id)
        for issue in disc.issues:
            summary.add(record_issue(store, issue, summary.batch_id))
        sources = tqdm(disc.sources, desc="study", unit="source", disable=not progress)
        # the same reading path as `scan` (a bad file is an issue, not an abort), one volume read ahead
        for item in prefetch(read_sources(sources), READ_AHEAD, name="read-ahead"):
            if isinstance(item, FileIssue):
                summary.add(record_issue(store, item, summary.batch_id))
                continue
            summary.add(process_volume(item, ctx, progress))
            if on_volume is not None:
                on_volume(item.meta.source_path)
    summary.seconds = time.perf_counter() - start
    return summary


def fail_source(store: Store, summary: IngestSummary, path: Path, reason: str) -> None:
    """Record and count a file that a worker process or actor could not finish, so the next ingest computes it."""
    summary.add(record_issue(store, FileIssue(path, reason, "error"), summary.batch_id))


def record_issue(store: Store, issue: FileIssue, batch_id: str) -> VolumeOutcome:
    """Store a file that gave no volume (not OCT, or unreadable) and say how it counts."""
    store.record_ingest_error(issue.path, issue.reason, issue.kind, batch_id)
    if issue.kind == "skipped":
        return VolumeOutcome(NOT_OCT, str(issue.path), issue.reason)
    return VolumeOutcome(FAILED, str(issue.path), issue.reason)
