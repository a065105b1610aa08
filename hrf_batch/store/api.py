"""The Store: one object per database, every method one short transaction, dataclasses in and out.

Several stores (in several processes) may write one database at once. Writes that clash on a unique
key with rows another writer committed first are tried again, so the second writer finds those rows
("already done") instead of failing; :meth:`Store.claim_volume` lets concurrent ingests split a study.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from hrf_batch.io.volume import VolumeMeta
from hrf_batch.results import RunInfo, VolumeResult
from hrf_batch.store import read, review, write
from hrf_batch.store.claims import ClaimLocks, claim_locks, lock_key
from hrf_batch.store.engine import check_schema, display_url, is_locked, locked_error, make_engine, resolve_url, writer
from hrf_batch.store.errors import StoreError
from hrf_batch.store.records import (
    AddedLesion,
    BScanVerdict,
    IngestErrorRecord,
    LesionVerdict,
    PatientRecord,
    PatientSummary,
    ReviewProgress,
    ReviewState,
    RunRecord,
    StoredAnatomy,
    StoredBScan,
    StoredVolume,
)


def open_store(url: str | None = None) -> Store:
    """Open (or create, at the newest schema) the study database; None means ./hrf_batch.sqlite.

    Raises SchemaOutdatedError for a database made by an older hrf-batch: `hrf-batch db upgrade` first.
    """
    resolved = resolve_url(url)
    engine = make_engine(resolved)
    try:
        check_schema(engine, resolved)
    except StoreError:
        engine.dispose()
        raise
    return Store(engine, resolved)


log = logging.getLogger(__name__)
T = TypeVar("T")
_WRITE_ATTEMPTS = 4  # tries of one write in all, when it clashes with a concurrent writer
_RETRY_SQLSTATES = ("40001", "40P01")  # PostgreSQL: serialization failure, deadlock detected


class Claim(enum.Enum):
    """What :meth:`Store.claim_volume` found."""

    CLAIMED = "claimed"  # this store computes the volume now and must release it afterwards
    DONE = "done"  # a done run with the same inputs exists: skip
    ELSEWHERE = "elsewhere"  # another live process is computing it: skip


class Store:
    """Reads and writes results; ORM rows stay inside, plain dataclasses come out."""

    def __init__(self, engine: Engine, url: URL) -> None:
        self._engine = engine
        self._url = url
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(writer(engine), expire_on_commit=False)
        self._locks: ClaimLocks = claim_locks(engine, url)
        self._claims: dict[write.RunKey, tuple[int, int]] = {}  # run key -> (lock key, run id)

    @property
    def url(self) -> str:
        """The database URL without password."""
        return display_url(self._url)

    @property
    def backend(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self._url.get_backend_name()

    def close(self) -> None:
        """Release claims and connections (and the SQLite file)."""
        try:
            for key in list(self._claims):
                self._end_claim(key)
            self._locks.close()
        except SQLAlchemyError as exc:  # the server drops the locks with the session that closes next
            log.warning("%s: could not release volume claims cleanly (%s); closing the connection drops them",
                        self.url, exc)
        finally:
            self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self, action: str) -> Iterator[Session]:
        """A session in one read transaction: commit on success, roll back everything on any error."""
        try:
            with self._sessions() as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise self._failure(action, exc) from exc

    def _write(self, action: str, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one write transaction; a clash with a concurrent writer runs it again on the
        rows that writer committed (so a duplicate key becomes "already there"), other errors roll back."""
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                with self._write_sessions() as session, session.begin():
                    return work(session)
            except SQLAlchemyError as exc:
                if attempt < _WRITE_ATTEMPTS and _clashed(exc):
                    log.info("%s in %s clashed with a concurrent writer (%s); trying again", action, self.url,
                             type(getattr(exc, "orig", exc)).__name__)
                    continue
                raise self._failure(action, exc) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _failure(self, action: str, exc: SQLAlchemyError) -> StoreError:
        if is_locked(exc):
            return locked_error(f"{action} in {self.url}", "nothing was saved")
        if isinstance(exc, IntegrityError):
            return StoreError(
                f"{action} in {self.url} clashed with rows written at the same time; nothing was saved",
                "run the command again: finished volumes are skipped",
            )
        return StoreError(
            f"{action} in {self.url} failed; nothing was saved",
            "check that the database is reachable and writable, then run the command again",
        )

    def claim_volume(
        self, meta: VolumeMeta, run: RunInfo, *, n_bscans: int, bscan_shape: tuple[int, int],
        started_at: datetime | None = None,
    ) -> Claim:
        """Claim a volume before computing it, so a concurrent ingest skips it instead of computing it too.

        CLAIMED: the run is stored as 'running' (a failed run, or one left 'running' by a process that
        died, is taken over) and this store holds its lock until :meth:`release_volume` or :meth:`close`.
        DONE: a done run with the same inputs exists. ELSEWHERE: another live process holds the claim.
        """
        key = write.RunKey.of(meta, run)
        if key in self._claims:
            return Claim.ELSEWHERE
        lock = lock_key("volume claim", *dataclasses.astuple(key))
        try:
            if not self._locks.try_lock(lock):
                return Claim.ELSEWHERE
        except SQLAlchemyError as exc:
            raise self._failure(f"claiming {meta.source_path}", exc) from exc
        started_at = started_at or write.utc_now()
        run_id = None
        try:
            run_id = self._write(f"claiming {meta.source_path}", lambda session: write.claim_run(
                session, meta, n_bscans, bscan_shape, run, started_at))
        finally:
            if run_id is None:  # done already, or the write failed: the lock is not needed
                self._unlock(lock)
        if run_id is None:
            return Claim.DONE
        self._claims[key] = (lock, run_id)
        return Claim.CLAIMED

    def release_volume(self, meta: VolumeMeta, run: RunInfo) -> None:
        """End a claim: a run still 'running' (neither saved nor recorded as failed) is deleted, the lock freed.

        Never raises for the database: a run that cannot be deleted stays 'running' and, its lock gone,
        is taken over by the next ingest."""
        self._end_claim(write.RunKey.of(meta, run))

    def _end_claim(self, key: write.RunKey) -> None:
        claim = self._claims.pop(key, None)
        if claim is None:
            return
        lock, run_id = claim
        try:
            self._write("releasing a volume claim", lambda session: write.drop_claim(session, run_id))
        except StoreError as exc:
            log.warning("%s; run %d stays 'running' until the next ingest takes it over", exc, run_id)
        finally:
            self._unlock(lock)

    def _unlock(self, lock: int) -> None:
        try:
            self._locks.unlock(lock)
        except SQLAlchemyError as exc:
            log.warning("%s: could not release a volume claim (%s); it ends with this connection", self.url, exc)

    def find_done_run(
        self, source_sha256: str, series_uid: str, model_id: str, segmenter: str,
        segmenter_checkpoint_sha256: str | None, params_hash: str, code_version: str,
    ) -> RunRecord | None:
        """The finished run with exactly these inputs, so an ingest can skip the volume."""
        key = write.RunKey(
            source_sha256, series_uid, model_id, segmenter, segmenter_checkpoint_sha256 or "", params_hash, code_version
        )
        with self._transaction("looking up a finished run") as session:
            return read.find_done_run(session, key)

    def find_done_run_for(self, meta: VolumeMeta, run: RunInfo) -> RunRecord | None:
        """:meth:`find_done_run` with the key taken from a volume's metadata and the run settings."""
        key = write.RunKey.of(meta, run)
        with self._transaction("looking up a finished run") as session:
            return read.find_done_run(session, key)

    def save_volume_result(self, result: VolumeResult, *, started_at: datetime | None = None) -> RunRecord:
        """Store all rows of one volume's result in one transaction: all of them or none.

        Patient, visit and volume are created or updated; a done run with the same inputs is left as
        it is and returned (a rerun is a no-op); a failed run with the same inputs is replaced.
        ``started_at`` is naive UTC; it defaults to the time of saving.
        """
        prepared = write.prepare(result)
        finished_at = write.utc_now()
        return self._write(f"saving the results of {result.meta.source_path}", lambda session: read.run_record(
            write.persist(session, prepared, started_at or finished_at, finished_at)))

    def record_failed_run(
        self, meta: VolumeMeta, run: RunInfo, error: str, *, n_bscans: int, bscan_shape: tuple[int, int],
        started_at: datetime | None = None,
    ) -> RunRecord:
        """Keep a trace of a volume the pipeline could not finish (status 'failed' with the error text)."""
        started_at = started_at or write.utc_now()
        return self._write(f"recording the failed run of {meta.source_path}", lambda session: read.run_record(
            write.persist_failed(session, meta, n_bscans, bscan_shape, run, error, started_at)))

    def record_ingest_error(self, path: str | Path, reason: str, kind: str = "error", batch_id: str | None = None) -> None:
        """Remember a file an ingest left out: kind 'error' (unreadable OCT) or 'skipped' (not OCT)."""
        self._write(f"recording the ingest error for {path}",
                    lambda session: write.add_ingest_error(session, str(path), reason, kind, batch_id))

    def ingest_errors(self, batch_id: str | None = None) -> list[IngestErrorRecord]:
        """Files left out by ingests, oldest first."""
        with self._transaction("reading ingest errors") as session:
            return read.ingest_errors(session, batch_id)

    def list_patients(self, *, include_identifiers: bool = False) -> list[PatientRecord]:
        """Every patient with visit/volume counts; names and birth dates only when asked for."""
        with self._transaction("listing patients") as session:
            return read.list_patients(session, include_identifiers)

    def patient_summary(self, patient_id: str) -> PatientSummary:
        """The patient's rows of the burden views: volume, visit, patient, ETDRS subfield and layer zone."""
        with self._transaction(f"reading patient {patient_id}") as session:
            return read.patient_summary(session, patient_id)

    def volume_results(self, patient_id: str, *, masks: bool = True) -> list[StoredVolume]:
        """The patient's volumes with their latest done run's B-scans, lesions and anatomy; masks and layer
        lines are decoded only when ``masks``."""
        with self._transaction(f"reading the results of patient {patient_id}") as session:
            return read.volume_results(session, patient_id, masks)

    def unfinished_volumes(self, patient_id: str) -> list[StoredVolume]:
        """The patient's volumes with no done run, each with its latest (failed or running) run and no B-scans."""
        with self._transaction(f"reading the unfinished volumes of patient {patient_id}") as session:
            return read.unfinished_volumes(session, patient_id)

    def run_anatomy(self, run_id: int, *, layers: bool = True) -> StoredAnatomy | None:
        """One run's anatomy (layer lines decoded when ``layers``); None for a run stored without."""
        with self._transaction(f"reading the anatomy of run {run_id}") as session:
            return read.run_anatomy(session, run_id, layers)

    def bscans_for_run(self, run_id: int, *, masks: bool = True) -> tuple[StoredBScan, ...]:
        """One run's B-scans in index order."""
        with self._transaction(f"reading run {run_id}") as session:
            return read.bscans_for_run(session, run_id, masks)

    def view_rows(self, view: str, patient_id: str | None = None) -> list[Any]:
        """Rows of `hrf_burden_volume`, `_visit`, `_patient`, `_etdrs` or `_layer` as dataclasses."""
        with self._transaction(f"reading view {view}") as session:
            return read.view_rows(session, view, patient_id)

    def run_record(self, run_id: int) -> RunRecord:
        """One run's provenance (model, segmenter, parameters, status); StoreError when there is no such run."""
        with self._transaction(f"reading run {run_id}") as session:
            return review.run_record(session, run_id)

    def run_volume(self, run_id: int, *, masks: bool = True) -> StoredVolume:
        """The volume of any run (not only the latest done one) with that run's B-scans and anatomy."""
        with self._transaction(f"reading run {run_id}") as session:
            return review.run_volume(session, run_id, masks)

    # Grader review: verdicts name the run they judge and never change the model's rows.

    def save_lesion_verdict(self, run_id: int, bscan_index: int, lesion_index: int, grader: str, verdict: str, *,
                            decided_at: datetime | None = None) -> LesionVerdict:
        """Store a grader's 'accept' or 'reject' of a stored lesion, replacing that grader's earlier verdict on it."""
        when = decided_at or write.utc_now()
        return self._write(f"saving a verdict on lesion {lesion_index} of B-scan {bscan_index}", lambda session:
                           review.save_lesion_verdict(session, run_id, bscan_index, lesion_index, grader, verdict, when))

    def delete_lesion_verdict(self, run_id: int, bscan_index: int, lesion_index: int, grader: str) -> bool:
        """Withdraw a grader's verdict on a lesion (undo); False when they had none."""
        return self._write(f"withdrawing a verdict on lesion {lesion_index} of B-scan {bscan_index}", lambda session:
                           review.delete_lesion_verdict(session, run_id, bscan_index, lesion_index, grader))

    def save_bscan_verdict(self, run_id: int, bscan_index: int, grader: str, has_hrf: bool, *,
                           decided_at: datetime | None = None) -> BScanVerdict:
        """Store a grader's "B-scan has HRF: yes/no", replacing that grader's earlier answer for it."""
        when = decided_at or write.utc_now()
        return self._write(f"saving the HRF yes/no of B-scan {bscan_index}", lambda session:
                           review.save_bscan_verdict(session, run_id, bscan_index, grader, has_hrf, when))

    def delete_bscan_verdict(self, run_id: int, bscan_index: int, grader: str) -> bool:
        """Withdraw a grader's HRF yes/no on a B-scan (undo); False when they had none."""
        return self._write(f"withdrawing the HRF yes/no of B-scan {bscan_index}", lambda session:
                           review.delete_bscan_verdict(session, run_id, bscan_index, grader))

    def save_added_lesion(self, run_id: int, bscan_index: int, grader: str, click_rc: tuple[int, int],
                          mask: np.ndarray, segmenter: str, *, created_at: datetime | None = None) -> AddedLesion:
        """Store an HRF the model missed: ``mask`` (bool, the B-scan's shape) as ``segmenter`` drew it at the click."""
        when = created_at or write.utc_now()
        return self._write(f"saving a lesion added to B-scan {bscan_index}", lambda session: review.save_added_lesion(
            session, run_id, bscan_index, grader, click_rc, mask, segmenter, when))

    def delete_added_lesion(self, added_id: int, grader: str) -> bool:
        """Remove a lesion the grader added (undo); False when no such lesion of theirs exists."""
        return self._write(f"removing added lesion {added_id}",
                           lambda session: review.delete_added_lesion(session, added_id, grader))

    def review_state(self, run_id: int, *, grader: str | None = None, masks: bool = True) -> ReviewState:
        """Every review row of one run (one grader's when ``grader``); empty tuples before any review."""
        with self._transaction(f"reading the review of run {run_id}") as session:
            return review.review_states(session, [run_id], grader, masks)[0]

    def reviewed_runs(self, *, grader: str | None = None, masks: bool = True) -> list[ReviewState]:
        """The review rows of every run that has any (one grader's when ``grader``), by run id."""
        with self._transaction("reading the reviewed runs") as session:
            return review.review_states(session, None, grader, masks)

    def review_progress(self, run_ids: Sequence[int], *, grader: str | None = None) -> list[ReviewProgress]:
        """How far the review of each run has come (one grader's, or anyone's when ``grader`` is None)."""
        with self._transaction("reading the review progress") as session:
            return review.review_progress(session, run_ids, grader)


def _clashed(exc: SQLAlchemyError) -> bool:
    """A conflict with a concurrent writer that a new attempt resolves: a duplicate key, or on PostgreSQL a
    serialization failure or deadlock."""
    if isinstance(exc, IntegrityError):
        return True
    return isinstance(exc, OperationalError) and getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES
