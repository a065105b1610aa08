"""Shared test fixtures: the real OCT files in ../shared/fixtures and small synthetic volumes."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["conftest_store"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(autouse=True, scope="session")
def _two_torch_threads():
    """The test machines have two cores; keep torch from spawning more threads than that."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The real third-party OCT files; fail loudly (never skip) when they are missing."""
    if not (SHARED_FIXTURES / "PROVENANCE.md").is_file():
        pytest.fail(
            f"real OCT fixtures not found at {SHARED_FIXTURES}: the tests expect the shared fixtures "
            "folder beside the project checkout (../shared/fixtures)"
        )
    return SHARED_FIXTURES


def make_test_volume(
    n: int = 3, height: int = 40, width: int = 64, *, eye: str = "OD", seed: int = 0, fmt: str = "heyex-vol"
):
    """A small Volume with known metadata and pixels, for writer/reader round trips."""
    from datetime import date, datetime

    import numpy as np

    from hrf_batch.io.volume import BScanPosition, Spacing, Volume, VolumeMeta

    rng = np.random.default_rng(seed)
    bscans = rng.integers(0, 256, size=(n, height, width)).astype(np.float32)
    localizer = rng.integers(0, 256, size=(80, 80)).astype(np.float32)
    spacing = Spacing(lateral_mm=0.01182, axial_mm=0.00387, between_bscans_mm=0.12 if n > 1 else 0.0)
    positions = tuple(
        BScanPosition((0.2, 0.3 + i * spacing.between_bscans_mm), (0.2 + width * spacing.lateral_mm, 0.3 + i * spacing.between_bscans_mm))
        for i in range(n)
    )
    meta = VolumeMeta(
        source_path="", source_sha256="", source_format=fmt, series_uid="S1", patient_id="P012", eye=eye,
        visit_date=date(2024, 3, 5), acquired_at=datetime(2024, 3, 5, 9, 41, 7), device="Heidelberg Engineering Spectralis",
        scan_pattern="volume" if n > 1 else "line", spacing=spacing, positions=positions,
        localizer_spacing_mm=(0.0118, 0.0118), birth_date=date(1950, 6, 1), patient_name="Jane Roe",
    )
    return Volume(bscans=bscans, meta=meta, localizer=localizer)


def save_tiny_model(folder: Path, *, threshold: float = 0.0, seed: int = 0) -> Path:
    """A random-initialised tiny CCT written through the real model writer (threshold 0: every B-scan runs)."""
    import torch

    from hrf_batch.model.files import ModelConfig, save_model
    from hrf_batch.model.nets import build_preset

    torch.manual_seed(seed)
    model = build_preset("cct-tiny", "binary").eval()
    config = ModelConfig.for_model(model, norm_mean=40.0, norm_std=50.0, preset="cct-tiny", metrics={"threshold": threshold})
    save_model(model, config, folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised tiny CCT saved through the real model-file writer."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


#: A study small enough to ingest several times in one test module: both eyes of 2 patients at 1 visit.
SMALL_STUDY_SPEC_ARGS = {"patients": 2, "visits": 1, "bscans": 3, "width": 64, "height": 64}
SMALL_STUDY_VOLUMES = 4


@pytest.fixture(scope="module")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic study of :data:`SMALL_STUDY_VOLUMES` volumes (HEYEX .vol files and DICOM series)."""
    from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

    folder = tmp_path_factory.mktemp("study") / "study"
    write_synthetic_study(folder, StudySpec(**SMALL_STUDY_SPEC_ARGS))
    return folder


#: Ingest settings for the small study: the lesion filter and the retina band off, so that the tiny random
#: model's B-scans do give lesions to compare between ingests.
SMALL_STUDY_FLAGS = {"model": None, "device": "cpu", "segmenter": "region", "max_iterations": 2, "lesion_filter": False,
                     "retina_band": False}


def small_study_ingest_args(study: Path, url: str, model: Path) -> list[str]:
    """`hrf-batch ingest` arguments with :data:`SMALL_STUDY_FLAGS`."""
    return ["ingest", str(study), "--db", url, "--model", str(model), "--device", "cpu", "--segmenter", "region",
            "--max-iterations", "2", "--no-lesion-filter", "--no-retina-band", "--quiet"]


@pytest.fixture(scope="module")
def serial_url(tmp_path_factory: pytest.TempPathFactory, small_study: Path, tiny_model: Path) -> str:
    """A serial ingest of the small study into a SQLite database of its own: the reference for the worker and Ray
    ingests."""
    from hrf_batch.config import load_settings
    from hrf_batch.ingest import ingest_study

    url = f"sqlite:///{tmp_path_factory.mktemp('serial') / 'serial.sqlite'}"
    settings = load_settings({**SMALL_STUDY_FLAGS, "model": str(tiny_model), "db": url}, env={})
    summary = ingest_study(small_study, settings, progress=False)
    assert (summary.processed, summary.failed) == (SMALL_STUDY_VOLUMES, 0)
    return url


#: Training settings small enough for tests on two cores.
TINY_TRAIN = dict(preset="cct-tiny", batch_size=4, device="cpu", max_lr=3e-3)


@pytest.fixture(scope="module")
def train_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic study of 96x64 B-scans to train on."""
    from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

    root = tmp_path_factory.mktemp("study")
    write_synthetic_study(root, StudySpec(patients=4, visits=1, bscans=3, width=96, height=64, seed=3))
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two shared cores: one torch thread is several times faster than two fighting ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def readme_queries() -> list[str]:
    """The SQL examples of the README, as written there (statements of its ```sql blocks)."""
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    queries = [q.strip() for block in readme.split("```sql")[1:] for q in block.split("```")[0].split(";") if q.strip()]
    assert len(queries) >= 2, "the README lost its SQL examples"
    return queries
