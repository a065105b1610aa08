"""`hrf-batch ingest --ray`: a local 2-actor Ray cluster writing to PostgreSQL stores what a serial ingest stores,
an actor that dies mid-study has its file computed by another, and what cannot work is refused before it starts.

The reference is a serial ingest of the small synthetic study (two HEYEX .vol files and two DICOM series) into a
SQLite database of its own, with the lesion filter and the retina band off so that the tiny random model's B-scans
do give lesions to compare.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from hrf_batch.cli import main
from hrf_batch.cluster import TEST_EXIT_AT, database_for_workers, plan_actors
from hrf_batch.errors import HrfBatchError

from conftest import SMALL_STUDY_VOLUMES, small_study_ingest_args
from conftest_store import TABLES, row_counts, stored_rows

N_VOLUMES = SMALL_STUDY_VOLUMES


def _ingest(study: Path, url: str, model: Path, *extra: str) -> Any:
    return CliRunner().invoke(main, [*small_study_ingest_args(study, url, model), "--ray", "local", "--workers", "2",
                                     *extra])


@pytest.mark.slow
def test_two_ray_actors_on_postgresql_store_what_a_serial_ingest_stores(pg_cluster: Any, small_study: Path,
                                                                         tiny_model: Path, serial_url: str) -> None:
    url = pg_cluster.create_database()
    result = _ingest(small_study, url, tiny_model)
    assert result.exit_code == 0, result.output
    assert f"volumes: {N_VOLUMES} processed, 0 already done (skipped), 0 failed" in result.output
    assert "files not OCT (skipped): 7" in result.output  # the ground-truth files, as the serial ingest counts them
    reference = stored_rows(serial_url)
    assert sum(len(v["lesions"]) for v in reference.values()) > 0
    assert stored_rows(url) == reference

    again = _ingest(small_study, url, tiny_model)  # the resume rule is the serial one
    assert again.exit_code == 0, again.output
    assert f"volumes: 0 processed, {N_VOLUMES} already done (skipped), 0 failed" in again.output


@pytest.mark.slow
def test_an_actor_that_dies_has_its_file_computed_by_another_and_the_study_completes(
        pg_cluster: Any, small_study: Path, tiny_model: Path, serial_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    doomed = sorted(small_study.rglob("*.vol"))
    url = pg_cluster.create_database()
    monkeypatch.setenv(TEST_EXIT_AT, ",".join(p.name for p in doomed))  # both actors die on their first file
    result = _ingest(small_study, url, tiny_model)
    assert result.exit_code == 0, result.output
    assert f"volumes: {N_VOLUMES} processed, 0 already done (skipped), 0 failed" in result.output
    assert stored_rows(url) == stored_rows(serial_url)  # no B-scan twice, none missing
    assert row_counts(url, ("ingest_errors",)) == {"ingest_errors": 7}  # only the ground-truth files


def _actor_pids() -> list[int]:
    """Processes of this user whose command line names the ingest actor."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:  # ended meanwhile
                continue
            if b"IngestWorker" in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_an_actor_killed_while_computing_leaves_no_duplicate_and_no_missing_bscan(
        pg_cluster: Any, small_study: Path, tiny_model: Path, serial_url: str) -> None:
    url = pg_cluster.create_database()
    killed: list[int] = []

    def kill_one_computing_actor() -> None:
        """SIGKILL one actor as soon as a volume is claimed ('running' in the database) and actors are up."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            try:
                running = row_counts(url, ("runs",))["runs"] > 0
            except SQLAlchemyError:  # the schema is not made yet: look again
                running = False
            pids = _actor_pids()
            if running and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_computing_actor, daemon=True)
    killer.start()
    result = _ingest(small_study, url, tiny_model)
    killer.join(5)
    assert killed, "no actor was seen computing: the test did not kill anything"
    assert result.exit_code == 0, result.output
    counts = re.search(r"volumes: (\d+) processed, (\d+) already done \(skipped\), (\d+) failed", result.output)
    assert counts, result.output
    processed, done, failed = map(int, counts.groups())  # killed after its commit, the retry finds the volume done
    assert (processed + done, failed) == (N_VOLUMES, 0), result.output
    assert stored_rows(url) == stored_rows(serial_url)
    assert row_counts(url, TABLES)["runs"] == N_VOLUMES


def test_sqlite_is_refused_for_a_cluster_of_several_machines(tmp_path: Path) -> None:
    with pytest.raises(HrfBatchError) as info:
        database_for_workers(str(tmp_path / "study.sqlite"), nodes=2)
    assert "SQLite cannot be written safely from several machines" in info.value.problem
    assert "postgresql://" in info.value.hint
    one_machine = database_for_workers("relative.sqlite", nodes=1)
    assert one_machine == f"sqlite:///{Path('relative.sqlite').resolve()}"  # actors may start in another folder
    assert database_for_workers("postgresql://u:secret@db:5432/s", nodes=3) == "postgresql+psycopg://u:secret@db:5432/s"
    with pytest.raises(HrfBatchError, match="in-memory"):
        database_for_workers("sqlite://", nodes=1)


def test_one_actor_per_gpu_on_cuda_else_per_cpu_and_never_more_than_the_cluster_has() -> None:
    assert plan_actors({"CPU": 16.0, "GPU": 2.0}, "auto", None) == plan_actors({"CPU": 16.0, "GPU": 2.0}, "cuda", None)
    gpu = plan_actors({"CPU": 16.0, "GPU": 2.0}, "cuda", None)
    assert (gpu.actors, gpu.num_gpus, gpu.device) == (2, 1.0, "cuda")
    cpu = plan_actors({"CPU": 16.0, "GPU": 2.0}, "cpu", 3)
    assert (cpu.actors, cpu.num_cpus, cpu.num_gpus, cpu.device) == (3, 1.0, 0.0, "cpu")
    assert plan_actors({"CPU": 4.0}, "auto", None).actors == 4
    with pytest.raises(HrfBatchError, match="has none"):
        plan_actors({"CPU": 4.0}, "cuda", None)
    with pytest.raises(HrfBatchError, match="more actors than the cluster's 4 CPU slots"):
        plan_actors({"CPU": 4.0}, "cpu", 5)


def test_an_unreachable_cluster_is_a_one_line_error(tmp_path: Path, small_study: Path, tiny_model: Path) -> None:
    db = tmp_path / "never.sqlite"
    result = CliRunner().invoke(main, ["ingest", str(small_study), "--db", str(db), "--model", str(tiny_model),
                                       "--ray", "127.0.0.1:1", "--quiet"])
    assert result.exit_code == 1, result.output
    assert "cannot join the Ray cluster at '127.0.0.1:1'" in result.output and "Traceback" not in result.output
    assert not db.exists()


def test_devices_are_for_local_workers_not_for_ray(small_study: Path, tiny_model: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["ingest", str(small_study), "--db", str(tmp_path / "d.sqlite"), "--ray", "local",
                                       "--devices", "0"])
    assert result.exit_code == 2 and "--devices is for --workers on this machine" in result.output


@pytest.fixture
def ray_head(tmp_path: Path) -> Any:
    """A Ray cluster started by `ray start --head` with a token of its own, as on a real head machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}", token
    finally:
        subprocess.run([ray_cli, "stop"], capture_output=True, timeout=120, check=False)


@pytest.mark.slow
def test_a_cluster_started_with_ray_start_is_joined_by_address_with_its_token_and_refused_without(
        ray_head: Any, pg_cluster: Any, small_study: Path, tiny_model: Path, serial_url: str) -> None:
    address, token = ray_head
    url = pg_cluster.create_database()
    cmd = [str(Path(sys.executable).with_name("hrf-batch")), *small_study_ingest_args(small_study, url, tiny_model),
           "--ray", address]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    refused = subprocess.run(cmd, env={**env, "RAY_AUTH_TOKEN": "0" * 64}, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"cannot join the Ray cluster at '{address}'" in refused.stderr and "token" in refused.stderr
    engine = create_engine(url)
    try:
        assert inspect(engine).get_table_names() == []  # refused before the database was touched
    finally:
        engine.dispose()

    joined = subprocess.run(cmd, env={**env, "RAY_AUTH_TOKEN": token}, capture_output=True, text=True, timeout=300)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    assert f"volumes: {N_VOLUMES} processed, 0 already done (skipped), 0 failed" in joined.stdout
    assert stored_rows(url) == stored_rows(serial_url)
