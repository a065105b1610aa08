"""`hrf-batch ingest --ray ADDRESS|auto|local`: one study over a Ray cluster, one actor per GPU or CPU slot.

Ray, not a home-made scheduler, places the workers: each is an actor that loads the classifier and the
segmenter once (one GPU each on CUDA, else one CPU slot each) and runs every source it is handed through
the code of the serial ingest (:func:`~hrf_batch.ingest.process_volume`: claim, skip if done, compute,
save in one transaction, record a failure). The driver discovers the study, records what discovery found
wrong, hands out one source at a time to each idle actor and keeps one progress bar and one summary.

Every worker writes to the database itself, so a cluster of several machines needs PostgreSQL: SQLite
(a file with WAL locking) is refused there with a message saying so. The study folder and the model must
be at the same path on every machine (a network share); a worker that cannot read a file records the
file as failed, like the serial ingest.

An actor that dies (its process killed, its node lost, out of memory) fails nothing by itself: the
source it held is handed to another actor (:data:`MAX_ATTEMPTS` in all), and a new actor takes the dead
one's place where Ray finds room. The dead actor's claim ended with its process, so the retry takes the
volume over; a volume is stored in one transaction, so it is stored once or not at all.

``--ray local`` starts a private Ray instance on this machine for the one ingest; ``auto`` joins the
cluster Ray finds (``ray start`` on this machine, or ``RAY_ADDRESS``); anything else is a cluster
address (``HOST:PORT`` or ``ray://HOST:PORT``). Ray's token authentication stays on: joining a cluster
needs its token (``RAY_AUTH_TOKEN``, or the file Ray keeps in ``~/.ray``, copied from the head node).

Test hook: when the environment variable named by :data:`TEST_EXIT_AT` holds file names (comma-separated),
an actor that is handed one of those files for the first time ends its process at once, as a killed
worker would; the retry then computes it. It is read in the actors only and exists for the tests.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hrf_batch.config import Settings
from hrf_batch.errors import HrfBatchError, one_line
from hrf_batch.ingest import (
    IngestContext,
    IngestSummary,
    VolumeOutcome,
    fail_source,
    load_models,
    new_batch_id,
    process_volume,
    record_issue,
)
from hrf_batch.io.discover import FileIssue, Source, discover, display_text, read_sources
from hrf_batch.store import Store, open_store, resolve_url

log = logging.getLogger(__name__)

LOCAL = "local"
MAX_ATTEMPTS = 3  # a source is handed out at most this often when the actors computing it die
TEST_EXIT_AT = "HRF_BATCH_TEST_RAY_EXIT_AT"  # tests only: see the module docstring
_TEST_EXIT_CODE = 9
_WAIT_S = 1.0
READY_TIMEOUT_S = 600.0  # how long actors may take to find room in the cluster and load their models
_CONNECT_TIMEOUT_S = 5.0  # an address that does not answer within this is refused (Ray itself retries for minutes)
_GPU_ACTOR_THREADS = 4  # CPU threads of a GPU actor (region growing and reading run on the CPU)


@dataclass(frozen=True)
class ActorPlan:
    """How many actors, and what each asks Ray for."""

    actors: int
    num_cpus: float
    num_gpus: float
    device: str  # what the actors' settings say: "cuda" (the GPU Ray gave the actor) or "cpu"


def plan_actors(resources: dict[str, float], device: str, workers: int | None) -> ActorPlan:
    """One actor per GPU on CUDA (``device`` cuda, or auto with GPUs in the cluster), else one per CPU slot.

    ``workers`` caps the count; asking for more actors than the cluster has slots is refused, since Ray
    would wait for ever for room."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    use_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise HrfBatchError(f"--device {device} asks for GPUs but the Ray cluster has none",
                            "use --device cpu, or add nodes with GPUs to the cluster")
    slots, kind = (gpus, "GPU") if use_gpu else (cpus, "CPU")
    if slots == 0:
        raise HrfBatchError("the Ray cluster offers no CPU to run workers on", "start nodes with CPUs (ray start)")
    if workers is not None and workers > slots:
        raise HrfBatchError(f"--workers {workers} asks for more actors than the cluster's {slots} {kind} slots",
                            f"give --workers {slots} or less, or add nodes to the cluster")
    n = workers or slots
    return ActorPlan(n, 1.0 if not use_gpu else 0.0, 1.0 if use_gpu else 0.0, "cuda" if use_gpu else "cpu")


def database_for_workers(db: str | None, nodes: int) -> str:
    """The database URL every actor opens: an absolute SQLite path on one machine, PostgreSQL on several."""
    url = resolve_url(db)
    if url.get_backend_name() != "sqlite":
        return url.render_as_string(hide_password=False)
    if not url.database or url.database == ":memory:":
        raise HrfBatchError("an in-memory SQLite database cannot be shared with Ray workers",
                            "give --db a SQLite file or a postgresql:// URL")
    if nodes > 1:
        raise HrfBatchError(
            f"the Ray cluster has {nodes} machines, but --db is a SQLite file ({url.database}): SQLite cannot be "
            "written safely from several machines",
            "give --db a PostgreSQL URL that every machine reaches, e.g. postgresql://USER@HOST:5432/DATABASE")
    return url.set(database=str(Path(url.database).expanduser().resolve())).render_as_string(hide_password=False)


def ingest_study_ray(study_dir: Path, settings: Settings, address: str, *, workers: int | None = None,
                     progress: bool = True) -> IngestSummary:
    """Ingest ``study_dir`` like :func:`~hrf_batch.ingest.ingest_study`, with Ray actors computing."""
    if address not in (LOCAL, "auto"):
        # Ray sends its token by itself only to a cluster it finds on this machine; for an address it must be told,
        # before it is imported (its core reads the mode then). Token authentication is never switched off here.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    start = time.perf_counter()
    disc = discover(study_dir)
    started_here = _connect(address)
    try:
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        db = database_for_workers(settings.db, nodes)
        plan = plan_actors(ray.cluster_resources(), settings.device, workers)
        actor_settings = dataclasses.replace(settings, db=db, device=plan.device, model=_absolute(settings.model),
                                             sam2_checkpoint=_absolute(settings.sam2_checkpoint))
        summary = IngestSummary(batch_id=new_batch_id())
        with open_store(db) as store:
            for issue in disc.issues:
                summary.add(record_issue(store, issue, summary.batch_id))
            if disc.sources:
                with tqdm(total=len(disc.sources), desc="study", unit="source", disable=not progress) as bar:
                    _Driver(plan, actor_settings, disc.sources, store, summary, bar).run()
    finally:
        if started_here:
            ray.shutdown()  # ends a private instance; on a shared cluster only this driver leaves
    summary.seconds = time.perf_counter() - start
    return summary


def _absolute(path: str | None) -> str | None:
    """A local file or folder as an absolute path, so that workers started elsewhere find it; names stay names."""
    if path is None or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())


def _connect(address: str) -> bool:
    """Join (or, for ``local``, start) a Ray cluster; True when this call connected (and so disconnects later)."""
    import ray

    if ray.is_initialized():  # a library caller connected already
        return False
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                               "configure_logging": True}
    try:
        if address == LOCAL:
            ray.init(**options)
        else:
            _check_reachable(address)
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise HrfBatchError(f"cannot join the Ray cluster at {address!r}: {one_line(exc)}", _JOIN_HINT) from exc
    return True


_JOIN_HINT = ("start one with `ray start --head` (and `ray start --address HEAD:6379` on the other machines), give its "
              "address with --ray HOST:PORT, or use --ray local for this machine alone; joining needs the cluster's "
              "token (RAY_AUTH_TOKEN)")


def _check_reachable(address: str) -> None:
    """Refuse at once a HOST:PORT that nothing answers on, instead of Ray's minutes of retries."""
    host_port = address.removeprefix("ray://")
    host, sep, port = host_port.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return  # auto, or a form Ray itself resolves and explains
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers on {host_port} ({exc.strerror or type(exc).__name__})") from exc


class IngestWorker:
    """The body of one Ray actor: models loaded once, one store connection, sources computed one by one."""

    def __init__(self, settings: Settings, batch_id: str, torch_threads: int, log_level: int) -> None:
        logging.basicConfig(level=log_level, format="%(levelname)s ray worker %(name)s: %(message)s")
        self.node = socket.gethostname()
        self.problem: tuple[str, str] | None = None
        try:
            import torch

            torch.set_num_threads(torch_threads)
            self.ctx = IngestContext(open_store(settings.db), load_models(settings), batch_id)
        except Exception as exc:  # kept and reported by ready(): the driver stops the ingest with this message
            if not isinstance(exc, HrfBatchError):
                log.exception("worker on %s failed to start", self.node)
            self.problem = ((exc.problem, exc.hint) if isinstance(exc, HrfBatchError)
                            else (f"{type(exc).__name__}: {one_line(exc)}", "the worker's log has the details"))

    def ready(self) -> tuple[str, tuple[str, str] | None]:
        """This actor's node, and why it cannot compute anything (None when it can)."""
        return self.node, self.problem

    def compute(self, source: Source, attempt: int) -> list[VolumeOutcome]:
        """Every volume of one source, through the serial reading path and :func:`process_volume`."""
        if attempt == 0 and source.path.name in os.environ.get(TEST_EXIT_AT, "").split(","):
            os._exit(_TEST_EXIT_CODE)
        out = []
        for item in read_sources([source]):  # a bad file is an issue, not an abort
            out.append(record_issue(self.ctx.store, item, self.ctx.batch_id) if isinstance(item, FileIssue)
                       else process_volume(item, self.ctx, progress=False))
        return out


@dataclass
class _Slot:
    """One actor place: the actor now in it and the source it holds."""

    index: int
    actor: Any
    holding: tuple[Source, int] | None = None


class _Driver:
    """Starts the actors, hands out sources, counts outcomes and replaces an actor that died."""

    def __init__(self, plan: ActorPlan, settings: Settings, sources: list[Source], store: Store,
                 summary: IngestSummary, bar: tqdm) -> None:
        import ray

        self.ray = ray
        self.plan = plan
        self.settings = settings
        self.pending: deque[tuple[Source, int]] = deque((s, 0) for s in sources)
        self.store = store
        self.summary = summary
        self.bar = bar
        self.replacements_left = 2 * plan.actors
        self.remote = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)(IngestWorker)
        self.slots: list[_Slot] = []
        self.running: dict[Any, _Slot] = {}

    def run(self) -> None:
        """Run every source to its end; whatever happens, no actor of this ingest outlives this call."""
        try:
            self.slots = [_Slot(i, self._new_actor()) for i in range(self.plan.actors)]
            try:
                self._check_ready([s.actor for s in self.slots])
            except self.ray.exceptions.GetTimeoutError as exc:
                raise HrfBatchError(f"the Ray cluster found no room for {self.plan.actors} workers within "
                                    f"{READY_TIMEOUT_S:.0f} s (other jobs may hold its CPUs or GPUs)",
                                    "give fewer --workers, or wait for the cluster to be free") from exc
            for slot in self.slots:
                self._hand_out(slot)
            while self.running:
                ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=_WAIT_S)
                for ref in ready:
                    self._collect(ref, self.running.pop(ref))
            self._fail_leftovers()
        finally:
            for slot in self.slots:
                self.ray.kill(slot.actor)

    def _new_actor(self) -> Any:
        threads = _GPU_ACTOR_THREADS if self.plan.num_gpus else max(1, int(self.plan.num_cpus))
        return self.remote.remote(self.settings, self.summary.batch_id, threads, logging.getLogger().level)

    def _check_ready(self, actors: list[Any]) -> None:
        """Wait until the actors have loaded their models; one that cannot stops the ingest with its reason.

        Raises GetTimeoutError when the cluster has found no room for them within :data:`READY_TIMEOUT_S`."""
        for node, problem in self.ray.get([a.ready.remote() for a in actors], timeout=READY_TIMEOUT_S):
            if problem is not None:
                raise HrfBatchError(f"a Ray worker on {node} stopped: {problem[0]}", problem[1])

    def _hand_out(self, slot: _Slot) -> None:
        slot.holding = self.pending.popleft() if self.pending else None
        if slot.holding is not None:
            source, attempt = slot.holding
            self.running[slot.actor.compute.remote(source, attempt)] = slot

    def _collect(self, ref: Any, slot: _Slot) -> None:
        source, attempt = slot.holding or (None, 0)
        try:
            outcomes = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:  # the actor's process or node is gone
            self._lost(slot, source, attempt, exc)
            return
        except self.ray.exceptions.RayTaskError as exc:  # the database failed under a worker: so it would for all
            cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
            if isinstance(cause, HrfBatchError):
                raise HrfBatchError(f"a Ray worker stopped: {cause.problem}", cause.hint) from exc
            raise HrfBatchError(f"a Ray worker stopped: {type(cause).__name__}: {one_line(cause)}",
                                "the worker's log has the details") from exc
        for outcome in outcomes:
            self.summary.add(outcome)
        self.bar.update(1)
        self.summary.show(self.bar)
        self._hand_out(slot)

    def _lost(self, slot: _Slot, source: Source | None, attempt: int, exc: Exception) -> None:
        """The actor died holding ``source``: hand it out again (or fail it after MAX_ATTEMPTS) and replace the actor."""
        if source is not None:
            name = display_text(source.path)
            if attempt + 1 < MAX_ATTEMPTS:
                log.warning("%s: the Ray worker computing it died (%s); handing it to another worker", name,
                            type(exc).__name__)
                self.pending.appendleft((source, attempt + 1))
            else:
                reason = (f"{name}: the Ray workers computing it died {MAX_ATTEMPTS} times, perhaps killed or out of "
                          "memory; the other files went on — run the ingest again to compute this file")
                fail_source(self.store, self.summary, source.path, reason)
                self.bar.update(1)
        slot.holding = None
        self.ray.kill(slot.actor)
        if self.replacements_left > 0:
            self.replacements_left -= 1
            slot.actor = self._new_actor()
            try:
                self._check_ready([slot.actor])
            except self.ray.exceptions.GetTimeoutError:
                log.error("no room in the Ray cluster for a new worker; going on with the others")
            else:
                self._hand_out(slot)
                return
            self.ray.kill(slot.actor)
        else:
            log.error("Ray workers keep dying; going on with the %d left", len(self.slots) - 1)
        self.slots.remove(slot)  # the others take what is pending; what none can take is failed at the end
        for other in self.slots:
            if other.holding is None:
                self._hand_out(other)

    def _fail_leftovers(self) -> None:
        """Sources no actor was left to compute: failed, so a rerun computes them."""
        while self.pending:
            source, _ = self.pending.popleft()
            reason = (f"{display_text(source.path)}: not computed, every Ray worker had died; "
                      "run the ingest again to compute this file")
            fail_source(self.store, self.summary, source.path, reason)
            self.bar.update(1)

