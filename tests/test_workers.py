"""`hrf-batch ingest --workers N`: the same rows as a serial ingest, reruns, a worker that dies, bad --devices.

The reference is a serial ingest of the same small synthetic study (two HEYEX .vol files and two DICOM
series) into its own SQLite database; the lesion filter and the retina band are off so that the tiny
random model's B-scans do give lesions to compare.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hrf_batch.cli import EXIT_PARTIAL, main
from hrf_batch.config import Settings
from hrf_batch.workers import TEST_EXIT_AT, worker_device

from conftest import SMALL_STUDY_VOLUMES, small_study_ingest_args
from conftest_store import TABLES, row_counts, stored_rows

N_VOLUMES = SMALL_STUDY_VOLUMES


def _ingest(study: Path, url: str, model: Path, *extra: str) -> Any:
    return CliRunner().invoke(main, [*small_study_ingest_args(study, url, model), *extra])


def test_two_workers_store_what_a_serial_ingest_stores(store_url: str, small_study: Path, tiny_model: Path,
                                                       serial_url: str) -> None:
    result = _ingest(small_study, store_url, tiny_model, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert f"volumes: {N_VOLUMES} processed, 0 already done (skipped), 0 failed" in result.output
    assert "files not OCT (skipped): 7" in result.output  # the ground-truth files, as the serial ingest counts them
    reference = stored_rows(serial_url)
    assert len(reference) == N_VOLUMES and sum(len(v["lesions"]) for v in reference.values()) > 0
    assert stored_rows(store_url) == reference


def test_a_rerun_with_workers_after_a_serial_ingest_skips_everything(small_study: Path, tiny_model: Path,
                                                                     serial_url: str) -> None:
    before = row_counts(serial_url, TABLES)
    result = _ingest(small_study, serial_url, tiny_model, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert f"volumes: 0 processed, {N_VOLUMES} already done (skipped), 0 failed" in result.output
    assert row_counts(serial_url, TABLES) == before


def test_a_worker_that_dies_fails_only_its_file_and_the_next_ingest_completes_the_study(
        tmp_path: Path, small_study: Path, tiny_model: Path, serial_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    doomed = sorted(small_study.rglob("*.vol"))[0]
    url = f"sqlite:///{tmp_path / 'killed.sqlite'}"
    monkeypatch.setenv(TEST_EXIT_AT, doomed.name)  # the worker handed this file ends with exit code 9
    result = _ingest(small_study, url, tiny_model, "--workers", "2")
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert f"volumes: {N_VOLUMES - 1} processed, 0 already done (skipped), 1 failed" in result.output
    failed = re.search(r"FAILED (.*?): (.*)", result.output)
    assert failed and failed.group(1) == str(doomed), result.output
    assert "worker process computing it ended with exit code 9" in failed.group(2)
    assert "run the ingest again" in failed.group(2)
    assert row_counts(url, ("ingest_errors",)) == {"ingest_errors": 7 + 1}

    monkeypatch.delenv(TEST_EXIT_AT)
    again = _ingest(small_study, url, tiny_model, "--workers", "2")
    assert again.exit_code == 0, again.output
    assert f"volumes: 1 processed, {N_VOLUMES - 1} already done (skipped), 0 failed" in again.output
    assert stored_rows(url) == stored_rows(serial_url)  # no B-scan twice, none missing


@pytest.mark.parametrize(("devices", "message"), [
    ("0,x", "is not a comma-separated list of CUDA device numbers"),
    ("0,-1", "has a negative device number"),
    ("0", "names CUDA devices but CUDA is not available here"),
])
def test_bad_devices_are_refused_before_anything_runs(tmp_path: Path, small_study: Path, tiny_model: Path, devices: str,
                                                      message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    db = tmp_path / "never.sqlite"
    result = _ingest(small_study, str(db), tiny_model, "--workers", "2", "--devices", devices)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not db.exists()


def test_devices_go_round_robin_and_without_them_every_worker_uses_the_settings_device() -> None:
    settings = Settings(device="cpu")
    assert [worker_device(settings, i, [0, 1]) for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [worker_device(settings, i, None) for i in range(2)] == ["cpu", "cpu"]


def test_a_worker_that_cannot_load_the_model_stops_the_ingest_with_its_message(tmp_path: Path, small_study: Path) -> None:
    result = _ingest(small_study, str(tmp_path / "db.sqlite"), tmp_path / "no-model", "--workers", "2")
    assert result.exit_code == 1, result.output
    assert "stopped: model folder not found" in result.output and "Traceback" not in result.output


def test_sources_left_when_every_worker_has_died_are_failed_not_lost(tmp_path: Path, small_study: Path, tiny_model: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first_two = [p.name for p in sorted(small_study.rglob("*.vol"))]  # discovery order: each worker's first source
    monkeypatch.setenv(TEST_EXIT_AT, ",".join(first_two))
    result = _ingest(small_study, str(tmp_path / "db.sqlite"), tiny_model, "--workers", "2")
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert "volumes: 0 processed, 0 already done (skipped), 4 failed" in result.output
    assert result.output.count("every worker process had ended") == 2
    assert result.output.count("ended with exit code 9") == 2


def test_a_worker_whose_pipe_ended_one_step_before_its_process_still_fails_its_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end of a worker is seen in two steps (its pipe, then its exit code); the source it held is recorded
    even when the process is reaped after the step that saw the pipe end."""
    from types import SimpleNamespace

    from tqdm import tqdm

    from hrf_batch import workers
    from hrf_batch.ingest import IngestSummary
    from hrf_batch.io.discover import Source
    from hrf_batch.store import open_store

    monkeypatch.setattr(workers, "wait", lambda *_args, **_kw: [])  # nothing new this step
    source = Source("heyex-vol", (tmp_path / "a.vol",))
    process = SimpleNamespace(exitcode=9, sentinel=object())  # reaped since the last step
    worker = workers._Worker(job=None, process=process, conn=object(), holding=source, eof=True)  # type: ignore[arg-type]
    summary = IngestSummary(batch_id="b")
    with open_store(str(tmp_path / "db.sqlite")) as store, tqdm(disable=True) as bar:
        driver = workers._Driver([], [], store, summary, bar)
        driver.workers = [worker]
        driver._step()
    assert summary.failed == 1 and summary.failures[0][0] == str(source.path)
    assert "ended with exit code 9" in summary.failures[0][1]
    assert driver._ended(worker)
