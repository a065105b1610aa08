"""Read-ahead: the bounded prefetch iterator, and the serial ingest reading volume i+1 while volume i computes."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import pytest

from hrf_batch.io.prefetch import prefetch

WAIT_S = 5.0  # how long a consumer waits for the read-ahead before the test calls it missing


def _counting(n: int, produced: list[int]) -> Iterator[int]:
    for i in range(n):
        produced.append(i)
        yield i


def test_items_arrive_in_order_and_all_of_them() -> None:
    assert list(prefetch(range(50))) == list(range(50))
    assert list(prefetch(iter([]))) == []


def test_the_next_item_is_produced_while_the_caller_holds_one_and_no_more() -> None:
    produced: list[int] = []
    ahead_when_held = []
    for item in prefetch(_counting(6, produced), ahead=1):
        deadline = time.monotonic() + WAIT_S
        while len(produced) < min(item + 2, 6) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.02)  # time to overrun the bound, if it could
        ahead_when_held.append(len(produced) - (item + 1))
    assert ahead_when_held == [1, 1, 1, 1, 1, 0]  # one ahead while computing, never two


def test_a_larger_bound_reads_further_ahead() -> None:
    produced: list[int] = []
    stream = prefetch(_counting(10, produced), ahead=3)
    assert next(stream) == 0
    deadline = time.monotonic() + WAIT_S
    while len(produced) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.02)
    assert len(produced) == 4
    stream.close()


def test_an_exception_from_the_source_arrives_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(source()):
            got.append(item)
    assert got == [1, 2]


def test_leaving_early_stops_the_thread() -> None:
    produced: list[int] = []
    for item in prefetch(_counting(1000, produced), name="early-stop-test"):
        if item == 3:
            break
    assert not any(t.name == "early-stop-test" for t in threading.enumerate())
    assert len(produced) <= 5


def test_ahead_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        next(prefetch(range(3), ahead=0))


# --------------------------------------------------------------------------- the serial ingest


@pytest.fixture(scope="module")
def study_with_a_broken_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic volumes and, between them in discovery order, a .vol file that cannot be read."""
    from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

    study = tmp_path_factory.mktemp("prefetch") / "study"
    write_synthetic_study(study, StudySpec(patients=2, visits=1, bscans=2, width=64, height=64, seed=3))
    vols = sorted(study.rglob("*.vol"))
    (vols[0].parent / (vols[0].stem + "_broken.vol")).write_bytes(b"HSF-OCT-103\x00" + b"\x00" * 40)
    return study


def _settings(db: Path, model: Path) -> Any:
    from hrf_batch.config import load_settings

    return load_settings({"db": str(db), "model": str(model), "device": "cpu", "segmenter": "region",
                          "max_iterations": 1}, env={})


def _stored(db: Path) -> tuple[list[tuple], list[tuple]]:
    with sqlite3.connect(db) as con:
        bscans = con.execute("select v.source_path, v.series_uid, b.bscan_index, b.scores, b.hrf_count, b.mask_png "
                             "from volumes v join runs r on r.volume_pk = v.id join bscans b on b.run_pk = r.id "
                             "order by v.source_path, v.series_uid, b.bscan_index").fetchall()
        errors = con.execute("select path, kind, reason from ingest_errors order by id").fetchall()
    return bscans, errors


def test_ingest_reads_the_next_volume_while_one_computes_and_keeps_order_and_outcomes(
        tmp_path: Path, tiny_model: Path, study_with_a_broken_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hrf_batch import ingest as ingest_mod
    from hrf_batch.io.discover import FileIssue, discover, read_sources

    study = study_with_a_broken_file
    disc = discover(study)
    expected = [item.path if isinstance(item, FileIssue) else item.meta.source_path
                for item in read_sources(disc.sources)]  # the order of a plain serial read
    volume_positions = [i for i, p in enumerate(expected) if not isinstance(p, Path)]
    assert len(expected) == 5 and sum(isinstance(p, Path) for p in expected) == 1

    # the reference: the same ingest without read-ahead
    monkeypatch.setattr(ingest_mod, "prefetch", lambda source, *args, **kwargs: iter(source))
    reference = ingest_mod.ingest_study(study, _settings(tmp_path / "plain.sqlite", tiny_model), progress=False)
    monkeypatch.undo()

    events: list[tuple[str, int]] = []
    read_started: defaultdict[int, threading.Event] = defaultdict(threading.Event)
    real_read, real_process = ingest_mod.read_sources, ingest_mod.process_volume

    def instrumented_read(sources):  # noqa: ANN001, ANN202 - same signature as read_sources
        items = real_read(sources)
        k = 0
        while True:
            events.append(("read", k))
            read_started[k].set()
            try:
                item = next(items)
            except StopIteration:
                return
            yield item
            k += 1

    computed = [0]
    order: list[str] = []

    def instrumented_process(volume, ctx, progress):  # noqa: ANN001, ANN202 - same signature as process_volume
        i = volume_positions[computed[0]]
        read_started[i + 1].wait(WAIT_S)  # read-ahead: item i+1 is being read while item i computes
        outcome = real_process(volume, ctx, progress)
        events.append(("computed", i))
        computed[0] += 1
        return outcome

    def record_issue(store, issue, batch_id):  # noqa: ANN001, ANN202 - same signature as record_issue
        order.append(str(issue.path))
        return real_record(store, issue, batch_id)

    real_record = ingest_mod.record_issue
    monkeypatch.setattr(ingest_mod, "read_sources", instrumented_read)
    monkeypatch.setattr(ingest_mod, "process_volume", instrumented_process)
    monkeypatch.setattr(ingest_mod, "record_issue", record_issue)
    seen: list[str] = []
    summary = ingest_mod.ingest_study(study, _settings(tmp_path / "ahead.sqlite", tiny_model), progress=False,
                                      on_volume=lambda path: seen.append(path))

    for kind, i in events:
        if kind == "computed":
            assert events.index(("read", i + 1)) < events.index(("computed", i)), events
    assert computed[0] == 4
    assert seen == [p for p in expected if not isinstance(p, Path)]
    assert order[len(disc.issues):] == [str(p) for p in expected if isinstance(p, Path)]
    assert (summary.processed, summary.failed, summary.hrf_count, summary.bscans, summary.failures) == (
        reference.processed, reference.failed, reference.hrf_count, reference.bscans, reference.failures)
    assert (summary.processed, summary.failed) == (4, 1)
    assert _stored(tmp_path / "ahead.sqlite") == _stored(tmp_path / "plain.sqlite")
