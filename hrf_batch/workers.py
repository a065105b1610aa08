"""`hrf-batch ingest --workers N`: one study spread over N worker processes on one machine.

The driver discovers the study once, records what discovery found wrong, and hands the sources (one
file, or the files of one DICOM series) out one at a time to N processes started with "spawn" (torch,
and CUDA above all, do not survive a fork). Each worker opens its own store connection, loads the
classifier and the segmenter once, and runs every volume through the code of the serial ingest
(:func:`~hrf_batch.ingest.process_volume`: claim, skip if done, compute, save, record a failure). It
sends back one small :class:`~hrf_batch.ingest.VolumeOutcome` per volume, so the driver keeps one
progress bar and builds the same summary as the serial ingest.

Each worker talks to the driver over its own pipe, and gets its next source only once it has reported
the last one done, so the driver always knows which source a worker holds: a worker that dies (killed,
out of memory) leaves that source recorded as failed, naming the file and the exit code, and the other
workers carry on. Its claim ends with the process, and no done run exists, so the next ingest computes
the source again. Ctrl-C ends every worker; what is already stored stays.

Test hook: when the environment variable named by :data:`TEST_EXIT_AT` holds file names (comma-separated),
a worker that is handed a source of one of those names ends at once with exit code 9, as a killed worker
would. It is read in the worker processes only and exists for the tests of the dead-worker handling.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hrf_batch.config import Settings
from hrf_batch.errors import HrfBatchError, one_line
from hrf_batch.ingest import (
    IngestContext,
    IngestSummary,
    fail_source,
    load_models,
    new_batch_id,
    process_volume,
    record_issue,
)
from hrf_batch.io.discover import FileIssue, Source, discover, display_text, read_sources
from hrf_batch.store import Store, open_store

log = logging.getLogger(__name__)

MAX_WORKERS = 64
TEST_EXIT_AT = "HRF_BATCH_TEST_WORKER_EXIT_AT"  # tests only: see the module docstring
_TEST_EXIT_CODE = 9
_STOP_WAIT_S = 10.0


def parse_devices(text: str) -> list[int]:
    """The CUDA device numbers of ``--devices 0,1``; refused when they are not numbers or CUDA is absent."""
    try:
        devices = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise HrfBatchError(f"--devices {text!r} is not a comma-separated list of CUDA device numbers",
                            "give device numbers such as --devices 0,1") from exc
    if any(d < 0 for d in devices):
        raise HrfBatchError(f"--devices {text!r} has a negative device number",
                            "give device numbers such as --devices 0,1")
    import torch

    if not torch.cuda.is_available():
        raise HrfBatchError(f"--devices {text} names CUDA devices but CUDA is not available here",
                            "leave out --devices to use --device cpu or auto")
    count = torch.cuda.device_count()
    missing = sorted({d for d in devices if d >= count})
    if missing:
        raise HrfBatchError(f"--devices {text}: no CUDA device {', '.join(map(str, missing))} here ({count} found)",
                            f"give numbers from 0 to {count - 1}")
    return devices


def worker_device(settings: Settings, index: int, devices: list[int] | None) -> str:
    """Worker ``index``'s device: ``cuda:<devices[index % len]>``, or the settings' device without ``--devices``."""
    return f"cuda:{devices[index % len(devices)]}" if devices else settings.device


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker process needs, as plain picklable data."""

    index: int
    settings: Settings
    batch_id: str
    torch_threads: int
    log_level: int


def ingest_study_workers(study_dir: Path, settings: Settings, workers: int, *, devices: list[int] | None = None,
                         progress: bool = True) -> IngestSummary:
    """Ingest ``study_dir`` like :func:`~hrf_batch.ingest.ingest_study`, with ``workers`` processes computing."""
    if not 1 <= workers <= MAX_WORKERS:
        raise HrfBatchError(f"{workers} workers asked for", f"give between 1 and {MAX_WORKERS}")
    start = time.perf_counter()
    disc = discover(study_dir)
    summary = IngestSummary(batch_id=new_batch_id())
    with open_store(settings.db) as store:
        for issue in disc.issues:
            summary.add(record_issue(store, issue, summary.batch_id))
        n = min(workers, len(disc.sources))
        jobs = [WorkerJob(i, dataclasses.replace(settings, device=worker_device(settings, i, devices)),
                          summary.batch_id, max(1, (os.cpu_count() or 1) // workers), logging.getLogger().level)
                for i in range(n)]
        with tqdm(total=len(disc.sources), desc="study", unit="source", disable=not progress) as bar:
            _Driver(jobs, disc.sources, store, summary, bar).run()
    summary.seconds = time.perf_counter() - start
    return summary


@dataclass
class _Worker:
    job: WorkerJob
    process: BaseProcess
    conn: Connection
    holding: Source | None = None
    eof: bool = False
    finished: bool = False  # its end has been handled (the source it held recorded as failed)


class _Driver:
    """Starts the workers, hands out sources, counts outcomes and notices a worker that died."""

    def __init__(self, jobs: list[WorkerJob], sources: list[Source], store: Store, summary: IngestSummary,
                 bar: tqdm) -> None:
        self.pending = list(reversed(sources))  # popped from the end: discovery order
        self.store = store
        self.summary = summary
        self.bar = bar
        self.jobs = jobs
        self.workers: list[_Worker] = []

    def run(self) -> None:
        """Run every source to its end; whatever happens, no worker outlives this call."""
        try:
            self._start()
            while not all(self._ended(w) for w in self.workers):
                self._step()
            self._fail_leftovers()
        finally:
            self._stop_all()

    def _fail_leftovers(self) -> None:
        """Sources no worker was left to compute (every worker died): failed, so a rerun computes them."""
        while self.pending:
            source = self.pending.pop()
            reason = (f"{display_text(source.path)}: not computed, every worker process had ended; "
                      "run the ingest again to compute this file")
            fail_source(self.store, self.summary, source.path, reason)
            self.bar.update(1)

    def _start(self) -> None:
        ctx = get_context("spawn")
        for job in self.jobs:
            mine, theirs = ctx.Pipe(duplex=True)
            process = ctx.Process(target=worker_main, args=(job, theirs), name=f"hrf-batch worker {job.index}",
                                  daemon=True)
            process.start()
            theirs.close()  # the worker's end lives in the worker only: its death reads as the end of the pipe
            worker = _Worker(job, process, mine)
            self.workers.append(worker)
            self._hand_out(worker)

    def _ended(self, worker: _Worker) -> bool:
        """Handled by :meth:`_finish`, not merely exited: a worker whose pipe ended in one step and whose
        process is reaped by the next must still have its source recorded."""
        return worker.finished

    def _step(self) -> None:
        live = [w for w in self.workers if not self._ended(w)]
        waitables: list[Any] = [w.conn for w in live if not w.eof] + [w.process.sentinel for w in live]
        ready = set(wait(waitables, timeout=1.0))
        for worker in live:
            if worker.conn in ready or worker.process.sentinel in ready:
                self._drain(worker)
            if worker.eof and worker.process.exitcode is not None:
                self._finish(worker)

    def _drain(self, worker: _Worker) -> None:
        """Read what the worker sent; the end of its pipe means it has ended or is ending."""
        while not worker.eof and worker.conn.poll():
            try:
                message = worker.conn.recv()
            except (EOFError, ConnectionResetError):  # reset: it died before reading what it was sent
                worker.eof = True
                return
            self._handle(worker, message)

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "outcome":
            self.summary.add(message[1])
            self.summary.show(self.bar)
        elif kind == "done":
            self.bar.update(1)
            self._hand_out(worker)
        elif kind == "fatal":  # the worker cannot compute anything (model, device, database): nor can the others
            raise HrfBatchError(f"worker {worker.job.index} stopped: {message[1]}", message[2])

    def _hand_out(self, worker: _Worker) -> None:
        worker.holding = self.pending.pop() if self.pending else None
        try:
            worker.conn.send(worker.holding)
        except (BrokenPipeError, ConnectionResetError):  # its end is handled once its process has ended
            log.warning("worker %d ended before it was handed its next source", worker.job.index)
            if worker.holding is not None:  # never started: another worker computes it
                self.pending.append(worker.holding)
                worker.holding = None

    def _finish(self, worker: _Worker) -> None:
        """A worker that ended holding a source failed it; that failure is recorded and the others go on."""
        worker.finished = True
        code = worker.process.exitcode
        source, worker.holding = worker.holding, None
        if source is None:
            if code != 0:
                log.warning("worker %d ended with exit code %s after its last source", worker.job.index, code)
            return
        path = display_text(source.path)
        killed = code is not None and code < 0
        how = f"was ended by signal {_signal_name(-code)}" if killed else f"ended with exit code {code}"
        reason = (f"{path}: the worker process computing it {how}, perhaps killed or out of memory; "
                  "the other files went on — run the ingest again to compute this file")
        log.error(reason)
        fail_source(self.store, self.summary, source.path, reason)
        self.bar.update(1)
        self.summary.show(self.bar)

    def _stop_all(self) -> None:
        """End every worker still running (Ctrl-C, an error): an uncommitted volume is simply computed again later."""
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in self.workers:
            worker.process.join(_STOP_WAIT_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()


def _signal_name(number: int) -> str:
    try:
        return f"{number} ({signal.Signals(number).name})"
    except ValueError:
        return str(number)


def worker_main(job: WorkerJob, conn: Connection) -> None:
    """A worker process: load the models once, then compute each source the driver hands over until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the driver ends the workers
    logging.basicConfig(level=job.log_level, format=f"%(levelname)s worker {job.index} %(name)s: %(message)s")
    # no bar is shown here: a plain lock, since tqdm's process-shared default is reported leaked when a worker is killed
    tqdm.set_lock(threading.RLock())
    import torch

    torch.set_num_threads(job.torch_threads)
    try:
        _work(job, conn)
    except Exception as exc:  # reported to the driver, which stops the ingest with this message
        if not isinstance(exc, HrfBatchError):
            log.exception("worker %d failed", job.index)
        problem, hint = (exc.problem, exc.hint) if isinstance(exc, HrfBatchError) else (
            f"{type(exc).__name__}: {one_line(exc)}", "the log has the details")
        conn.send(("fatal", problem, hint))
        raise SystemExit(1) from exc
    finally:
        conn.close()


def _work(job: WorkerJob, conn: Connection) -> None:
    models = load_models(job.settings)
    with open_store(job.settings.db) as store:
        ctx = IngestContext(store, models, job.batch_id)
        while (source := _next_source(conn)) is not None:
            if source.path.name in os.environ.get(TEST_EXIT_AT, "").split(","):
                os._exit(_TEST_EXIT_CODE)
            for item in read_sources([source]):  # the serial reading path: a bad file is an issue, not an abort
                outcome = (record_issue(store, item, job.batch_id) if isinstance(item, FileIssue)
                           else process_volume(item, ctx, progress=False))
                conn.send(("outcome", outcome))
            conn.send(("done",))


def _next_source(conn: Connection) -> Source | None:
    """The next source to compute; None once the driver has no more, or has gone."""
    try:
        return conn.recv()
    except EOFError:
        return None
